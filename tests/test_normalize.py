"""Transcript normalisation: the upstream Higgs Audio v2 generation script's rules, one behaviour per test."""

from __future__ import annotations

import pytest

from model.normalize import normalize_transcript, speaker_tags

# --- full-width punctuation ---------------------------------------------------------------------------


def test_chinese_comma_and_exclamation_become_ascii():
    assert normalize_transcript("你好，世界！") == "你好, 世界!"


@pytest.mark.parametrize(
    ("full_width", "ascii_form"),
    [
        ("。", "."),
        ("：", ":"),
        ("；", ";"),
        ("？", "?"),
        ("！", "!"),
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
    ],
)
def test_full_width_mark_maps_to_its_ascii_form(full_width, ascii_form):
    # Placed between letters and followed by a "." so neither whitespace nor the closing rule interferes.
    assert normalize_transcript(f"a{full_width}b.") == f"a{ascii_form}b."


def test_chinese_comma_gains_a_following_space():
    assert normalize_transcript("一，二。") == "一, 二."


def test_chinese_comma_before_a_space_leaves_a_single_space():
    assert normalize_transcript("一， 二。") == "一, 二."


def test_chinese_sentence_with_quotes_and_ellipsis():
    assert normalize_transcript("他说：“等一下……”") == '他说:"等一下......"'


def test_full_width_parentheses_end_up_as_spaces():
    assert normalize_transcript("北京（首都）很大。") == "北京 首都 很大."


def test_full_width_brackets_around_a_tag_are_converted_before_tags_are_rewritten():
    assert normalize_transcript("哈哈【laugh】") == "哈哈<SE>[Laughter]</SE>"


# --- parentheses and temperature ----------------------------------------------------------------------


def test_parentheses_become_spaces():
    assert normalize_transcript("The cat (a tabby) slept.") == "The cat a tabby slept."


def test_parentheses_touching_words_separate_them():
    assert normalize_transcript("word(aside)word.") == "word aside word."


def test_degrees_celsius_are_spelled_out():
    assert normalize_transcript("It is 20°C today.") == "It is 20 degrees Celsius today."


def test_degrees_fahrenheit_are_spelled_out():
    assert normalize_transcript("It is 68°F today.") == "It is 68 degrees Fahrenheit today."


def test_space_before_degree_sign_is_not_doubled():
    assert normalize_transcript("It is 20 °C.") == "It is 20 degrees Celsius."


def test_bare_degree_sign_is_left_alone():
    assert normalize_transcript("Turn 90° left.") == "Turn 90° left."


# --- sound-event tags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "markup"),
    [
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
    ],
)
def test_sound_event_tag_becomes_markup(tag, markup):
    assert normalize_transcript(f"Well {tag} then.") == f"Well {markup} then."


def test_sound_event_tags_are_case_sensitive():
    assert normalize_transcript("Well [Laugh] then.") == "Well [Laugh] then."


def test_music_start_and_end_are_not_taken_for_plain_music():
    text = "[music start] La la. [music end] [music]"
    assert normalize_transcript(text) == "<SE_s>[Music]</SE_s> La la. <SE_e>[Music]</SE_e> <SE>[Music]</SE>"


def test_speaker_tags_are_not_rewritten():
    assert normalize_transcript("[SPEAKER0] Hi.") == "[SPEAKER0] Hi."


# --- whitespace ---------------------------------------------------------------------------------------


def test_blank_lines_are_dropped():
    assert normalize_transcript("One.\n\n\nTwo.") == "One.\nTwo."


def test_whitespace_only_lines_are_dropped():
    assert normalize_transcript("One.\n \t \nTwo.") == "One.\nTwo."


def test_whitespace_runs_inside_a_line_collapse_to_one_space():
    assert normalize_transcript("a  b\t\tc   d.") == "a b c d."


def test_each_line_is_trimmed():
    assert normalize_transcript("  One.  \n\tTwo.\t") == "One.\nTwo."


def test_carriage_returns_are_removed_from_line_ends():
    assert normalize_transcript("One.\r\nTwo.\r\n") == "One.\nTwo."


