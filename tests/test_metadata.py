"""The AudioFolder index holds every metadata part's columns, whichever rows each part holds."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.metadata import AUDIOFOLDER_INDEX, totals, write_audiofolder_index
from pipeline.stages import METADATA_DIR, metadata_table
from pipeline.storage import Storage


def write_part(storage: Storage, name: str, records: list[dict]) -> None:
    buffer = io.BytesIO()
    pq.write_table(metadata_table(records), buffer)
    storage.write_bytes(f"{METADATA_DIR}/part-{name}.parquet", buffer.getvalue())


def ok(row_id: str, **extra) -> dict:
    return {"id": row_id, "status": "ok", "file_name": f"audio/{row_id}.wav", "duration_s": 1.0, **extra}


def index_of(storage: Storage, root: Path) -> list[dict]:
    _, schema = totals(storage)
    write_audiofolder_index(storage, schema)
    return pq.read_table(root / AUDIOFOLDER_INDEX).to_pylist()


def test_a_column_all_none_in_the_first_part_keeps_the_later_parts_values(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    write_part(storage, "0", [ok("a", mood=None, topic="news")])
    write_part(storage, "1", [ok("b", mood="calm", topic=None)])

    rows = index_of(storage, tmp_path)

    assert [(r["id"], r["topic"], r["mood"]) for r in rows] == [("a", "news", None), ("b", None, "calm")]


def test_a_column_typed_differently_by_two_parts_keeps_both_parts_values(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    write_part(storage, "0", [ok("a", take=1, score=1)])
    write_part(storage, "1", [ok("b", take="B", score=0.5)])
    write_part(storage, "2", [ok("c", take=[1, 2])])

    rows = index_of(storage, tmp_path)

    assert [(r["take"], r["score"]) for r in rows] == [("1", 1.0), ("B", 0.5), ("[1, 2]", None)]


def test_totals_count_every_part_and_give_the_schema_of_all_their_columns(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    write_part(storage, "0", [ok("a"), {"id": "line 2", "status": "error", "error": "line 2: …"}])
    write_part(storage, "1", [ok("b", mood="calm")])

    summary, schema = totals(storage)

    assert summary == {"rows": 3, "by_status": {"ok": 2, "error": 1}, "audio_seconds": 2.0}
    assert schema.field("mood").type == pa.string() and schema.names[0] == "id"
