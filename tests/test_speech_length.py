"""The speech length a row's KV slot is sized by: generous for real recordings, per script."""

from pathlib import Path

import pytest
import soundfile as sf

from model.speech_length import estimate_seconds

VOICES = Path(__file__).resolve().parents[1] / "examples" / "voices"


@pytest.mark.parametrize("clip", sorted(VOICES.glob("*.wav")), ids=lambda p: p.stem)
def test_the_estimate_is_longer_than_each_example_voice_takes_to_say_its_transcript(clip: Path):
    transcript = clip.with_suffix(".txt").read_text()
    assert estimate_seconds(transcript) > 1.2 * sf.info(clip).duration


def test_a_character_of_a_syllabic_script_counts_longer_than_a_letter():
    assert estimate_seconds("你好世界") > estimate_seconds("abcd")
    assert estimate_seconds("안녕하세요") > estimate_seconds("hello")


def test_a_digit_counts_longer_than_a_letter():
    assert estimate_seconds("In 1999 it cost 4500.") > estimate_seconds("In abcd it cost abcd.")


def test_speaker_tags_and_runs_of_whitespace_are_not_spoken():
    plain = estimate_seconds("Hello there. Hi.")
    assert estimate_seconds("[SPEAKER0] Hello there.\n\n   [SPEAKER1] Hi.") == plain


def test_an_empty_text_still_gets_room_for_lead_in_and_tail():
    assert estimate_seconds("") > 0
