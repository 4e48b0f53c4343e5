"""How long a text is likely to take to speak, so a row's KV slot reserves about that much instead of its
whole max_new_tokens (EngineOptions.reserve).

The estimate errs long on purpose: a row that outgrows it is generated again from the start with its whole
max_new_tokens (its codes depend only on its request and seed, so they come out the same), which costs more
than the memory a generous estimate holds back.
"""

from __future__ import annotations

import re

# Speaking rates well below read speech, which expressive readings, dialogues and scene prompts slow down:
# the example voices (examples/voices) speak 12-20 characters a second in English, spaces and punctuation
# included, and 2.9 in Sichuanese (Mandarin is read at ~4-5).
ALPHABETIC_CHARS_PER_S = 8.0
SYLLABIC_CHARS_PER_S = 2.0
# Lead-in, breaths and the tail around any text, however short.
PADDING_S = 3.0
# A digit is read as a word or more ("1999": nineteen ninety-nine), so it counts as this many characters.
CHARS_PER_DIGIT = 3

_SPEAKER_TAG = re.compile(r"\[SPEAKER\d+\]")
_SPACES = re.compile(r"\s+")
_DIGIT = re.compile(r"[0-9]")
# Scripts written a syllable per character: CJK ideographs, kana, hangul.
_SYLLABIC = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def estimate_seconds(text: str) -> float:
    """A generous estimate of the seconds `text` takes to speak."""
    text = _SPACES.sub(" ", _SPEAKER_TAG.sub(" ", text)).strip()
    syllabic = len(_SYLLABIC.findall(text))
    alphabetic = len(text) - syllabic + (CHARS_PER_DIGIT - 1) * len(_DIGIT.findall(text))
    return PADDING_S + alphabetic / ALPHABETIC_CHARS_PER_S + syllabic / SYLLABIC_CHARS_PER_S