def test_ideographic_space_counts_as_whitespace():
    assert normalize_transcript("你好\u3000\u3000世界。") == "你好 世界."


# --- closing punctuation ------------------------------------------------------------------------------


def test_period_is_appended_when_text_ends_in_a_letter():
    assert normalize_transcript("Hello world") == "Hello world."


def test_period_is_appended_after_trailing_whitespace_is_removed():
    assert normalize_transcript("Hello world  \n\n") == "Hello world."


def test_period_is_appended_only_to_the_last_line():
    assert normalize_transcript("First line\nSecond line") == "First line\nSecond line."


@pytest.mark.parametrize("ending", [".", "!", "?", ",", ";", '"', "'", "</SE_e>", "</SE>"])
def test_no_period_is_appended_after_a_closing_ending(ending):
    assert normalize_transcript(f"Hello{ending}") == f"Hello{ending}"


@pytest.mark.parametrize("ending", [":", "-", ")", "]", ">", "</SE_s>"])
def test_period_is_appended_after_other_endings(ending):
    # ")" has already become a space, so the period follows the word itself.
    expected = "Hello." if ending == ")" else f"Hello{ending}."
    assert normalize_transcript(f"Hello{ending}") == expected


def test_sustained_event_start_at_the_end_gets_a_period():
    assert normalize_transcript("Listen [music start]") == "Listen <SE_s>[Music]</SE_s>."


def test_event_at_the_end_needs_no_period():
    assert normalize_transcript("That was funny [laugh]") == "That was funny <SE>[Laughter]</SE>"


def test_chinese_comma_at_the_end_counts_as_closing():
    assert normalize_transcript("你好，") == "你好,"


@pytest.mark.parametrize("blank", ["", " ", "\n\n", " \t\n \n"])
def test_blank_text_stays_empty_rather_than_becoming_a_period(blank):
    # Upstream would return "."; an empty result lets callers reject the request.
    assert normalize_transcript(blank) == ""


def test_text_of_only_parentheses_is_empty():
    assert normalize_transcript("( )") == ""


# --- idempotence --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "normalised",
    [
        "Hello world.",
        "你好, 世界!",
        "[SPEAKER0] Hi there.\n[SPEAKER1] Hello <SE>[Laughter]</SE>",
        "It is 20 degrees Celsius.",
        "<SE_s>[Music]</SE_s> La la. <SE_e>[Music]</SE_e>",
    ],
)
def test_already_normalised_text_is_unchanged(normalised):
    assert normalize_transcript(normalised) == normalised


@pytest.mark.parametrize(
    "raw",
    [
        "你好，世界！",
        "  The cat (a tabby)\n\n  slept at 20°C [laugh]  ",
        "他说：“等一下……”",
        "哈哈【laugh】",
        "[music start] La la [music end]",
        "",
    ],
)
def test_normalising_twice_equals_normalising_once(raw):
    once = normalize_transcript(raw)
    assert normalize_transcript(once) == once


# --- speaker tags -------------------------------------------------------------------------------------


def test_speaker_tags_of_a_two_speaker_dialogue():
    dialogue = "[SPEAKER1] Hi.\n[SPEAKER0] Hello.\n[SPEAKER1] How are you?\n[SPEAKER0] Fine."
    assert speaker_tags(dialogue) == ["SPEAKER0", "SPEAKER1"]


def test_speaker_tags_of_untagged_text_is_empty():
    assert speaker_tags("Just one voice.") == []


def test_speaker_tags_sort_as_strings():
    assert speaker_tags("[SPEAKER2] a [SPEAKER10] b") == ["SPEAKER10", "SPEAKER2"]


def test_speaker_tags_need_the_exact_bracketed_form():
    assert speaker_tags("SPEAKER0 [speaker1] [SPEAKER] 【SPEAKER2】 [SPEAKER3]") == ["SPEAKER3"]


def test_speaker_tags_survive_normalisation():
    dialogue = "[SPEAKER0] 你好，\n\n[SPEAKER1] (wave) hi"
    assert speaker_tags(normalize_transcript(dialogue)) == speaker_tags(dialogue)
