"""Ray Data sources for the text manifests: JSON Lines as raw numbered lines (pipeline.json_lines) and CSV
as pipeline.csv_records reads it, the job's first stage turning either into rows, so a bad line or record
errors its own row instead of failing the read task."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.csv_records import csv_blocks
from pipeline.json_lines import line_file, lines_blocks, numbered_lines, read_chunks


class _ManifestFiles(FileBasedDatasource):
    """A manifest's files; where it has several, a bad line is named by its file too (line_file)."""

    def __init__(self, paths: list[str], **kwargs) -> None:
        super().__init__(paths, **kwargs)
        self.name_files = len(paths) > 1


class JsonLinesDatasource(_ManifestFiles):
    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        lines = ((number, line, None) for number, line in numbered_lines(read_chunks(f)))
        yield from lines_blocks(lines, line_file(path, self.name_files))


class CsvDatasource(_ManifestFiles):
    """Whole files, read as the driver's id check reads them (Ray's CSV reader streams and infers types
    from the first megabyte, so a late value of another type failed the run midway)."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from csv_blocks(f.readall(), line_file(path, self.name_files))
