"""Ray Data sources for the text manifests: JSON Lines as raw numbered lines (pipeline.json_lines) and CSV
as pipeline.csv_records reads it, the job's first stage turning either into rows, so a bad line or record
errors its own row instead of failing the read task."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.csv_records import csv_blocks
from pipeline.json_lines import line_file, lines_block, numbered_lines, read_chunks

# Lines per block out of a read task: Ray splits a file's output to the blocks a job asks for, and
# smaller pieces keep a large file from becoming one block that a single task must hold.
BLOCK_LINES = 16384


class _ManifestFiles(FileBasedDatasource):
    """A manifest's files; where it has several, a bad line is named by its file too (line_file)."""

    def __init__(self, paths: list[str], **kwargs) -> None:
        super().__init__(paths, **kwargs)
        self.name_files = len(paths) > 1


class JsonLinesDatasource(_ManifestFiles):
    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        file = line_file(path, self.name_files)
        numbered: list[tuple[int, bytes]] = []
        for item in numbered_lines(read_chunks(f)):
            numbered.append(item)
            if len(numbered) == BLOCK_LINES:
                yield lines_block(numbered, file=file)
                numbered = []
        if numbered:
            yield lines_block(numbered, file=file)


class CsvDatasource(_ManifestFiles):
    """Whole files, read as the driver's id check reads them (Ray's CSV reader streams and infers types
    from the first megabyte, so a late value of another type failed the run midway)."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from csv_blocks(f.readall(), line_file(path, self.name_files))
