"""JSON Lines manifests are read line by line: each line is its own row, and a bad line errors alone."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.json_lines import LineLabel, lines_block, manifest_rows, numbered_lines, parse_line
from pipeline.manifest import ManifestRules, id_label, recorded_id, validate_row
from pipeline.reader import iter_ids
from pipeline.stages import ValidateStage, metadata_table, unpack


def lines_of(data: bytes, chunk: int = 7) -> list[tuple[int, bytes]]:
    return list(numbered_lines(data[i : i + chunk] for i in range(0, len(data), chunk)))


def test_lines_are_numbered_as_editors_number_them_across_read_chunks() -> None:
    data = b'\xef\xbb\xbf{"id": "a"}\n\n   \n{"id": "b"}\r\n{"id": "c"}'

    assert lines_of(data) == [(1, b'{"id": "a"}'), (4, b'{"id": "b"}\r'), (5, b'{"id": "c"}')]


def test_a_line_separator_inside_a_json_string_does_not_split_the_line() -> None:
    # json.dumps(..., ensure_ascii=False) writes U+2028 raw; str.splitlines() would cut the row in two.
    line = json.dumps({"id": "a", "text": "one\u2028two\x85three"}, ensure_ascii=False).encode()

    ((number, raw),) = lines_of(line + b"\n")

    assert parse_line(number, raw) == {"id": "a", "text": "one\u2028two\x85three"}


def test_a_line_keeps_the_types_it_spells() -> None:
    row = parse_line(1, b'{"id": "a", "seed": 5, "when": "2024-01-01 10:00:00", "narrator": {"audio": "x"}}')

    assert row == {"id": "a", "seed": 5, "when": "2024-01-01 10:00:00", "narrator": {"audio": "x"}}
    assert type(row["seed"]) is int


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            b'{"id": "a", "text": "unterminated}',
            """line 3 (value '{"id": "a", "text": "unterminated}'): invalid JSON at column 21: """
            "Unterminated string starting",
        ),
        (
            b'{"id": "a",}',
            """line 3 (value '{"id": "a",}'): invalid JSON at column 12: """
            "Expecting property name enclosed in double quotes",
        ),
        (b'["a", "b"]', """line 3 (value '["a", "b"]'): expected a JSON object, got list"""),
        (b'"just text"', """line 3 (value '"just text"'): expected a JSON object, got str"""),
        (
            b'{"id": "caf\xe9"}',
            """line 3 (value '{"id": "caf\ufffd"}'): not UTF-8 (byte 12 of the line); save the manifest as UTF-8""",
        ),
    ],
)
def test_a_line_that_holds_no_row_becomes_an_error_naming_the_line_its_start_and_why(
    line: bytes, message: str
) -> None:
    row = parse_line(3, line)

    assert row["_error"] == message
    assert row["_error_field"] == "line"
    assert isinstance(row["id"], LineLabel) and row["id"] == "line 3"


def test_a_long_bad_line_is_shown_cut_to_60_characters() -> None:
    row = parse_line(1, b'{"id": "a", "text": "' + b"x" * 200)

    assert row["_error"].startswith('line 1 (value \'{"id": "a", "text": "xxxxxxxx')
    assert "...'): invalid JSON" in row["_error"] and len(row["_error"]) < 160


def test_validation_records_a_bad_line_under_its_line_label() -> None:
    row = validate_row(parse_line(7, b"{not json"), ManifestRules())

    assert (row["status"], row["id"], row["error_field"]) == ("error", "line 7", "line")
    assert row["error"].startswith("line 7 (value '{not json'): invalid JSON")
    assert recorded_id(parse_line(7, b"{not json")) == "line 7"


def test_a_line_label_is_its_own_id_label_unlike_an_invalid_id_spelled_the_same() -> None:
    assert id_label(LineLabel("line 7")) == "line 7"
    assert id_label("line 7") == "'line 7'"


def test_a_block_of_lines_becomes_rows_and_a_block_of_columns_stays_as_it_is() -> None:
    block = lines_block([(1, b'{"id": "a", "seed": 1}'), (2, b"oops"), (4, b'{"id": "b", "voice": "x"}')])

    rows = manifest_rows(block)

    assert rows[0] == {"id": "a", "seed": 1}
    assert rows[1]["id"] == "line 2" and rows[1]["_error"].startswith("line 2 (value 'oops'): invalid JSON")
    assert rows[2] == {"id": "b", "voice": "x"}
    assert manifest_rows(pa.table({"id": ["a"]})) == [{"id": "a"}]


def test_a_bad_line_of_a_books_manifest_is_labelled_in_its_id_column() -> None:
    row = manifest_rows(lines_block([(2, b"oops")]), id_column="book_id")[0]

    assert row["book_id"] == "line 2" and "id" not in row


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_the_id_scan_gathers_every_column_any_line_names_in_the_order_first_seen(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "m.jsonl", b'{"id": "a", "text": "t"}\nbad\n{"id": "b", "mood": "calm", "text": "t"}\n'
    )
    columns: dict[str, None] = {}

    list(iter_ids(manifest, columns=columns))

    assert list(columns) == ["id", "text", "mood"]


def test_validation_gives_every_row_each_passthrough_column(tmp_path: Path) -> None:
    block = lines_block(
        [(1, b'{"id": "a", "text": "Hi.", "topic": "x"}'), (2, b'{"id": "b", "text": "Yo."}')]
    )
    stage = ValidateStage(ManifestRules(), columns=["id", "text", "topic", "voice"])

    rows = unpack(stage(block))

    assert [(r["id"], r["topic"]) for r in rows] == [("a", "x"), ("b", None)]
    assert "voice" not in rows[1]  # consumed into the canonical columns, not passed through


def test_the_id_scan_yields_each_lines_id_and_the_label_of_each_bad_line(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "m.jsonl", b'{"id": "a", "seed": 1}\n{"id": 5, "seed": "x"}\nnot json\n{"text": "t"}\n'
    )

    (ids,) = list(iter_ids(manifest))

    assert ids == ["a", 5, "line 3", None]
    assert isinstance(ids[2], LineLabel)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # json.dump(rows, indent=2): only the last element's line is an object on its own.
        (
            b'[\n  {"id": "a", "text": "t"},\n  {"id": "b", "text": "t"}\n]\n',
            "3 of its 4 lines hold no row (first: line 1 (value '['): invalid JSON",
        ),
        (
            b'{\n  "id": "a",\n  "text": "t"\n}\n',
            "4 of its 4 lines hold no row (first: line 1 (value '{'): invalid JSON",
        ),
        (b"\n\n", "it holds no rows"),
    ],
)
def test_a_file_most_of_whose_lines_hold_no_object_is_refused_whole(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    manifest = write(tmp_path / "m.jsonl", data)

    with pytest.raises(ValueError) as refused:
        list(iter_ids(manifest))

    assert str(refused.value).startswith(f"manifest {manifest!r} cannot be read as JSON Lines: {reason}")


def test_a_manifest_without_the_id_column_is_refused(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.jsonl", b'{"text": "a"}\n{"text": "b"}\n')

    with pytest.raises(ValueError, match="has no 'book_id' column"):
        list(iter_ids(manifest, column="book_id"))


def test_metadata_gets_a_column_for_every_passthrough_field_any_row_names() -> None:
    records = [
        {"id": "a", "status": "ok", "speaker": "x"},
        {"id": "b", "status": "ok", "topic": "y", "speaker": 3},
    ]

    table = metadata_table(records)

    assert table.column("topic").to_pylist() == [None, "y"]
    assert table.column("speaker").to_pylist() == ['"x"', "3"]  # mixed types: kept readable as JSON text


def test_a_folder_of_jsonl_files_is_read_whole_and_names_a_bad_line_by_its_file(tmp_path: Path) -> None:
    # As Ray Data's write_json or Spark leave a dataset: part files and markers that hold no rows.
    folder = tmp_path / "manifest"
    folder.mkdir()
    write(folder / "part-0.json", b'{"id": "a"}\nbad\n{"id": "b"}\n')
    write(folder / "part-1.json", b'{"id": "c"}\nbad\n{"id": "d"}\n')
    write(folder / "_SUCCESS", b"")
    write(folder / ".part-0.json.crc", b"\x00")

    ids = [i for chunk in iter_ids(str(folder)) for i in chunk]

    assert ids == ["a", "part-0.json line 2", "b", "c", "part-1.json line 2", "d"]


def test_a_folder_of_several_formats_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "manifest"
    folder.mkdir()
    write(folder / "a.jsonl", b'{"id": "a"}\n')
    write(folder / "b.csv", b"id\nb\n")

    with pytest.raises(
        ValueError, match=r"holds files of several formats \(csv, json\); keep one format in it"
    ):
        list(iter_ids(str(folder)))


def test_a_gzipped_jsonl_manifest_is_read_as_jsonl(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.jsonl.gz", gzip.compress(b'{"id": "a"}\nbad\n{"id": "b"}\n'))

    assert [i for chunk in iter_ids(manifest) for i in chunk] == ["a", "line 2", "b"]
