"""Where an audiobook run keeps its files, relative to the output root.

<book_id>/chunks/<chapter:03d>/<k:04d>.npy|.wav  every generated chunk (codes and audio), for resume
<book_id>/chunks/<chapter:03d>/plan.json         what those chunks were generated from
<book_id>/chapters/<chapter:03d>.mp3             mastered chapters
<book_id>/<book_id>.m4b, qc.csv, cover.<ext>     the assembled book, its QC table, the EPUB cover
metadata/books-*.parquet                         one row per book and run (resume reads it)
"""

from __future__ import annotations

BOOKS_METADATA_DIR = "metadata"
# Top-level names the run itself writes; a book folder with one of these names would collide with them.
RESERVED_BOOK_IDS = frozenset({BOOKS_METADATA_DIR, "_tmp", "summary.json", "config.yaml"})
COVER_EXTENSIONS = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png"}


def chunk_dir(book_id: str, chapter: int) -> str:
    return f"{book_id}/chunks/{chapter:03d}"


def chunk_key(book_id: str, chapter: int, k: int, ext: str) -> str:
    return f"{chunk_dir(book_id, chapter)}/{k:04d}.{ext}"


def plan_key(book_id: str, chapter: int) -> str:
    return f"{chunk_dir(book_id, chapter)}/plan.json"


def chapter_key(book_id: str, chapter: int) -> str:
    return f"{book_id}/chapters/{chapter:03d}.mp3"


def m4b_key(book_id: str) -> str:
    return f"{book_id}/{book_id}.m4b"


def qc_key(book_id: str) -> str:
    return f"{book_id}/qc.csv"


def cover_key(book_id: str, mime: str) -> str:
    return f"{book_id}/cover.{COVER_EXTENSIONS[mime]}"
