"""JSON Lines manifests, read one line at a time: each line is its own row.

Arrow's JSON reader parses a file as one table, so one malformed line, or a field whose type changes
between rows (a narrator given as a name in one book and as {audio, transcript} in the next), refused the
whole manifest; and it infers types per block (an integer seed next to 2.5 became 5.0, a text that looked
like "2024-01-01 10:00:00" a timestamp). Read line by line, a bad line becomes an error row of its own,
named `line N`, and every row keeps the values its line spells.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator

import pyarrow as pa

# The columns of a block of raw lines, as the reader hands them to a job's first stage.
LINE_NUMBER = "_line_number"
LINE = "_line"
# Lines per block out of a read task: Ray splits a file's output to the blocks a job asks for, and
# smaller pieces keep a large file from becoming one block that a single task must hold.
BLOCK_LINES = 16384
# Why a line holds no row, where that is known before parsing it (pipeline.csv_records).
LINE_ERROR = "_line_error"
# The file the lines come from, where a manifest has several: line numbers are each file's own.
LINE_FILE = "_line_file"
_BOM = b"\xef\xbb\xbf"


class LineLabel(str):
    """The id a bad line's record carries as given: `line N` for a line that holds no row, or the label an
    eval-set adapter gave a line it found bad (its `_error`). Resume and the duplicate check compare it as
    it is (pipeline.manifest.id_label), as the record names it; `line N` is not a valid id, so it names no
    row of the manifest."""


def numbered_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a file read in `chunks`, with their 1-based numbers; blank lines count, so
    numbers match editors'. Lines end at "\\n" only: JSON text may hold U+2028 and friends unescaped."""
    for number, line in enumerate(_split(chunks), start=1):
        if number == 1:
            line = line.removeprefix(_BOM)  # Windows editors write one
        if line.strip():
            yield number, line


def _split(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def read_chunks(handle, size: int = 1 << 20) -> Iterator[bytes]:
    """A binary file's bytes in pieces of `size`."""
    while chunk := handle.read(size):
        yield chunk


def line_file(path: str, name_files: bool) -> str:
    """The name a manifest file's bad lines carry: its base name, where the manifest has several files."""
    return path.rsplit("/", 1)[-1] if name_files else ""


def parse_line(number: int, line: bytes, id_column: str = "id", file: str = "") -> dict:
    """The row a line holds; a line that holds none becomes a row that errors naming the line (its `_error`,
    which validation turns into the line's metadata record), and its `file` where a manifest has several."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 (byte {exc.start + 1} of the line); save the manifest as UTF-8"
    except json.JSONDecodeError as exc:
        # Some of json's messages end "... at" before the position they would be followed by.
        reason = f"invalid JSON at column {exc.colno}: {exc.msg.removesuffix(' at')}"
    else:
        if isinstance(value, dict):
            return value
        reason = f"expected a JSON object, got {type(value).__name__}"
    return bad_line(number, reason, id_column, line, file)


def bad_line(number: int, reason: str, id_column: str = "id", text: bytes = b"", file: str = "") -> dict:
    """The row of a line that holds none: validation turns its `_error` into the line's metadata record,
    which names the line (`line N`, or `FILE line N`), shows how it starts (its `text`) and says why, as
    every row error does."""
    label = f"{file} line {number}" if file else f"line {number}"
    shown = f" (value {_preview(text)})" if text.strip() else ""
    return {
        id_column: LineLabel(label),
        "_error": f"{label}{shown}: {reason}",
        "_error_field": "line",
    }


def _preview(text: bytes, limit: int = 60) -> str:
    value = text.decode("utf-8", errors="replace").strip()
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def lines_blocks(
    lines: Iterable[tuple[int, bytes, str | None]], file: str = "", size: int = BLOCK_LINES
) -> Iterator[pa.Table]:
    """(number, line, why it holds no row or None) in blocks of at most `size` lines (see lines_block)."""
    lines = iter(lines)
    while batch := list(itertools.islice(lines, size)):
        numbers, texts, errors = zip(*batch, strict=True)
        known = list(errors) if any(errors) else None
        yield lines_block(list(zip(numbers, texts, strict=True)), known, file)


def lines_block(
    numbered: list[tuple[int, bytes]], errors: list[str | None] | None = None, file: str = ""
) -> pa.Table:
    """Raw lines as a block: bytes, so that a line that is not UTF-8 errors alone when it is parsed; with
    `errors`, the lines already known to hold no row and why; with `file`, the file they come from."""
    columns = {
        LINE_NUMBER: pa.array([n for n, _ in numbered], pa.int64()),
        LINE: pa.array([line for _, line in numbered], pa.binary()),
    }
    if errors is not None:
        columns[LINE_ERROR] = pa.array(errors, pa.string())
    if file:
        columns[LINE_FILE] = pa.array([file] * len(numbered), pa.string())
    return pa.table(columns)


def manifest_rows(batch: pa.Table, id_column: str = "id") -> list[dict]:
    """A block's rows as dicts, whether it holds columns (Parquet, CSV) or raw JSON lines."""
    if LINE not in batch.column_names:
        return batch.to_pylist()
    numbers = batch.column(LINE_NUMBER).to_pylist()
    lines = batch.column(LINE).to_pylist()
    errors = _column(batch, LINE_ERROR)
    files = _column(batch, LINE_FILE)
    return [
        bad_line(n, error, id_column, line, file or "")
        if error
        else parse_line(n, line, id_column, file or "")
        for n, line, error, file in zip(numbers, lines, errors, files, strict=True)
    ]


def _column(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows
