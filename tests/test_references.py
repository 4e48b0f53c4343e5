"""Specification of pipeline.references: which reference-audio sources are read, and which are refused."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from model.requests import RequestError
from pipeline.references import FetchPolicy, fetch_reference
from tests.helpers import CLIP, AudioServer

SECRET = "sekrit-Zq7-do-not-print"


def local_policy(*roots: Path, **kwargs) -> FetchPolicy:
    return FetchPolicy(allowed_roots=tuple(str(root) for root in roots), **kwargs)


def refused(source: str, policy: FetchPolicy) -> RequestError:
    with pytest.raises(RequestError) as info:
        fetch_reference(source, policy)
    return info.value


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "refs"
    path.mkdir()
    return path


# ---- local files ---------------------------------------------------------------------------------------


def test_file_under_an_allowed_root_is_read(root: Path):
    (root / "voice.wav").write_bytes(CLIP)

    assert fetch_reference(str(root / "voice.wav"), local_policy(root)) == CLIP


def test_relative_path_is_resolved_against_the_working_directory(root: Path, monkeypatch):
    (root / "voice.wav").write_bytes(CLIP)
    monkeypatch.chdir(root)

    assert fetch_reference("voice.wav", local_policy(root)) == CLIP


def test_file_outside_the_allowed_roots_is_refused(root: Path, tmp_path: Path):
    (tmp_path / "elsewhere.wav").write_bytes(CLIP)

    error = refused(str(tmp_path / "elsewhere.wav"), local_policy(root))

    assert "not a path under the allowed roots" in error.reason


def test_no_local_file_is_read_when_no_roots_are_configured(root: Path):
    (root / "voice.wav").write_bytes(CLIP)

    error = refused(str(root / "voice.wav"), FetchPolicy())

    assert "not a path under the allowed roots" in error.reason


def test_symlink_inside_the_root_pointing_outside_is_refused(root: Path, tmp_path: Path):
    (tmp_path / "secret.wav").write_bytes(CLIP)
    (root / "link.wav").symlink_to(tmp_path / "secret.wav")

    error = refused(str(root / "link.wav"), local_policy(root))

    assert "not a path under the allowed roots" in error.reason


def test_dot_dot_traversal_out_of_the_root_is_refused(root: Path, tmp_path: Path):
    (tmp_path / "secret.wav").write_bytes(CLIP)

    error = refused(f"{root}/../secret.wav", local_policy(root))

    assert "not a path under the allowed roots" in error.reason


def test_sibling_folder_sharing_the_roots_name_as_a_prefix_is_refused(root: Path, tmp_path: Path):
    (tmp_path / "refs-private").mkdir()
    (tmp_path / "refs-private" / "voice.wav").write_bytes(CLIP)

    error = refused(str(tmp_path / "refs-private" / "voice.wav"), local_policy(root))

    assert "not a path under the allowed roots" in error.reason


def test_directory_is_refused(root: Path):
    (root / "voices").mkdir()

    error = refused(str(root / "voices"), local_policy(root))

    assert "is a directory" in error.reason


def test_fifo_is_refused_without_blocking(root: Path):
    os.mkfifo(root / "pipe.wav")
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            fetch_reference(str(root / "pipe.wav"), local_policy(root))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=5)

    assert not worker.is_alive(), "fetch_reference blocked on a FIFO"
    assert isinstance(outcome[0], RequestError)
    assert "not a regular file" in outcome[0].reason


def test_missing_file_under_the_root_is_not_found(root: Path):
    error = refused(str(root / "missing.wav"), local_policy(root))

    assert error.reason == "not found"


def test_file_larger_than_max_bytes_is_refused(root: Path):
    (root / "voice.wav").write_bytes(CLIP)

    error = refused(str(root / "voice.wav"), local_policy(root, max_bytes=len(CLIP) - 1))

    assert f"larger than the limit of {len(CLIP) - 1} bytes" in error.reason


def test_file_uri_is_read_as_a_local_path(root: Path):
    (root / "voice.wav").write_bytes(CLIP)

    assert fetch_reference((root / "voice.wav").as_uri(), local_policy(root)) == CLIP


def test_file_uri_outside_the_allowed_roots_is_refused(root: Path, tmp_path: Path):
    (tmp_path / "secret.wav").write_bytes(CLIP)

    error = refused((tmp_path / "secret.wav").as_uri(), local_policy(root))

    assert "not a path under the allowed roots" in error.reason


# ---- data URIs and base64 ------------------------------------------------------------------------------


def test_audio_data_uri_is_decoded():
    source = "data:audio/wav;base64," + base64.b64encode(CLIP).decode()

    assert fetch_reference(source, FetchPolicy()) == CLIP


def test_data_uri_that_is_not_audio_is_refused():
    source = "data:text/plain;base64," + base64.b64encode(b"hello").decode()

    error = refused(source, FetchPolicy())

    assert error.reason == "data URI media type 'text/plain' is not audio/*"


def test_data_uri_with_invalid_base64_is_refused():
    error = refused("data:audio/wav;base64,UklG!!RiQ=", FetchPolicy())

    assert "not valid base64" in error.reason


def test_data_uri_larger_than_max_bytes_is_refused():
    source = "data:audio/wav;base64," + base64.b64encode(CLIP).decode()

    error = refused(source, FetchPolicy(max_bytes=16))

    assert "larger than the limit of 16 bytes" in error.reason


def test_raw_base64_is_decoded():
    assert fetch_reference(base64.b64encode(CLIP).decode(), FetchPolicy()) == CLIP


def test_line_wrapped_raw_base64_is_decoded():
    encoded = base64.encodebytes(CLIP).decode()  # wrapped at 76 characters

    assert "\n" in encoded.strip()
    assert fetch_reference(encoded, FetchPolicy()) == CLIP


def test_raw_base64_garbage_is_refused():
    error = refused("UklGRiQAAABXQVZFZm=0IBAAAAA", FetchPolicy())

    assert "not valid base64" in error.reason


def test_encoded_bytes_are_taken_as_they_are_within_the_limit():
    assert fetch_reference(b"RIFF1234", FetchPolicy()) == b"RIFF1234"

    with pytest.raises(RequestError) as too_large:
        fetch_reference(b"RIFF1234", FetchPolicy(max_bytes=4))
    assert (
        too_large.value.message == "references.audio (value '<8 bytes>'): is larger than the limit of 4 bytes"
    )
    with pytest.raises(RequestError, match="is empty"):
        fetch_reference(b"", FetchPolicy())


def test_source_of_no_known_kind_is_refused():
    error = refused("my voice, please!", FetchPolicy())

    assert error.reason == "not a path under the allowed roots, URI, URL, data URI or base64"


def test_error_shows_at_most_60_characters_of_the_source():
    blob = "QUJD" * 1000 + "A"  # base64 alphabet, invalid length

    error = refused(blob, FetchPolicy())

    assert len(error.value) <= 60
    assert blob not in error.message


# ---- http(s) -------------------------------------------------------------------------------------------


PRIVATE = FetchPolicy(allow_private_urls=True)


def test_loopback_url_is_refused_by_default_before_any_request(http_server: AudioServer):
    error = refused(http_server.url("/voice.wav"), FetchPolicy())

    assert (
        "'127.0.0.1' resolves to a private/loopback address; set allow_private_urls to permit" in error.reason
    )
    assert http_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/voice.wav",
        "http://10.1.2.3/voice.wav",
        "http://192.168.0.10/voice.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/voice.wav",
        "http://0.0.0.0/voice.wav",
        "http://224.0.0.1/voice.wav",
        "http://[::1]/voice.wav",
        "http://[::ffff:127.0.0.1]/voice.wav",
        "https://[fe80::1]/voice.wav",
    ],
)
def test_urls_resolving_to_non_public_addresses_are_refused_by_default(url: str):
    error = refused(url, FetchPolicy())

    assert "resolves to a private/loopback address" in error.reason


def test_loopback_url_is_fetched_when_private_urls_are_allowed(http_server: AudioServer):
    assert fetch_reference(http_server.url("/voice.wav"), PRIVATE) == CLIP


def test_connection_goes_to_the_address_that_was_checked(http_server: AudioServer, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "voices.example":
            lookups.append(host)
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)

    assert fetch_reference(http_server.url("/voice.wav", host="voices.example"), PRIVATE) == CLIP
    assert lookups == ["voices.example"]  # resolved once: no second lookup for a rebinding DNS to answer
    assert http_server.requests == [("/voice.wav", f"voices.example:{http_server.port}")]


def test_server_slower_than_the_timeout_is_refused(http_server: AudioServer):
    start = time.monotonic()

    error = refused(http_server.url("/slow.wav"), FetchPolicy(allow_private_urls=True, timeout_s=0.5))

    assert error.reason == "no answer within 0.5 s"
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("path", ["/big.wav", "/big-unsized.wav"])
def test_response_larger_than_max_bytes_is_refused(http_server: AudioServer, path: str):
    error = refused(http_server.url(path), FetchPolicy(allow_private_urls=True, max_bytes=1024))

    assert error.reason == "response is larger than the limit of 1024 bytes"


def test_error_status_is_refused(http_server: AudioServer):
    error = refused(http_server.url("/missing.wav"), PRIVATE)

    assert error.reason == "answered HTTP 404"


def test_redirect_is_not_followed(http_server: AudioServer):
    error = refused(http_server.url("/redirect.wav"), PRIVATE)

    assert "redirects are not followed" in error.reason
    assert http_server.paths == ["/redirect.wav"]


def test_credentials_in_a_url_are_refused_and_not_shown(http_server: AudioServer):
    url = http_server.url("/voice.wav", host=f"user:{SECRET}@127.0.0.1")

    error = refused(url, PRIVATE)

    assert error.reason == "credentials in the URL are not supported"
    assert SECRET not in error.message
    assert http_server.requests == []


# ---- fsspec URIs ---------------------------------------------------------------------------------------


def test_memory_uri_is_read_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/refs-{uuid.uuid4().hex}/voice.wav"
    fs.pipe(path, CLIP)
    try:
        assert fetch_reference(f"memory://{path}", FetchPolicy()) == CLIP
    finally:
        fs.rm(path)


@pytest.mark.parametrize(
    "source", ["zip://voice.wav::file:///etc/passwd", "local:///etc/passwd", "ftp://10.0.0.1/voice.wav"]
)
def test_fsspec_protocols_that_bypass_the_policy_are_refused(source: str):
    error = refused(source, FetchPolicy())

    assert "not supported" in error.reason


def test_s3_object_is_fetched(s3_server, s3_bucket: str):
    s3_server.client().put_object(Bucket=s3_bucket, Key="voices/a.wav", Body=CLIP)

    data = fetch_reference(
        f"s3://{s3_bucket}/voices/a.wav", FetchPolicy(storage_options=s3_server.storage_options)
    )

    assert data == CLIP


def test_empty_s3_object_reads_as_no_bytes_for_the_decoder_to_refuse(s3_server, s3_bucket: str):
    s3_server.client().put_object(Bucket=s3_bucket, Key="voices/empty.wav", Body=b"")

    data = fetch_reference(
        f"s3://{s3_bucket}/voices/empty.wav", FetchPolicy(storage_options=s3_server.storage_options)
    )

    assert data == b""


def test_s3_object_larger_than_max_bytes_is_refused(s3_server, s3_bucket: str):
    s3_server.client().put_object(Bucket=s3_bucket, Key="voices/a.wav", Body=CLIP)
    policy = FetchPolicy(storage_options=s3_server.storage_options, max_bytes=16)

    error = refused(f"s3://{s3_bucket}/voices/a.wav", policy)

    assert "larger than the limit of 16 bytes" in error.reason


def test_missing_s3_object_is_not_found_and_the_secret_is_not_shown(s3_server, s3_bucket: str):
    options = {**s3_server.storage_options, "secret": SECRET}

    error = refused(f"s3://{s3_bucket}/voices/missing.wav", FetchPolicy(storage_options=options))

    assert error.reason == "not found"
    assert SECRET not in error.message


def test_unreachable_s3_endpoint_error_does_not_show_the_secret(s3_server):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    options = {
        **s3_server.storage_options,
        "secret": SECRET,
        "endpoint_url": f"http://127.0.0.1:{closed_port}",
    }

    error = refused(f"s3://bucket-{uuid.uuid4().hex[:8]}/a.wav", FetchPolicy(storage_options=options))

    assert error.reason.startswith("could not be read")
    assert SECRET not in error.message
    assert error.__cause__ is None
