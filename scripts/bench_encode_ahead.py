"""Synthesis calls two at a time against one after the other, each row cloning its own clip, as JSON.

    python scripts/bench_encode_ahead.py --out encode_ahead.json      # GPU: release-size model, random bf16
    python scripts/bench_encode_ahead.py --config tiny --device cpu --calls 4 --rows 16 --slots 8 --frames 40

A GPU synthesis actor takes CALLS_PER_GPU_ACTOR calls at once (pipeline.dataset_job): while one decodes, the
next one's reference clips are encoded beside it (model.engine). Here --calls calls of --rows rows, each row
cloning a voice from a --clip-seconds clip of noise of its own (every clip encoded: the cache is off), every
row generating --frames frames (EOS ignored), go through one engine with --slots slots, (a) one call after
the other and (b) from --at-once threads (default 2, as the actor runs them); --repeats times each, in turn.
It imports the engine only, not the pipeline: the GPU machine has torch and only the wheels
scripts/gpu_wheels.sh brings, no pyarrow or fsspec among them.
Reported: walls, x real time, the ratio of (a) to (b), the seconds spent encoding clips, and whether (a) and
(b) gave the same codes.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import resolve_device  # noqa: E402
from model.engine import EngineOptions, SynthesisEngine  # noqa: E402
from model.requests import Reference, SynthesisRequest  # noqa: E402
from model.tiny import random_checkpoint  # noqa: E402
from scripts.bench_gpu import FRAME_RATE, script  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402


def clip(i: int, seconds: float, rate: int = 24000) -> bytes:
    """A 16-bit WAV of noise: each clip distinct, so none is served from another's codes."""
    rng = np.random.default_rng(i)
    buffer = io.BytesIO()
    sf.write(
        buffer,
        (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32),
        rate,
        "PCM_16",
        format="WAV",
    )
    return buffer.getvalue()


def calls_of(args, tokenizer) -> list[list[SynthesisRequest]]:
    rows = [
        SynthesisRequest(
            id=f"r{i}",
            text=script(i, args.text_tokens, tokenizer),
            references=[Reference(audio=clip(i, args.clip_seconds), transcript=script(i + 7, 30, tokenizer))],
            seed=i,
            max_new_tokens=args.frames + 8,  # the delay pattern's 8 steps before the first frame
        )
        for i in range(args.calls * args.rows)
    ]
    return [rows[i : i + args.rows] for i in range(0, len(rows), args.rows)]


def timed(run, calls: list[list[SynthesisRequest]], device: torch.device) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = [r for call_results in run(calls) for r in call_results]
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default=None)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128, help="rows per call")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--frames", type=int, default=150, help="frames generated per row (6 s)")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--clip-seconds", type=float, default=8.0)
    parser.add_argument("--at-once", type=int, default=2, help="calls run together (CALLS_PER_GPU_ACTOR)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = random_checkpoint(args.config, device)
    engine = SynthesisEngine(
        loaded, EngineOptions(ignore_eos=True, max_batch_size=args.slots, reference_cache_size=0)
    )
    calls = calls_of(args, loaded.processor.tokenizer)
    report = {
        **header("encode_ahead", device),
        "config": args.config,
        "calls": args.calls,
        "rows_per_call": args.rows,
        "slots": args.slots,
        "frames_per_row": args.frames,
        "clip_seconds": args.clip_seconds,
        "calls_at_once": args.at_once,
    }
    warm = time.perf_counter()
    engine.generate(calls[0])  # kernels, allocator, CUDA graphs
    report["warmup_s"] = round(time.perf_counter() - warm, 1)

    def one_after_another(calls):
        return [engine.generate(call) for call in calls]

    def at_once(calls):
        with ThreadPoolExecutor(args.at_once) as pool:
            return list(pool.map(engine.generate, calls))

    runs: dict[str, list[float]] = {"one_after_another": [], "at_once": []}
    codes: dict[str, dict[str, np.ndarray]] = {}
    encode_s: dict[str, float] = {}
    audio_s = 0.0
    for _ in range(args.repeats):
        for name, run in (("one_after_another", one_after_another), ("at_once", at_once)):
            wall, results = timed(run, calls, device)
            runs[name].append(round(wall, 3))
            codes[name] = {r.id: r.audio_codes for r in results}
            audio_s = sum(r.generated_frames for r in results) / FRAME_RATE
            encode_s[name] = sum(r.timings["reference_encode_s"] for r in results)
    report["audio_s"] = round(audio_s, 1)
    for name, walls in runs.items():
        report[name] = {
            "wall_s": walls,
            "x_real_time": [round(audio_s / w, 2) for w in walls],
            "reference_encode_s": round(encode_s[name], 2),  # its last run's, summed over the rows
        }
    report["at_once_vs_one_after_another"] = round(min(runs["one_after_another"]) / min(runs["at_once"]), 3)
    a, b = codes["one_after_another"], codes["at_once"]
    report["same_codes"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    report["total_s"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)


if __name__ == "__main__":
    main()
