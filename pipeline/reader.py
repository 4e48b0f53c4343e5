"""Manifests in: Parquet, JSONL or CSV on any fsspec URI, as a Ray Dataset or a stream of id columns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.storage import open_input

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def manifest_format(uri: str) -> str:
    for suffix, kind in FORMATS.items():
        if uri.lower().rstrip("/").endswith(suffix):
            return kind
    return "parquet"  # a folder of Parquet parts, as Ray Data writes them


def manifest_files(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """The filesystem and the files of a manifest (one file, or every file of its format in a folder)."""
    fs, path = open_input(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest {uri!r} does not exist")
    if fs.isdir(path):
        suffixes = tuple(s for s, kind in FORMATS.items() if kind == "parquet")
        files = sorted(p for p in fs.find(path) if p.lower().endswith(suffixes))
        if not files:
            raise FileNotFoundError(f"manifest folder {uri!r} holds no Parquet files")
        return fs, files
    return fs, [path]


def read_manifest(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    num_cpus: float = 0.25,
    num_blocks: int | None = None,
):
    """A Ray Dataset of the manifest rows, read through the URI's own filesystem."""
    import ray

    fs, files = manifest_files(uri, storage_options)
    filesystem = PyFileSystem(FSSpecHandler(fs))
    kind = manifest_format(uri)
    # Reading is light; a whole CPU per read task would starve the actor pools on a small machine.
    options = {"filesystem": filesystem, "num_cpus": num_cpus, "override_num_blocks": num_blocks}
    if kind == "json":
        return ray.data.read_json(files, **options)  # newline-delimited, via pyarrow.json
    if kind == "csv":
        return ray.data.read_csv(files, **options)
    # Ray 2.60's default Parquet reader lists files in a separate task that always asks for a whole CPU;
    # with the actor pools already holding the rest of a small machine that task never starts and the run
    # hangs. The previous reader takes the task resources given here.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, **options)
    finally:
        context.use_datasource_v2 = use_v2


def iter_ids(uri: str, storage_options: dict[str, Any] | None = None, column: str = "id") -> Iterator[list]:
    """The manifest's id column in chunks, for the driver's duplicate check; only that column is read."""
    fs, files = manifest_files(uri, storage_options)
    kind = manifest_format(uri)
    for path in files:
        name = uri if len(files) == 1 else f"{uri} ({fs.unstrip_protocol(path)})"
        with fs.open(path, "rb") as handle, _readable(name, kind):
            if kind == "parquet":
                parquet = pq.ParquetFile(handle)
                if column not in parquet.schema_arrow.names:
                    raise ValueError(f"manifest {uri!r} has no {column!r} column")
                for batch in parquet.iter_batches(columns=[column], batch_size=65536):
                    yield batch.column(0).to_pylist()
            else:
                table = _read_text_table(handle, kind)
                if column not in table.column_names:
                    raise ValueError(f"manifest {uri!r} has no {column!r} column")
                yield table.column(column).to_pylist()


@contextlib.contextmanager
def _readable(name: str, kind: str) -> Iterator[None]:
    """Arrow's parse errors (a malformed line, invalid UTF-8, an unpaired surrogate escape in JSON) name
    neither the manifest nor the format, and they make the whole file unreadable: say which and why."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        raise ValueError(f"manifest {name!r} cannot be read as {kind}: {exc}") from None


def _read_text_table(handle: Any, kind: str) -> pa.Table:
    if kind == "json":
        return pa_json.read_json(handle)
    return pa_csv.read_csv(handle)
