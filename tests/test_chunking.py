"""Chunking chapter text into generation prompts."""

from __future__ import annotations

import pytest

from model.chunking import (
    chunk_sentences,
    chunk_speakers,
    chunk_text,
    chunk_words,
    count_words,
)

# Public domain: Jane Austen, Pride and Prejudice (1813), chapter 1, with abbreviations and a decimal
# worked in to exercise the sentence splitter.
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n\n"
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at '
    'last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has just been '
    'here, and she told me all about it." Mr. Bennet made no answer. The rent was 3.14 times the old one, '
    "e.g. far too much, said Dr. Jones of St. Albans."
)

CHINESE = "我很好。你呢？我们今天去公园吧！“好的。”他说。天气很好，阳光明媚，我们走了很久。"

DIALOGUE = (
    "[SPEAKER0] I can't believe you did that.\n"
    "It was reckless.\n"
    "[SPEAKER1] Relax, it worked out fine.\n"
    "[SPEAKER0] This time, maybe.\n"
    "[SPEAKER1] Every time."
)

TEXTS = {"austen": AUSTEN, "chinese": CHINESE, "dialogue": DIALOGUE}


def _squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("method", ["word", "speaker", "sentence"])
@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("max_words", [1, 3, 7, 40, 500])
def test_chunks_reproduce_the_text_in_order(method: str, name: str, max_words: int) -> None:
    text = TEXTS[name]
    chunks = chunk_text(text, method, max_words=max_words, max_turns=2)
    assert chunks
    assert _squash("".join(chunks)) == _squash(text)
    if name != "chinese":  # CJK chunks may cut between characters of one space-free "word"
        assert " ".join(chunks).split() == text.split()


@pytest.mark.parametrize("method", ["word", "sentence"])
@pytest.mark.parametrize("max_words", [1, 2, 5, 12, 30])
def test_max_words_is_respected(method: str, max_words: int) -> None:
    for text in (AUSTEN, CHINESE):
        for chunk in chunk_text(text, method, max_words=max_words):
            assert count_words(chunk) <= max_words, chunk


def test_unsplittable_word_stands_alone() -> None:
    word = "Supercalifragilisticexpialidocious"
    assert chunk_sentences(f"{word} {word} {word}.", max_words=1) == [word, word, f"{word}."]
    assert chunk_words(f"{word} {word}", max_words=1) == [word, f"{word}\n\n"]


def test_count_words() -> None:
    assert count_words("Hello, world - again!") == 3
    assert count_words("我很好。") == 3
    assert count_words("") == 0


# --- word method (upstream) --------------------------------------------------------------------------


def test_word_method_matches_upstream() -> None:
    text = "one two three four five\n\nsix seven"
    assert chunk_words(text, max_words=2) == ["one two", "three four", "five\n\n", "six seven\n\n"]
    assert chunk_words(text, max_words=200) == ["one two three four five\n\n", "six seven\n\n"]


def test_word_method_skips_empty_paragraphs() -> None:
    assert chunk_words("a b\n\n\n\n  \n\nc", max_words=5) == ["a b\n\n", "c\n\n"]
    assert chunk_words("") == []


def test_word_method_counts_cjk_characters() -> None:
    chunks = chunk_words("我很好你呢\n\nhello there world", max_words=2)
    assert chunks == ["我很", "好你", "呢\n\n", "hello there", "world\n\n"]


# --- speaker method (upstream) -----------------------------------------------------------------------


def test_speaker_method_one_turn_per_chunk() -> None:
    assert chunk_speakers(DIALOGUE) == [
        "[SPEAKER0] I can't believe you did that.\nIt was reckless.",
        "[SPEAKER1] Relax, it worked out fine.",
        "[SPEAKER0] This time, maybe.",
        "[SPEAKER1] Every time.",
    ]


def test_speaker_method_groups_turns() -> None:
    assert chunk_speakers(DIALOGUE, max_turns=2) == [
        "[SPEAKER0] I can't believe you did that.\nIt was reckless.\n[SPEAKER1] Relax, it worked out fine.",
        "[SPEAKER0] This time, maybe.\n[SPEAKER1] Every time.",
    ]


