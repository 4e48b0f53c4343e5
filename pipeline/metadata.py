"""The metadata parts of an output: finished ids for resuming, totals for summary.json, the AudioFolder index.

Resume is an anti-join on ids: every id with a metadata row (ok or error) is finished and is not read into
the graph again. Each metadata part is written atomically after its audio, so a killed run leaves whole
parts only, and a later run never writes an id that a part already holds. Ray Data's CheckpointConfig was
not used: it needs ids unique in the input (we explain duplicated ids instead of failing the run) and it
records ids at its own write sinks, while our metadata parts are written by the stage that writes the audio.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages import METADATA_DIR
from pipeline.storage import Storage


def metadata_parts(storage: Storage) -> list[str]:
    return [k for k in storage.list(METADATA_DIR) if k.endswith(".parquet")]


def _columns(storage: Storage, columns: list[str]) -> Iterator[pa.Table]:
    for key in metadata_parts(storage):
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(key)))
        present = [c for c in columns if c in parquet.schema_arrow.names]
        yield parquet.read(columns=present)


def finished_ids(storage: Storage, retry_errors: bool = False) -> set[str]:
    """Ids the output already accounts for; with retry_errors, error rows are dropped so they run again."""
    if retry_errors:
        drop_error_rows(storage)
    done: set[str] = set()
    for table in _columns(storage, ["id"]):
        done.update(table.column("id").to_pylist())
    return done


def drop_error_rows(storage: Storage) -> None:
    """Rewrite each metadata part without its error rows (part by part, so memory stays flat)."""
    for key in metadata_parts(storage):
        table = pq.read_table(io.BytesIO(storage.read_bytes(key)))
        keep = pa.compute.equal(table.column("status"), "ok")
        if pa.compute.all(keep).as_py():
            continue
        kept = table.filter(keep)
        if kept.num_rows == 0:
            storage.delete(key)
            continue
        buffer = io.BytesIO()
        pq.write_table(kept, buffer)
        storage.write_bytes(key, buffer.getvalue())


def totals(storage: Storage) -> dict:
    """Counts by status and audio seconds over every metadata part of the output."""
    counts: Counter[str] = Counter()
    audio_s = 0.0
    rows = 0
    for table in _columns(storage, ["status", "duration_s"]):
        rows += table.num_rows
        counts.update(table.column("status").to_pylist())
        if "duration_s" in table.column_names:
            audio_s += sum(d or 0.0 for d in table.column("duration_s").to_pylist())
    return {"rows": rows, "by_status": dict(counts), "audio_seconds": round(audio_s, 3)}


AUDIOFOLDER_INDEX = "metadata.parquet"


def write_audiofolder_index(storage: Storage) -> int:
    """<output>/metadata.parquet with the ok rows, so `load_dataset("audiofolder", data_dir=output)` works.

    Hugging Face's AudioFolder pairs a `file_name` column (relative to the index file) with the audio files;
    error rows have no audio and stay in metadata/ only. Parts are streamed into one Parquet writer.
    """
    writer = None
    rows = 0
    buffer = io.BytesIO()
    schema = None
    for key in metadata_parts(storage):
        table = pq.read_table(io.BytesIO(storage.read_bytes(key)))
        table = table.filter(pa.compute.equal(table.column("status"), "ok"))
        if table.num_rows == 0:
            continue
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(buffer, schema)
        table = _conform(table, schema)
        writer.write_table(table)
        rows += table.num_rows
    if writer is None:
        return 0
    writer.close()
    storage.write_bytes(AUDIOFOLDER_INDEX, buffer.getvalue())
    return rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Match the first part's columns: passthrough columns may be missing or typed differently later."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            try:
                column = column.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                column = pa.nulls(table.num_rows, f.type)
        else:
            column = pa.nulls(table.num_rows, f.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
