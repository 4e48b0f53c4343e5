"""Rows a second through the dataset job's I/O-bound stages, reading reference clips (FetchStage) and storing
audio (WriteStage), against servers that answer each request after a delay, as JSON.

    python scripts/bench_io.py --rows 256 --delay-ms 0,20,50 --threads 1,16 --out io.json

Object storage answers a request in tens of ms; these stages spent most of their time waiting for it. Both
servers run on 127.0.0.1, each in a process of its own (so that it does not share this one's GIL), and
answer every request after `--delay-ms`:

- `fetch`: every row names its own 4 s 16 kHz WAV clip (`--clips` distinct ones, cycled over the rows; an
  eval set has one per row, a voice library a few) by http URL (`--source http`) or `s3://` URI read
  through s3fs from a moto S3 server (`--source s3`); the stage reads, decodes and resamples each clip.
- `write`: every row carries 4 s of synthesised audio (noise at 24 kHz), which the stage encodes as WAV and
  stores in the moto S3 server, then writes the block's metadata part.
- `driver`: what the dataset job's driver reads from an output of `--parts` metadata parts of `--block` rows
  each on the moto S3 server (a run of 1M rows leaves ~8,000): the finished ids (resume, at the start), then
  the totals and the AudioFolder index (at the end); `--threads` here are reads in flight
  (pipeline.storage.READ_AHEAD). Reported as parts a second.

Each combination of delay and threads runs the same blocks of `--block` rows through a fresh stage.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline.storage as storage_module  # noqa: E402
from model.requests import SynthesisResult  # noqa: E402
from pipeline.manifest import ManifestRules, validate_row  # noqa: E402
from pipeline.metadata import finished_ids, metadata_parts, totals, write_audiofolder_index  # noqa: E402
from pipeline.references import FetchPolicy  # noqa: E402
from pipeline.stages import METADATA_DIR, FetchStage, WriteSettings, WriteStage, pack, unpack  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from scripts.bench_report import emit  # noqa: E402

BUCKET = "bench"


def clips(count: int, seconds: float, rate: int = 16000) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        buffer = io.BytesIO()
        samples = (rng.standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)
        sf.write(buffer, samples, rate, "PCM_16", format="WAV")
        out[f"clip-{i}.wav"] = buffer.getvalue()
    return out


def serve_http(files: dict[str, bytes], delay_s: float, port: multiprocessing.Queue) -> None:
    """Serve `files` over HTTP, each answer after `delay_s`; the port is put on `port`."""

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


def serve_s3(delay_s: float, port: multiprocessing.Queue) -> None:
    """moto's S3 server (as ThreadedMotoServer runs it), each answer after `delay_s`."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line a request otherwise
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):  # noqa: ANN001, ANN202 - WSGI
        time.sleep(delay_s)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed, threaded=True, request_handler=MotoRequestHandler)
    port.put(server.server_port)
    server.serve_forever()


@contextlib.contextmanager
def served(target, *args) -> Iterator[str]:  # noqa: ANN001
    """The base URL of `target(*args, port_queue)` run in a process of its own."""
    port: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=target, args=(*args, port), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{port.get(timeout=60)}"
    finally:
        process.terminate()


def s3_options(endpoint: str) -> dict:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    return {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def fill_bucket(endpoint: str, files: dict[str, bytes], create: bool = True) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if create:
        client.create_bucket(Bucket=BUCKET)
    for name, data in files.items():
        client.put_object(Bucket=BUCKET, Key=name, Body=data)


def fetch_run(blocks: list, policy: FetchPolicy, threads: int) -> dict:
    stage = FetchStage(policy, max_seconds=60.0, threads=threads)
    started = time.perf_counter()
    out = [stage(block) for block in blocks]
    seconds = time.perf_counter() - started
    rows = [row for block in out for row in unpack(block)]
    errors = [r["error"] for r in rows if r["status"] != "pending"]
    if errors:
        raise SystemExit(f"{len(errors)} rows errored, first: {errors[0]}")
    return {
        "threads": threads,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(rows) / seconds, 1),
        # What the blocks carry on to the synthesis actors through Ray's object store.
        "output_bytes_per_row": round(sum(block.nbytes for block in out) / len(rows)),
    }


def write_run(blocks: list, output: str, options: dict, threads: int) -> dict:
    stage = WriteStage(WriteSettings(output, options, checkpoint="bench", threads=threads))
    started = time.perf_counter()
    statuses = [s for block in blocks for s in stage(block).column("status").to_pylist()]
    seconds = time.perf_counter() - started
    if set(statuses) != {"ok"}:
        raise SystemExit(f"rows not stored: {statuses}")
    return {"threads": threads, "seconds": round(seconds, 3), "rows_per_s": round(len(statuses) / seconds, 1)}