def test_speaker_method_keeps_untagged_opening() -> None:
    assert chunk_speakers("Narration first.\n[SPEAKER0] Hi.") == ["Narration first.", "[SPEAKER0] Hi."]


# --- sentence method ---------------------------------------------------------------------------------


def test_sentences_are_packed_whole() -> None:
    text = "One two three. Four five six. Seven eight nine. Ten."
    assert chunk_sentences(text, max_words=6) == ["One two three. Four five six.", "Seven eight nine. Ten."]
    assert chunk_sentences(text, max_words=5) == [
        "One two three.",
        "Four five six.",
        "Seven eight nine. Ten.",
    ]


def test_paragraph_break_ends_a_chunk() -> None:
    assert chunk_sentences("Short one.\n\nShort two.", max_words=100) == ["Short one.", "Short two."]


def test_hard_wraps_collapse_and_chunks_are_stripped() -> None:
    chunks = chunk_sentences("  First line\nwraps here.   Second   sentence.  \n \n  Next.  ")
    assert chunks == ["First line wraps here. Second sentence.", "Next."]
    assert all(chunk == chunk.strip() and chunk for chunk in chunk_sentences(AUSTEN, max_words=5))


@pytest.mark.parametrize(
    "text",
    [
        "Mr. Bennet met Mrs. Long and Dr. Jones on St. Albans Road today.",
        "Bring fruit, e.g. apples, or grains, i.e. oats, to the picnic today.",
        "The ratio was 3.14 and then it was 2.71 by the end of the day.",
        "The book by J. R. R. Tolkien was long and very well loved by all.",
    ],
)
def test_abbreviations_and_decimals_do_not_end_sentences(text: str) -> None:
    # The limit fits exactly one sentence, so any split inside it would be a wrong sentence boundary.
    chunks = chunk_sentences(f"{text} Next sentence here.", max_words=count_words(text))
    assert chunks == [text, "Next sentence here."]


def test_closing_quotes_stay_with_their_sentence() -> None:
    text = 'He asked, "Have you heard?" She said "No!" (It was late.) Done.'
    assert chunk_sentences(text, max_words=5) == [
        'He asked, "Have you heard?"',
        'She said "No!"',
        "(It was late.) Done.",
    ]


def test_lowercase_continuation_is_not_a_sentence_end() -> None:
    assert chunk_sentences('"Stop!" he said, and left. Then more.', max_words=5) == [
        '"Stop!" he said, and left.',
        "Then more.",
    ]


def test_long_sentence_splits_at_clauses_then_words() -> None:
    text = "Alpha beta gamma delta, epsilon zeta; eta theta iota kappa lambda mu."
    assert chunk_sentences(text, max_words=4) == [
        "Alpha beta gamma delta,",
        "epsilon zeta;",
        "eta theta iota kappa",
        "lambda mu.",
    ]


def test_cjk_sentences() -> None:
    # Each CJK character counts as a word; punctuation counts nothing.
    assert chunk_sentences(CHINESE, max_words=8) == [
        "我很好。你呢？",
        "我们今天去公园吧！",
        "“好的。”他说。",
        "天气很好，阳光明媚，",
        "我们走了很久。",
    ]
    assert chunk_sentences(CHINESE, max_words=1000) == [CHINESE]


def test_empty_text_gives_no_chunks() -> None:
    for method in ("word", "speaker", "sentence"):
        assert chunk_text("", method) == []
        assert chunk_text(" \n\n ", method) in ([], [""])


def test_unknown_method_and_bad_limits() -> None:
    with pytest.raises(ValueError, match="word, speaker, sentence"):
        chunk_text("text", "paragraph")
    with pytest.raises(ValueError, match="max_words"):
        chunk_text("text", "sentence", max_words=0)
    with pytest.raises(ValueError, match="max_turns"):
        chunk_text("text", "speaker", max_turns=0)


def test_default_limits_per_method() -> None:
    text = " ".join(["word"] * 150) + "."
    assert len(chunk_text(text, "word")) == 1
    assert len(chunk_text(text, "sentence")) == 2
