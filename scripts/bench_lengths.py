"""What the engine does with each row's expected length, as JSON: KV slots sized by its text's estimated
speech length (generation.engine.reserve) instead of max_new_tokens, and the longest rows admitted first.

    python scripts/bench_lengths.py                      # plan for the release config + tiny runs on CPU
    python scripts/bench_lengths.py --free-gb 66 --out r.json

1. The plan: for the example texts (manifest rows, and each line of the example transcripts, as dataset rows
   are), the columns a slot needs and how many slots fit `--free-gb` of GPU memory (engine.fitting_batch_size,
   the release's config in bf16), rows with a `--prompt-tokens` prompt of which `--own-tokens` are their own
   (the rest a shared prefix kept once, as engine.MIN_PREFIX_CACHE_ROWS allows).
2. Measured on the tiny checkpoint: a call of rows that stop on stream-eos, with each policy and with a
   reserve so tight that most rows outgrow it and run again: wall time, rows run again, and whether every
   row's codes equal those of max_new_tokens slots.
3. Measured on the tiny checkpoint: calls of `--order-calls` rows of 150-349 frames (stream-eos ignored)
   through `--order-slots` slots, admitted by prompt length only (admission.LENGTH_CLASS above every reserve,
   the order before), longest first, and longest first with refills prefilled ahead (admission.PREFILL_AHEAD,
   the engine's now): decode steps against the fewest possible (the rows' frames over the slots), prefill
   groups, and wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.engine import audio_steps, fitting_batch_size, slot_reserve  # noqa: E402
from model.requests import SynthesisRequest  # noqa: E402
from model.slot_cache import round_up  # noqa: E402
from model.speech_length import estimate_seconds  # noqa: E402
from model.tiny import build_text_tokenizer, build_tiny_checkpoint, real_model_config  # noqa: E402
from scripts.bench_gpu import counting_steps, engine_constants, watch_prefills  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402


def example_texts() -> list[str]:
    manifest = [json.loads(line) for line in (ROOT / "examples" / "manifest.jsonl").open()]
    rows = [row.get("text") or row["script"] for row in manifest]
    for path in sorted((ROOT / "examples" / "transcripts").rglob("*")):
        if path.is_file():
            rows += [line.strip() for line in path.read_text().splitlines() if len(line.strip()) > 20]
    return rows


def plan(args: argparse.Namespace) -> dict:
    config = real_model_config(build_text_tokenizer())
    free = int(args.free_gb * 1e9)
    frames = [
        audio_steps(math.ceil(estimate_seconds(text) * 25), config.num_codebooks) for text in example_texts()
    ]
    report = {"rows": len(frames), "free_gb": args.free_gb, "estimated_frames": _spread(frames)}
    # A call's slots fit its longest row: one of the longest example texts, or of the median one.
    policies = {
        "max_new_tokens": args.max_new_tokens,
        "estimate_longest_row": max(frames),
        "estimate_median_row": int(np.median(frames)),
    }
    for name, reserve in policies.items():
        length = round_up(args.own_tokens + slot_reserve(reserve, args.max_new_tokens))
        slots = fitting_batch_size(config, torch.bfloat16, free, length, args.prompt_tokens)
        report[name] = {"slot_columns": length, "slots": slots}
    for name in ("estimate_longest_row", "estimate_median_row"):
        report[name]["slots_vs_max_new_tokens"] = round(
            report[name]["slots"] / report["max_new_tokens"]["slots"], 2
        )
    return report


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "median": int(np.median(values)), "max": max(values)}


def counting_outgrown(engine) -> list[str]:
    """The ids of the rows `engine` runs again from now on, as it finds them."""
    found: list[str] = []
    check = engine._outgrew

    def counted(item, frames) -> bool:
        outgrew = check(item, frames)
        if outgrew:
            found.append(item.request.id)
        return outgrew

    engine._outgrew = counted
    return found


def tiny_checkpoint():
    """The tiny checkpoint, built in a temporary folder and loaded on the CPU."""
    from model.checkpoint import CheckpointSpec, load_checkpoint

    folder = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    return load_checkpoint(CheckpointSpec(source=str(folder), device="cpu"))


def measured(loaded, rows: int) -> dict:
    from model.engine import EngineOptions, SynthesisEngine

    requests = [
        SynthesisRequest(id=f"r{i}", text=f"Sentence number {i} is spoken here.", seed=i, max_new_tokens=200)
        for i in range(rows)
    ]
    report, expected = {}, None
    for name, reserve in (("max_new_tokens", "max_new_tokens"), ("estimate", "estimate"), ("tight", 40)):
        engine = SynthesisEngine(loaded, EngineOptions(max_batch_size=16, reserve=reserve))
        engine.generate([replace(r, max_new_tokens=16) for r in requests[:2]])  # warm-up
        outgrown = counting_outgrown(engine)
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - started
        got = [r.audio_codes for r in results]
        expected = expected or got
        report[name] = {
            "wall_s": round(seconds, 3),
            "slot_columns": engine._decode_step.cache.length,
            "rows_run_again": len(outgrown),
            "codes_equal": all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True)),
            "frames": _spread([r.generated_frames for r in results]),
        }
    base = report["max_new_tokens"]["wall_s"]
    for name in ("estimate", "tight"):
        report[name]["speed_vs_max_new_tokens"] = round(base / report[name]["wall_s"], 3)
    return report


# The policies compared, each as model.admission constants: admitting by prompt length only (the order before
# the CPU session of 2026-11-26 12:31 UTC), longest first, and longest first with refills prefilled ahead
# (the engine's now; before, a refill waited for REFILL_SHARE of the slots to be free).
ORDER_POLICIES = {
    "prompt_length": {"admission.LENGTH_CLASS": 1 << 30, "admission.PREFILL_AHEAD": False},
    "longest_first": {"admission.PREFILL_AHEAD": False},
    "prefill_ahead": {},
}


def admission_order(loaded, calls: list[int], slots: int) -> list[dict]:
    """For each call size in `calls`: rows of 150-349 frames (bench_gpu.py's mixed rows) through `slots`
    slots under each of ORDER_POLICIES: decode steps (what a GPU pays for at large batch), prefill groups
    and wall time; each policy's ratios against the one before it."""
    from model.engine import EngineOptions, SynthesisEngine

    reports = []
    with counting_steps() as steps:
        for rows in calls:
            requests = [
                SynthesisRequest(
                    id=f"o{i}",
                    text=f"Row {i} " + "word " * (i % 7),  # prompts of 7 lengths
                    seed=1000 + i,
                    max_new_tokens=150 + (i * 37) % 200 + 8,
                )
                for i in range(rows)
            ]
            fewest = -(-sum(r.max_new_tokens for r in requests) // slots)
            report: dict = {"rows": rows, "slots": slots, "fewest_steps": fewest}
            previous = None
            for name, constants in ORDER_POLICIES.items():
                engine = SynthesisEngine(loaded, EngineOptions(max_batch_size=slots, ignore_eos=True))
                engine.generate([replace(r, max_new_tokens=16) for r in requests[:2]])  # warm-up
                groups = watch_prefills(engine)
                with engine_constants(constants):
                    steps.clear()
                    started = time.perf_counter()
                    engine.generate(requests)
                    seconds = time.perf_counter() - started
                run = {"decode_steps": len(steps), "prefill_groups": len(groups), "wall_s": round(seconds, 3)}
                if previous:
                    run["steps_ratio"] = round(previous["decode_steps"] / run["decode_steps"], 3)
                    run["wall_ratio"] = round(previous["wall_s"] / run["wall_s"], 3)
                report[name] = previous = run
            reports.append(report)
            print(json.dumps(report), file=sys.stderr, flush=True)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--free-gb", type=float, default=66.0, help="an H100's after the release's weights")
    parser.add_argument("--prompt-tokens", type=int, default=688, help="bench_gpu.py's rows")
    parser.add_argument("--own-tokens", type=int, default=331, help="of which not the shared prefix")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=48, help="tiny rows measured (0: the plan only)")
    parser.add_argument("--order-calls", default="64,80,128", help="rows per call (empty: skip)")
    parser.add_argument("--order-slots", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = header("lengths", torch.device("cpu"))
    report["plan"] = plan(args)
    loaded = tiny_checkpoint() if args.rows or args.order_calls else None
    if args.rows:
        report["tiny"] = measured(loaded, args.rows)
    if args.order_calls:
        calls = [int(n) for n in args.order_calls.split(",")]
        report["order"] = admission_order(loaded, calls, args.order_slots)
    emit(report, args.out)


if __name__ == "__main__":
    main()
