"""Rows into a block and back (pipeline.stages.pack / unpack), as the synthesis stage hands its rows with their
waveforms to the write stage, as JSON.

    python scripts/bench_payload.py --rows 1024 --seconds 5 --repeats 3 --out payload.json

A GPU synthesis actor takes two calls at once (pipeline.dataset_job.CALLS_PER_GPU_ACTOR): while one call packs
its 1,024 rows of audio (~0.5 GB of float32 for 5 s each), the other's thread issues decode steps, and only a
few are queued ahead on the GPU. Code that holds the GIL for long without a break stops that thread, and the
GPU runs dry. So besides each direction's wall time this reports the longest gap a second Python thread saw
between its ticks (it asks for one every millisecond) while the rows were packed and unpacked: how long a
decode loop beside them would have waited.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.requests import SynthesisResult  # noqa: E402
from pipeline.manifest import ManifestRules, validate_row  # noqa: E402
from pipeline.stages import pack, unpack  # noqa: E402
from scripts.bench_report import emit  # noqa: E402


class Ticker:
    """A thread that wakes every millisecond and records the longest gap between its wake-ups."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        time.sleep(0.01)
        self.longest = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthesized_rows(count: int, seconds: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        row = validate_row({"id": f"row-{i}", "text": "A row of speech."}, ManifestRules())
        waveform = (rng.standard_normal(int(24000 * seconds)) * 0.1).astype(np.float32)
        row["_result"] = SynthesisResult(id=row["id"], waveform=waveform, generated_frames=int(25 * seconds))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per row, at 24 kHz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = synthesized_rows(args.rows, args.seconds)
    runs = []
    for _ in range(args.repeats):
        with Ticker() as packing:
            started = time.perf_counter()
            block = pack(rows)
            pack_s = time.perf_counter() - started
        with Ticker() as unpacking:
            started = time.perf_counter()
            back = unpack(block)
            unpack_s = time.perf_counter() - started
        assert np.array_equal(back[-1]["_result"].waveform, rows[-1]["_result"].waveform)
        runs.append(
            {
                "pack_s": round(pack_s, 3),
                "unpack_s": round(unpack_s, 3),
                "longest_stall_packing_ms": round(packing.longest * 1e3, 1),
                "longest_stall_unpacking_ms": round(unpacking.longest * 1e3, 1),
            }
        )
        del block, back
    emit(
        {
            "benchmark": "payload",
            "rows": args.rows,
            "seconds_per_row": args.seconds,
            "block_mb": round(sum(r["_result"].waveform.nbytes for r in rows) / 1e6, 1),
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
