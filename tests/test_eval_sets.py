from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval_sets import output_key, read_emergent_jsonl, read_seedtts_meta

META = (
    "utt_a|Prompt one.|prompt-wavs/a.wav|Say this first.\n"
    "\n"
    "utt_b|Prompt two.|../shared/b.wav|Then this.|gt/utt_b.wav\n"
    "utt_c|Prompt three.|/abs/c.wav|And this.\n"
    "utt_d|Prompt four.|s3://other/d.wav|Last one.|\n"
)


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["_error"] is None]


def test_seedtts_local_rows(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    meta = tmp_path / "en" / "meta.lst"
    meta.write_text(META, encoding="utf-8")
    rows = read_seedtts_meta(str(meta), language="en")

    assert [r["id"] for r in rows] == ["utt_a", "utt_b", "utt_c", "utt_d"]
    assert [r["line_number"] for r in rows] == [1, 3, 4, 5]  # the blank line 2 is skipped, not renumbered
    assert _ok(rows) == rows
    a, b, c, d = rows
    assert a["text"] == "Say this first."
    assert a["references"] == [
        {"audio": f"{tmp_path}/en/prompt-wavs/a.wav", "transcript": "Prompt one.", "speaker_tag": None}
    ]
    assert b["references"][0]["audio"] == f"{tmp_path}/shared/b.wav"
    assert c["references"][0]["audio"] == "/abs/c.wav"
    assert d["references"][0]["audio"] == "s3://other/d.wav"
    assert (a["prompt_wav"], a["prompt_text"], a["gt_wav"]) == ("prompt-wavs/a.wav", "Prompt one.", None)
    assert b["gt_wav"] == "gt/utt_b.wav"
    assert d["gt_wav"] is None  # an empty fifth field is no ground truth
    assert {r["eval_set"] for r in rows} == {"seedtts"}
    assert {r["language"] for r in rows} == {"en"}


def test_seedtts_relative_meta_path_resolves_to_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "meta.lst").write_text("u|p|wavs/u.wav|t\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    [row] = read_seedtts_meta("meta.lst")
    assert row["references"][0]["audio"] == f"{tmp_path}/wavs/u.wav"


def test_seedtts_s3_meta(s3_server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="seed/en/meta.lst", Body=META.encode())
    rows = read_seedtts_meta(f"s3://{s3_bucket}/seed/en/meta.lst", s3_server.storage_options)
    audio = [r["references"][0]["audio"] for r in rows]
    assert audio == [
        f"s3://{s3_bucket}/seed/en/prompt-wavs/a.wav",
        f"s3://{s3_bucket}/seed/shared/b.wav",
        "/abs/c.wav",
        "s3://other/d.wav",
    ]
    assert "language" in rows[0] and rows[0]["language"] is None


@pytest.mark.parametrize(
    ("line", "row_id", "field", "reason"),
    [
        ("only|three|fields", "only", "line", "expected 4 or 5 '|'-separated fields, got 3"),
        ("a|b|c|d|e|f", "a", "line", "expected 4 or 5 '|'-separated fields, got 6"),
        ("|prompt|p.wav|text", None, "utt", "empty utt"),
        ("u1|prompt|p.wav|  ", "u1", "infer_text", "empty infer_text"),
        ("u1|prompt||text", "u1", "prompt_wav", "empty prompt_wav"),
    ],
)
def test_seedtts_malformed_lines(tmp_path: Path, line: str, row_id, field: str, reason: str) -> None:
    meta = tmp_path / "meta.lst"
    meta.write_text(f"good|p|g.wav|fine\n\n{line}\nlast|p|l.wav|fine\n", encoding="utf-8")
    rows = read_seedtts_meta(str(meta))
    assert [r["id"] for r in rows] == ["good", row_id, "last"]
    bad = rows[1]
    assert bad["_error"] == f"line 3: {reason}"
    assert bad["_error_field"] == field
    assert bad["text"] is None and bad["references"] == []
    assert rows[0]["_error"] is None and rows[2]["_error"] is None


def test_seedtts_duplicate_utt(tmp_path: Path) -> None:
    meta = tmp_path / "meta.lst"
    meta.write_text("x|p|1.wav|one\ny|p|2.wav|two\nx|p|3.wav|three\n", encoding="utf-8")
    rows = read_seedtts_meta(str(meta))
    assert [r["id"] for r in rows] == ["x", "y", "x"]
    assert rows[0]["_error"] is None and rows[0]["text"] == "one"
    assert rows[2]["_error"] == "line 3: duplicate utt (first at line 1)"
    assert rows[2]["_error_field"] == "utt"


def test_seedtts_crlf_and_bom(tmp_path: Path) -> None:
    meta = tmp_path / "meta.lst"
    meta.write_bytes("\ufeffu|p|w.wav|text\r\n\r\n".encode())
    [row] = read_seedtts_meta(str(meta))
    assert (row["id"], row["text"], row["_error"]) == ("u", "text", None)


def _jsonl(path: Path, records: list) -> str:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8"
    )
    return str(path)