def metadata_part(first: int, rows: int) -> bytes:
    """A metadata part as the write stage leaves one: a block's rows, ok, with their files and durations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"row-{i}" for i in range(first, first + rows)]
    table = pa.table(
        {
            "id": ids,
            "status": ["ok"] * rows,
            "file_name": [f"audio/{i}.wav" for i in ids],
            "duration_s": [4.0] * rows,
            "text": ["Hi."] * rows,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def driver_run(output: str, options: dict, ahead: int) -> dict:
    storage_module.READ_AHEAD = ahead
    storage = Storage(output, options)
    out: dict = {"threads": ahead}
    started = time.perf_counter()
    out["finished_ids"] = len(finished_ids(storage))
    out["resume_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    _, schema = totals(storage)
    write_audiofolder_index(storage, schema)
    out["summary_s"] = round(time.perf_counter() - started, 3)
    parts = len(metadata_parts(storage))
    out["parts_per_s"] = round(3 * parts / (out["resume_s"] + out["summary_s"]), 1)  # each part read 3 times
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="fetch,write")
    parser.add_argument("--source", choices=("http", "s3"), default="http", help="where fetch reads clips")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument(
        "--clips", type=int, default=0, help="distinct clips, cycled over the rows; 0: --rows"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each clip and each row's audio")
    parser.add_argument("--block", type=int, default=128, help="rows per stage call (MIN_BLOCK_ROWS)")
    parser.add_argument("--parts", type=int, default=200, help="metadata parts the driver reads")
    parser.add_argument("--delay-ms", default="0,20,50")
    parser.add_argument("--threads", default="1,16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    stages = args.stages.split(",")
    thread_counts = [int(t) for t in args.threads.split(",")]
    files = clips(args.clips or args.rows, args.seconds)
    names = [f"clip-{i % len(files)}.wav" for i in range(args.rows)]
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(int(24000 * args.seconds)) * 0.1).astype(np.float32)

    def blocks(rows: list[dict]) -> list:
        return [pack(rows[i : i + args.block]) for i in range(0, len(rows), args.block)]

    def fetch_blocks(prefix: str) -> list:
        return blocks(
            [
                validate_row(
                    {
                        "id": f"row-{i}",
                        "text": "Hi.",
                        "references": [{"audio": f"{prefix}/{n}", "transcript": "Hi."}],
                    },
                    ManifestRules(),
                )
                for i, n in enumerate(names)
            ]
        )

    def write_blocks() -> list:
        rows = []
        for i in range(args.rows):
            row = validate_row({"id": f"row-{i}", "text": "Hi."}, ManifestRules())
            row["_result"] = SynthesisResult(
                id=row["id"], waveform=audio, generated_frames=int(25 * args.seconds)
            )
            rows.append(row)
        return blocks(rows)

    report: dict = {
        "benchmark": "io_stages",
        "cpus": os.cpu_count(),
        "rows": args.rows,
        "distinct_clips": len(files),
        "clip_bytes": len(files["clip-0.wav"]),
        "seconds_per_row": args.seconds,
        "block_rows": args.block,
        "fetch_source": args.source,
        "delays": [],
    }
    for delay in (float(d) for d in args.delay_ms.split(",")):
        entry: dict = {"delay_ms": delay}
        with served(serve_s3, delay / 1e3) as s3_endpoint:
            options = s3_options(s3_endpoint)
            fill_bucket(s3_endpoint, files if args.source == "s3" and "fetch" in stages else {})
            if "fetch" in stages:
                with contextlib.ExitStack() as stack:
                    if args.source == "http":
                        prefix = stack.enter_context(served(serve_http, files, delay / 1e3))
                        policy = FetchPolicy(allow_private_urls=True, timeout_s=60.0)
                    else:
                        prefix, policy = (
                            f"s3://{BUCKET}",
                            FetchPolicy(storage_options=options, timeout_s=60.0),
                        )
                    fetch_input = fetch_blocks(prefix)
                    fetch_run(fetch_input[:1], policy, thread_counts[-1])  # warm-up: resampling kernels
                    entry["fetch"] = [fetch_run(fetch_input, policy, t) for t in thread_counts]
            if "write" in stages:
                write_input = write_blocks()
                for t in thread_counts:
                    output = f"s3://{BUCKET}/out-{t}"
                    write_run(
                        write_input[:1], output + "-warmup", options, t
                    )  # connections, the bucket's region
                    entry.setdefault("write", []).append(write_run(write_input, output, options, t))
            if "driver" in stages:
                parts = {
                    f"out-driver/{METADATA_DIR}/part-{i:05d}.parquet": metadata_part(
                        i * args.block, args.block
                    )
                    for i in range(args.parts)
                }
                fill_bucket(s3_endpoint, parts, create=False)  # made above
                output = f"s3://{BUCKET}/out-driver"
                entry["driver"] = [driver_run(output, options, t) for t in thread_counts]
        for stage in stages:
            runs, speed = entry[stage], "parts_per_s" if stage == "driver" else "rows_per_s"
            entry[f"{stage}_speedup"] = round(runs[-1][speed] / runs[0][speed], 2)
        report["delays"].append(entry)
        print(entry, file=sys.stderr)
    emit(report, args.out)


if __name__ == "__main__":
    main()
