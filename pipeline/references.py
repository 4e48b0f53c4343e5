"""Turn a manifest's reference-audio source into encoded audio bytes, safely.

A source is encoded audio bytes themselves (a Parquet binary cell, or the bytes of a 🤗 datasets Audio
value, which pipeline.manifest unwraps), taken as they are within the size limit, or a string, one of,
decided in this order:

1. a ``data:`` URI whose media type is ``audio/*``;
2. an ``http://`` or ``https://`` URL (private addresses refused unless the policy allows them);
3. an fsspec URI (``s3://``, ``gs://``, ``memory://`` ...); ``file://`` URIs are local paths;
4. a local path that is an existing file under one of the policy's allowed roots;
5. raw base64;

and anything else is refused. Decoding the bytes is left to ``model.reference_audio``.

Every failure is a ``RequestError(field, reason, value)`` whose value is the source cut to 60 characters,
with URL credentials and query strings left out, and whose reason never carries storage credentials.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from model.requests import RequestError
from pipeline.secrets import scrub, secret_values

DEFAULT_FIELD = "references.audio"
SHOWN_CHARS = 60

# fsspec protocols a manifest may name. An allowlist rather than "anything fsspec knows": several
# protocols reach hosts named in the URL (ftp, sftp, smb, webhdfs, ...) and would bypass the private-address
# check, and others read the local disk (local, dir, zip, tar, cached wrappers) and would bypass the roots.
FSSPEC_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory"})

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
_MIN_BASE64_CHARS = 16
# Longer strings are never taken for paths (no OS accepts them), which also keeps realpath() away from
# megabytes of base64.
_MAX_PATH_CHARS = 4096
_READ_CHUNK = 64 * 1024
_NOT_RECOGNISED = "not a path under the allowed roots, URI, URL, data URI or base64"


@dataclass(frozen=True)
class FetchPolicy:
    """What ``fetch_reference`` may read, and how much.

    ``allowed_roots``: local files may only be read under these folders (after resolving symlinks);
    empty means no local files at all. ``allow_private_urls``: permit http(s) URLs whose host resolves to
    a loopback, private, link-local, reserved, multicast or otherwise non-global address.
    ``timeout_s``: the whole http(s) fetch (connect, headers and body) must finish within it.
    ``max_bytes``: the largest encoded clip accepted from any kind of source.
    ``storage_options``: passed to fsspec for ``s3://``, ``gs://`` ... URIs.
    """

    allowed_roots: tuple[str, ...] = ()
    allow_private_urls: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 50 * 1024 * 1024
    storage_options: dict | None = None


def fetch_reference(source: str | bytes, policy: FetchPolicy, field: str = DEFAULT_FIELD) -> bytes:
    """Encoded audio bytes for ``source`` (see the module docstring for the kinds of source)."""
    if isinstance(source, bytes):
        shown = f"<{len(source)} bytes>"
        if not source:
            raise RequestError(field, "is empty", shown)
        if len(source) > policy.max_bytes:
            raise RequestError(field, f"is larger than the limit of {policy.max_bytes} bytes", shown)
        return source
    if not isinstance(source, str):
        raise RequestError(field, f"must be a string or bytes, got {type(source).__name__}")
    fetch = _Fetch(source, policy, field)
    if not source.strip():
        raise fetch.error("is empty")
    if source[:5].lower() == "data:":
        return fetch.data_uri()
    match = _SCHEME.match(source)
    if match:
        protocol = match.group(1).lower()
        if protocol in ("http", "https"):
            return fetch.http(protocol)
        if protocol == "file":
            return fetch.file_uri()
        return fetch.fsspec(protocol)
    return fetch.path_or_base64()


class _Fetch:
    """One fetch: the source, the policy, and how errors about it are worded."""

    def __init__(self, source: str, policy: FetchPolicy, field: str) -> None:
        self.source = source
        self.policy = policy
        self.field = field

    def error(self, reason: str) -> RequestError:
        return RequestError(self.field, reason, shown_source(self.source))

    def too_large(self) -> RequestError:
        return self.error(f"is larger than the limit of {self.policy.max_bytes} bytes")

    # ---- data URIs and base64 ------------------------------------------------------------------------

    def data_uri(self) -> bytes:
        header, comma, payload = self.source[5:].partition(",")
        if not comma:
            raise self.error("data URI has no ',' before its data")
        params = [part.strip() for part in header.split(";")]
        media_type = params[0].lower() or "text/plain"  # RFC 2397's default
        is_base64 = len(params) > 1 and params[-1].lower() == "base64"
        kind, slash, subtype = media_type.partition("/")
        if kind != "audio" or not slash or not subtype:
            raise self.error(f"data URI media type {media_type!r} is not audio/*")
        if is_base64:
            return self.decode_base64(payload, "data URI payload is not valid base64")
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > self.policy.max_bytes:
            raise self.too_large()
        return data

    def decode_base64(self, text: str, reason: str) -> bytes:
        compact = "".join(text.split())  # line-wrapped base64 is still base64
        if len(compact) // 4 * 3 > self.policy.max_bytes + 2:  # checked before decoding anything
            raise self.too_large()
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise self.error(reason) from None
        if not data:
            raise self.error(reason)
        if len(data) > self.policy.max_bytes:
            raise self.too_large()
        return data

    # ---- http(s) -------------------------------------------------------------------------------------

    def http(self, scheme: str) -> bytes:
        try:
            parts = urllib.parse.urlsplit(self.source)
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise self.error("is not a valid URL") from None
        host = parts.hostname
        if not host:
            raise self.error("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise self.error("credentials in the URL are not supported")
        addresses = self.resolve(host, port)
        request = urllib.request.Request(
            self.source, headers={"User-Agent": "higgs-batch", "Accept-Encoding": "identity"}
        )
        opener = _pinned_opener(addresses)
        limit = self.policy.max_bytes
        deadline = time.monotonic() + self.policy.timeout_s
        no_answer = self.error(f"no answer within {self.policy.timeout_s:g} s")
        try:
            with opener.open(request, timeout=self.policy.timeout_s) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.strip().isdigit() and int(length) > limit:
                    raise self.error(f"response is larger than the limit of {limit} bytes")
                chunks: list[bytes] = []
                total = 0
                while total <= limit:
                    if time.monotonic() > deadline:
                        raise no_answer
                    chunk = response.read1(min(_READ_CHUNK, limit + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
        except RequestError:
            raise
        except _RedirectRefused as exc:
            raise self.error(
                f"answered with a redirect (HTTP {exc.code}); redirects are not followed"
            ) from None
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self.error(f"answered HTTP {exc.code}") from None
        except TimeoutError:  # socket.timeout is TimeoutError since 3.10
            raise no_answer from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise no_answer from None
            raise self.error(f"could not be fetched: {_describe(exc.reason)}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self.error(f"could not be fetched: {_describe(exc)}") from None
        if total > limit:
            raise self.error(f"response is larger than the limit of {limit} bytes")
        return b"".join(chunks)

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        # getaddrinfo has no timeout of its own; a hanging resolver is bounded only by the system's.
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise self.error(f"host {host!r} could not be resolved") from None
        if not infos:
            raise self.error(f"host {host!r} could not be resolved")
        if not self.policy.allow_private_urls:
            for info in infos:
                if _is_private(info[4][0]):
                    raise self.error(
                        f"host {host!r} resolves to a private/loopback address; set allow_private_urls to permit"
                    )
        return infos

    # ---- fsspec --------------------------------------------------------------------------------------

    def fsspec(self, protocol: str) -> bytes:
        if "::" in self.source:
            raise self.error("chained fsspec URLs are not supported")
        if protocol not in FSSPEC_PROTOCOLS:
            supported = ", ".join(sorted(FSSPEC_PROTOCOLS))
            raise self.error(
                f"protocol {protocol!r} is not supported (supported: http, https, file, {supported})"
            )
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        options = self.policy.storage_options or {}
        limit = self.policy.max_bytes
        try:
            fs, path = url_to_fs(self.source, **options)
            if isinstance(fs, LocalFileSystem):
                raise self.error("local files must be given as paths under the allowed roots")
            info = fs.info(path)
            if info.get("type") == "directory":
                raise self.error("is a directory, not a file")
            size = info.get("size")
            if size is not None and size > limit:
                raise self.too_large()
            # One GET for the bytes: opening the file would ask for its info again, a third round trip a
            # clip on object storage (scripts/bench_io.py). An empty object has no range to ask for.
            data = b"" if size == 0 else fs.cat_file(path, start=0, end=limit + 1)
        except RequestError:
            raise
        except FileNotFoundError:
            raise self.error("not found") from None
        except Exception as exc:  # noqa: BLE001 - any backend error becomes a request error, scrubbed
            # `from None`: a chained traceback could carry what the scrubbed text leaves out.
            raise self.error(f"could not be read: {scrub(_describe(exc), secret_values(options))}") from None
        if len(data) > limit:
            raise self.too_large()
        return data

    # ---- local files ---------------------------------------------------------------------------------

    def file_uri(self) -> bytes:
        path = self.source[len("file://") :]
        if path[:10].lower() == "localhost/":
            path = path[9:]
        if not path.startswith("/"):
            raise self.error("file:// URI needs an absolute path")
        return self.local(path)

    def path_or_base64(self) -> bytes:
        # Existence is only asked of paths under the allowed roots, so the answer says nothing about files
        # elsewhere; anything else that looks like base64 is decoded as base64.
        resolved = self.resolve_local(self.source) if len(self.source) <= _MAX_PATH_CHARS else None
        if resolved is not None and os.path.lexists(resolved):
            return self.read_local(resolved)
        if len(self.source.strip()) >= _MIN_BASE64_CHARS and _BASE64.match(self.source):
            return self.decode_base64(self.source, "not valid base64 (nor a file under the allowed roots)")
        return self.local(self.source)

    def local(self, path: str) -> bytes:
        resolved = self.resolve_local(path) if len(path) <= _MAX_PATH_CHARS else None
        if resolved is None:
            raise self.error(_NOT_RECOGNISED)
        return self.read_local(resolved)

    def resolve_local(self, path: str) -> str | None:
        """``path`` with symlinks resolved, or None when that is not inside an allowed root."""
        try:
            resolved = os.path.realpath(path)
            for root in self.policy.allowed_roots:
                if not root:
                    continue
                real_root = os.path.realpath(root)
                try:
                    if os.path.commonpath([real_root, resolved]) == real_root:
                        return resolved
                except ValueError:  # different drives on Windows
                    continue
        except (OSError, ValueError):  # e.g. an embedded NUL
            return None
        return None

    def read_local(self, resolved: str) -> bytes:
        limit = self.policy.max_bytes
        try:
            info = os.stat(resolved)
        except FileNotFoundError:
            raise self.error("not found") from None
        except OSError as exc:
            raise self.error(f"could not be read: {_describe(exc)}") from None
        self.check_regular(info, limit)
        # The stat above keeps FIFOs from ever being opened; O_NONBLOCK and the fstat below cover a file
        # swapped for one in between, and O_NOFOLLOW a last component swapped for a symlink. A directory
        # higher up swapped for a symlink after realpath() is a residual race that this does not close.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(resolved, flags)
        except OSError as exc:
            raise self.error(f"could not be read: {_describe(exc)}") from None
        try:
            self.check_regular(os.fstat(fd), limit)
            chunks: list[bytes] = []
            total = 0
            while total <= limit:
                chunk = os.read(fd, min(1024 * 1024, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            raise self.error(f"could not be read: {_describe(exc)}") from None
        finally:
            os.close(fd)
        if total > limit:
            raise self.too_large()
        return b"".join(chunks)

    def check_regular(self, info: os.stat_result, limit: int) -> None:
        if stat.S_ISDIR(info.st_mode):
            raise self.error("is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise self.error("is not a regular file")
        if info.st_size > limit:
            raise self.too_large()


# ---- http helpers -------------------------------------------------------------------------------------


class _RedirectRefused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # Redirects are refused outright rather than re-checked: following one would mean resolving and
    # vetting a second host, and a reference clip has no business living behind a redirect.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise _RedirectRefused(code)


class _PinnedHandler(urllib.request.AbstractHTTPHandler):
    """http/https that connects only to the addresses already resolved and checked.

    Connecting to the checked addresses, rather than letting http.client resolve the host again, closes
    the DNS-rebinding gap between the check and the connection. The Host header and, for https, SNI and
    certificate verification still use the host name from the URL.
    """

    def __init__(self, addresses: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self._addresses = addresses

    def _connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):  # noqa: ANN001
        last: OSError | None = None
        for family, socktype, proto, _canonname, sockaddr in self._addresses:
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last if last is not None else OSError("no address to connect to")

    def _factory(self, cls: type[http.client.HTTPConnection]):  # noqa: ANN202
        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connection = cls(host, **kwargs)
            connection._create_connection = self._connect  # type: ignore[attr-defined]
            return connection

        return make

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._factory(http.client.HTTPConnection), req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._factory(http.client.HTTPSConnection), req, context=_tls_context())

    http_request = urllib.request.AbstractHTTPHandler.do_request_
    https_request = urllib.request.AbstractHTTPHandler.do_request_


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # One for every fetch: building it loads the system's CA certificates, ~40 ms, which per request was
    # most of the time a fetch actor spent on an http(s) reference (scripts/bench_io.py). An SSLContext
    # may be shared by threads.
    return ssl.create_default_context()


def _pinned_opener(addresses: list[tuple[Any, ...]]) -> urllib.request.OpenerDirector:
    # Built by hand rather than with build_opener(): no ProxyHandler (an environment proxy would take the
    # connection somewhere other than the checked address), no file/ftp/data handlers, no redirects.
    opener = urllib.request.OpenerDirector()
    for handler in (
        _PinnedHandler(addresses),
        _NoRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _is_private(address: str) -> bool:
    """Whether a resolved address is anything but a public unicast one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global  # shared address space (100.64.0.0/10) and the like
    )


# ---- messages -----------------------------------------------------------------------------------------


def shown_source(source: str) -> str:
    """The source as an error may show it: no URL credentials or query, at most 60 characters."""
    if _SCHEME.match(source):
        try:
            parts = urllib.parse.urlsplit(source)
            netloc = parts.netloc.rpartition("@")[2]
            query = "?..." if parts.query else ""
            source = f"{parts.scheme}://{netloc}{parts.path}{query}"
        except ValueError:
            source = source.split("?", 1)[0]
    if len(source) > SHOWN_CHARS:
        source = source[: SHOWN_CHARS - 3] + "..."
    return source


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
