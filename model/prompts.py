"""Request -> conversation in upstream Higgs Audio v2's prompt layout (examples/generation.py).

The conversation uses transformers' message format (system, scene, user, assistant with audio items) and is
rendered by the checkpoint's chat template. Audio items carry an index into the request's references, in the
order their placeholders appear in the rendered text.

One difference from upstream comes from the released chat template itself: it always puts a blank line after
the first text item of a scene, so speakers described with audio in the scene and no scene prompt render as
"SPEAKER0:\n\n <audio>" where upstream wrote "SPEAKER0: <audio>". With a scene prompt, or with profiles only,
the layout is upstream's exactly. Upstream also omits the system turn for a clone without a scene prompt; the
template requires one, so the default system message is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from model.normalize import normalize_transcript, speaker_tags
from model.requests import Reference, RequestError, SynthesisRequest

DEFAULT_SYSTEM_MESSAGE = "Generate audio following instruction."
MULTISPEAKER_SYSTEM_MESSAGE = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate speech for the "
    "following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
# Upstream alternates these when a dialogue has no voices.
SMART_VOICE_DESCRIPTIONS = ("feminine", "masculine")


@dataclass
class Conversation:
    messages: list[dict]
    # The audio placeholders in the order they appear in the rendered text: ("reference", i) for
    # request.references[i], ("context", j) for request.context[j].
    audio_order: list[tuple[str, int]]


def load_profiles(path: str | Path) -> dict[str, str]:
    """Voice profiles from an upstream-style profile.yaml ({profiles: {name: description}})."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    profiles = data.get("profiles", data)
    if not isinstance(profiles, dict):
        raise ValueError(f"{path}: expected a mapping of profile names to descriptions")
    return {str(k): str(v).strip() for k, v in profiles.items()}


def _speaker_label(ref: Reference, index: int) -> str:
    return ref.speaker_tag or f"SPEAKER{index}"


def _audio(index: int, kind: str = "reference") -> dict:
    return {"type": "audio", kind: index}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def control_tokens(tokenizer) -> re.Pattern[str]:
    """The tokenizer's special tokens (<|eot_id|>, <|AUDIO_OUT|>, Llama 3's reserved ones, ...) as one
    pattern, longest first."""
    tokens = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    if not tokens:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def check_control_tokens(request: SynthesisRequest, pattern: re.Pattern[str]) -> None:
    """Refuse text that holds a special token: the template would take it for structure (a turn's end, a
    header), and an audio placeholder for a clip that is not there."""
    fields = [
        ("text", request.text),
        ("system_prompt", request.system_prompt),
        ("scene_prompt", request.scene_prompt),
    ]
    for i, ref in enumerate(request.references):
        fields += [
            (f"references[{i}].transcript", ref.transcript),
            (f"references[{i}].profile", ref.profile),
            (f"references[{i}].speaker_tag", ref.speaker_tag),
        ]
    fields += [(f"context[{j}].text", turn.text) for j, turn in enumerate(request.context)]
    for name, value in fields:
        found = pattern.search(value) if value else None
        if found:
            raise RequestError(
                name,
                f"holds the model's control token {found.group()}, which would change the prompt; remove it",
                value,
            )


def build_conversation(request: SynthesisRequest) -> Conversation:
    text = normalize_transcript(request.text)
    if not text:
        raise RequestError("text", "is empty after normalisation", request.text)
    refs = request.references
    in_scene = request.references_in_scene or any(r.profile is not None for r in refs)
    messages: list[dict] = []
    audio_order: list[tuple[str, int]] = []

    if refs and in_scene:
        system = request.system_prompt or DEFAULT_SYSTEM_MESSAGE
        items = [_text(request.scene_prompt)] if request.scene_prompt else []
        for i, ref in enumerate(refs):
            label = _speaker_label(ref, i)
            if ref.profile is not None:
                items.append(_text(f"{label}: {ref.profile}"))
            else:
                items += [_text(f"{label}:"), _audio(i)]
                audio_order.append(("reference", i))
        messages.append({"role": "system", "content": system})
        if all(item["type"] == "text" for item in items):
            # A plain string renders exactly as upstream's joined scene text.
            scene = items[0]["text"] + "\n\n" if request.scene_prompt else ""
            scene += "\n".join(item["text"] for item in items[1 if request.scene_prompt else 0 :])
            messages.append({"role": "scene", "content": scene})
        else:
            messages.append({"role": "scene", "content": items})
    elif refs:
        messages.append({"role": "system", "content": request.system_prompt or DEFAULT_SYSTEM_MESSAGE})
        if request.scene_prompt:
            messages.append({"role": "scene", "content": request.scene_prompt})
        for i, ref in enumerate(refs):
            transcript = normalize_transcript(ref.transcript) if ref.transcript else ""
            prefix = f"[{_speaker_label(ref, i)}] " if len(refs) > 1 else ""
            messages.append({"role": "user", "content": prefix + transcript})
            messages.append({"role": "assistant", "content": [_audio(i)]})
            audio_order.append(("reference", i))
    else:
        tags = speaker_tags(request.text)
        if len(tags) > 1:
            voices = "\n".join(f"{tag}: {SMART_VOICE_DESCRIPTIONS[i % 2]}" for i, tag in enumerate(tags))
            scene = f"{request.scene_prompt}\n\n{voices}" if request.scene_prompt else voices
            messages.append(
                {"role": "system", "content": request.system_prompt or MULTISPEAKER_SYSTEM_MESSAGE}
            )
            messages.append({"role": "scene", "content": scene})
        else:
            messages.append({"role": "system", "content": request.system_prompt or DEFAULT_SYSTEM_MESSAGE})
            if request.scene_prompt:
                messages.append({"role": "scene", "content": request.scene_prompt})

    for j, turn in enumerate(request.context):
        messages.append({"role": "user", "content": normalize_transcript(turn.text)})
        messages.append({"role": "assistant", "content": [_audio(j, "context")]})
        audio_order.append(("context", j))
    messages.append({"role": "user", "content": text})
    return Conversation(messages=messages, audio_order=audio_order)


def render(conversation: Conversation, processor) -> str:
    """The prompt text, with one <|AUDIO_OUT|> placeholder per reference clip, ending in <|audio_out_bos|>."""
    return processor.apply_chat_template(conversation.messages, tokenize=False, add_generation_prompt=True)
