"""Hostile manifest rows: each becomes status=error for that row, with a message naming the field, and
nothing else is affected.

One manifest holds every bad row and a few good ones; the job runs once (module fixture, which also checks
the shared output contract) and each row's record is checked by its own parametrized test. Reference
URLs that need private addresses allowed (a server that never answers, a response over the size limit)
run in a second, smaller job, since the policy is per job.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf

from pipeline.dataset_job import run_dataset_job
from pipeline.manifest import ManifestRules, validate_row
from pipeline.references import FetchPolicy
from tests.helpers import (
    assert_output_contract,
    make_job,
    objects,
    read_metadata,
    serve_audio,
    text_row,
    voices_copy,
    write_jsonl,
    write_parquet,
)

LOCAL = fsspec.filesystem("file")
URL_TOKEN = "hb-url-token-0c4f11"  # a password in a reference URL: refused, and never shown


@dataclass(frozen=True)
class Case:
    name: str  # the test id
    row: dict  # its manifest columns
    recorded_id: str  # the id its metadata row carries (an invalid id is recorded as its repr)
    field: str
    reason: str  # a phrase the error must contain


def bad(name: str, field: str, reason: str, *, id=None, **columns) -> Case:
    """A bad row named `name`; a row whose id itself is bad passes it as `id` and is recorded by its repr."""
    if id is None:
        return Case(name, {"id": name, **columns}, name, field, reason)
    return Case(name, {"id": id, **columns}, repr(id), field, reason)


@dataclass
class Voices:
    root: Path  # the allowed root
    outside: Path  # a clip outside it


def reference(audio: str) -> list[dict]:
    return [{"audio": audio, "transcript": "Hello there."}]


def cases(voices: Voices, server_url: str) -> list[Case]:
    root, outside = voices.root, voices.outside
    ref = "references[0].audio"
    return [
        # ---- ids: they become object keys, so anything that could name another path is refused
        bad("id-slash", "id", "contains a path separator", id="a/b"),
        bad("id-backslash", "id", "contains a path separator", id="a\\b"),
        bad("id-traversal", "id", "contains a path separator", id="../escape"),
        bad("id-dot-dot", "id", "must not be '.' or '..'", id=".."),
        bad("id-inner-dot-dot", "id", "must not contain '..'", id="a..b"),
        bad("id-absolute", "id", "is an absolute path", id="/etc/passwd"),
        bad("id-empty", "id", "is empty", id=""),
        Case("id-missing", {"id": None}, "None", "id", "is missing"),
        bad("id-over-long", "id", "is longer than 128 characters (129)", id="x" * 129),
        bad("id-control-bell", "id", "contains control character U+0007", id="bell\x07"),
        bad("id-control-newline", "id", "contains control character U+000A", id="new\nline"),
        # ("id-duplicated" is added by the fixture: two rows, one record)
        # ---- text
        bad("text-empty", "text", "is empty or whitespace only", text=""),
        bad("text-whitespace", "text", "is empty or whitespace only", text=" \t\n  "),
        bad("text-1-mb", "text", "is longer than 20000 characters (1000000)", text="a" * 1_000_000),
        bad("text-nul", "text", "contains control character U+0000 at position 5", text="Hello\x00world"),
        bad("text-escape", "text", "contains control character U+001B", text="Red \x1b[31malert"),
        # ---- sampling parameters
        bad("temperature-nan", "temperature", "is NaN", temperature=math.nan),
        bad("temperature-infinite", "temperature", "must be in [0, 2]", temperature=math.inf),
        bad("temperature-negative", "temperature", "must be in [0, 2]", temperature=-0.5),
        bad("seed-negative", "seed", "must be in [0, ", seed=-1),
        bad("top-p-out-of-range", "top_p", "must be in (0, 1]", top_p=1.5),
        bad("max-new-tokens-out-of-range", "max_new_tokens", "must be in [1, 4096]", max_new_tokens=10**6),
        bad("top-k-wrong-type", "top_k", "must be an integer, got str", top_k="ten"),
        bad("ras-win-len-wrong-type", "ras_win_len", "must be an integer, got bool", ras_win_len=True),
        bad("response-format-unknown", "response_format", "must be one of wav, flac", response_format="mp3"),
        # ---- references
        bad("ref-missing-file", ref, "not found", references=reference(str(root / "missing.wav"))),
        bad(
            "ref-corrupt-file",
            ref,
            "not a decodable audio file",
            references=reference(str(root / "corrupt.wav")),
        ),
        bad("ref-silent-clip", ref, "clip is silent", references=reference(str(root / "silent.wav"))),
        bad(
            "ref-ten-minute-clip",
            ref,
            "clip is 600.0 s long; reference clips may be at most 60 s",
            references=reference(str(root / "ten-minutes.wav")),
        ),
        bad(
            "ref-too-short-clip",
            ref,
            "clip is 0.00417 s long; reference clips must be at least 0.5 s",
            references=reference(str(root / "click.wav")),
        ),
        bad("ref-directory", ref, "is a directory, not a file", references=reference(str(root / "a-folder"))),
        bad("ref-fifo", ref, "is not a regular file", references=reference(str(root / "fifo.wav"))),
        bad(
            "ref-outside-roots",
            ref,
            "not a path under the allowed roots",
            references=reference(str(outside)),
        ),
        bad(
            "ref-traversal-out-of-root",
            ref,
            "not a path under the allowed roots",
            references=reference(f"{root}/../{outside.parent.name}/{outside.name}"),
        ),
        bad(
            "ref-symlink-out-of-root",
            ref,
            "not a path under the allowed roots",
            references=reference(str(root / "escape.wav")),
        ),
        bad(
            "ref-ssrf-loopback",
            ref,
            "'127.0.0.1' resolves to a private/loopback address",
            references=reference(f"{server_url}/voice.wav"),
        ),
        bad(
            "ref-url-credentials",
            ref,
            "credentials in the URL are not supported",
            references=reference(server_url.replace("://", f"://user:{URL_TOKEN}@") + "/voice.wav"),
        ),
        bad("ref-base64-garbage", ref, "not valid base64", references=reference("QUJDRA" * 3 + "A")),
        bad(
            "ref-data-uri-not-audio",
            ref,
            "data URI media type 'text/plain' is not audio/*",
            references=reference("data:text/plain;base64,SGVsbG8gd29ybGQ="),
        ),
    ]


def make_voices(folder: Path) -> Voices:
    """A copy of the example voices plus every kind of bad clip, and a clip outside the allowed root."""
    root = voices_copy(folder)
    outside = folder / "elsewhere" / "clip.wav"
    outside.parent.mkdir()
    outside.write_bytes((root / "en_man.wav").read_bytes())
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEjunk" + os.urandom(2048))
    sf.write(root / "silent.wav", np.zeros(24_000, dtype=np.int16), 24_000)
    # 100 samples: shorter than the codec's encoder can take at all (119).
    sf.write(root / "click.wav", np.full(100, 8000, dtype=np.int16), 24_000)
    # Ten minutes at 8 kHz (9.6 MB): a quiet tone, so only its length is wrong with it.
    period = (1000 * np.sin(np.linspace(0, 2 * np.pi, 80, endpoint=False))).astype(np.int16)
    sf.write(root / "ten-minutes.wav", np.tile(period, 600 * 8000 // 80), 8000)
    (root / "a-folder").mkdir()
    os.mkfifo(root / "fifo.wav")
    (root / "escape.wav").symlink_to(outside)
    return Voices(root, outside)


GOOD = ["good-0", "good-1", "good-clone"]


@pytest.fixture(scope="module")
def hostile_run(ray_local, tiny_checkpoint, tmp_path_factory):
    """Every bad row and three good ones through one job; the output contract holds; records by id."""
    folder = tmp_path_factory.mktemp("hostile")
    voices = make_voices(folder)
    with serve_audio() as server:
        all_cases = cases(voices, server.url("").rstrip("/"))
        rows = [text_row(0, id="good-0"), text_row(1, id="good-1")]
        rows.append(text_row(2, id="good-clone", references=reference(str(voices.root / "en_man.wav"))))
        rows += [{**text_row(10 + i), **case.row} for i, case in enumerate(all_cases)]
        rows += [text_row(90, id="id-duplicated"), text_row(91, id="id-duplicated")]
        manifest = write_parquet(folder / "manifest.parquet", rows)
        before = objects(LOCAL, str(folder))
        out = folder / "out"
        started = time.monotonic()
        summary = run_dataset_job(
            make_job(
                str(manifest), str(out), tiny_checkpoint, fetch=FetchPolicy(allowed_roots=(str(voices.root),))
            )
        )
        elapsed = time.monotonic() - started
        requests = list(server.requests)

    recorded = [*GOOD, *(case.recorded_id for case in all_cases), "id-duplicated"]
    metadata = assert_output_contract(LOCAL, str(out), recorded, container=str(folder), before=before)
    return {
        "metadata": metadata,
        "summary": summary,
        "requests": requests,
        "elapsed": elapsed,
        "cases": {case.name: case for case in all_cases},
        "out": out,
    }


# The case names, for parametrizing (the cases themselves need the fixture's folders and server).
CASE_NAMES = [case.name for case in cases(Voices(Path("/r"), Path("/o/c.wav")), "http://127.0.0.1:1")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_hostile_row_errors_naming_its_field(hostile_run, name: str) -> None:
    case = hostile_run["cases"][name]
    row = hostile_run["metadata"][case.recorded_id]

    assert row["status"] == "error"
    assert row["error_field"] == case.field
    assert row["error"].startswith(case.field), row["error"]
    assert not row["error"].startswith(f"{case.field}: {case.field}"), row["error"]  # named once
    assert case.reason in row["error"], row["error"]
    assert row["file_name"] is None and row["audio_uri"] is None and row["duration_s"] is None
    assert len(row["error"]) < 400  # a 1 MB text or a long id is quoted, not copied


def test_a_duplicated_id_gets_one_error_record_and_no_audio(hostile_run) -> None:
    row = hostile_run["metadata"]["id-duplicated"]

    assert (row["status"], row["error_field"]) == ("error", "id")
    assert "duplicate id at manifest rows" in row["error"]


def test_the_good_rows_beside_the_hostile_ones_are_synthesised(hostile_run) -> None:
    metadata, summary = hostile_run["metadata"], hostile_run["summary"]

    assert {row_id for row_id, row in metadata.items() if row["status"] == "ok"} == set(GOOD)
    assert summary["this_run"]["by_status"] == {"ok": len(GOOD), "error": len(metadata) - len(GOOD)}
    # The SSRF and credential rows were refused before any request reached the server.
    assert hostile_run["requests"] == []
    assert URL_TOKEN not in str(metadata)
    assert not any(URL_TOKEN.encode() in p.read_bytes() for p in hostile_run["out"].rglob("*") if p.is_file())


def test_an_unpaired_surrogate_is_refused_by_validation_naming_the_field() -> None:
    # Arrow strings are UTF-8, which cannot hold a lone surrogate: no Parquet or CSV file can carry one, so
    # the check validation applies to every row is called directly (a JSONL line can: below).
    row = validate_row({"id": "surrogate", "text": "broken \ud800 text"}, ManifestRules())

    assert (row["status"], row["error_field"]) == ("error", "text")
    assert "contains unpaired surrogate U+D800 at position 7" in row["error"]


def test_a_jsonl_line_with_an_unpaired_surrogate_errors_alone(ray_local, tiny_checkpoint, tmp_path) -> None:
    # JSON can spell one ("\\ud800"). Arrow's JSON reader refused the whole file; read line by line, the
    # row's text is checked like any other and only that row errors.
    manifest = tmp_path / "manifest.jsonl"
    write_jsonl(manifest, [text_row(0), text_row(1, id="surrogate", text="broken \ud800 text")])
    assert "\\ud800" in manifest.read_text()
    out = tmp_path / "out"

    run_dataset_job(make_job(str(manifest), str(out), tiny_checkpoint))

    records = {r["id"]: r for r in read_metadata(LOCAL, str(out)).to_pylist()}
    assert (records["row-0"]["status"], records["surrogate"]["status"]) == ("ok", "error")
    assert records["surrogate"]["error_field"] == "text"
    assert "contains unpaired surrogate U+D800 at position 7" in records["surrogate"]["error"]


def test_urls_that_never_answer_or_answer_too_much_error_alone(ray_local, tiny_checkpoint, tmp_path) -> None:
    with serve_audio() as server:
        rows = [
            text_row(0, id="good-0"),
            text_row(1, id="ref-never-answers", references=reference(server.url("/never.wav"))),
            text_row(2, id="ref-over-size-limit", references=reference(server.url("/big.wav"))),
            text_row(
                3, id="ref-over-size-limit-unsized", references=reference(server.url("/big-unsized.wav"))
            ),
            text_row(4, id="good-1"),
        ]
        manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
        out = tmp_path / "out"
        # Private addresses allowed (the server is on 127.0.0.1), a 1 s budget per fetch, 1 KiB per clip.
        policy = FetchPolicy(allow_private_urls=True, timeout_s=1.0, max_bytes=1024)
        started = time.monotonic()
        summary = run_dataset_job(make_job(str(manifest), str(out), tiny_checkpoint, fetch=policy))
        elapsed = time.monotonic() - started
        paths = server.paths

    metadata = assert_output_contract(
        LOCAL, str(out), [row["id"] for row in rows], container=str(tmp_path), before={str(manifest)}
    )
    assert summary["this_run"]["by_status"] == {"ok": 2, "error": 3}
    assert metadata["ref-never-answers"]["error"].endswith("no answer within 1 s")
    for row_id in ("ref-over-size-limit", "ref-over-size-limit-unsized"):
        assert metadata[row_id]["error_field"] == "references[0].audio"
        assert metadata[row_id]["error"].endswith("response is larger than the limit of 1024 bytes")
    assert sorted(paths) == ["/big-unsized.wav", "/big.wav", "/never.wav"]
    assert elapsed < 120
