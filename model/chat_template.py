"""The chat template of the transformers-format Higgs Audio v2 checkpoints, for the tiny checkpoint.

It renders the same text as the template shipped with the released processor: a required system turn, an
optional `scene` turn folded into the system turn between <|scene_desc_start|> and <|scene_desc_end|> (audio
items there become ` <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>`), user turns of text only, assistant turns
of audio only, and a generation prompt that forces audio with <|audio_out_bos|>.
"""

CHAT_TEMPLATE = """{{- bos_token -}}
{%- if not messages or messages[0]['role'] != 'system' -%}
{{- raise_exception('A system message is required but not provided!') -}}
{%- endif -%}
{%- macro text_of(content) -%}
{%- if content is string -%}{{- content | trim -}}
{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + text_of(messages[0]['content']) -}}
{%- set rest = messages[1:] -%}
{%- if rest and rest[0]['role'] == 'scene' -%}
{{- '\\n\\n<|scene_desc_start|>\\n' -}}
{%- set scene = rest[0]['content'] -%}
{%- if scene is string -%}{{- scene | trim -}}
{%- else -%}
{%- for item in scene -%}
{%- if item['type'] == 'text' -%}
{{- item['text'] | trim -}}
{%- if loop.first and not loop.last -%}{{- '\\n\\n' -}}
{%- elif not loop.first and not loop.last and scene[loop.index]['type'] != 'audio' -%}{{- '\\n' -}}
{%- endif -%}
{%- elif item['type'] == 'audio' -%}
{{- ' <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}
{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '\\n<|scene_desc_end|>' -}}
{%- set rest = rest[1:] -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for message in rest -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{%- if message['role'] == 'assistant' -%}
{%- if message['content'] is string or message['content'][0]['type'] != 'audio' -%}
{{- raise_exception('Assistant messages must contain audio content only!') -}}
{%- endif -%}
{{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}
{%- else -%}
{%- if message['content'] is not string -%}
{%- for item in message['content'] if item['type'] == 'audio' -%}
{{- raise_exception('User messages cannot contain audio content!') -}}
{%- endfor -%}
{%- endif -%}
{{- text_of(message['content']) -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' -}}
{%- endif -%}"""