def test_emergent_rows(tmp_path: Path) -> None:
    uri = _jsonl(
        tmp_path / "emergent.jsonl",
        [
            {"category": "Emotions", "text_to_synthesize": "Wow!", "evolution_depth": 0, "language": "en"},
            "",
            {
                "category": "Questions",
                "text_to_synthesize": "Really?",
                "evolution_depth": 2,
                "language": "en",
            },
        ],
    )
    voice = {"audio": "s3://voices/belinda.wav", "transcript": "Hi there."}
    rows = read_emergent_jsonl(uri, voice=voice)
    assert [r["id"] for r in rows] == ["0", "1"]
    assert [r["unique_id_eval"] for r in rows] == [0, 1]
    assert [r["line_number"] for r in rows] == [1, 3]
    assert [r["category"] for r in rows] == ["Emotions", "Questions"]
    assert [r["evolution_depth"] for r in rows] == [0, 2]
    assert rows[1]["text"] == "Really?" and rows[1]["language"] == "en"
    expected = [{"audio": "s3://voices/belinda.wav", "transcript": "Hi there.", "speaker_tag": None}]
    assert all(r["references"] == expected for r in rows)
    assert rows[0]["references"] is not rows[1]["references"]  # no shared mutable state between rows
    assert all(r["_error"] is None and r["eval_set"] == "emergent" for r in rows)


def test_emergent_without_voice_and_bad_lines(tmp_path: Path) -> None:
    uri = _jsonl(
        tmp_path / "e.jsonl",
        [
            {"category": "A", "text_to_synthesize": "one"},
            '{"category": "B", "text_to_synthesize": ',
            {"category": "C"},
            ["not", "an", "object"],
            {"category": "D", "text_to_synthesize": "four"},
        ],
    )
    rows = read_emergent_jsonl(uri)
    # Bad rows still take their index, so later ids keep matching the dataset's row order.
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["references"] == [] and rows[0]["_error"] is None
    assert rows[1]["_error"].startswith("line 2: invalid JSON")
    assert rows[1]["_error_field"] == "line"
    assert rows[2]["_error"] == "line 3: missing or empty text_to_synthesize"
    assert rows[2]["_error_field"] == "text_to_synthesize" and rows[2]["category"] == "C"
    assert rows[3]["_error"] == "line 4: expected a JSON object, got list"
    assert rows[4]["text"] == "four" and rows[4]["_error"] is None


@pytest.mark.parametrize(
    "voice", [{"transcript": "x"}, {"audio": ""}, "voice.wav", {"audio": "a", "transcript": 3}]
)
def test_emergent_bad_voice_raises(tmp_path: Path, voice) -> None:
    uri = _jsonl(tmp_path / "e.jsonl", [{"text_to_synthesize": "x"}])
    with pytest.raises(ValueError, match="voice"):
        read_emergent_jsonl(uri, voice=voice)


def test_output_key(tmp_path: Path) -> None:
    meta = tmp_path / "meta.lst"
    meta.write_text("utt-1|p|w.wav|text\n", encoding="utf-8")
    [seed] = read_seedtts_meta(str(meta))
    assert output_key("seedtts", seed) == "utt-1.wav"
    emergent = read_emergent_jsonl(_jsonl(tmp_path / "e.jsonl", [{"text_to_synthesize": "a"}] * 12))
    assert output_key("emergent", emergent[11]) == "11.wav"


@pytest.mark.parametrize(
    ("eval_set", "row"),
    [
        ("librispeech", {"id": "x"}),
        ("seedtts", {"id": None}),
        ("seedtts", {"id": "../x"}),
        ("seedtts", {"id": "a/b"}),
        ("emergent", {"id": "3"}),  # emergent names come from unique_id_eval, not id
        ("emergent", {"unique_id_eval": True}),
    ],
)
def test_output_key_rejects(eval_set: str, row: dict) -> None:
    with pytest.raises(ValueError):
        output_key(eval_set, row)
