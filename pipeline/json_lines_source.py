"""A Ray Data source of JSON Lines files as raw numbered lines (pipeline.json_lines): the job's first stage
parses them, so a bad line errors its own row instead of failing the read task."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.json_lines import lines_block, numbered_lines, read_chunks

# Lines per block out of a read task: Ray splits a file's output to the blocks a job asks for, and
# smaller pieces keep a large file from becoming one block that a single task must hold.
BLOCK_LINES = 16384


class JsonLinesDatasource(FileBasedDatasource):
    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        numbered: list[tuple[int, bytes]] = []
        for item in numbered_lines(read_chunks(f)):
            numbered.append(item)
            if len(numbered) == BLOCK_LINES:
                yield lines_block(numbered)
                numbered = []
        if numbered:
            yield lines_block(numbered)
