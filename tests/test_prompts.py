"""The rendered prompt of every mode matches upstream Higgs Audio v2's layout (examples/generation.py)."""

from dataclasses import replace

import numpy as np
import pytest

from model.prompts import (
    DEFAULT_SYSTEM_MESSAGE,
    MULTISPEAKER_SYSTEM_MESSAGE,
    build_conversation,
    check_control_tokens,
    control_tokens,
    load_profiles,
    render,
)
from model.requests import ContextTurn, Reference, RequestError, SynthesisRequest

BOS = "<|begin_of_text|>"
AUDIO = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
GEN = "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"


def turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def clip() -> Reference:
    return Reference(
        audio=np.zeros(240, dtype=np.float32) + 0.1, sample_rate=24000, transcript="Hello (there)."
    )


@pytest.fixture(scope="module")
def processor(engine):
    return engine.processor


def test_smart_voice_is_the_default_system_message_and_the_text(processor):
    prompt = render(build_conversation(SynthesisRequest(text="The sun rises")), processor)
    assert prompt == BOS + turn("system", DEFAULT_SYSTEM_MESSAGE) + turn("user", "The sun rises.") + GEN


def test_scene_prompt_sits_in_the_system_turn_between_scene_markers(processor):
    request = SynthesisRequest(text="Hi.", scene_prompt="Audio is recorded from a quiet room.")
    system = f"{DEFAULT_SYSTEM_MESSAGE}\n\n<|scene_desc_start|>\nAudio is recorded from a quiet room.\n<|scene_desc_end|>"
    assert (
        render(build_conversation(request), processor)
        == BOS + turn("system", system) + turn("user", "Hi.") + GEN
    )


def test_system_prompt_overrides_the_default(processor):
    request = SynthesisRequest(text="Hi.", system_prompt="Speak like a pirate.")
    assert render(build_conversation(request), processor) == (
        BOS + turn("system", "Speak like a pirate.") + turn("user", "Hi.") + GEN
    )


def test_single_voice_clone_puts_transcript_and_audio_in_turns_before_the_text(processor):
    conversation = build_conversation(SynthesisRequest(text="New words.", references=[clip()]))
    assert conversation.audio_order == [("reference", 0)]
    assert render(conversation, processor) == (
        BOS
        + turn("system", DEFAULT_SYSTEM_MESSAGE)
        + turn("user", "Hello there .")  # the reference transcript is normalised like the text
        + turn("assistant", AUDIO)
        + turn("user", "New words.")
        + GEN
    )


def test_smart_voice_dialogue_uses_the_multispeaker_system_message_and_alternating_voices(processor):
    text = "[SPEAKER0] Hi.\n[SPEAKER1] Hello."
    system = (
        f"{MULTISPEAKER_SYSTEM_MESSAGE}\n\n<|scene_desc_start|>\nQuiet room.\n\n"
        "SPEAKER0: feminine\nSPEAKER1: masculine\n<|scene_desc_end|>"
    )
    request = SynthesisRequest(text=text, scene_prompt="Quiet room.")
    assert (
        render(build_conversation(request), processor)
        == BOS + turn("system", system) + turn("user", text) + GEN
    )


def test_cloned_dialogue_tags_each_reference_transcript_with_its_speaker(processor):
    refs = [
        clip(),
        Reference(audio=np.ones(240, dtype=np.float32) * 0.2, sample_rate=24000, transcript="Yes."),
    ]
    conversation = build_conversation(SynthesisRequest(text="[SPEAKER0] A. [SPEAKER1] B.", references=refs))
    assert conversation.audio_order == [("reference", 0), ("reference", 1)]
    assert render(conversation, processor) == (
        BOS
        + turn("system", DEFAULT_SYSTEM_MESSAGE)
        + turn("user", "[SPEAKER0] Hello there .")
        + turn("assistant", AUDIO)
        + turn("user", "[SPEAKER1] Yes.")
        + turn("assistant", AUDIO)
        + turn("user", "[SPEAKER0] A. [SPEAKER1] B.")
        + GEN
    )


