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

from pipeline.stages import METADATA_DIR, json_text
from pipeline.storage import Storage


def metadata_parts(storage: Storage) -> list[str]:
    return [k for k in storage.list(METADATA_DIR) if k.endswith(".parquet")]


def _columns(storage: Storage, columns: list[str]) -> Iterator[tuple[pa.Table, pa.Schema]]:
    """Each part's `columns` that it has, with the part's whole schema."""
    for _, contents in storage.read_each(metadata_parts(storage)):
        parquet = pq.ParquetFile(io.BytesIO(contents))
        present = [c for c in columns if c in parquet.schema_arrow.names]
        yield parquet.read(columns=present), parquet.schema_arrow


def finished_ids(storage: Storage, retry_errors: bool = False) -> set[str]:
    """Ids the output already accounts for; with retry_errors, error rows are dropped so they run again."""
    if retry_errors:
        drop_error_rows(storage)
    done: set[str] = set()
    for table, _ in _columns(storage, ["id"]):
        done.update(table.column("id").to_pylist())
    return done


def drop_error_rows(storage: Storage) -> None:
    """Rewrite each metadata part without its error rows (part by part, so memory stays flat)."""
    for key, contents in storage.read_each(metadata_parts(storage)):
        table = pq.read_table(io.BytesIO(contents))
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


def totals(storage: Storage) -> tuple[dict, pa.Schema | None]:
    """Counts by status and audio seconds over every metadata part of the output; and, read in the same
    pass, the schema that holds every part's columns, for write_audiofolder_index (None: no parts)."""
    counts: Counter[str] = Counter()
    audio_s = 0.0
    rows = 0
    schemas = []
    for table, schema in _columns(storage, ["status", "duration_s"]):
        schemas.append(schema)
        rows += table.num_rows
        counts.update(table.column("status").to_pylist())
        if "duration_s" in table.column_names:
            audio_s += sum(d or 0.0 for d in table.column("duration_s").to_pylist())
    summary = {"rows": rows, "by_status": dict(counts), "audio_seconds": round(audio_s, 3)}
    return summary, _unified(schemas) if schemas else None


def _unified(schemas: list[pa.Schema]) -> pa.Schema:
    """Every part's columns, in the order first seen. Parts type a passthrough column by their own rows: a
    part whose rows all lack it has it as null, and parts may disagree (JSONL rows spell their own values).
    Types that promote (int64 and double) become the wider one; others text, as metadata_table does."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            found = types.setdefault(f.name, [])
            if not pa.types.is_null(f.type) and f.type not in found:
                found.append(f.type)
    fields = []
    for name, found in types.items():
        kind = found[0] if len(found) == 1 else pa.null()
        if len(found) > 1:
            try:
                one = [pa.schema([(name, t)]) for t in found]
                kind = pa.unify_schemas(one, promote_options="permissive").field(name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


AUDIOFOLDER_INDEX = "metadata.parquet"


def write_audiofolder_index(storage: Storage, schema: pa.Schema | None = None) -> int:
    """<output>/metadata.parquet with the ok rows, so `load_dataset("audiofolder", data_dir=output)` works.

    Hugging Face's AudioFolder pairs a `file_name` column (relative to the index file) with the audio files;
    error rows have no audio and stay in metadata/ only. Parts are streamed into one Parquet writer, whose
    `schema` (from totals) holds every part's columns; without it, the first part's.
    """
    writer = None
    rows = 0
    buffer = io.BytesIO()
    for _, contents in storage.read_each(metadata_parts(storage)):
        table = pq.read_table(io.BytesIO(contents))
        table = table.filter(pa.compute.equal(table.column("status"), "ok"))
        if table.num_rows == 0:
            continue
        if writer is None:
            schema = schema or table.schema
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
    """Match the index's columns: a part may lack a passthrough column or type it otherwise."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table.column(f.name)
        try:
            column = column.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            if pa.types.is_string(f.type):  # a value other parts cannot share a type with: as JSON text
                column = json_text(column.to_pylist())
            else:
                column = pa.nulls(table.num_rows, f.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
