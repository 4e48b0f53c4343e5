"""Specification of pipeline.storage: keyed, atomic, retried access under one root, local or S3."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from pathlib import Path

import pytest

from pipeline.secrets import redact
from pipeline.storage import Storage, StorageError, open_input


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "run1"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/run1", server.storage_options)


def all_paths(storage: Storage) -> list[str]:
    """Every object under the root, straight from the filesystem (not through Storage.list)."""
    return sorted(storage.fs.find(storage.root))


# ---- the check before a run ----------------------------------------------------------------------


def test_a_writable_root_passes_the_check_and_keeps_nothing_from_it(storage: Storage):
    storage.check_writable()

    assert storage.list() == []
    if storage.is_local:
        assert not Path(storage.root).exists()  # it did not exist before the check


def test_a_root_that_is_a_file_fails_the_check(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("a file")

    with pytest.raises(StorageError, match="Not a directory"):
        Storage(str(tmp_path / "notes.txt")).check_writable()


def test_a_bucket_that_does_not_exist_fails_the_check(s3_server):
    with pytest.raises(Exception, match="NoSuchBucket|does not exist"):
        Storage("s3://no-such-bucket-9c1/run1", s3_server.storage_options, retries=1).check_writable()


# ---- round trips ---------------------------------------------------------------------------------


def test_written_bytes_read_back(storage: Storage):
    storage.write_bytes("audio/a.wav", b"RIFF\x00\x01")

    assert storage.read_bytes("audio/a.wav") == b"RIFF\x00\x01"


def test_written_text_reads_back_as_utf8(storage: Storage):
    storage.write_text("meta/a.json", '{"text": "héllo"}')

    assert storage.read_text("meta/a.json") == '{"text": "héllo"}'
    assert storage.read_bytes("meta/a.json") == '{"text": "héllo"}'.encode()


def test_writing_same_key_twice_keeps_one_object_with_latest_content(storage: Storage):
    storage.write_bytes("audio/a.wav", b"first")
    storage.write_bytes("audio/a.wav", b"second")

    assert storage.read_bytes("audio/a.wav") == b"second"
    assert storage.list() == ["audio/a.wav"]


def test_no_temporary_objects_remain_after_writes(storage: Storage):
    for i in range(3):
        storage.write_bytes(f"audio/{i}.wav", b"x")

    assert all_paths(storage) == [storage.key_path(f"audio/{i}.wav") for i in range(3)]


def test_an_s3_write_is_one_upload_to_its_key(s3_server, s3_bucket, caplog):
    # Uploads to an object store show up whole or not at all; a temporary object moved onto the key took a
    # copy and a delete on top, three round trips for every audio file.
    storage = Storage(f"s3://{s3_bucket}/run1", s3_server.storage_options)
    storage.write_bytes("audio/warmup.wav", b"x")  # the bucket's region and connections, looked up once

    with caplog.at_level(logging.DEBUG, logger="s3fs"):
        storage.write_bytes("audio/a.wav", b"audio")

    calls = [r.getMessage().split(" - ")[0] for r in caplog.records if r.getMessage().startswith("CALL: ")]
    assert calls == ["CALL: put_object"]
    assert storage.read_bytes("audio/a.wav") == b"audio"


def test_read_each_gives_every_key_its_contents_in_order(storage: Storage):
    keys = [f"metadata/part-{i:03d}.parquet" for i in range(40)]
    for key in reversed(keys):  # written in another order than read
        storage.write_bytes(key, key.encode())

    got = list(storage.read_each(keys, ahead=8))

    assert got == [(key, key.encode()) for key in keys]


def test_read_each_keeps_up_to_its_reads_in_flight_and_no_more(tmp_path: Path):
    storage = Storage(str(tmp_path / "run1"))
    keys = [f"part-{i}" for i in range(20)]
    for key in keys:
        storage.write_bytes(key, b"x")
    lock, running, most = threading.Lock(), [0], [0]
    read = storage.read_bytes

    def slow_read(key: str) -> bytes:  # as an object store answers: after a while, many at once
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return read(key)

    storage.read_bytes = slow_read
    assert [key for key, _ in storage.read_each(keys, ahead=4)] == keys
    assert most[0] == 4


def test_exists_reflects_writes_and_deletes(storage: Storage):
    assert not storage.exists("audio/a.wav")
    storage.write_bytes("audio/a.wav", b"x")
    assert storage.exists("audio/a.wav")
    storage.delete("audio/a.wav")
    assert not storage.exists("audio/a.wav")


def test_a_prefix_is_not_an_existing_key(storage: Storage):
    storage.write_bytes("audio/a.wav", b"x")

    assert not storage.exists("audio")


def test_deleting_an_absent_key_is_not_an_error(storage: Storage):
    storage.delete("never/written.wav")

    assert storage.list() == []


def test_reading_an_absent_key_raises_file_not_found(storage: Storage):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("never/written.wav")


def test_another_writer_is_seen_despite_cached_listings(storage: Storage):
    other = Storage(storage.uri_of_root(), storage.storage_options)
    assert storage.list() == []
    assert not storage.exists("audio/a.wav")

    other.write_bytes("audio/a.wav", b"x")

    assert storage.exists("audio/a.wav")
    assert storage.list() == ["audio/a.wav"]


# ---- listing ---------------------------------------------------------------------------------------


def test_list_returns_sorted_relative_keys_recursively(storage: Storage):
    for key in ["meta/b.json", "audio/sub/c.wav", "audio/a.wav"]:
        storage.write_bytes(key, b"x")

    assert storage.list() == ["audio/a.wav", "audio/sub/c.wav", "meta/b.json"]


def test_list_under_a_prefix_returns_keys_relative_to_the_root(storage: Storage):
    for key in ["audio/a.wav", "audio/sub/c.wav", "audio_old/z.wav", "meta/b.json"]:
        storage.write_bytes(key, b"x")

    assert storage.list("audio") == ["audio/a.wav", "audio/sub/c.wav"]
    assert storage.list("audio/") == ["audio/a.wav", "audio/sub/c.wav"]


def test_list_of_an_absent_prefix_is_empty(storage: Storage):
    assert storage.list("nothing/here") == []
    assert storage.list() == []


def test_list_hides_leftover_temporary_objects(storage: Storage):
    storage.write_bytes("audio/a.wav", b"x")
    # What a writer that crashed between its upload and its move leaves behind.
    storage.fs.pipe_file(f"{storage.root}/_tmp/deadbeef", b"partial")
    storage.fs.invalidate_cache()

    assert storage.list() == ["audio/a.wav"]


# ---- keys and URIs ---------------------------------------------------------------------------------


def test_uri_includes_the_protocol(s3_server, s3_bucket, tmp_path: Path):
    s3 = Storage(f"s3://{s3_bucket}/run1/", s3_server.storage_options)
    local = Storage(f"file://{tmp_path}/run1")

    assert s3.uri("audio/a.wav") == f"s3://{s3_bucket}/run1/audio/a.wav"
    assert local.uri("audio/a.wav") == f"file://{tmp_path}/run1/audio/a.wav"


def test_plain_local_path_and_file_uri_name_the_same_root(tmp_path: Path):
    Storage(str(tmp_path / "run1")).write_bytes("a.txt", b"x")

    assert Storage(f"file://{tmp_path}/run1").read_bytes("a.txt") == b"x"


ESCAPING_KEYS = ["../x", "/abs", "a/../../b", "a\\b", "a\x00b", "", "a//b", "a/", "./a", "_tmp/x"]


@pytest.mark.parametrize("key", ESCAPING_KEYS, ids=repr)
def test_keys_that_could_leave_the_root_are_rejected_and_nothing_is_written(storage: Storage, key: str):
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")

    assert all_paths(storage) == []


@pytest.mark.parametrize("key", ESCAPING_KEYS, ids=repr)
def test_key_path_rejects_the_same_keys(key: str, tmp_path: Path):
    with pytest.raises(ValueError):
        Storage(str(tmp_path)).key_path(key)


def test_rejected_escape_does_not_touch_the_parent_directory(tmp_path: Path):
    storage = Storage(str(tmp_path / "run1"))

    with pytest.raises(ValueError):
        storage.write_bytes("../outside.txt", b"x")

    assert not (tmp_path / "outside.txt").exists()


def test_rejection_message_names_the_key():
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        Storage("/tmp/root").key_path("../x")


def test_dots_inside_a_segment_are_an_ordinary_name(storage: Storage):
    storage.write_bytes("takes/v1..2.wav", b"x")

    assert storage.list() == ["takes/v1..2.wav"]


# ---- credentials ---------------------------------------------------------------------------------


def test_redact_hides_secret_values_at_any_depth():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA123",
        "secret": "s3cr3t",
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_secret_access_key": "s3cr3t",
            "AWS_Session_Token": "tok",
        },
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "profiles": [{"password": "pw", "user": "me"}],
        "Credentials": {"anything": "here"},
    }

    assert redact(options) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "***",
        "secret": "***",
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_secret_access_key": "***",
            "AWS_Session_Token": "***",
        },
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "profiles": [{"password": "***", "user": "me"}],
        "Credentials": "***",
    }


def test_redact_leaves_its_input_unchanged():
    options = {"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}

    redact(options)

    assert options == {"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}


def test_storage_repr_hides_credentials(s3_server, s3_bucket):
    storage = Storage(f"s3://{s3_bucket}/run1", {**s3_server.storage_options, "secret": "sekrit-value-42"})

    assert "sekrit-value-42" not in repr(storage)
    assert f"s3://{s3_bucket}/run1" in repr(storage)


# ---- inputs --------------------------------------------------------------------------------------


def test_open_input_reads_an_s3_manifest(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/manifest.jsonl", Body=b'{"id": 1}\n')

    fs, path = open_input(f"s3://{s3_bucket}/in/manifest.jsonl", s3_server.storage_options)

    assert path == f"{s3_bucket}/in/manifest.jsonl"
    with fs.open(path, "rb") as f:
        assert f.read() == b'{"id": 1}\n'


def test_open_input_reads_a_local_manifest(tmp_path: Path):
    (tmp_path / "manifest.jsonl").write_text('{"id": 1}\n')

    fs, path = open_input(str(tmp_path / "manifest.jsonl"))

    assert fs.cat_file(path) == b'{"id": 1}\n'


# ---- failures and retries --------------------------------------------------------------------------


def test_s3_write_survives_a_server_restart_within_the_retry_window(s3_server, s3_bucket, caplog):
    storage = Storage(f"s3://{s3_bucket}/run1", s3_server.storage_options, retries=5, backoff_s=0.2)
    storage.write_bytes("audio/warmup.wav", b"x")  # connections are pooled before the outage
    s3_server.stop()
    restart = threading.Timer(1.0, s3_server.start)
    restart.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
            storage.write_bytes("audio/a.wav", b"after the outage")
    finally:
        restart.join()
        s3_server.start()

    assert any("retrying" in record.getMessage() for record in caplog.records)
    assert storage.read_bytes("audio/a.wav") == b"after the outage"
    assert all_paths(storage) == [storage.key_path("audio/a.wav"), storage.key_path("audio/warmup.wav")]


def test_s3_write_with_retries_exhausted_raises_storage_error_naming_the_uri_not_the_secret(
    s3_server, s3_bucket
):
    secret = "sekrit-value-42"
    storage = Storage(
        f"s3://{s3_bucket}/run1", {**s3_server.storage_options, "secret": secret}, retries=3, backoff_s=0.01
    )
    s3_server.stop()
    try:
        with pytest.raises(StorageError) as caught:
            storage.write_bytes("audio/a.wav", b"x")
    finally:
        s3_server.start()

    message = str(caught.value)
    assert f"s3://{s3_bucket}/run1/audio/a.wav" in message
    assert "after 3 attempts" in message
    assert secret not in message
    assert caught.value.uri == f"s3://{s3_bucket}/run1/audio/a.wav"
    assert caught.value.attempts == 3


def test_s3_exists_raises_rather_than_answering_false_when_the_server_is_down(s3_server, s3_bucket):
    storage = Storage(f"s3://{s3_bucket}/run1", s3_server.storage_options, retries=2, backoff_s=0.01)
    s3_server.stop()
    try:
        with pytest.raises(StorageError):
            storage.exists("audio/a.wav")
    finally:
        s3_server.start()


def test_storage_error_survives_pickling():
    error = StorageError("storage write of s3://b/k failed", "s3://b/k", 5)

    copy = pickle.loads(pickle.dumps(error))

    assert (str(copy), copy.uri, copy.attempts) == (str(error), "s3://b/k", 5)
    assert isinstance(copy, OSError)


def test_local_errors_are_not_retried(tmp_path: Path, caplog):
    storage = Storage(str(tmp_path / "run1"), retries=5, backoff_s=1.0)
    storage.write_bytes("a.wav", b"x")

    with caplog.at_level(logging.WARNING, logger="pipeline.storage"), pytest.raises(StorageError):
        storage.write_bytes("a.wav/inner.wav", b"x")  # the parent "directory" is a file

    assert not any("retrying" in record.getMessage() for record in caplog.records)
    assert storage.list() == ["a.wav"]


def test_a_finished_local_run_leaves_no_empty_tmp_or_attempts_folder(tmp_path: Path):
    from pipeline.attempts import AttemptLog

    storage = Storage(str(tmp_path / "run1"))
    storage.write_bytes("a.txt", b"x")
    log = AttemptLog(storage)
    log.start(["row-1"])
    assert (tmp_path / "run1" / "_tmp").is_dir() and (tmp_path / "run1" / "_attempts").is_dir()
    storage.clear_tmp()
    log.clear()
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["a.txt"]