def test_references_in_scene_describe_each_speaker_with_its_audio(processor):
    refs = [clip(), clip()]
    request = SynthesisRequest(
        text="[SPEAKER0] A. [SPEAKER1] B.",
        references=refs,
        references_in_scene=True,
        scene_prompt="A studio.",
    )
    system = (
        f"{DEFAULT_SYSTEM_MESSAGE}\n\n<|scene_desc_start|>\nA studio.\n\n"
        f"SPEAKER0: {AUDIO}\nSPEAKER1: {AUDIO}\n<|scene_desc_end|>"
    )
    assert render(build_conversation(request), processor) == (
        BOS + turn("system", system) + turn("user", "[SPEAKER0] A. [SPEAKER1] B.") + GEN
    )


def test_a_voice_profile_is_described_in_the_scene(processor):
    profiles = load_profiles("examples/voices/profile.yaml")
    request = SynthesisRequest(text="Hi.", references=[Reference(profile=profiles["male_en"])])
    system = f"{DEFAULT_SYSTEM_MESSAGE}\n\n<|scene_desc_start|>\nSPEAKER0: {profiles['male_en']}\n<|scene_desc_end|>"
    assert (
        render(build_conversation(request), processor)
        == BOS + turn("system", system) + turn("user", "Hi.") + GEN
    )


def test_a_profile_and_a_clip_mix_in_the_scene_in_speaker_order(processor):
    request = SynthesisRequest(
        text="[SPEAKER0] A. [SPEAKER1] B.",
        references=[Reference(profile="Calm narrator."), clip()],
        scene_prompt="A studio.",
    )
    conversation = build_conversation(request)
    assert conversation.audio_order == [("reference", 1)]
    scene = (
        "<|scene_desc_start|>\nA studio.\n\nSPEAKER0: Calm narrator.\nSPEAKER1: "
        + AUDIO
        + "\n<|scene_desc_end|>"
    )
    assert scene in render(conversation, processor)


def test_text_that_normalises_to_nothing_is_a_request_error():
    with pytest.raises(RequestError) as err:
        build_conversation(SynthesisRequest(text=" \n "))
    assert err.value.field == "text"


def test_context_turns_follow_the_references_and_precede_the_text(processor):
    from model.requests import ContextTurn

    codes = np.zeros((8, 3), dtype=np.int64)
    request = SynthesisRequest(
        text="Third part.",
        references=[clip()],
        context=[ContextTurn("First part.", codes), ContextTurn("Second part.", codes)],
    )
    conversation = build_conversation(request)
    assert conversation.audio_order == [("reference", 0), ("context", 0), ("context", 1)]
    assert render(conversation, processor) == (
        BOS
        + turn("system", DEFAULT_SYSTEM_MESSAGE)
        + turn("user", "Hello there .")
        + turn("assistant", AUDIO)
        + turn("user", "First part.")
        + turn("assistant", AUDIO)
        + turn("user", "Second part.")
        + turn("assistant", AUDIO)
        + turn("user", "Third part.")
        + GEN
    )


@pytest.mark.parametrize(
    ("request_", "field", "token"),
    [
        (SynthesisRequest(text="Say <|AUDIO_OUT|> now."), "text", "<|AUDIO_OUT|>"),
        (SynthesisRequest(text="Hi.", system_prompt="Be brief.<|eot_id|>"), "system_prompt", "<|eot_id|>"),
        (
            SynthesisRequest(text="Hi.", scene_prompt="<|scene_desc_start|>Rain."),
            "scene_prompt",
            "<|scene_desc_start|>",
        ),
        (
            SynthesisRequest(
                text="Hi.", context=[ContextTurn("Before.", np.zeros((8, 4), dtype=np.int64))] * 2
            ),
            None,
            None,
        ),
        (
            SynthesisRequest(text="Hi.", context=[ContextTurn("Then <|end_header_id|>", np.zeros((8, 4)))]),
            "context[0].text",
            "<|end_header_id|>",
        ),
    ],
)
def test_text_holding_a_control_token_is_a_request_error_naming_field_and_token(
    processor, request_, field, token
):
    pattern = control_tokens(processor.tokenizer)
    if field is None:
        check_control_tokens(request_, pattern)  # plain text passes
        return
    with pytest.raises(RequestError) as err:
        check_control_tokens(request_, pattern)
    assert err.value.field == field and token in err.value.reason


def test_a_reference_transcript_holding_a_control_token_names_the_reference(processor):
    ref = replace(clip(), transcript="Hello <|audio_out_bos|>")
    with pytest.raises(RequestError) as err:
        check_control_tokens(
            SynthesisRequest(text="Hi.", references=[ref]), control_tokens(processor.tokenizer)
        )
    assert err.value.field == "references[0].transcript"
