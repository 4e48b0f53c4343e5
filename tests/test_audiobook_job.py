"""The audiobook job: books in, chapter MP3s + M4B + QC out, with per-chunk resume.

The end-to-end runs use the tiny checkpoint on a local Ray (2 CPUs); its "speech" is noise, which is
enough to check the chapter layout, the encodings and that mastering meets ACX on the files it writes.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ebooklib import epub

from model.checkpoint import CheckpointSpec
from model.engine import EngineOptions
from pipeline.attempts import ATTEMPTS_DIR, MAX_STARTS, AttemptLog
from pipeline.audiobook_job import AudiobookJob, run_audiobook_job
from pipeline.book_stage import BookSettings, BookStage, ChunkingSettings
from pipeline.chapter_stage import ChapterSettings, ChapterStage
from pipeline.dataset_job import Resources
from pipeline.export import decode, probe
from pipeline.json_lines import lines_block
from pipeline.manifest import ManifestRules
from pipeline.mastering import measure_qc
from pipeline.references import FetchPolicy
from pipeline.stages import pack, unpack
from pipeline.storage import Storage

REPO = Path(__file__).resolve().parents[1]
VOICES = REPO / "examples" / "voices"
ALICE = REPO / "examples" / "books" / "alice.txt"
ALICE_TITLES = ["CHAPTER I. Down the Rabbit-Hole", "CHAPTER II. The Pool of Tears"]
EPUB_TITLES = ["The Looking-Glass", "The Garden of Live Flowers"]
GEN = {"max_new_tokens": 30, "seed": 3}


# ---- inputs ---------------------------------------------------------------------------------------


def png(width: int = 2, height: int = 2) -> bytes:
    """A real (tiny, grey) PNG: the M4B's cover atom is probed by ffmpeg, so it must decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def epub_bytes(chapters: list[tuple[str, str]], cover: bytes | None = None) -> bytes:
    """An EPUB 3 with a nav, an NCX, an optional cover and one page per (title, paragraphs) chapter."""
    book = epub.EpubBook()
    book.set_identifier("looking-glass-test")
    book.set_title("Through the Looking-Glass")
    book.set_language("en")
    book.add_author("Lewis Carroll")
    if cover is not None:
        book.set_cover("images/cover.png", cover)
    pages = []
    for i, (title, body) in enumerate(chapters, start=1):
        page = epub.EpubHtml(title=title, file_name=f"text/ch{i}.xhtml", lang="en")
        page.content = f"<html><head><title>{title}</title></head><body><h1>{title}</h1>{body}</body></html>"
        book.add_item(page)
        pages.append(page)
    book.toc = [epub.Link(p.file_name, p.title, f"ch{i}") for i, p in enumerate(pages, start=1)]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = (["cover"] if cover is not None else []) + ["nav", *pages]
    buffer = io.BytesIO()
    epub.write_epub(buffer, book)
    return buffer.getvalue()


def looking_glass(cover: bool = True) -> bytes:
    # Public domain: Lewis Carroll, Through the Looking-Glass (1871).
    return epub_bytes(
        [
            (
                EPUB_TITLES[0],
                "<p>One thing was certain, that the white kitten had had nothing to do with it.</p>",
            ),
            (EPUB_TITLES[1], "<p>I should see the garden far better, said Alice to herself.</p>"),
        ],
        cover=png() if cover else None,
    )


