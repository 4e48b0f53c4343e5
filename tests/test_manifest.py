"""Manifest validation: one behaviour per test, read as the spec of what a manifest row may contain."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import requests as rq
from model.requests import Reference, RequestError, SynthesisRequest
from pipeline.manifest import (
    CANONICAL_COLUMNS,
    ManifestRules,
    mark_duplicates,
    to_request,
    validate_row,
)

VOICES = Path(__file__).resolve().parent.parent / "examples" / "voices"
RULES = ManifestRules(voice_library=str(VOICES))


def check(row: dict, rules: ManifestRules = RULES) -> dict:
    return validate_row(row, rules)


def assert_error(out: dict, field: str, reason: str) -> None:
    assert out["status"] == "error"
    assert out["error_field"] == field
    assert out["error"].startswith(field)
    assert reason in out["error"]


# --- a valid row -------------------------------------------------------------------------------------------


def test_minimal_row_is_pending_with_all_defaults():
    out = check({"id": "a1", "text": "Hello there."})
    assert out["status"] == "pending"
    assert out["error"] is None and out["error_field"] is None
    assert set(CANONICAL_COLUMNS) <= set(out)
    assert out["text"] == "Hello there."
    assert out["system_prompt"] is None and out["scene_prompt"] is None and out["speaker_tag"] is None
    assert out["references"] == []
    assert out["temperature"] == rq.DEFAULT_TEMPERATURE
    assert out["top_p"] == rq.DEFAULT_TOP_P
    assert out["top_k"] == rq.DEFAULT_TOP_K
    assert out["max_new_tokens"] == rq.DEFAULT_MAX_NEW_TOKENS
    assert out["ras_win_len"] == rq.DEFAULT_RAS_WIN_LEN
    assert out["ras_win_max_num_repeat"] == rq.DEFAULT_RAS_WIN_MAX_NUM_REPEAT
    assert out["seed"] == 0
    assert out["response_format"] == "wav"


def test_rules_defaults_override_the_model_defaults():
    rules = ManifestRules(defaults={"temperature": 0.3, "top_k": 0}, default_response_format="flac")
    out = check({"id": "a", "text": "Hi."}, rules)
    assert (out["temperature"], out["top_k"], out["response_format"]) == (0.3, 0, "flac")


def test_row_values_override_defaults():
    out = check({"id": "a", "text": "Hi.", "temperature": 0.0, "seed": 42, "response_format": "flac"})
    assert (out["temperature"], out["seed"], out["response_format"]) == (0.0, 42, "flac")


def test_none_sampling_value_means_default():
    assert check({"id": "a", "text": "Hi.", "top_p": None})["top_p"] == rq.DEFAULT_TOP_P


def test_integral_float_is_accepted_as_int():
    out = check({"id": "a", "text": "Hi.", "top_k": 7.0})
    assert out["top_k"] == 7 and type(out["top_k"]) is int


def test_numpy_scalars_are_accepted_as_plain_python_numbers():
    out = check({"id": "a", "text": "Hi.", "seed": np.int64(3), "top_p": np.float32(0.5)})
    assert out["seed"] == 3 and type(out["seed"]) is int
    assert out["top_p"] == 0.5 and type(out["top_p"]) is float


def test_invalid_rules_defaults_fail_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        ManifestRules(defaults={"temperature": 5.0})


def test_unknown_rules_default_fails_at_construction():
    with pytest.raises(ValueError, match="tempo"):
        ManifestRules(defaults={"tempo": 1.0})


# --- text and its aliases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["script", "prompt", "transcript"])
def test_text_alias_fills_text(alias):
    out = check({"id": "a", alias: "Spoken words."})
    assert out["status"] == "pending"
    assert out["text"] == "Spoken words."
    assert alias not in out


def test_equal_aliases_are_not_a_conflict():
    assert check({"id": "a", "text": "Same.", "script": "Same."})["status"] == "pending"


def test_conflicting_aliases_name_both_columns():
    out = check({"id": "a", "text": "One.", "script": "Two."})
    assert_error(out, "text", "conflicts with script")


def test_missing_text_is_an_error():
    assert_error(check({"id": "a"}), "text", "is missing")


def test_nan_text_from_pandas_counts_as_missing():
    out = check({"id": "a", "text": float("nan"), "script": "From the script column."})
    assert out["text"] == "From the script column."


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_or_whitespace_text_is_an_error(text):
    assert_error(check({"id": "a", "text": text}), "text", "empty")


def test_text_empty_after_normalisation_is_an_error():
    assert_error(check({"id": "a", "text": "( )"}), "text", "empty after normalisation")


def test_non_string_text_is_an_error():
    assert_error(check({"id": "a", "text": 42}), "text", "must be a string, got int")


def test_one_megabyte_text_is_rejected_by_length():
    out = check({"id": "a", "text": "x" * 1_000_000})
    assert_error(out, "text", "longer than 20000 characters (1000000)")
    assert len(out["error"]) < 300


def test_text_limit_comes_from_the_rules():
    out = check({"id": "a", "text": "Eleven chars"}, ManifestRules(max_text_chars=10))
    assert_error(out, "text", "longer than 10 characters")


def test_error_from_an_alias_names_the_alias_column():
    assert_error(check({"id": "a", "script": ""}), "script", "empty")


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_text_are_an_error(char):
    assert_error(check({"id": "a", "text": f"Hi{char} there."}), "text", "control character")


def test_newline_tab_and_carriage_return_are_allowed_in_text():
    assert check({"id": "a", "text": "Line one.\r\n\tLine two."})["status"] == "pending"


def test_unpaired_surrogate_in_text_is_an_error():
    assert_error(check({"id": "a", "text": "Broken \ud800 text."}), "text", "unpaired surrogate U+D800")


@pytest.mark.parametrize("column", ["system_prompt", "scene_prompt", "speaker_tag"])
def test_optional_prompts_are_kept(column):
    assert check({"id": "a", "text": "Hi.", column: "Quiet room."})[column] == "Quiet room."


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (5, "must be a string"),
        ("x" * 4001, "longer than 4000"),
        ("a\x00b", "control character"),
        ("\udfff", "surrogate"),
    ],
)
@pytest.mark.parametrize("column", ["system_prompt", "scene_prompt", "speaker_tag"])
def test_bad_optional_prompts_are_errors(column, value, reason):
    assert_error(check({"id": "a", "text": "Hi.", column: value}), column, reason)


# --- ids ---------------------------------------------------------------------------------------------------


def test_id_with_dots_dashes_and_underscores_is_fine():
    assert check({"id": "Ch-01_take.2", "text": "Hi."})["id"] == "Ch-01_take.2"


def test_integer_id_from_a_csv_becomes_a_string():
    assert check({"id": 17, "text": "Hi."})["id"] == "17"


@pytest.mark.parametrize(
    ("bad_id", "reason"),
    [
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("../etc", "path separator"),
        ("..", "must not be '.' or '..'"),
        (".", "must not be '.' or '..'"),
        ("a..b", "must not contain '..'"),
        ("/abs", "absolute path"),
        ("\\abs", "absolute path"),
        ("", "is empty"),
        ("x" * 129, "longer than 128 characters"),
        ("a\x00b", "control character U+0000"),
        ("a\nb", "control character U+000A"),
        ("a b", "may only contain"),
        ("café", "may only contain"),
        (None, "is missing"),
        (1.5, "must be a string"),
        (True, "must be a string"),
    ],
)
def test_hostile_ids_are_errors(bad_id, reason):
    assert_error(check({"id": bad_id, "text": "Hi."}), "id", reason)


def test_128_character_id_is_allowed():
    assert check({"id": "x" * 128, "text": "Hi."})["status"] == "pending"


def test_invalid_id_is_kept_as_its_repr():
    assert check({"id": "../x", "text": "Hi."})["id"] == "'../x'"


def test_duplicate_id_is_marked_with_the_first_row():
    rows = [check({"id": i, "text": "Hi."}) for i in ("a", "b", "a", "a")]
    marked = mark_duplicates(rows)
    assert [r["status"] for r in marked] == ["pending", "pending", "error", "error"]
    assert_error(marked[2], "id", "duplicate id (first seen at row 0)")
    assert marked[3]["id"] == "a"


def test_invalid_ids_are_not_counted_as_duplicates():
    rows = [check({"id": "a/b", "text": "Hi."}), check({"id": "a/b", "text": "Hi."})]
    assert [r["error"] for r in mark_duplicates(rows)] == [r["error"] for r in rows]


# --- sampling parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("temperature", float("nan"), "is NaN"),
        ("temperature", -0.1, "must be in [0, 2]"),
        ("temperature", 2.5, "must be in [0, 2]"),
        ("temperature", math.inf, "must be in [0, 2]"),
        ("temperature", "hot", "must be a number, got str"),
        ("temperature", True, "must be a number, got bool"),
        ("temperature", [1.0], "must be a number, got list"),
        ("top_p", float("nan"), "is NaN"),
        ("top_p", 0.0, "must be in (0, 1]"),
        ("top_p", -0.5, "must be in (0, 1]"),
        ("top_p", 1.01, "must be in (0, 1]"),
        ("top_k", float("nan"), "is NaN"),
        ("top_k", -1, "must be in [0, 1026]"),
        ("top_k", 1027, "must be in [0, 1026]"),
        ("top_k", 7.5, "must be an integer"),
        ("top_k", "7.5", "must be an integer"),
        ("top_k", "fifty", "must be an integer, got str"),
        ("top_k", False, "must be an integer, got bool"),
        ("max_new_tokens", float("nan"), "is NaN"),
        ("max_new_tokens", 0, "must be in [1, 4096]"),
        ("max_new_tokens", -5, "must be in [1, 4096]"),
        ("max_new_tokens", 4097, "must be in [1, 4096]"),
        ("max_new_tokens", {"n": 1}, "must be an integer, got dict"),
        ("ras_win_len", float("nan"), "is NaN"),
        ("ras_win_len", -1, "must be in [0, 64]"),
        ("ras_win_len", 65, "must be in [0, 64]"),
        ("ras_win_max_num_repeat", float("nan"), "is NaN"),
        ("ras_win_max_num_repeat", 0, "must be in [1, 64]"),
        ("ras_win_max_num_repeat", 65, "must be in [1, 64]"),
        ("ras_win_max_num_repeat", [2], "must be an integer, got list"),
        ("seed", float("nan"), "is NaN"),
        ("seed", -1, "must be in [0, 9223372036854775807]"),
        ("seed", 2**63, "must be in [0, 9223372036854775807]"),
        ("seed", math.inf, "must be an integer"),
    ],
)
def test_bad_sampling_parameter_is_an_error(name, value, reason):
    out = check({"id": "a", "text": "Hi.", name: value})
    assert_error(out, name, reason)


def test_numbers_written_as_text_are_numbers():
    # A CSV column with one non-number in it is read as text, every row's number with it.
    out = check(
        {"id": "a", "text": "Hi.", "seed": "42", "top_k": " 50 ", "temperature": "0.7", "ras_win_len": "7.0"}
    )
    assert out["status"] == "pending"
    assert (out["seed"], out["top_k"], out["temperature"], out["ras_win_len"]) == (42, 50, 0.7, 7)
    assert type(out["seed"]) is int and type(out["temperature"]) is float


def test_a_blank_text_cell_means_the_default():
    out = check({"id": "a", "text": "Hi.", "seed": "", "temperature": "  "})
    assert (out["seed"], out["temperature"]) == (0, 1.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 0),
        ("temperature", 2),
        ("top_p", 1.0),
        ("top_k", 0),
        ("top_k", 1026),
        ("max_new_tokens", 4096),
        ("ras_win_len", 0),
        ("ras_win_max_num_repeat", 64),
        ("seed", 2**63 - 1),
    ],
)
def test_sampling_parameter_bounds_are_inclusive(name, value):
    assert check({"id": "a", "text": "Hi.", name: value})[name] == value


def test_max_new_tokens_limit_comes_from_the_rules():
    out = check({"id": "a", "text": "Hi.", "max_new_tokens": 600}, ManifestRules(max_new_tokens_limit=512))
    assert_error(out, "max_new_tokens", "must be in [1, 512]")


def test_error_message_names_the_value():
    assert check({"id": "a", "text": "Hi.", "temperature": "hot"})["error"].startswith(
        "temperature (value 'hot')"
    )


@pytest.mark.parametrize("value", ["mp3", 1, "wave"])
def test_unknown_response_format_is_an_error(value):
    assert_error(check({"id": "a", "text": "Hi.", "response_format": value}), "response_format", "wav, flac")


# --- voices from the library and profiles ------------------------------------------------------------------


def test_library_voice_resolves_to_absolute_wav_and_transcript():
    out = check({"id": "a", "text": "Hi.", "voice": "belinda"})
    expected = (VOICES / "belinda.txt").read_text(encoding="utf-8").strip()
    assert out["references"] == [
        {"audio": str(VOICES / "belinda.wav"), "transcript": expected, "speaker_tag": None, "profile": None}
    ]
    assert Path(out["references"][0]["audio"]).is_absolute()
    assert "voice" not in out


def test_profile_voice_resolves_to_its_description():
    out = check({"id": "a", "text": "Hi.", "voice": "profile:male_en"})
    [ref] = out["references"]
    assert ref["audio"] is None and ref["transcript"] == "" and ref["speaker_tag"] is None
    assert ref["profile"].startswith("Male, American accent")


def test_comma_separated_voices_give_one_reference_each():
    out = check({"id": "a", "text": "[SPEAKER0] Hi. [SPEAKER1] Hello.", "voice": "belinda, en_man"})
    assert [Path(r["audio"]).name for r in out["references"]] == ["belinda.wav", "en_man.wav"]


def test_library_voice_and_profile_can_be_mixed():
    out = check({"id": "a", "text": "Hi.", "voice": "profile:female_en_british,en_woman"})
    assert [r["profile"] is not None for r in out["references"]] == [True, False]


def test_unknown_voice_lists_available_names():
    out = check({"id": "a", "text": "Hi.", "voice": "nobody"})
    assert_error(out, "voice", "unknown voice 'nobody'; available: belinda, broom_salesman, en_man")
    assert "'nobody'" in out["error"]


def test_unknown_profile_lists_available_profiles():
    out = check({"id": "a", "text": "Hi.", "voice": "profile:nobody"})
    assert_error(out, "voice", "unknown profile 'nobody'; available: male_en, female_en_story")


@pytest.mark.parametrize("name", ["../voices/belinda", "/etc/passwd", "..", "belinda.wav/..", "a\\b"])
def test_voice_names_with_path_tricks_are_errors(name):
    assert_error(check({"id": "a", "text": "Hi.", "voice": name}), "voice", "not a valid voice name")


def test_empty_entry_in_voice_list_is_an_error():
    assert_error(check({"id": "a", "text": "Hi.", "voice": "belinda,,en_man"}), "voice", "empty entry")


def test_voice_without_a_library_is_an_error():
    out = check({"id": "a", "text": "Hi.", "voice": "belinda"}, ManifestRules())
    assert_error(out, "voice", "no voice library is configured")


def test_profile_without_a_profiles_file_is_an_error():
    out = check({"id": "a", "text": "Hi.", "voice": "profile:male_en"}, ManifestRules())
    assert_error(out, "voice", "no profiles file is configured")


def test_explicit_profiles_path_is_used(tmp_path):
    profiles = tmp_path / "mine.yaml"
    profiles.write_text("profiles:\n  calm: A calm voice.\n", encoding="utf-8")
    out = check(
        {"id": "a", "text": "Hi.", "voice": "profile:calm"}, ManifestRules(profiles_path=str(profiles))
    )
    assert out["references"][0]["profile"] == "A calm voice."


def test_clip_without_transcript_is_not_a_library_voice(tmp_path):
    library = tmp_path / "voices"
    shutil.copytree(VOICES, library)
    (library / "belinda.txt").unlink()
    out = check({"id": "a", "text": "Hi.", "voice": "belinda"}, ManifestRules(voice_library=str(library)))
    assert_error(out, "voice", "unknown voice 'belinda'")


def test_references_and_voice_together_are_an_error():
    row = {"id": "a", "text": "Hi.", "voice": "belinda", "references": [{"audio": "s3://b/x.wav"}]}
    assert_error(check(row), "voice", "either voice or references, not both")


# --- explicit references -----------------------------------------------------------------------------------


def test_references_keep_their_audio_source_as_given():
    sources = [
        "s3://bucket/a.wav",
        "https://example.com/b.wav",
        "data:audio/wav;base64,UklGRg==",
        "/tmp/c.wav",
    ]
    out = check(
        {"id": "a", "text": "Hi.", "references": [{"audio": s, "transcript": "Hey."} for s in sources]}
    )
    assert [r["audio"] for r in out["references"]] == sources
    assert out["references"][0] == {
        "audio": sources[0],
        "transcript": "Hey.",
        "speaker_tag": None,
        "profile": None,
    }


def test_references_as_numpy_array_are_accepted():
    refs = np.array([{"audio": "a.wav", "transcript": None, "speaker_tag": "SPEAKER0"}], dtype=object)
    out = check({"id": "a", "text": "Hi.", "references": refs})
    assert out["references"] == [
        {"audio": "a.wav", "transcript": "", "speaker_tag": "SPEAKER0", "profile": None}
    ]


def test_canonical_row_validates_again_unchanged():
    once = check({"id": "a", "text": "Hi.", "voice": "profile:male_en,belinda", "extra": 1})
    assert check(once) == once


@pytest.mark.parametrize(
    ("refs", "reason"),
    [
        ("s3://b/x.wav", "must be a list of dicts; in a CSV cell, that list as JSON"),
        ({"audio": "x.wav"}, "must be a list of dicts, got dict"),
        (["x.wav"], "reference 0 must be a dict, got str"),
        ([{"transcript": "Hi."}], "reference 0 is missing audio"),
        ([{"audio": "x.wav"}, {"audio": 5}], "reference 1 audio must be a non-empty string"),
        ([{"audio": "  "}], "reference 0 audio must be a non-empty string"),
        ([{"audio": b""}], "reference 0 audio must be a non-empty string"),
        (
            [{"audio": {"array": [0.0], "sampling_rate": 16000}}],
            "reference 0 audio must be a non-empty string",
        ),
        ([{"audio": {"bytes": None, "path": None}}], "reference 0 is missing audio"),
        ([{"audio": "x.wav", "transcript": 3}], "reference 0 transcript must be a string"),
        ([{"audio": "x.wav", "transcript": "a\x00"}], "reference 0 transcript contains control character"),
        ([{"audio": "x.wav", "speaker_tag": 1}], "reference 0 speaker_tag must be a string"),
        ([{"audio": "x.wav", "transcipt": "typo"}], "reference 0 has unknown keys ['transcipt']"),
        ([{"audio": "x.wav", "profile": "A voice."}], "reference 0 has both audio and profile"),
        ([{"audio": "x.wav"}] * 9, "has 9 entries; at most 8"),
    ],
)
def test_malformed_references_are_errors(refs, reason):
    assert_error(check({"id": "a", "text": "Hi.", "references": refs}), "references", reason)


def test_empty_references_mean_no_voice():
    assert check({"id": "a", "text": "Hi.", "references": []})["references"] == []


def test_a_blank_references_cell_means_no_voice_and_leaves_the_voice_column_free():
    assert check({"id": "a", "text": "Hi.", "references": " "})["references"] == []
    named = check({"id": "b", "text": "Hi.", "references": "", "voice": "belinda"})
    assert named["status"] == "pending" and named["references"][0]["audio"].endswith("belinda.wav")


def test_references_in_a_csv_cell_are_read_as_json():
    cell = '[{"audio": "s3://b/x.wav", "transcript": "Hello there."}]'
    out = check({"id": "a", "text": "Hi.", "references": cell})
    assert out["status"] == "pending"
    assert [(r["audio"], r["transcript"]) for r in out["references"]] == [("s3://b/x.wav", "Hello there.")]


def test_reference_audio_may_be_encoded_bytes_as_a_parquet_binary_cell_holds_them():
    out = check({"id": "a", "text": "Hi.", "references": [{"audio": b"RIFF....", "transcript": "Hey."}]})

    assert out["status"] == "pending" and out["references"][0]["audio"] == b"RIFF...."


def test_a_datasets_audio_value_gives_its_bytes_or_else_its_path():
    # 🤗 datasets stores an Audio column in Parquet as a struct of the file's bytes and its name.
    embedded = {"bytes": b"fLaC....", "path": "common_voice_1.flac"}
    linked = {"bytes": None, "path": "s3://voices/a.flac"}
    out = check({"id": "a", "text": "Hi.", "references": [{"audio": embedded}, {"audio": linked}]})

    assert [r["audio"] for r in out["references"]] == [b"fLaC....", "s3://voices/a.flac"]


# --- passthrough columns -----------------------------------------------------------------------------------


def test_passthrough_columns_survive_on_a_valid_row():
    meta = {"chapter": 3, "tags": ["x"]}
    out = check({"id": "a", "text": "Hi.", "book": "Dune", "meta": meta})
    assert out["book"] == "Dune" and out["meta"] is meta


def test_passthrough_columns_survive_on_an_invalid_row():
    out = check({"id": "a", "text": "", "book": "Dune"})
    assert out["status"] == "error"
    assert out["id"] == "a" and out["book"] == "Dune"


def test_invalid_row_has_every_canonical_column():
    out = check({"id": "a", "temperature": "hot"})
    assert set(CANONICAL_COLUMNS) <= set(out)
    assert out["text"] is None and out["references"] is None


# --- to_request --------------------------------------------------------------------------------------------


def test_to_request_carries_every_field():
    row = check(
        {
            "id": "r1",
            "text": "Hello.",
            "system_prompt": "Sys.",
            "scene_prompt": "A quiet room.",
            "temperature": 0.5,
            "top_p": 0.8,
            "top_k": 20,
            "max_new_tokens": 300,
            "ras_win_len": 0,
            "ras_win_max_num_repeat": 3,
            "seed": 9,
        }
    )
    req = to_request(row)
    assert isinstance(req, SynthesisRequest)
    assert (req.id, req.text, req.system_prompt, req.scene_prompt) == (
        "r1",
        "Hello.",
        "Sys.",
        "A quiet room.",
    )
    assert (req.temperature, req.top_p, req.top_k, req.max_new_tokens) == (0.5, 0.8, 20, 300)
    assert (req.ras_win_len, req.ras_win_max_num_repeat, req.seed) == (0, 3, 9)
    assert req.references == []


def test_to_request_uses_fetched_audio_and_profiles():
    row = check({"id": "r", "text": "Hi.", "voice": "belinda,profile:male_en"})
    req = to_request(row, audio_by_index=[b"RIFFdata", None])
    clip, profile = req.references
    assert clip.audio == b"RIFFdata" and clip.transcript.startswith("Twas the night")
    assert profile.audio is None and profile.profile.startswith("Male, American accent")


def test_to_request_without_fetched_audio_is_an_error():
    row = check({"id": "r", "text": "Hi.", "references": [{"audio": "s3://b/x.wav"}]})
    with pytest.raises(RequestError, match="reference 0 audio has not been fetched"):
        to_request(row)


def test_row_speaker_tag_names_a_single_voice():
    row = check({"id": "r", "text": "Hi.", "voice": "profile:male_en", "speaker_tag": "NARRATOR"})
    assert to_request(row).references == [
        Reference(profile=row["references"][0]["profile"], speaker_tag="NARRATOR")
    ]


def test_to_request_refuses_an_error_row():
    with pytest.raises(ValueError, match="not pending"):
        to_request(check({"id": "r", "text": ""}))


def test_pending_rows_survive_an_arrow_round_trip():
    pa = pytest.importorskip("pyarrow")
    rows = [
        check({"id": "a", "text": "Hi.", "voice": "belinda,profile:male_en", "book": "Dune"}),
        check({"id": "b", "text": "Hi.", "references": [{"audio": "s3://b/x.wav"}], "book": None}),
    ]
    back = pa.Table.from_pylist(rows).to_pylist()
    assert [check(row) for row in back] == rows
    assert to_request(back[0], audio_by_index=[b"RIFF", None]).references[1].profile is not None


def test_a_csv_column_with_one_non_number_errors_only_that_row(tmp_path):
    import pyarrow.csv as pa_csv

    path = tmp_path / "manifest.csv"
    path.write_text("id,text,seed\na,Hello there.,5\nb,Hello again.,x\nc,And again.,\n")
    rows = pa_csv.read_csv(path).to_pylist()  # seed is read as text: one cell is not a number
    out = {row["id"]: check(row) for row in rows}

    assert (out["a"]["status"], out["a"]["seed"]) == ("pending", 5)
    assert_error(out["b"], "seed", "must be an integer, got str")
    assert (out["c"]["status"], out["c"]["seed"]) == ("pending", 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, "5"),
        (np.int64(7), "7"),
        ("row-1", "row-1"),
        ("a/b", None),
        (None, None),
        (2.5, None),
        (True, None),
    ],
)
def test_canonical_id_is_the_id_a_value_becomes_or_none(value, expected):
    from pipeline.manifest import canonical_id

    assert canonical_id(value) == expected


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"id": 5}, "5"),
        ({"id": "a/b"}, "'a/b'"),
        ({"id": None}, "None"),
        ({"id": "u/7", "_error": "line 7: bad"}, "u/7"),  # an eval-set adapter's label for a bad line
    ],
)
def test_recorded_id_is_the_id_the_rows_record_carries(row, expected):
    from pipeline.manifest import recorded_id

    assert recorded_id({"text": "Hi.", **row}) == expected
    assert validate_row({"text": "Hi.", **row}, RULES)["id"] == expected


@pytest.mark.parametrize(
    ("fields", "given"), [({}, "neither"), ({"audio": b"RIFF", "profile": "calm"}, "audio and profile")]
)
def test_a_reference_with_neither_or_both_of_audio_and_profile_says_which_it_got(fields, given):
    with pytest.raises(RequestError, match=f"exactly one of audio or profile, got {given}$"):
        Reference(**fields)
