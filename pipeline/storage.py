"""Keyed reads and writes under one output root on any fsspec filesystem (local disk, S3, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.secrets import redact, scrub, secret_values

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Reserved first segment for in-flight writes; callers may not use it, and listings hide it.
TMP_DIR = "_tmp"
# Object stores where an upload shows up whole or not at all. A write there is one upload to its key; a
# temporary object moved onto it would cost two more requests (a copy and a delete) for nothing.
WHOLE_UPLOADS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory"})

# Control characters would make keys that print and compare differently from what they look like.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_BACKOFF_S = 10.0
# Reads read_each keeps in flight: an object store answers each in tens of ms, and a run of a million rows
# leaves ~8,000 metadata parts for the driver to read at the start (resume) and end (totals, index).
READ_AHEAD = 16


def _transient_errors() -> tuple[type[BaseException], ...]:
    # With the endpoint down, s3fs re-raises botocore's EndpointConnectionError untranslated, and that is
    # a BotoCoreError rather than an OSError, so the botocore/aiohttp types have to be named explicitly.
    # They are optional imports because a local-only install has no reason to carry them.
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errors += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


_TRANSIENT = _transient_errors()
# OSError subclasses that describe the request, not the network: retrying cannot change the answer.
_PERMANENT = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageError(OSError):
    """A storage operation failed for good; the message names the URI and cause, never credentials."""

    def __init__(self, message: str, uri: str, attempts: int) -> None:
        super().__init__(message)
        self.uri = uri
        self.attempts = attempts

    def __str__(self) -> str:
        # OSError's default str() for a single argument is that argument; keep it so explicitly.
        return self.args[0]

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray re-raises worker exceptions on the driver by pickling them; OSError's default reduce
        # would call __init__ with the message alone.
        return (type(self), (self.args[0], self.uri, self.attempts))


def open_input(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for reading any fsspec URI (manifests, reference audio, ...)."""
    if not uri:
        raise ValueError("input URI is empty")
    return url_to_fs(uri, **copy.deepcopy(storage_options or {}))


def _check_segments(key: str, *, what: str) -> None:
    if "\\" in key:
        raise ValueError(f"{what} {key!r} contains a backslash; use '/' to separate segments")
    if _CONTROL.search(key):
        raise ValueError(f"{what} {key!r} contains a control character")
    if key.startswith("/"):
        raise ValueError(f"{what} {key!r} is absolute; keys are relative to the storage root")
    segments = key.split("/")
    if any(segment == "" for segment in segments):
        raise ValueError(f"{what} {key!r} has an empty segment (leading, trailing or doubled '/')")
    if any(segment in (".", "..") for segment in segments):
        raise ValueError(f"{what} {key!r} contains a '.' or '..' segment; keys may not leave the root")
    if segments[0] == TMP_DIR:
        raise ValueError(f"{what} {key!r} is under {TMP_DIR!r}/, which is reserved for in-flight writes")