def write_manifest(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def book_settings(root: Path, **kw) -> BookSettings:
    return BookSettings(
        output=str(root / "out"),
        rules=ManifestRules(voice_library=str(VOICES)),
        voices=FetchPolicy(allowed_roots=(str(VOICES),)),
        sources=FetchPolicy(allowed_roots=(str(root), str(ALICE.parent))),
        **kw,
    )


def make_job(root: Path, books: str, checkpoint: str, batch_size: int = 8, **kw) -> AudiobookJob:
    """A job over `books`; batch_size 0 is runtime.batch_size=auto (slots from free memory, 16 on a CPU)."""
    book = kw.pop("book", None) or book_settings(root)
    return AudiobookJob(
        books=books,
        output=str(root / "out"),
        checkpoint=CheckpointSpec(source=checkpoint, device="cpu"),
        book=book,
        engine=EngineOptions(max_batch_size=batch_size),
        resources=Resources(
            actors=1, cpus_per_actor=1.0, batch_size=batch_size, cpu_stage_workers=1, cpu_stage_cpus=0.2
        ),
        **kw,
    )


def book_rows(out: Path) -> dict[str, dict]:
    """Each book's newest metadata row."""
    rows: dict[str, dict] = {}
    for part in sorted((out / "metadata").glob("books-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            if row["book_id"] not in rows or row["finished_at"] >= rows[row["book_id"]]["finished_at"]:
                rows[row["book_id"]] = row
    return rows


@pytest.fixture(scope="module")
def rendered(ray_local, tiny_checkpoint, tmp_path_factory):
    """One run over a plain-text book and an EPUB with runtime.batch_size=auto; the tests below read what
    it wrote."""
    root = tmp_path_factory.mktemp("audiobooks")
    (root / "looking-glass.epub").write_bytes(looking_glass())
    books = write_manifest(
        root / "books.jsonl",
        [
            {
                "book_id": "alice",
                "source": str(ALICE),
                "title": "Alice's Adventures in Wonderland",
                "author": "Lewis Carroll",
                "narrator": "en_woman",
                "language": "en",
                **GEN,
            },
            # No title/author: they come from the EPUB's own metadata.
            {
                "book_id": "looking-glass",
                "source": str(root / "looking-glass.epub"),
                "narrator": "profile:female_en_story",
                **GEN,
            },
        ],
    )
    summary = run_audiobook_job(
        make_job(root, books, tiny_checkpoint, batch_size=0, buffer_size=1, config_yaml="model: tiny\n")
    )
    return root / "out", summary


# ---- end to end -------------------------------------------------------------------------------------


def test_every_book_finishes_with_its_files_and_metadata(rendered) -> None:
    out, summary = rendered
    run = summary["this_run"]
    assert run["by_status"] == {"ok": 2}
    assert run["chapters"] == 4
    assert run["chunks_resumed"] == 0
    chunk_files = list(out.glob("*/chunks/*/*.npy"))
    assert run["chunks_generated"] == len(chunk_files) > 0
    assert len(list(out.glob("*/chunks/*/*.wav"))) == len(chunk_files)
    assert summary["buffer_size"] == 1
    assert (out / "config.yaml").read_text() == "model: tiny\n"
    assert json.loads((out / "summary.json").read_text()) == summary

    rows = book_rows(out)
    assert set(rows) == {"alice", "looking-glass"}
    for book_id, row in rows.items():
        assert row["status"] == "ok" and row["error"] is None
        assert row["chapters"] == 2
        assert row["qc_passed"] is True
        assert row["m4b_uri"].endswith(f"{book_id}/{book_id}.m4b")
        assert row["duration_s"] == pytest.approx(probe(out / book_id / f"{book_id}.m4b")["duration_s"])
    assert (rows["alice"]["title"], rows["alice"]["author"]) == (
        "Alice's Adventures in Wonderland",
        "Lewis Carroll",
    )
    assert (rows["looking-glass"]["title"], rows["looking-glass"]["author"]) == (
        "Through the Looking-Glass",
        "Lewis Carroll",
    )
    assert summary["output_totals"]["by_status"] == {"ok": 2}


def test_chunks_cut_off_at_max_new_tokens_are_counted_per_book_and_listed_per_chapter_in_qc_csv(
    rendered,
) -> None:
    out, summary = rendered
    # max_new_tokens=30 (GEN) cuts off every chunk of the tiny checkpoint.
    markers = {p.with_suffix("") for p in out.glob("*/chunks/*/*.cutoff")}
    assert len(markers) == summary["this_run"]["chunks_cut_off"] == summary["this_run"]["chunks_generated"]
    for book_id, row in book_rows(out).items():
        lines = (out / book_id / "qc.csv").read_text().splitlines()
        header = lines[0].split(",")
        listed = [line.split(",")[header.index("chunks_cut_off")].split() for line in lines[1:]]
        assert row["chunks_cut_off"] == sum(len(chunks) for chunks in listed) > 0
        for chapter, chunks in enumerate(listed, start=1):
            folder = out / book_id / "chunks" / f"{chapter:03d}"
            assert {folder / f"{int(k):04d}" for k in chunks} == {m for m in markers if m.parent == folder}


@pytest.mark.parametrize(("book_id", "titles"), [("alice", ALICE_TITLES), ("looking-glass", EPUB_TITLES)])
def test_chapter_mp3s_are_192_kbps_44_1_khz_in_order(rendered, book_id, titles) -> None:
    out, _ = rendered
    files = sorted((out / book_id / "chapters").glob("*.mp3"))
    assert [f.name for f in files] == ["001.mp3", "002.mp3"]
    for number, (path, title) in enumerate(zip(files, titles, strict=True), start=1):
        info = probe(path)
        assert info["codec"] == "mp3"
        assert info["sample_rate"] == 44100 and info["channels"] == 1
        assert info["audio_bit_rate_kbps"] == 192
        assert info["tags"]["title"] == title
        assert info["tags"]["track"] == f"{number}/2"
        assert info["tags"]["genre"] == "Audiobook"


@pytest.mark.parametrize(
    ("book_id", "titles", "title", "cover"),
    [
        ("alice", ALICE_TITLES, "Alice's Adventures in Wonderland", False),
        ("looking-glass", EPUB_TITLES, "Through the Looking-Glass", True),
    ],
)
def test_m4b_has_one_marker_per_chapter_with_tags_and_cover(rendered, book_id, titles, title, cover) -> None:
    out, _ = rendered
    info = probe(out / book_id / f"{book_id}.m4b")
    assert info["codec"] == "aac"
    assert [c["title"] for c in info["chapters"]] == titles
    chapters = info["chapters"]
    assert chapters[0]["start_s"] == 0.0
    assert chapters[0]["end_s"] == pytest.approx(chapters[1]["start_s"])
    assert chapters[-1]["end_s"] == pytest.approx(info["duration_s"], abs=0.05)
    # Each marker spans its chapter's MP3.
    for chapter, mp3 in zip(chapters, sorted((out / book_id / "chapters").glob("*.mp3")), strict=True):
        assert chapter["end_s"] - chapter["start_s"] == pytest.approx(probe(mp3)["duration_s"], abs=0.05)
    assert info["tags"]["title"] == title
    assert info["tags"]["artist"] == "Lewis Carroll"
    assert info["has_cover"] is cover


@pytest.mark.parametrize("book_id", ["alice", "looking-glass"])
def test_the_encoded_chapters_meet_acx_and_qc_csv_says_so(rendered, book_id) -> None:
    out, _ = rendered
    lines = (out / book_id / "qc.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in ("rms_ok", "peak_ok", "noise_floor_ok", "head_ok", "tail_ok", "sample_rate_ok", "passed"):
        assert column in header
    qc_rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [r["number"] for r in qc_rows] == ["1", "2"]
    for row, mp3 in zip(qc_rows, sorted((out / book_id / "chapters").glob("*.mp3")), strict=True):
        audio, rate = decode(mp3)
        qc = measure_qc(audio, rate)
        assert -23.0 <= qc.rms_db <= -18.0, qc
        assert qc.peak_db <= -3.0, qc
        assert qc.noise_floor_db <= -60.0, qc
        assert 0.5 <= qc.head_silence_s <= 1.0, qc
        assert 1.0 <= qc.tail_silence_s <= 5.0, qc
        assert qc.sample_rate == 44100 and qc.passed
        assert row["passed"] == "True"
        assert float(row["rms_db"]) == qc.rms_db and float(row["peak_db"]) == qc.peak_db


def test_bad_books_fail_with_their_reason_while_a_good_one_finishes(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    (tmp_path / "drm.epub").write_bytes(_with_files(looking_glass(), {"META-INF/rights.xml": "<rights/>"}))
    (tmp_path / "holes.txt").write_text(
        "CHAPTER I.\n\nSome words.\n\nCHAPTER II.\n\nCHAPTER III.\n\nMore words.\n"
    )
    (tmp_path / "long.txt").write_text("CHAPTER I.\n\n" + "Word after word. " * 30)
    (tmp_path / "good.txt").write_text("CHAPTER I.\n\nA short and happy book.\n")
    voice = {"narrator": "en_man", **GEN}
    books = write_manifest(
        tmp_path / "books.jsonl",
        [
            {"book_id": "drm", "source": str(tmp_path / "drm.epub"), **voice},
            {"book_id": "holes", "source": str(tmp_path / "holes.txt"), **voice},
            {"book_id": "nobody", "source": str(tmp_path / "good.txt"), **{**voice, "narrator": "nobody"}},
            {"book_id": "long", "source": str(tmp_path / "long.txt"), **voice},
            {"book_id": "twice", "source": str(tmp_path / "good.txt"), **voice},
            {"book_id": "twice", "source": str(tmp_path / "good.txt"), **voice},
            {"book_id": "good", "source": str(tmp_path / "good.txt"), **voice},
        ],
    )
    book = book_settings(tmp_path, max_book_words=40)
    summary = run_audiobook_job(make_job(tmp_path, books, tiny_checkpoint, book=book))

    rows = book_rows(tmp_path / "out")
    assert summary["this_run"]["by_status"] == {"error": 5, "ok": 1}
    assert rows["good"]["status"] == "ok"
    assert (tmp_path / "out" / "good" / "good.m4b").is_file()
    expected = {
        "drm": ("source", "EPUB is DRM-protected (META-INF/rights.xml)"),
        "holes": ("source", "chapter 2 ('CHAPTER II.') is empty"),
        "nobody": ("narrator", "unknown voice 'nobody'"),
        "long": ("source", "the book has 90 words, more than max_book_words=40"),
        "twice": ("book_id", "duplicate at manifest rows [4, 5]"),
    }
    for book_id, (field, reason) in expected.items():
        row = rows[book_id]
        assert (row["status"], row["error_field"]) == ("error", field), row
        assert reason in row["error"], row["error"]
        # Nothing was rendered for a book that failed its checks.
        assert not (tmp_path / "out" / book_id / "chunks").exists()


def test_a_killed_run_resumes_per_chunk_and_finished_books_are_skipped(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    text = "CHAPTER I.\n\nOne word. Two words. Three words.\n\nCHAPTER II.\n\nFour words. Five words.\n"
    (tmp_path / "short.txt").write_text(text)
    books = write_manifest(
        tmp_path / "books.jsonl",
        [{"book_id": "short", "source": str(tmp_path / "short.txt"), "narrator": "en_man", **GEN}],
    )
    # One sentence per chunk: three chunks in chapter 1, two in chapter 2.
    book = book_settings(tmp_path, chunking=ChunkingSettings(method="sentence", max_words=2))
    out = tmp_path / "out"

    # "Killed" after one chunk per chapter: the limit stops each chapter where a crash would.
    first = run_audiobook_job(make_job(tmp_path, books, tiny_checkpoint, book=book, max_new_chunks=1))
    assert first["this_run"]["by_status"] == {"incomplete": 1}
    assert first["this_run"]["chunks_generated"] == 2
    assert book_rows(out)["short"]["status"] == "incomplete"
    assert not (out / "short" / "short.m4b").exists()
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("short/chunks/*/0000.*")}
    assert len(kept) == 6  # .npy, .wav and .cutoff (GEN's max_new_tokens cuts every chunk) for each chapter

    second = run_audiobook_job(make_job(tmp_path, books, tiny_checkpoint, book=book))
    assert second["this_run"]["by_status"] == {"ok": 1}
    assert second["this_run"]["chunks_resumed"] == 2
    assert second["this_run"]["chunks_generated"] == 3  # 5 chunks in all, 2 already stored
    for path, (data, mtime) in kept.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert len(list(out.glob("short/chunks/*/*.npy"))) == 5
    assert [c["title"] for c in probe(out / "short" / "short.m4b")["chapters"]] == [
        "CHAPTER I.",
        "CHAPTER II.",
    ]

    third = run_audiobook_job(make_job(tmp_path, books, tiny_checkpoint, book=book))
    assert third["skipped_as_finished"] == 1
    assert third["this_run"]["books"] == 0 and third["this_run"]["chunks_generated"] == 0
    assert third["output_totals"]["by_status"] == {"ok": 1}


# ---- the stages on their own (no Ray) ----------------------------------------------------------------


def _with_files(data: bytes, files: dict[str, str]) -> bytes:
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def plan(tmp_path: Path, raw: dict, **kw) -> list[dict]:
    return BookStage(book_settings(tmp_path, **kw)).plan(raw)


def test_book_stage_explodes_a_book_into_chunked_chapters(tmp_path) -> None:
    (tmp_path / "b.txt").write_text(
        "CHAPTER I.\n\nFirst paragraph. It has two sentences.\n\n* * *\n\nSecond paragraph.\n\n"
        "CHAPTER II.\n\nOnly one here.\n"
    )
    rows = plan(
        tmp_path,
        {"book_id": "b", "source": str(tmp_path / "b.txt"), "narrator": "en_man", "temperature": 0.7},
        chunking=ChunkingSettings(max_words=4),
    )
    assert [(r["chapter"], r["chapter_title"], r["chapters"]) for r in rows] == [
        (1, "CHAPTER I.", 2),
        (2, "CHAPTER II.", 2),
    ]
    # Sentence chunks of at most 4 words; "* * *" has no words and is dropped.
    assert rows[0]["chunks"] == ["First paragraph.", "It has two sentences.", "Second paragraph."]
    assert rows[0]["paragraph_ends"] == [False, True, True]
    assert rows[0]["request"]["temperature"] == 0.7
    assert rows[0]["request"]["max_new_tokens"] == 2048  # the rules' default fills what a book leaves out
    (ref,) = rows[0]["request"]["references"]
    assert ref["audio"] == str(VOICES / "en_man.wav") and ref["transcript"]
    assert rows[0]["_audio"] == [(VOICES / "en_man.wav").read_bytes()]


def test_characters_voice_tagged_chapters_and_the_narrator_the_rest(tmp_path) -> None:
    (tmp_path / "d.md").write_text(
        "# Narration\n\nIt was a quiet evening.\n\n"
        "# Dialogue\n\n[SPEAKER0] Did you hear that?\n[SPEAKER1] Only the wind.\n"
    )
    narrator = {"audio": str(VOICES / "belinda.wav"), "transcript": "Hello there."}
    rows = plan(
        tmp_path,
        {
            "book_id": "d",
            "source": str(tmp_path / "d.md"),
            "narrator": json.dumps(narrator),  # a JSONL column of strings may carry the dict as JSON
            "characters": {"SPEAKER1": "en_man", "SPEAKER0": "profile:female_en_story", "SPEAKER2": None},
        },
        chunking=ChunkingSettings(method="speaker"),
    )
    narration, dialogue = rows
    assert [r["audio"] for r in narration["request"]["references"]] == [str(VOICES / "belinda.wav")]
    refs = dialogue["request"]["references"]
    assert [r["speaker_tag"] for r in refs] == ["SPEAKER0", "SPEAKER1"]
    assert refs[0]["profile"] and refs[1]["audio"] == str(VOICES / "en_man.wav")
    assert dialogue["_audio"] == [None, (VOICES / "en_man.wav").read_bytes()]
    assert dialogue["chunks"] == ["[SPEAKER0] Did you hear that?", "[SPEAKER1] Only the wind."]


def test_a_books_jsonl_may_give_one_narrator_by_name_and_the_next_as_a_clip(tmp_path) -> None:
    # Arrow's JSON reader refused such a manifest whole (a column of strings and objects), and any bad
    # line with it; read line by line, each line is its own book and a bad line errors alone.
    (tmp_path / "b.txt").write_text("One sentence here.\n")
    clip = {"audio": str(VOICES / "belinda.wav"), "transcript": "Hello there."}
    lines = [
        json.dumps({"book_id": "by-name", "source": str(tmp_path / "b.txt"), "narrator": "en_man"}).encode(),
        b'{"book_id": "cut", "source": ',
        json.dumps({"book_id": "by-clip", "source": str(tmp_path / "b.txt"), "narrator": clip}).encode(),
    ]

    rows = unpack(BookStage(book_settings(tmp_path))(lines_block(list(enumerate(lines, start=1)))))

    by_book = {r["book_id"]: r for r in rows}
    assert by_book["by-name"]["request"]["references"][0]["audio"] == str(VOICES / "en_man.wav")
    assert by_book["by-clip"]["request"]["references"][0]["audio"] == str(VOICES / "belinda.wav")
    assert (by_book["by-name"]["status"], by_book["by-clip"]["status"]) == ("pending", "pending")
    bad = by_book["line 2"]
    assert (bad["status"], bad["error_field"], bad["kind"]) == ("error", "line", "book")
    assert bad["error"].startswith('line 2 (value \'{"book_id": "cut", "source":\'): invalid JSON')


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"narrator": None}, "narrator", "narrator: is missing"),
        ({"narrator": "en_man,en_woman"}, "narrator", "names one voice"),
        (
            {"narrator": {"audio": "/etc/passwd", "transcript": "x"}},
            "narrator",
            "not a path under the allowed roots",
        ),
        ({"book_id": "a/b"}, "book_id", "book_id (value 'a/b'): contains a path separator"),
        ({"book_id": "metadata"}, "book_id", "is reserved"),
        ({"temperature": 5}, "temperature", "must be in [0, 2]"),
        ({"source": "/etc/hostname"}, "source", "not a path under the allowed roots"),
        ({"source": None}, "source", "source: is missing"),
        ({"characters": {"SPEAKER0": "nobody"}}, "characters.SPEAKER0", "unknown voice 'nobody'"),
        ({"characters": {"NARRATOR": "en_man"}}, "characters", "is not SPEAKERn"),
        (
            {"source": "tagged.txt"},
            "characters",
            "has [SPEAKERn] tags (SPEAKER0) but the book gives no characters",
        ),
        (
            {"source": "tagged.txt", "characters": {"SPEAKER1": "en_man"}},
            "characters",
            "no voice for SPEAKER0",
        ),
        ({"source": "book.pdf"}, "source", "unsupported book type '.pdf'"),
        ({"source": "broken.epub"}, "source", "not a readable EPUB"),
    ],
)
def test_book_errors_name_the_field_and_the_reason(tmp_path, raw, field, reason) -> None:
    (tmp_path / "ok.txt").write_text("CHAPTER I.\n\nFine text.\n")
    (tmp_path / "tagged.txt").write_text("CHAPTER I.\n\n[SPEAKER0] Hello.\n")
    (tmp_path / "book.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "broken.epub").write_bytes(b"PK\x03\x04 not really a zip")
    row = {"book_id": "x", "source": str(tmp_path / "ok.txt"), "narrator": "en_man", **raw}
    if isinstance(row["source"], str) and not row["source"].startswith("/"):
        row["source"] = str(tmp_path / row["source"])
    (error,) = plan(tmp_path, row)
    assert (error["kind"], error["status"], error["error_field"]) == ("book", "error", field)
    assert reason in error["error"], error["error"]


def test_relative_sources_resolve_against_the_job_folder(tmp_path) -> None:
    (tmp_path / "rel.txt").write_text("CHAPTER I.\n\nRelative.\n")
    rows = plan(tmp_path, {"book_id": "r", "source": "rel.txt", "narrator": "en_man"}, base_dir=str(tmp_path))
    assert rows[0]["status"] == "pending"


class SpyEngine:
    """Passes requests to the real engine and keeps them, to see each chunk's context."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.requests = []

    def generate_chained(self, requests, follow, priority=None):
        self.requests += requests

        def kept(request, result):
            later = follow(request, result)
            self.requests += [] if later is None else [later]
            return later

        return self.engine.generate_chained(requests, kept, priority)


def _chapter_rows(
    tmp_path: Path, text: str = "CHAPTER I.\n\nOne. Two. Three. Four.\n", book: str = "c", **gen
) -> pa.Table:
    """The chapter rows BookStage plans for `text`, one word per chunk; `gen` overrides GEN."""
    (tmp_path / f"{book}.txt").write_text(text)
    source = {"book_id": book, "source": str(tmp_path / f"{book}.txt"), "narrator": "profile:male_en"}
    rows = plan(
        tmp_path,
        {**source, **GEN, **gen},
        chunking=ChunkingSettings(max_words=1),
    )
    return pack(rows)


@pytest.mark.parametrize("buffer_size", [1, 2])
def test_chapter_stage_passes_buffer_size_and_carries_stored_chunks_over(
    engine, tiny_checkpoint, tmp_path, buffer_size
) -> None:
    settings = ChapterSettings(
        output=str(tmp_path / "out"),
        checkpoint=CheckpointSpec(source=tiny_checkpoint),
        buffer_size=buffer_size,
    )
    first = SpyEngine(engine)
    (row,) = unpack(ChapterStage(replace(settings, max_new_chunks=2), engine=first)(_chapter_rows(tmp_path)))
    assert (row["status"], row["chunks_generated"]) == ("incomplete", 2)
    assert "2 of 4 chunks rendered" in row["error"]

    second = SpyEngine(engine)
    (row,) = unpack(ChapterStage(settings, engine=second)(_chapter_rows(tmp_path)))
    assert (row["status"], row["chunks_resumed"], row["chunks_generated"]) == ("rendered", 2, 2)
    chunks = ["One.", "Two.", "Three.", "Four."]
    assert [r.text for r in second.requests] == chunks[2:]
    # Chunk k hears chunks k-N..k-1, the stored ones with the codes read back from storage.
    for request, k in zip(second.requests, (2, 3), strict=True):
        assert [turn.text for turn in request.context] == chunks[max(0, k - buffer_size) : k]
        for turn, j in zip(request.context, range(max(0, k - buffer_size), k), strict=True):
            stored = np.load(tmp_path / "out" / "c" / "chunks" / "001" / f"{j:04d}.npy")
            np.testing.assert_array_equal(turn.codes, stored)


def test_chunks_cut_off_at_max_new_tokens_stay_named_in_the_chapter_row_across_a_resume(
    engine, tiny_checkpoint, tmp_path
) -> None:
    settings = ChapterSettings(
        output=str(tmp_path / "out"), checkpoint=CheckpointSpec(source=tiny_checkpoint)
    )
    # max_new_tokens=30 (GEN): every chunk of the tiny checkpoint runs to it.
    (row,) = unpack(ChapterStage(replace(settings, max_new_chunks=2), engine=engine)(_chapter_rows(tmp_path)))
    assert row["chunks_cut_off"] == [0, 1]
    (row,) = unpack(ChapterStage(settings, engine=engine)(_chapter_rows(tmp_path)))
    assert (row["status"], row["chunks_resumed"], row["chunks_cut_off"]) == ("rendered", 2, [0, 1, 2, 3])


def test_a_chunk_generated_again_after_a_kill_drops_its_earlier_tries_cut_off_marker(
    engine, tiny_checkpoint, tmp_path
) -> None:
    settings = ChapterSettings(
        output=str(tmp_path / "out"), checkpoint=CheckpointSpec(source=tiny_checkpoint)
    )
    # max_new_tokens=200: every chunk of the tiny checkpoint ends on stream-eos before it.
    (row,) = unpack(ChapterStage(settings, engine=engine)(_chapter_rows(tmp_path, max_new_tokens=200)))
    assert row["chunks_cut_off"] == []
    chunks = tmp_path / "out" / "c" / "chunks" / "001"
    (chunks / "0002.npy").unlink()  # killed after chunk 2's audio and a cut-off marker, before its codes
    (chunks / "0002.cutoff").write_text("{}")
    (row,) = unpack(ChapterStage(settings, engine=engine)(_chapter_rows(tmp_path, max_new_tokens=200)))
    assert (row["status"], row["chunks_resumed"], row["chunks_cut_off"]) == ("rendered", 2, [])
    assert not (chunks / "0002.cutoff").exists()


def test_chunks_of_another_plan_are_thrown_away(engine, tiny_checkpoint, tmp_path) -> None:
    settings = ChapterSettings(
        output=str(tmp_path / "out"), checkpoint=CheckpointSpec(source=tiny_checkpoint)
    )
    ChapterStage(settings, engine=engine)(_chapter_rows(tmp_path))
    # Another buffer size changes what every chunk hears, so nothing stored may be reused.
    (row,) = unpack(ChapterStage(replace(settings, buffer_size=0), engine=engine)(_chapter_rows(tmp_path)))
    assert (row["chunks_resumed"], row["chunks_generated"]) == (0, 4)


def _two_chapters(tmp_path: Path) -> pa.Table:
    return _chapter_rows(tmp_path, "CHAPTER I.\n\nOne. Two.\n\nCHAPTER II.\n\nThree. Four.\n", book="b")


def _stage_after_deaths(tmp_path: Path, checkpoint: str, engine, *dead: list[str]) -> ChapterStage:
    """A chapter stage over an output where starts on each of `dead` (chapter@chunk marks) were recorded
    MAX_STARTS times and never returned, as workers killed on them leave them."""
    log = AttemptLog(Storage(str(tmp_path / "out")))
    for marks in dead:
        for _ in range(MAX_STARTS):
            log.start(marks)
    settings = ChapterSettings(output=str(tmp_path / "out"), checkpoint=CheckpointSpec(source=checkpoint))
    return ChapterStage(settings, engine=engine)


def test_chapters_whose_joint_start_killed_the_worker_twice_render_one_at_a_time(
    engine, tiny_checkpoint, tmp_path
) -> None:
    spy = SpyEngine(engine)
    calls: list[int] = []
    spy.generate_chained = lambda requests, follow, priority: (
        calls.append(len(requests)) or SpyEngine.generate_chained(spy, requests, follow, priority)
    )
    stage = _stage_after_deaths(tmp_path, tiny_checkpoint, spy, ["b#1@0", "b#2@0"])
    rows = unpack(stage(_two_chapters(tmp_path)))
    assert [r["status"] for r in rows] == ["rendered", "rendered"]
    assert calls == [1, 1]  # chapter 1 alone, then chapter 2
    assert [r.text for r in spy.requests] == ["One.", "Two.", "Three.", "Four."]
    assert not list((tmp_path / "out").glob(f"{ATTEMPTS_DIR}/*"))  # every start returned


def test_a_chapter_that_killed_the_worker_twice_alone_errors_and_its_batch_mate_renders(
    engine, tiny_checkpoint, tmp_path
) -> None:
    spy = SpyEngine(engine)
    stage = _stage_after_deaths(tmp_path, tiny_checkpoint, spy, ["b#1@0", "b#2@0"], ["b#1@0"])
    first, second = unpack(stage(_two_chapters(tmp_path)))
    assert (first["status"], first["error_field"]) == ("error", "synthesis")
    assert "chunk 0: the synthesis worker died 2 times while rendering this chapter alone" in first["error"]
    assert second["status"] == "rendered"
    assert [r.text for r in spy.requests] == ["Three.", "Four."]  # chapter 1 was not run again


# ---- the Hydra job -----------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="render_audiobook", overrides=list(overrides))


def test_batch_size_auto_puts_auto_chapters_together_and_lets_the_engine_size_its_slots(
    monkeypatch, tiny_checkpoint
) -> None:
    from jobs.render_audiobook import build_job

    monkeypatch.chdir(REPO)
    job = build_job(_compose(f"model.source={tiny_checkpoint}", "runtime.batch_size=auto"))
    assert job.resources.batch_size == 0  # run_audiobook_job: AUTO_CHAPTERS chapters a block
    assert job.engine.max_batch_size == 0  # model.engine.fitting_batch_size on a GPU, 16 rows on a CPU


def test_the_default_config_builds_a_job(monkeypatch, tiny_checkpoint) -> None:
    from jobs.render_audiobook import build_job

    monkeypatch.chdir(REPO)
    job = build_job(_compose(f"model.source={tiny_checkpoint}", "buffer_size=3", "chunking.method=word"))
    assert job.buffer_size == 3
    assert job.book.chunking.method == "word"
    assert job.mastering.mp3_bitrate_kbps == 192
    assert job.book.sources.allowed_roots == (str(REPO / "examples" / "books"),)
    assert "buffer_size: 3" in job.config_yaml


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("chunking.method=paragraph", "chunking.method='paragraph'"),
        ("chunking.max_words=0", "max_words=0 must be at least 1"),
        ("buffer_size=-1", "buffer_size=-1 must be at least 0"),
        ("max_book_words=many", "max_book_words='many' must be an integer"),
        ("mastering.mp3_bitrate_kbps=100", "is not an MP3 bit rate"),
        ("mastering.target_rms_db=-70", "noise_floor_db < target_rms_db"),
        ("pauses.sentence_s=-1", "sentence_s=-1 must be at least 0.0"),
        ("books=missing.jsonl", "books='missing.jsonl'"),
        ("runtime.batch_size=many", "runtime.batch_size must be a count of rows, or auto"),
    ],
)
def test_bad_config_fails_fast_with_exit_code_2(monkeypatch, tiny_checkpoint, override, message) -> None:
    from jobs.common import ConfigError
    from jobs.render_audiobook import build_job

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="configuration error") as err:
        build_job(_compose(f"model.source={tiny_checkpoint}", override))
    assert err.value.code == 2
    assert message in str(err.value)


def test_the_cli_exits_2_on_a_bad_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.render_audiobook", "chunking.method=paragraph"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "chunking.method" in proc.stderr
