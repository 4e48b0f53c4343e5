"""CSV manifests: one table when Arrow reads the file cleanly, else record by record, a bad record alone.

Arrow refuses a whole CSV for one record with the wrong number of fields (an unquoted comma in a text, the
commonest slip in a hand-written manifest), and a file with one cell that is not UTF-8 comes back with that
whole column as bytes, so every row's text errored. Such a file is read here with Python's csv module
instead, and a record that does not match the header becomes an error row `line N` (pipeline.json_lines),
the others rows as usual, with the numbers and booleans Arrow finds over them (dates and times stay text).

Either way a blank cell means the default (None), and the columns that name or say something (TEXT_COLUMNS)
are text whatever their cells look like: Arrow read ids 0001 and 1 both as the integer 1, so 0001's audio
was 1.wav and the two were taken for one id repeated.

The driver's id check and the read tasks both read a file through `csv_table`, then `record_blocks`, so
they agree on its rows.
(Ray's own CSV reader streams the file and infers types from its first megabyte: a 200,000-row manifest
whose last seed was "abc" failed the run after 163,574 rows, though the whole-file check had passed.)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv

from pipeline.json_lines import lines_blocks
from pipeline.manifest import TEXT_ALIASES

# The ids, texts, voices, prompts and sources of the dataset and audiobook jobs.
TEXT_COLUMNS = (
    *("id", "book_id", *TEXT_ALIASES, "voice", "speaker_tag", "system_prompt", "scene_prompt", "references"),
    *("response_format", "source", "narrator", "characters", "language"),
)
_CONVERT = pa_csv.ConvertOptions(
    column_types=dict.fromkeys(TEXT_COLUMNS, pa.string()), strings_can_be_null=True
)
_TYPED = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
_ESCAPED = range(0xDC80, 0xDD00)  # bytes that were not UTF-8, as errors="surrogateescape" spells them


def csv_table(data: bytes) -> pa.Table | None:
    """The file as Arrow reads it (types inferred over the whole file), or None when it must be read
    record by record: Arrow refuses it, or some column holds bytes that are not UTF-8."""
    try:
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=_CONVERT)
    except pa.ArrowInvalid:
        return None
    if any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in table.schema):
        return None
    return table


def csv_records(data: bytes) -> Iterator[tuple[int, dict | list[str] | None, str | None]]:
    """(line the record starts on, its row, None) for each non-blank record, or where it holds no row (the
    line it starts on, its fields or None, why). Raises ValueError for a header that cannot be read."""
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    start = 1
    while True:
        try:
            fields = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit(); the reader goes on after it
            fields, problem = None, f"unreadable CSV record ({exc})"
        number, start = start, reader.line_num + 1
        if fields is not None and not any(field.strip() for field in fields):
            continue
        if header is None:
            header = _header(fields, problem)
            continue
        if problem is None and len(fields) != len(header):
            problem = (
                f"{len(fields)} fields where the header has {len(header)}; quote a field that holds a comma"
            )
        if problem is None and any(ord(c) in _ESCAPED for field in fields for c in field):
            problem = "not UTF-8; save the manifest as UTF-8"
        if problem is not None:
            yield number, fields, problem
        else:
            yield number, {name: value or None for name, value in zip(header, fields, strict=True)}, None


def csv_blocks(data: bytes, file: str = "") -> Iterator[pa.Table]:
    """The file's blocks: the table Arrow reads, or else its records (record_blocks)."""
    table = csv_table(data)
    if table is not None:
        yield table
    else:
        yield from record_blocks(data, file)


def record_blocks(data: bytes, file: str = "") -> Iterator[pa.Table]:
    """The file's records as blocks of JSON lines (pipeline.json_lines), a bad record as its fields with
    why it holds no row, named by `file` where a manifest has several."""
    records = list(csv_records(data))
    rows = iter(_typed([row for _, row, problem in records if problem is None]))
    lines = (
        (number, json.dumps(next(rows)).encode() if problem is None else _record_text(row), problem)
        for number, row, problem in records
    )
    yield from lines_blocks(lines, file)


def _typed(rows: list[dict]) -> list[dict]:
    """`rows` (every cell text) with the columns Arrow reads as numbers or booleans over them as those: what
    a file of only these records would give them, but dates and times, which JSON has no type for."""
    if not rows:
        return rows
    names = list(rows[0])
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(names)
    writer.writerows([["" if row[name] is None else row[name] for name in names] for row in rows])
    try:
        table = pa_csv.read_csv(io.BytesIO(text.getvalue().encode("utf-8")), convert_options=_CONVERT)
    except pa.ArrowInvalid:
        return rows
    for name, column in zip(names, table.columns, strict=True):
        if any(is_type(column.type) for is_type in _TYPED):
            for row, value in zip(rows, column.to_pylist(), strict=True):
                row[name] = value
    return rows


def _record_text(fields: list[str] | None) -> bytes:
    """A bad record as its error shows it: its fields, joined again."""
    return ",".join(fields or []).encode("utf-8", errors="surrogateescape")


def _header(fields: list[str] | None, problem: str | None) -> list[str]:
    if fields is None:
        raise ValueError(f"its header is an {problem}")
    if any(ord(c) in _ESCAPED for name in fields for c in name):
        raise ValueError("its header is not UTF-8; save the manifest as UTF-8")
    return fields
