"""Transcript clean-up as upstream Higgs Audio v2 does it (boson-ai/higgs-audio examples/generation.py).

Prompts should reach the model in the same shape upstream gives them, so every rule, and the order the
rules run in, follows upstream exactly; changing either changes the text the model is conditioned on.
"""

from __future__ import annotations

import re

# Upstream's normalize_chinese_punctuation table, in its order. "，" gains a trailing space so the
# following word does not run into the comma; the whitespace pass later removes any doubled space.
_FULL_WIDTH_PUNCTUATION: tuple[tuple[str, str], ...] = (
    ("，", ", "),
    ("。", "."),
    ("：", ":"),
    ("；", ";"),
    ("？", "?"),
    ("！", "!"),
    ("（", "("),
    ("）", ")"),
    ("【", "["),
    ("】", "]"),
    ("《", "<"),
    ("》", ">"),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
    ("、", ","),
    ("—", "-"),
    ("…", "..."),
    ("·", "."),
    ("「", '"'),
    ("」", '"'),
    ("『", '"'),
    ("』", '"'),
)

# Upstream's ad-hoc symbol rules ("will be improved in the future" there). They run after the table
# above so full-width parentheses are caught too.
_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("(", " "),
    (")", " "),
    ("°F", " degrees Fahrenheit"),
    ("°C", " degrees Celsius"),
)

# Plain-text event tags rewritten into the <SE...> markup the model was trained on. <SE> is a one-off
# event, <SE_s>/<SE_e> open and close a sustained one. Upstream's order is kept even though no tag
# currently overlaps another, so that adding one later cannot silently change results.
SOUND_EVENT_TAGS: tuple[tuple[str, str], ...] = (
    ("[laugh]", "<SE>[Laughter]</SE>"),
    ("[humming start]", "<SE>[Humming]</SE>"),
    ("[humming end]", "<SE_e>[Humming]</SE_e>"),
    ("[music start]", "<SE_s>[Music]</SE_s>"),
    ("[music end]", "<SE_e>[Music]</SE_e>"),
    ("[music]", "<SE>[Music]</SE>"),
    ("[sing start]", "<SE_s>[Singing]</SE_s>"),
    ("[sing end]", "<SE_e>[Singing]</SE_e>"),
    ("[applause]", "<SE>[Applause]</SE>"),
    ("[cheering]", "<SE>[Cheering]</SE>"),
    ("[cough]", "<SE>[Cough]</SE>"),
)

# Endings upstream accepts as already closed; upstream appends "." to anything else, so every prompt
# ends on closing punctuation or an event tag.
CLOSING_ENDINGS: tuple[str, ...] = (".", "!", "?", ",", ";", '"', "'", "</SE_e>", "</SE>")

_SPEAKER_TAG = re.compile(r"\[(SPEAKER\d+)\]")


def _replace_all(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _collapse_whitespace(text: str) -> str:
    """Drop blank lines, squeeze whitespace runs inside each line to one space, strip the ends."""
    lines = (" ".join(line.split()) for line in text.split("\n") if line.strip())
    return "\n".join(lines).strip()


def normalize_transcript(text: str) -> str:
    """Normalise a transcript exactly as upstream's generation script does before synthesis.

    Steps, in order: full-width punctuation to ASCII, parentheses to spaces, °F/°C spelled out,
    sound-event tags to <SE> markup, whitespace collapsed per line, and a closing "." appended when the
    text does not already end in accepted punctuation or an event tag.

    Deviation from upstream: text that is empty after the whitespace step returns "" rather than ".",
    so an empty request stays recognisably empty for the caller to reject instead of becoming a
    one-character prompt.
    """
    text = _replace_all(text, _FULL_WIDTH_PUNCTUATION)
    text = _replace_all(text, _SYMBOLS)
    text = _replace_all(text, SOUND_EVENT_TAGS)
    text = _collapse_whitespace(text)
    if text and not text.endswith(CLOSING_ENDINGS):
        text += "."
    return text


def speaker_tags(text: str) -> list[str]:
    """Sorted unique speaker tags such as "SPEAKER0" found as "[SPEAKERn]" in `text`.

    Sorting is plain string order, as upstream's `sorted(set(...))`, so "SPEAKER10" precedes
    "SPEAKER2". Upstream reads the tags from the raw transcript, before normalisation.
    """
    return sorted(set(_SPEAKER_TAG.findall(text)))
