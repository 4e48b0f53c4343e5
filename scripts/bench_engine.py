"""Engine throughput at several batch sizes, as JSON.

    python scripts/bench_engine.py                      # tiny checkpoint, CPU
    python scripts/bench_engine.py --config real        # release-size config, random bf16 weights, GPU

Every row generates exactly --frames frames (EOS ignored), so batch sizes compare like for like. Reports rows/s
and generated frames/s per batch size and the speed-up over batch 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import CheckpointSpec, load_checkpoint, resolve_device  # noqa: E402
from model.engine import EngineOptions, SynthesisEngine  # noqa: E402
from model.requests import SynthesisRequest  # noqa: E402
from model.tiny import build_tiny_checkpoint, random_checkpoint  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402

FRAME_RATE = 25


def make_engine(config: str, device: str | None, batch_size: int) -> SynthesisEngine:
    options = EngineOptions(max_batch_size=batch_size, ignore_eos=True)
    if config == "tiny":
        folder = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        return SynthesisEngine(load_checkpoint(CheckpointSpec(source=str(folder), device=device)), options)
    return SynthesisEngine(random_checkpoint("real", resolve_device(device)), options)


def requests(n: int, frames: int) -> list[SynthesisRequest]:
    text = "The quick brown fox jumps over the lazy dog while the narrator keeps a steady voice."
    return [SynthesisRequest(id=f"r{i}", text=text, seed=i, max_new_tokens=frames + 9) for i in range(n)]


def measure(engine: SynthesisEngine, batch_size: int, rows: int, frames: int) -> dict:
    engine.options.max_batch_size = batch_size
    engine.generate(requests(min(rows, batch_size), 16))  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = engine.generate(requests(rows, frames))
    wall = time.perf_counter() - started
    generated = sum(r.generated_frames for r in results)
    out = {
        "batch_size": batch_size,
        "rows": rows,
        "frames_per_row": frames,
        "wall_s": round(wall, 3),
        "rows_per_s": round(rows / wall, 3),
        "frames_per_s": round(generated / wall, 1),
        "x_real_time": round(generated / FRAME_RATE / wall, 2),
    }
    if engine.device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--rows", type=int, default=32, help="rows per batch size")
    parser.add_argument("--frames", type=int, default=50, help="audio frames generated per row")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    engine = make_engine(args.config, args.device, max(sizes))
    runs = [measure(engine, size, args.rows, args.frames) for size in sizes]
    base = runs[0]["rows_per_s"]
    for run in runs:
        run["speedup_vs_first"] = round(run["rows_per_s"] / base, 2)
    report = {
        **header("engine", engine.device),
        "config": args.config,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
