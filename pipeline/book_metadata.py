"""Book-level records: metadata/books-*.parquet (resume and totals) and each book's qc.csv.

Every run appends parts and never rewrites them; a book rendered again (after an error) simply has a later
row, so readers take each book's newest row.
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.book_layout import BOOKS_METADATA_DIR
from pipeline.mastering import QC, qc_table
from pipeline.storage import Storage

BOOK_FIELDS = [
    pa.field("book_id", pa.string()),
    pa.field("status", pa.string()),  # ok | error | incomplete
    pa.field("error", pa.string()),
    pa.field("error_field", pa.string()),
    pa.field("title", pa.string()),
    pa.field("author", pa.string()),
    pa.field("language", pa.string()),
    pa.field("chapters", pa.int32()),
    pa.field("duration_s", pa.float64()),
    pa.field("m4b_uri", pa.string()),
    pa.field("qc_uri", pa.string()),
    pa.field("qc_passed", pa.bool_()),
    pa.field("chunks_generated", pa.int64()),
    # Chunks max_new_tokens cut off (likely mid-word, or a run-on generation): qc.csv names them per chapter.
    pa.field("chunks_cut_off", pa.int64()),
    pa.field("run_id", pa.string()),
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
]
BOOK_COLUMNS = [f.name for f in BOOK_FIELDS]
PART_PREFIX = f"{BOOKS_METADATA_DIR}/books-"


def book_record(run_id: str, **values: object) -> dict:
    record = dict.fromkeys(BOOK_COLUMNS)
    record.update({k: v for k, v in values.items() if k in record})
    record.update(run_id=run_id, finished_at=datetime.now(timezone.utc))
    return record


def write_book_records(storage: Storage, records: list[dict], run_id: str) -> str | None:
    if not records:
        return None
    table = pa.table({f.name: pa.array([r.get(f.name) for r in records], f.type) for f in BOOK_FIELDS})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    key = f"{PART_PREFIX}{run_id}-{uuid.uuid4().hex[:8]}.parquet"
    storage.write_bytes(key, buffer.getvalue())
    return key


def latest_book_records(storage: Storage) -> dict[str, dict]:
    """Each book's newest record over every part of the output."""
    latest: dict[str, dict] = {}
    keys = storage.list(BOOKS_METADATA_DIR)
    parts = [k for k in keys if k.startswith(PART_PREFIX) and k.endswith(".parquet")]
    for _, contents in storage.read_each(parts):
        for record in pq.read_table(io.BytesIO(contents)).to_pylist():
            previous = latest.get(record["book_id"])
            if previous is None or record["finished_at"] >= previous["finished_at"]:
                latest[record["book_id"]] = record
    return latest


def book_totals(latest: dict[str, dict]) -> dict:
    by_status: dict[str, int] = {}
    for record in latest.values():
        by_status[record["status"]] = by_status.get(record["status"], 0) + 1
    ok = [r for r in latest.values() if r["status"] == "ok"]
    return {
        "books": len(latest),
        "by_status": by_status,
        "audio_seconds": round(sum(r["duration_s"] or 0.0 for r in ok), 3),
        "qc_passed": sum(1 for r in ok if r["qc_passed"]),
    }


def qc_csv(chapters: list[dict]) -> str:
    """One line per chapter: number, title, file, every measurement and a pass column per ACX rule."""
    rows = qc_table([(c["chapter_title"], QC(**c["qc"])) for c in chapters])
    for row, chapter in zip(rows, chapters, strict=True):
        row["number"] = chapter["chapter"]
        row["file"] = chapter["mp3_key"]
        row["chunks_cut_off"] = " ".join(str(k) for k in chapter.get("chunks_cut_off", []))
    fields = ["number", "chapter", "file", *[k for k in rows[0] if k not in ("number", "chapter", "file")]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
