"""Split a chapter's text into generation chunks.

Higgs Audio generates a long text chunk by chunk, each chunk conditioned on the audio of the ones before,
so a chunk is one prompt: long enough to carry natural prosody, short enough to stay within what the model
renders reliably. "word" and "speaker" follow upstream (boson-ai/higgs-audio examples/generation.py,
prepare_chunk_text) so a job can reproduce upstream's output; "sentence" is ours, for audiobooks, where a
chunk cut mid-sentence is audible.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

METHODS: tuple[str, ...] = ("word", "speaker", "sentence")
DEFAULT_WORD_MAX_WORDS = 200  # upstream generation.py's --chunk_max_word_num default
DEFAULT_SENTENCE_MAX_WORDS = 120

# Scripts written without spaces between words, where one character stands in for one word. Hangul is left
# out on purpose: Korean separates words with spaces, so counting syllables would overcount it.
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK = re.compile(f"[{_CJK_CHARS}]")
# One counting unit: a single CJK character or a run of other non-space characters.
_UNIT = re.compile(f"[{_CJK_CHARS}]|[^\\s{_CJK_CHARS}]+")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")

# Western terminators need whitespace (or the end) after them, which keeps "3.14", "U.S.A" and "e.g.x"
# whole; CJK terminators do not, because Chinese and Japanese put no space between sentences. Closing
# quotes and brackets stay with the sentence they close.
_SENTENCE_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]}]*(?=\s|$)"
    r"|[\u3002\uff01\uff1f]+[\"'\u201d\u2019\u300d\u300f\uff09)\u3011\u300b]*"
)
_CLAUSE_END = re.compile(r"[,;](?=\s)|[\uff0c\uff1b\u3001]")

# Words that end in "." without ending the sentence. "etc." and "no." are left out: they end sentences
# as often as not ("he said no.").
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. mx. dr. st. jr. sr. prof. rev. hon. gen. col. capt. lt. sgt. mt. ft. vs. "  # noqa: SIM905
    "e.g. i.e. cf. viz. approx. vol. fig.".split()
)
_LEADING_PUNCTUATION = "\"'([{\u201c\u2018\u00ab"


def count_words(text: str) -> int:
    """Words as the chunkers count them: each CJK character, plus each other whitespace-separated run
    holding at least one letter or digit (a lone dash or "* * *" costs nothing)."""
    cjk = len(_CJK.findall(text))
    others = _CJK.sub(" ", text).split()
    return cjk + sum(1 for token in others if any(ch.isalnum() for ch in token))


def chunk_words(text: str, max_words: int = DEFAULT_WORD_MAX_WORDS) -> list[str]:
    """Upstream's "word" method: paragraphs on "\\n\\n", each cut into runs of at most `max_words`
    space-separated words, the last chunk of every paragraph suffixed with "\\n\\n" as upstream does.

    Deviations from upstream: whitespace-only paragraphs are skipped rather than sent as empty prompts,
    and CJK paragraphs count each CJK character as a word (see below).
    """
    _check_positive("max_words", max_words)
    chunks: list[str] = []
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        if _CJK.search(paragraph):
            # Upstream segments Chinese with jieba and counts its tokens; we do not ship jieba, and one
            # character per word is the closest dependency-free stand-in. Decided per paragraph, not per
            # text as upstream's langid call does, so English paragraphs of a mixed text keep upstream's
            # exact split.
            pieces = _pack(_unit_spans(paragraph), paragraph, max_words)
        else:
            words = paragraph.split(" ")
            pieces = [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
        pieces[-1] += "\n\n"
        chunks.extend(pieces)
    return chunks


def chunk_speakers(text: str, max_turns: int = 1) -> list[str]:
    """Upstream's "speaker" method: a turn starts at each line beginning with "[SPEAKER" (or upstream's
    "<|speaker_id_start|>"), continuation lines join it with "\\n", and every `max_turns` turns merge
    into one chunk with "\\n"."""
    _check_positive("max_turns", max_turns)
    turns: list[str] = []
    turn = ""
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        if line.startswith(("[SPEAKER", "<|speaker_id_start|>")):
            if turn:
                turns.append(turn.strip())
            turn = line
        elif turn:
            turn += "\n" + line
        else:
            turn = line
    if turn:
        turns.append(turn.strip())
    return ["\n".join(turns[i : i + max_turns]) for i in range(0, len(turns), max_turns)]


def chunk_sentences(text: str, max_words: int = DEFAULT_SENTENCE_MAX_WORDS) -> list[str]:
    """Pack whole sentences into chunks of at most `max_words` words; a paragraph break always ends a chunk.

    A sentence longer than `max_words` is cut at commas and semicolons, and a clause still too long is cut
    between words. Whitespace inside a paragraph is collapsed to single spaces: hard line wraps carry no
    meaning for speech. Every chunk is stripped and non-empty.
    """
    _check_positive("max_words", max_words)
    chunks: list[str] = []
    for raw in _PARAGRAPH_BREAK.split(text):
        paragraph = " ".join(raw.split())
        if not paragraph:
            continue
        pieces: list[tuple[int, int]] = []
        for sentence in _sentence_spans(paragraph):
            pieces.extend(_fit(sentence, paragraph, max_words))
        chunks.extend(_pack(pieces, paragraph, max_words))
    return chunks


def chunk_text(
    text: str, method: str = "sentence", max_words: int | None = None, max_turns: int = 1
) -> list[str]:
    """Chunk `text` with `method` ("word", "speaker" or "sentence").

    `max_words` defaults per method (200 for "word" as upstream, 120 for "sentence"); "speaker" ignores it
    and groups `max_turns` turns instead.
    """
    if method == "word":
        return chunk_words(text, DEFAULT_WORD_MAX_WORDS if max_words is None else max_words)
    if method == "speaker":
        return chunk_speakers(text, max_turns)
    if method == "sentence":
        return chunk_sentences(text, DEFAULT_SENTENCE_MAX_WORDS if max_words is None else max_words)
    raise ValueError(f"unknown chunk method {method!r}; expected one of {', '.join(METHODS)}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        if _ends_sentence(paragraph, match):
            spans.append((start, match.end()))
            start = match.end()
    if paragraph[start:].strip():
        spans.append((start, len(paragraph)))
    return spans


def _ends_sentence(paragraph: str, match: re.Match[str]) -> bool:
    terminator = match.group()
    if terminator[0] in ".!?\u2026":
        # A lower-case next word means the sentence goes on: 'he said "Stop!" and left', "wait... what".
        following = paragraph[match.end() :].lstrip()
        if following[:1].islower():
            return False
    if terminator.rstrip("\"'\u201d\u2019\u00bb)]}") == ".":
        preceding = paragraph[: match.start()].rsplit(None, 1)
        word = preceding[-1].lstrip(_LEADING_PUNCTUATION) if preceding else ""
        # Initials ("J. R. R. Tolkien") and known abbreviations ("Mr. Darcy", "e.g. Paris").
        if (len(word) == 1 and word.isupper()) or (word.lower() + ".") in _ABBREVIATIONS:
            return False
    return True


def _fit(span: tuple[int, int], text: str, max_words: int) -> list[tuple[int, int]]:
    """Cut `span` into pieces of at most `max_words` words: whole if it fits, else at clause ends, else
    between words."""
    start, end = span
    if count_words(text[start:end]) <= max_words:
        return [span]
    clauses: list[tuple[int, int]] = []
    cut = start
    for match in _CLAUSE_END.finditer(text, start, end):
        clauses.append((cut, match.end()))
        cut = match.end()
    if text[cut:end].strip():
        clauses.append((cut, end))
    elif clauses:
        clauses[-1] = (clauses[-1][0], end)
    if len(clauses) == 1:
        return _merge(_unit_spans(text, start, end), text, max_words)
    pieces: list[tuple[int, int]] = []
    for clause in clauses:
        pieces.extend(_fit(clause, text, max_words))
    return _merge(pieces, text, max_words)


def _unit_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    end = len(text) if end is None else end
    return [match.span() for match in _UNIT.finditer(text, start, end)]


def _merge(spans: Iterable[tuple[int, int]], text: str, max_words: int) -> list[tuple[int, int]]:
    """Greedily join consecutive spans while the joined text stays within `max_words` words."""
    merged: list[tuple[int, int]] = []
    count = 0
    for start, end in spans:
        words = count_words(text[start:end])
        if merged and count + words <= max_words:
            merged[-1] = (merged[-1][0], end)
            count += words
        else:
            merged.append((start, end))
            count = words
    return merged


def _pack(spans: Iterable[tuple[int, int]], text: str, max_words: int) -> list[str]:
    chunks = (text[start:end].strip() for start, end in _merge(spans, text, max_words))
    return [chunk for chunk in chunks if chunk]
