"""Manifests in: Parquet, JSONL or CSV on any fsspec URI, as a Ray Dataset or a stream of id columns.

JSONL is read line by line (pipeline.json_lines), and a CSV that Arrow cannot read cleanly record by record
(pipeline.csv_records), so a bad line errors its own row; a job's first stage turns a block into rows with
`pipeline.json_lines.manifest_rows` whichever the format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.csv_records import csv_table, record_blocks
from pipeline.json_lines import (
    LineLabel,
    line_file,
    manifest_rows,
    numbered_lines,
    parse_line,
    read_chunks,
)
from pipeline.storage import open_input

ID_CHUNK = 65536
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# Text manifests may come compressed (manifest.jsonl.gz); Parquet compresses inside the file.
COMPRESSIONS = (".gz", ".bz2", ".xz")


def _format_of(path: str) -> str | None:
    name = path.lower().rstrip("/")
    packed = name.endswith(COMPRESSIONS)
    if packed:
        name = name.rsplit(".", 1)[0]
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix) and not (packed and kind == "parquet"):
            return kind
    return None


def manifest_files(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str], str]:
    """The filesystem, the files and the format of a manifest: one file (its format by its suffix; Parquet
    without one), or the files of a folder, all of one format, as Ray Data and Spark write them
    (part-*.parquet, *.json, ...; names starting with "." or "_", such as _SUCCESS, are not rows)."""
    fs, path = open_input(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest {uri!r} does not exist")
    if not fs.isdir(path):
        return fs, [path], _format_of(path) or "parquet"
    found: dict[str, list[str]] = {}
    for file in sorted(fs.find(path)):
        kind = _format_of(file)
        if kind and not file.rsplit("/", 1)[-1].startswith((".", "_")):
            found.setdefault(kind, []).append(file)
    if not found:
        raise FileNotFoundError(f"manifest folder {uri!r} holds no Parquet, JSONL or CSV files")
    if len(found) > 1:
        raise ValueError(
            f"manifest folder {uri!r} holds files of several formats ({', '.join(sorted(found))}); "
            "keep one format in it"
        )
    ((kind, files),) = found.items()
    return fs, files, kind


def read_manifest(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    num_cpus: float = 0.25,
    num_blocks: int | None = None,
):
    """A Ray Dataset of the manifest rows, read through the URI's own filesystem."""
    import ray

    fs, files, kind = manifest_files(uri, storage_options)
    filesystem = PyFileSystem(FSSpecHandler(fs))
    # Reading is light; a whole CPU per read task would starve the actor pools on a small machine.
    options = {"filesystem": filesystem, "num_cpus": num_cpus, "override_num_blocks": num_blocks}
    if kind in ("json", "csv"):
        from pipeline.text_sources import CsvDatasource, JsonLinesDatasource

        kinds = {"json": JsonLinesDatasource, "csv": CsvDatasource}
        source = kinds[kind](files, filesystem=filesystem)
        return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=num_blocks)
    # Ray 2.60's default Parquet reader lists files in a separate task that always asks for a whole CPU;
    # with the actor pools already holding the rest of a small machine that task never starts and the run
    # hangs. The previous reader takes the task resources given here.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, **options)
    finally:
        context.use_datasource_v2 = use_v2


