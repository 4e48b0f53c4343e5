"""Rows a second through the dataset job's fetch stage (pipeline.stages.FetchStage), as JSON.

    python scripts/bench_fetch.py --rows 256 --clips 256 --delay-ms 0,20,50 --threads 1,16 --out fetch.json

Each row names a reference clip by URL: `--clips` distinct 16 kHz WAV clips of `--seconds` s, cycled over the
rows (an eval set: every row its own clip; a voice library: a few clips over many rows). They are served by
a local HTTP server on 127.0.0.1 that answers each request after `--delay-ms` (object storage's time to first
byte), and, with `--s3`, by a moto S3 server on 127.0.0.1 read through s3fs (no added delay). Every
combination of delay and fetch threads runs the same blocks of `--block` rows through a fresh stage; it
reads, decodes and resamples each clip as a fetch actor does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.manifest import ManifestRules, validate_row  # noqa: E402
from pipeline.references import FetchPolicy  # noqa: E402
from pipeline.stages import FetchStage, pack, unpack  # noqa: E402
from scripts.bench_report import emit  # noqa: E402


def clips(count: int, seconds: float, rate: int = 16000) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        buffer = io.BytesIO()
        sf.write(
            buffer,
            (rng.standard_normal(int(rate * seconds)) * 0.1).astype(np.float32),
            rate,
            "PCM_16",
            format="WAV",
        )
        out[f"clip-{i}.wav"] = buffer.getvalue()
    return out


def serve(files: dict[str, bytes], delay_s: float, port: multiprocessing.Queue) -> None:
    """Serve `files` over HTTP on 127.0.0.1, each answer after `delay_s`; the port is put on `port`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            time.sleep(delay_s)
            data = files.get(self.path.lstrip("/"))
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port.put(httpd.server_address[1])
    httpd.serve_forever()


@contextlib.contextmanager
def clip_server(files: dict[str, bytes], delay_s: float) -> Iterator[str]:
    """The URL of `serve` run in a process of its own, so that it does not share this one's GIL."""
    port: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=serve, args=(files, delay_s, port), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{port.get(timeout=30)}"
    finally:
        process.terminate()


def s3_sources(files: dict[str, bytes]) -> tuple[str, dict, subprocess.Popen]:
    """The files put in a bucket of a moto S3 server on 127.0.0.1, in a process of its own so that it does not
    share this one's GIL; the bucket's URI, s3fs's options for it, and the server's process."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.1)
    for name, data in files.items():
        client.put_object(Bucket="bench", Key=name, Body=data)
    return "s3://bench", {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}, server


def run(blocks: list, policy: FetchPolicy, threads: int) -> dict:
    stage = FetchStage(policy, max_seconds=60.0, threads=threads)
    rows = sum(b.num_rows for b in blocks)
    started = time.perf_counter()
    out = [unpack(stage(block)) for block in blocks]
    seconds = time.perf_counter() - started
    errors = [r["error"] for part in out for r in part if r["status"] != "pending"]
    if errors:
        raise SystemExit(f"{len(errors)} rows errored, first: {errors[0]}")
    return {"threads": threads, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--clips", type=int, default=256, help="distinct clips, cycled over the rows")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each clip")
    parser.add_argument("--block", type=int, default=128, help="rows per stage call (MIN_BLOCK_ROWS)")
    parser.add_argument("--delay-ms", default="0,20,50")
    parser.add_argument("--threads", default="1,16")
    parser.add_argument("--s3", action="store_true", help="also read the clips from a moto S3 server")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    files = clips(args.clips, args.seconds)
    names = [f"clip-{i % args.clips}.wav" for i in range(args.rows)]
    thread_counts = [int(t) for t in args.threads.split(",")]

    def blocks(prefix: str) -> list:
        rows = [
            validate_row(
                {
                    "id": f"row-{i}",
                    "text": "Hello.",
                    "references": [{"audio": f"{prefix}/{n}", "transcript": "Hi."}],
                },
                ManifestRules(),
            )
            for i, n in enumerate(names)
        ]
        return [pack(rows[i : i + args.block]) for i in range(0, len(rows), args.block)]

    report = {
        "benchmark": "fetch_stage",
        "cpus": os.cpu_count(),
        "rows": args.rows,
        "distinct_clips": args.clips,
        "clip_seconds": args.seconds,
        "clip_bytes": len(files["clip-0.wav"]),
        "block_rows": args.block,
        "http": [],
    }
    policy = FetchPolicy(allow_private_urls=True, timeout_s=30.0)
    for delay in (float(d) for d in args.delay_ms.split(",")):
        with clip_server(files, delay / 1e3) as url:
            http_blocks = blocks(url)
            run(http_blocks[:1], policy, thread_counts[-1])  # warm-up: resampling kernels, the thread pool
            runs = [run(http_blocks, policy, t) for t in thread_counts]
        speedup = round(runs[-1]["rows_per_s"] / runs[0]["rows_per_s"], 2)
        entry = {"delay_ms": delay, "runs": runs, "speedup": speedup}
        report["http"].append(entry)
        print(entry, file=sys.stderr)
    if args.s3:
        bucket, options, s3_server = s3_sources(files)
        try:
            s3_policy = FetchPolicy(storage_options=options)
            s3_blocks = blocks(bucket)
            run(s3_blocks[:1], s3_policy, thread_counts[-1])
            runs = [run(s3_blocks, s3_policy, t) for t in thread_counts]
        finally:
            s3_server.terminate()
        report["s3_moto"] = {
            "runs": runs,
            "speedup": round(runs[-1]["rows_per_s"] / runs[0]["rows_per_s"], 2),
        }
    emit(report, args.out)


if __name__ == "__main__":
    main()
