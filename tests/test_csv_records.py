"""CSV manifests: Arrow's table when it reads the file cleanly, else record by record, a bad record alone."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from pipeline.csv_records import csv_blocks, csv_records, csv_table
from pipeline.json_lines import manifest_rows
from pipeline.reader import iter_ids


def rows_of(data: bytes) -> list[dict]:
    return [row for block in csv_blocks(data) for row in manifest_rows(block)]


def test_a_clean_csv_is_arrows_table_with_the_types_it_infers() -> None:
    rows = rows_of(b"id,text,seed\na,Hello.,1\nb,There.,2\n")

    assert rows == [{"id": "a", "text": "Hello.", "seed": 1}, {"id": "b", "text": "There.", "seed": 2}]


def test_ids_and_texts_stay_text_however_numeric_they_look_and_other_columns_are_inferred() -> None:
    # Arrow read ids 0001 and 1 both as the integer 1: one file name, and a duplicate id.
    rows = rows_of(b"id,text,voice,speaker\n0001,2024,7,0012\n1,Hello.,7,12\n")

    assert rows == [
        {"id": "0001", "text": "2024", "voice": "7", "speaker": 12},
        {"id": "1", "text": "Hello.", "voice": "7", "speaker": 12},
    ]


def test_a_csv_read_record_by_record_gets_the_numbers_and_booleans_a_clean_file_would() -> None:
    data = b"id,text,seed,score,keep,day\n0001,Hi.,3,0.5,true,2024-01-01\nb,Hello, unquoted.,1,2,false,x\n"

    good, bad = rows_of(data)

    assert good == {"id": "0001", "text": "Hi.", "seed": 3, "score": 0.5, "keep": True, "day": "2024-01-01"}
    assert rows_of(data.split(b"\nb,")[0] + b"\n")[0] == {**good, "day": datetime.date(2024, 1, 1)}
    assert bad["id"] == "line 3"


def test_types_are_inferred_over_the_whole_file_not_its_first_megabyte() -> None:
    # Ray's streaming CSV reader took seed for an integer column and failed at the last row.
    data = (
        b"id,text,seed\n"
        + b"".join(b"r%d,Hello there.,%d\n" % (i, i) for i in range(200_000))
        + b"x,Bad.,abc\n"
    )

    (table,) = list(csv_blocks(data))

    assert table.num_rows == 200_001
    assert table.column("seed")[-2:].to_pylist() == ["199999", "abc"]


def test_a_record_with_an_unquoted_comma_errors_alone_naming_its_line() -> None:
    rows = rows_of(b'id,text\na,"Hello, quoted."\nb,Hello, unquoted.\n\nc,Fine.\n')

    assert rows[0] == {"id": "a", "text": "Hello, quoted."}
    assert rows[1]["id"] == "line 3" and rows[1]["_error_field"] == "line"
    assert rows[1]["_error"] == (
        "line 3 (value 'b,Hello, unquoted.'): 3 fields where the header has 2; quote a field that holds a comma"
    )
    assert rows[2] == {"id": "c", "text": "Fine."}  # read record by record: every cell a string


def test_a_cell_that_is_not_utf8_errors_its_record_and_leaves_the_others_text() -> None:
    # Arrow read the whole text column as bytes for it, so every row's text errored.
    assert csv_table(b"id,text\na,caf\xe9\nb,Fine.\n") is None

    rows = rows_of(b"id,text\na,caf\xe9\nb,Fine.\n")

    assert rows[0]["_error"] == "line 2 (value 'a,caf\ufffd'): not UTF-8; save the manifest as UTF-8"
    assert rows[1] == {"id": "b", "text": "Fine."}


def test_records_that_span_lines_are_numbered_by_the_line_they_start_on() -> None:
    data = b'id,text\na,"Two\nlines."\nb,x,y\nc,"Three\n\nlines."\nd,x,y\n'

    records = [(number, row, problem) for number, row, problem in csv_records(data)]

    assert [(number, row["id"] if problem is None else row) for number, row, problem in records] == [
        (2, "a"),
        (4, ["b", "x", "y"]),
        (5, "c"),
        (8, ["d", "x", "y"]),
    ]


def test_a_blank_cell_means_the_default_in_a_clean_file_and_read_record_by_record() -> None:
    clean = rows_of(b"id,text,seed,note\na,Hi.,,\nb,Hi.,3,x\n")
    records = rows_of(b"id,text,seed,note\na,Hi.,,\nb,Hi.,3,x,extra\n")

    assert clean[0] == records[0] == {"id": "a", "text": "Hi.", "seed": None, "note": None}


def test_the_id_scan_labels_each_bad_record(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id,text\n5,One.\nb,Two, three.\nc,Four.\n")

    (ids,) = list(iter_ids(str(manifest)))

    assert ids == ["5", "line 3", "c"]


def test_a_csv_most_of_whose_records_are_bad_is_refused_whole(tmp_path: Path) -> None:
    # A semicolon-separated export with commas in its texts: not the CSV the manifest reader takes.
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id;text\na;Hello, there.\nb;One, two.\nc;Fine.\n")

    with pytest.raises(ValueError) as refused:
        list(iter_ids(str(manifest)))

    assert str(refused.value).startswith(
        f"manifest {str(manifest)!r} cannot be read as CSV: 2 of its 3 lines hold no row (first: line 2 (value 'a;Hello, there.'): 2 fields"
    )