class Storage:
    """One root URI plus relative keys: every path it touches is under the root.

    On an object store (WHOLE_UPLOADS) a write is one upload to its key. Elsewhere writes go to
    ``<root>/_tmp/<uuid>`` and are then moved onto the key, so a reader never sees a half-written local
    file. Either way a retried or repeated write simply replaces the object. Calls to an object store are
    retried with exponential backoff; local filesystems are tried once, since retrying a full disk or a bad
    path only delays the error.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        if not uri:
            raise ValueError("storage root URI is empty")
        if retries < 1:
            raise ValueError(f"retries is the number of attempts and must be >= 1, got {retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        # Deep copy: botocore fills in defaults inside the config_kwargs dicts it is given, and the
        # caller's options should come back exactly as they were passed.
        self._storage_options = copy.deepcopy(storage_options or {})
        self.fs, root = url_to_fs(uri, **copy.deepcopy(self._storage_options))
        self.root = root.rstrip("/")
        if not self.root:
            raise ValueError(f"storage root {uri!r} names no bucket or directory")
        self.retries = retries
        self.backoff_s = backoff_s
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.whole_uploads = bool(protocols & WHOLE_UPLOADS)
        self._secrets = secret_values(self._storage_options)

    def __repr__(self) -> str:
        return f"Storage({self.uri_of_root()!r}, storage_options={redact(self._storage_options)!r})"

    @property
    def storage_options(self) -> dict[str, Any]:
        return copy.deepcopy(self._storage_options)

    # ---- paths -------------------------------------------------------------------------------

    def key_path(self, key: str) -> str:
        """Filesystem path of ``key`` under the root; rejects keys that could point anywhere else."""
        if not isinstance(key, str):
            raise ValueError(f"key must be a string, got {type(key).__name__}")
        if key == "":
            raise ValueError("key is empty")
        _check_segments(key, what="key")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        """Full URI of ``key``, protocol included (``s3://bucket/run1/audio/a.wav``)."""
        return self.fs.unstrip_protocol(self.key_path(key))

    def uri_of_root(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def _prefix_path(self, prefix_key: str) -> str:
        prefix_key = prefix_key[:-1] if prefix_key.endswith("/") else prefix_key
        if prefix_key == "":
            return self.root
        _check_segments(prefix_key, what="prefix")
        return f"{self.root}/{prefix_key}"

    def _relative(self, path: str) -> str:
        return path[len(self.root) + 1 :]

    # ---- writes ------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing what was there; no temporary object is left behind."""
        path = self.key_path(key)
        payload = bytes(data)
        if self.whole_uploads:

            def upload() -> None:
                try:
                    self.fs.pipe_file(path, payload)
                finally:
                    self.fs.invalidate_cache(path)

            self._call("write", self.uri(key), upload)
            return
        # One temporary key for all attempts: when an outage leaves an upload behind (the move failed and
        # so did the clean-up), the next attempt overwrites and moves that same object.
        tmp = f"{self.root}/{TMP_DIR}/{uuid.uuid4().hex}"

        def attempt() -> None:
            try:
                if self.is_local:
                    self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
                    self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                self.fs.pipe_file(tmp, payload)
                self._move(tmp, path)
            except BaseException:
                self._discard(tmp)
                raise
            finally:
                self.fs.invalidate_cache(path)

        self._call("write", self.uri(key), attempt)

    def check_writable(self) -> None:
        """Write and remove an empty object under ``_tmp/``, raising what a run's first write would (a root
        that is a file, no permission, no bucket, no credentials) before any work starts. A local root
        that did not exist before is not left behind."""
        folder = f"{self.root}/{TMP_DIR}"
        tmp = f"{folder}/check-{uuid.uuid4().hex}"
        existed = not self.is_local or os.path.exists(self.root)

        def attempt() -> None:
            if self.is_local:
                self.fs.makedirs(folder, exist_ok=True)
            self.fs.pipe_file(tmp, b"")
            self.fs.rm_file(tmp)

        self._call("write", self.fs.unstrip_protocol(tmp), attempt)
        self._drop_empty(folder)
        if not existed:
            self._drop_empty(self.root)

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def _move(self, tmp: str, path: str) -> None:
        if self.is_local:
            # A rename within the root's filesystem: readers see the old file or the new one, never half.
            if self.fs.isdir(path):
                raise IsADirectoryError(f"{self.fs.unstrip_protocol(path)} is a directory")
            self.fs.mv(tmp, path)
        else:
            # Lists skip fsspec's path expansion, which would cost extra HEAD/LIST requests per write
            # and move the object *into* ``path`` if other keys happen to live under it as a prefix.
            self.fs.mv([tmp], [path])

    def _discard(self, tmp: str) -> None:
        try:
            self.fs.rm_file(tmp)
        except FileNotFoundError:
            pass
        except Exception as exc:
            # Best effort: the error that made us clean up is the one the caller needs to see.
            logger.warning(
                "could not remove temporary object %s (%s: %s)",
                self.fs.unstrip_protocol(tmp),
                type(exc).__name__,
                self._scrub(str(exc)),
            )

    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is already absent is not an error (deletes are retried)."""
        path = self.key_path(key)

        def attempt() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(path)

        self._call("delete", self.uri(key), attempt)

    def clear_tmp(self) -> int:
        """Remove every in-flight object under ``_tmp/``; returns how many there were.

        Only for a moment when nothing writes under this root: a writer killed between upload and move
        (a killed run, an outage that outlasted the retries) leaves its temporary object behind.
        """
        prefix = f"{self.root}/{TMP_DIR}"

        def attempt() -> int:
            self.fs.invalidate_cache(prefix)
            try:
                found = [self.fs._strip_protocol(p) for p in self.fs.find(prefix)]
            except FileNotFoundError:
                return 0
            found = [p for p in found if p.startswith(prefix + "/")]
            for path in found:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
            self.fs.invalidate_cache(prefix)
            return len(found)

        count = self._call("clear", self.fs.unstrip_protocol(prefix), attempt)
        self._drop_empty(prefix)
        return count

    def drop_empty_folder(self, prefix_key: str) -> None:
        """On a local root, remove the folder at ``prefix_key`` if nothing is left in it (object stores
        have no folders), so a finished run leaves no empty ``_attempts/`` behind."""
        self._drop_empty(self._prefix_path(prefix_key))

    def _drop_empty(self, path: str) -> None:
        if not self.is_local:
            return
        with contextlib.suppress(OSError):  # absent, or a writer put something there after all
            os.rmdir(path)
        self.fs.invalidate_cache(path)

    # ---- reads -------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        """Contents of ``key``; raises FileNotFoundError when it does not exist."""
        path = self.key_path(key)
        return self._call("read", self.uri(key), lambda: self.fs.cat_file(path))

    def read_each(self, keys: Iterable[str], ahead: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(key, contents) for each of ``keys`` in order, up to ``ahead`` (READ_AHEAD) reads in flight: at
        most that many objects are held beyond the one being used."""
        keys = iter(keys)
        ahead = ahead or READ_AHEAD
        with ThreadPoolExecutor(ahead, thread_name_prefix="storage-read") as pool:
            pending = deque((key, pool.submit(self.read_bytes, key)) for key in itertools.islice(keys, ahead))
            while pending:
                key, future = pending.popleft()
                contents = future.result()
                following = next(keys, None)
                if following is not None:
                    pending.append((following, pool.submit(self.read_bytes, following)))
                yield key, contents

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def exists(self, key: str) -> bool:
        path = self.key_path(key)

        def attempt() -> bool:
            # Other workers write under the same root, so a cached parent listing may be stale.
            self.fs.invalidate_cache(path)
            # Not fs.isfile/fs.exists: s3fs answers False for *any* error there, so an unreachable
            # store would look like a missing key and callers would redo finished work.
            try:
                return self.fs.info(path)["type"] == "file"
            except FileNotFoundError:
                return False

        return self._call("exists", self.uri(key), attempt)

    def list(self, prefix_key: str = "") -> list[str]:
        """Sorted relative keys of all objects under ``prefix_key`` (recursive); [] when there are none."""
        prefix = self._prefix_path(prefix_key)

        def attempt() -> list[str]:
            self.fs.invalidate_cache(prefix)
            try:
                found: Iterable[str] = self.fs.find(prefix)
            except FileNotFoundError:
                return []
            keys = []
            for path in found:
                path = self.fs._strip_protocol(path)
                # find() on a file path returns the file itself; keep only what is under the prefix,
                # so "audio" does not match "audio_old/x" and the in-flight area stays hidden.
                if prefix != self.root and not path.startswith(prefix + "/"):
                    continue
                key = self._relative(path)
                if key and not key.startswith(TMP_DIR + "/"):
                    keys.append(key)
            return sorted(keys)

        return self._call("list", self.fs.unstrip_protocol(prefix), attempt)

    # ---- retries -----------------------------------------------------------------------------

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        attempts = 1 if self.is_local else self.retries
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except _PERMANENT as exc:
                raise StorageError(self._message(op, uri, exc, attempt), uri, attempt) from exc
            except _TRANSIENT as exc:
                last = exc
                if attempt == attempts:
                    break
                # Jitter only lengthens the wait, so the retry window is at least the documented one
                # while many workers hitting the same throttled bucket still spread out.
                delay = min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S) * random.uniform(1.0, 1.5)
                logger.warning(
                    "%s %s failed (attempt %d/%d, %s); retrying in %.2fs",
                    op,
                    uri,
                    attempt,
                    attempts,
                    type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
        assert last is not None
        raise StorageError(self._message(op, uri, last, attempts), uri, attempts) from last

    def _message(self, op: str, uri: str, exc: BaseException, attempts: int) -> str:
        tries = "attempt" if attempts == 1 else "attempts"
        cause = self._scrub(str(exc)) or "no detail"
        return f"storage {op} of {uri} failed after {attempts} {tries}: {type(exc).__name__}: {cause}"

    def _scrub(self, text: str) -> str:
        # Exception text from the SDKs is not under our control; make sure no secret rides along.
        return scrub(text, self._secrets)
