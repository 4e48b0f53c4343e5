"""Helpers shared by the test modules: manifests, jobs, what a finished output must look like, processes.

`assert_output_contract` is the one check every end-to-end test makes of an output, on local disk or S3:
exactly one metadata row per manifest id, every ok row's audio decodes to the duration its metadata states,
no in-flight (`_tmp/`) objects left behind, and nothing written outside the output prefix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
# The start of a wav file: what the HTTP server below serves as a reference clip.
CLIP = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes(range(64))


# ---- manifests and jobs -----------------------------------------------------------------------------


def text_row(i: int, **extra) -> dict:
    return {"id": f"row-{i}", "text": f"Row {i} is read aloud.", "seed": i, "max_new_tokens": 30, **extra}


def table_of(rows: list[dict]) -> pa.Table:
    """Rows as one Arrow table; every row gets every column (from_pylist only looks at the first row's keys)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(table_of(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def voices_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "voices"
    shutil.copytree(REPO / "examples" / "voices", folder)
    return folder


def make_job(
    manifest: str,
    output: str,
    checkpoint: str,
    *,
    batch_size: int = 2,
    rows_per_call: int | None = None,
    engine=None,
    **kw,
):
    """A dataset job on the CPU with the tiny checkpoint, `batch_size` rows decoded together and, unless
    `rows_per_call` says otherwise (0: the job's default), as many per call: each call is a metadata part."""
    from model.options import CheckpointSpec, EngineOptions
    from pipeline.dataset_job import DatasetJob, Resources

    return DatasetJob(
        manifest=manifest,
        output=output,
        checkpoint=CheckpointSpec(source=checkpoint, device="cpu"),
        engine=engine or EngineOptions(max_batch_size=batch_size),
        resources=Resources(
            batch_size=batch_size, rows_per_call=batch_size if rows_per_call is None else rows_per_call
        ),
        **kw,
    )


# ---- reading an output ------------------------------------------------------------------------------


def metadata_part_paths(fs, root: str) -> list[str]:
    folder = f"{root}/metadata"
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet")) if fs.exists(folder) else []


def read_metadata(fs, root: str) -> pa.Table:
    """Every metadata part of an output as one table (passthrough columns may differ between parts)."""
    parts = metadata_part_paths(fs, root)
    assert parts, f"no metadata parts under {root}/metadata"
    return pa.concat_tables(
        [pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts], promote_options="default"
    )


def by_id(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"ids written more than once: {sorted(ids)}"
    return {r["id"]: r for r in rows}


def assert_audio_matches_metadata(fs, root: str, row: dict) -> bytes:
    """The row's audio decodes, at the stated sample rate, to the stated duration (within 1 ms)."""
    assert row["status"] == "ok", row
    data = fs.cat_file(f"{root}/{row['file_name']}")
    audio, rate = sf.read(io.BytesIO(data))
    assert rate == row["sample_rate"]
    assert len(audio) > 0
    assert abs(len(audio) / rate - row["duration_s"]) < 1e-3
    return data


def tmp_objects(fs, root: str) -> list[str]:
    return list(fs.find(f"{root}/_tmp")) if fs.exists(f"{root}/_tmp") else []


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def objects(fs, container: str) -> set[str]:
    """Every object (file) under `container`, a local folder or a bucket, as the filesystem names it."""
    fs.invalidate_cache()
    return set(fs.find(container)) if fs.exists(container) else set()


def assert_output_contract(
    fs,
    root: str,
    ids: Iterable[str],
    *,
    container: str,
    before: Iterable[str] = (),
    ignore: Iterable[str] = (),
    finished: bool = True,
) -> dict[str, dict]:
    """The four checks on an output; returns its metadata rows by id.

    `root` is the output prefix as `fs` names it (a local path, or ``bucket/prefix`` on S3); `ids` are the
    manifest's ids as the metadata records them (an invalid id is recorded as its repr). `container` is the
    folder or bucket around the output and `before` what it held before the run: anything new must be under
    `root`, except under the `ignore` folders (a tool's own files, such as Hydra's run folder).
    `finished=False` is for a run that failed: it may have written no metadata, summary or index.
    """
    fs.invalidate_cache()
    ids = sorted(ids)
    # 1. Exactly one metadata row per manifest id.
    parts = metadata_part_paths(fs, root)
    metadata = by_id(read_metadata(fs, root)) if parts or ids else {}
    assert sorted(metadata) == ids, f"metadata ids differ: {sorted(set(metadata) ^ set(ids))}"
    # 2. Every ok row's audio exists, decodes and has the stated duration; no audio without an ok row.
    ok = {row_id: row for row_id, row in metadata.items() if row["status"] == "ok"}
    for row in metadata.values():
        assert row["status"] in ("ok", "error"), row
        if row["status"] == "ok":
            assert_audio_matches_metadata(fs, root, row)
        else:
            assert row["error"] and row["error_field"], row
            assert row["file_name"] is None and row["audio_uri"] is None, row
    audio = {p for p in objects(fs, root) if p.startswith(f"{root}/audio/")}
    assert audio == {f"{root}/{row['file_name']}" for row in ok.values()}, "audio objects without an ok row"
    # 3. No in-flight objects left under the final keys' root.
    assert not tmp_objects(fs, root), f"leftover in-flight objects: {tmp_objects(fs, root)}"
    # 4. Nothing outside the output prefix.
    skipped = tuple(f"{folder.rstrip('/')}/" for folder in (root, *ignore))
    outside = {p for p in objects(fs, container) - set(before) if not p.startswith(skipped)}
    assert not outside, f"objects written outside {root}: {sorted(outside)}"
    if finished:
        summary = json.loads(fs.cat_file(f"{root}/summary.json"))
        assert summary["output_totals"]["rows"] == len(ids)
        index = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/metadata.parquet"))) if ok else None
        assert (sorted(index.column("id").to_pylist()) if ok else []) == sorted(ok)
    return metadata


# ---- Ray's logs -------------------------------------------------------------------------------------


class RayLogs:
    """What this process's Ray session logged since `mark()`: worker stdout/stderr and Ray's own logs."""

    def __init__(self) -> None:
        import ray

        assert ray.is_initialized()
        self.folder = Path(ray._private.worker._global_node.get_logs_dir_path())
        self.offsets: dict[Path, int] = {}
        self.mark()

    def mark(self) -> None:
        self.offsets = {p: p.stat().st_size for p in self._files()}

    def _files(self) -> list[Path]:
        return [p for p in self.folder.rglob("*") if p.is_file()]

    def text(self) -> str:
        """Everything appended since the mark."""
        chunks = []
        for path in self._files():
            with contextlib.suppress(OSError), path.open("rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                chunks.append(handle.read().decode("utf-8", "replace"))
        return "".join(chunks)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


# ---- an HTTP server for reference URLs ---------------------------------------------------------------


class AudioServer:
    """A local HTTP server on 127.0.0.1 that records every request it answers.

    /voice.wav is CLIP; /big.wav and /big-unsized.wav are 4096 bytes with and without a Content-Length;
    /slow.wav answers once `release` is set or after 5 s; /never.wav reads the request and never answers
    (until the server is closed); /redirect.wav redirects to /voice.wav; `files` maps more paths to their
    bytes; /together/PATH answers with those of PATH (CLIP if `files` has none) once `together` requests wait
    there at once, and 503 if they do not within 5 s; anything else is a 404.
    """

    def __init__(self, files: dict[str, bytes] | None = None, together: int = 1) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.release = threading.Event()
        self.together = threading.Barrier(together)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append((self.path, self.headers.get("Host", "")))
                if self.path in (files or {}):
                    self.answer(200, files[self.path])
                elif self.path.startswith("/together/"):
                    try:
                        server.together.wait(timeout=5)
                    except threading.BrokenBarrierError:
                        self.answer(503, b"alone")
                    else:
                        self.answer(200, (files or {}).get(self.path[len("/together") :], CLIP))
                elif self.path == "/voice.wav":
                    self.answer(200, CLIP)
                elif self.path == "/big.wav":
                    self.answer(200, bytes(4096))
                elif self.path == "/big-unsized.wav":  # no Content-Length: read until the connection closes
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(bytes(4096))
                elif self.path == "/slow.wav":
                    server.release.wait(timeout=5)
                    self.answer(200, CLIP)
                elif self.path == "/never.wav":
                    server.release.wait()
                elif self.path == "/redirect.wav":
                    self.send_response(302)
                    self.send_header("Location", "/voice.wav")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.answer(404, b"no such clip")

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up first
                    super().handle()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _host in self.requests]


@contextlib.contextmanager
def serve_audio(files: dict[str, bytes] | None = None, together: int = 1) -> Iterator[AudioServer]:
    server = AudioServer(files, together)
    server.thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


# ---- processes (from /proc: no psutil in this environment) ------------------------------------------


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def generate_command(*overrides: str) -> list[str]:
    """`python -m jobs.generate_dataset` with its own local Ray (never a cluster running on this machine)."""
    return [sys.executable, "-m", "jobs.generate_dataset", *overrides, "runtime.address=local"]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on; comm may hold spaces


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def process_tree(roots: set[int]) -> set[int]:
    """The roots and all their descendants."""
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), set()).add(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def group_members(pgid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL what is left: only pids this test started (its subprocess trees)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        pids = wait_gone(pids, grace)
        if not pids:
            return


def compile_with_backend(monkeypatch, backend: str | Callable) -> None:
    """Every torch.compile the code under test calls runs with `backend` ("eager", "aot_eager", or a function
    given each traced graph) instead of inductor: traced as it would be, without inductor's lowering."""
    import torch

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": backend}))