def iter_ids(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    column: str = "id",
    columns: dict[str, None] | None = None,
) -> Iterator[list]:
    """The manifest's id column in chunks, for the driver's duplicate check; only that column is read.
    `columns`, where given, gathers the names of every column any row has, in the order first seen."""
    columns = {} if columns is None else columns
    fs, files, kind = manifest_files(uri, storage_options)
    for path in files:
        name = uri if len(files) == 1 else f"{uri} ({fs.unstrip_protocol(path)})"
        file = line_file(path, len(files) > 1)
        # fsspec infers a compression from the name (as Ray's read tasks do); none for Parquet's names.
        with fs.open(path, "rb", compression="infer") as handle, _readable(name, kind):
            if kind == "json":
                yield from _json_ids(handle, name, column, columns, file)
            elif kind == "parquet":
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                columns.update(dict.fromkeys(names))
                if column not in names:
                    raise ValueError(f"manifest {uri!r} has no {column!r} column")
                # An eval set's bad lines carry `_error`; their records keep the id as given.
                read = [column, "_error"] if "_error" in names else [column]
                for batch in parquet.iter_batches(columns=read, batch_size=ID_CHUNK):
                    ids = batch.column(0).to_pylist()
                    if len(read) > 1:
                        errors = batch.column(1).to_pylist()
                        ids = [_as_recorded(i, e) for i, e in zip(ids, errors, strict=True)]
                    yield ids
            else:
                yield from _csv_ids(handle.read(), name, column, columns, file)


@contextlib.contextmanager
def _readable(name: str, kind: str) -> Iterator[None]:
    """Arrow's parse errors (a CSV line with the wrong number of fields, invalid UTF-8, a corrupt Parquet
    file) name neither the manifest nor the format, and they make the whole file unreadable: say which and
    why."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        raise ValueError(f"manifest {name!r} cannot be read as {kind}: {exc}") from None


def _as_recorded(value: object, error: object) -> object:
    """An id as the record of its row will carry it (pipeline.manifest.recorded_id)."""
    return LineLabel(value) if isinstance(value, str) and isinstance(error, str) and error else value


def _json_ids(handle: Any, name: str, column: str, columns: dict[str, None], file: str) -> Iterator[list]:
    """Each line's `column` (None where its object lacks it, the `line N` label where it holds no row)."""
    lines = numbered_lines(read_chunks(handle))
    rows = (parse_line(number, line, column, file) for number, line in lines)
    yield from _checked_ids(rows, name, column, columns, "JSON Lines", "write one JSON object per line")


def _csv_ids(data: bytes, name: str, column: str, columns: dict[str, None], file: str) -> Iterator[list]:
    table = csv_table(data)
    if table is not None:
        columns.update(dict.fromkeys(table.column_names))
        if column not in table.column_names:
            raise ValueError(f"manifest {name!r} has no {column!r} column")
        yield table.column(column).to_pylist()
        return

    def rows() -> Iterator[dict]:
        # As the read tasks read it (pipeline.csv_records.csv_blocks), so both agree on its rows.
        try:
            for block in record_blocks(data, file):
                yield from manifest_rows(block, column)
        except ValueError as exc:
            raise ValueError(f"manifest {name!r} cannot be read as CSV: {exc}") from None

    fix = "give each record as many fields as the header"
    yield from _checked_ids(rows(), name, column, columns, "CSV", fix)


def _checked_ids(
    rows: Iterator[dict], name: str, column: str, columns: dict[str, None], kind: str, fix: str
) -> Iterator[list]:
    """The rows' `column` in chunks. A file most of whose lines hold no row is not what its name says (a
    JSON array, a pretty-printed object, a CSV with another delimiter): refused whole rather than run as a
    heap of bad lines."""
    chunk: list = []
    good = bad = with_column = 0
    first_bad = None
    for row in rows:
        if isinstance(row.get(column), LineLabel):
            bad += 1
            first_bad = first_bad or row["_error"]
        else:
            good += 1
            with_column += column in row
            if not row.keys() <= columns.keys():  # a check costs half an update, and rows mostly repeat
                columns.update(dict.fromkeys(row))
        chunk.append(row.get(column))
        if len(chunk) == ID_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
    if not good + bad:
        raise ValueError(f"manifest {name!r} cannot be read as {kind}: it holds no rows")
    if bad > good:
        raise ValueError(
            f"manifest {name!r} cannot be read as {kind}: {bad} of its {good + bad} lines hold no row "
            f"(first: {first_bad}); {fix}"
        )
    if not with_column:
        raise ValueError(f"manifest {name!r} has no {column!r} column")
