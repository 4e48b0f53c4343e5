"""Engine throughput on the release-size model against plain transformers `generate`, as JSON.

    python scripts/bench_gpu.py --out bench_gpu.json             # GPU: HiggsAudioV2Config defaults, random bf16
    python scripts/bench_gpu.py --config tiny --frames 40        # CPU smoke run with the tiny config

Each row is a realistic prompt: ~300 text tokens of script plus a 10 s reference (250 frames of codes, given
as a user/assistant turn exactly as a cloned voice is). Every row generates --frames frames, EOS ignored.
Reports frames/s, x real time (25 frames = 1 s) and peak GPU memory per batch size, and transformers'
`model.generate` at batch 1 on the same prompt in the same run as the baseline. No download: weights are
random, which changes no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import resolve_device  # noqa: E402
from model.engine import EngineOptions, SynthesisEngine  # noqa: E402
from model.requests import ContextTurn, SynthesisRequest  # noqa: E402
from model.tiny import random_checkpoint  # noqa: E402

FRAME_RATE = 25
WORDS = [
    "the",
    "narrator",
    "speaks",
    "clearly",
    "about",
    "rivers",
    "mountains",
    "cities",
    "and",
    "the",
    "people",
    "who",
    "travel",
    "between",
    "them",
    "while",
    "the",
    "evening",
    "light",
    "fades",
    "slowly",
    "over",
    "quiet",
    "streets",
    "and",
    "distant",
    "harbours",
    "full",
    "of",
    "boats",
]


def build_engine(config: str, device: torch.device) -> SynthesisEngine:
    loaded = random_checkpoint("real" if config == "real" else "tiny", device)
    return SynthesisEngine(loaded, EngineOptions(ignore_eos=True, refill=True))


def script(i: int, tokens: int, tokenizer) -> str:
    words, text = [], ""
    k = i
    while len(tokenizer(text).input_ids) < tokens:
        words.extend(WORDS[k % len(WORDS)] for _ in range(8))
        k += 7
        text = " ".join(words) + "."
    return text


def requests(n: int, frames: int, text_tokens: int, ref_frames: int, tokenizer) -> list[SynthesisRequest]:
    rng = np.random.default_rng(0)
    ref = ContextTurn(text=script(99, 40, tokenizer), codes=rng.integers(0, 1024, size=(8, ref_frames)))
    # The delay pattern takes 8 steps before the first and after the last frame of audio.
    return [
        SynthesisRequest(
            id=f"r{i}",
            text=script(i, text_tokens, tokenizer),
            context=[ref],
            seed=i,
            max_new_tokens=frames + 9,
        )
        for i in range(n)
    ]


def measure(engine: SynthesisEngine, batch: int, frames: int, rows: list[SynthesisRequest]) -> dict:
    engine.options.max_batch_size = batch
    engine.generate(rows[: min(batch, 2)])  # warm-up: kernels, allocator
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = engine.generate(rows[:batch])
    wall = time.perf_counter() - started
    generated = sum(r.generated_frames for r in results)
    out = {
        "batch_size": batch,
        "frames_per_row": frames,
        "prompt_tokens": results[0].prompt_tokens,
        "wall_s": round(wall, 3),
        "frames_per_s": round(generated / wall, 1),
        "x_real_time": round(generated / FRAME_RATE / wall, 2),
    }
    if engine.device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def baseline_generate(engine: SynthesisEngine, frames: int, request: SynthesisRequest) -> dict:
    """transformers' own HiggsAudioV2 generate at batch 1 on the same prompt."""
    input_ids, audio = engine.prepare(request)
    device = engine.device
    model = engine.model
    kwargs = {
        "input_ids": torch.tensor([input_ids], device=device),
        "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long, device=device),
        "audio_input_ids": audio[None].to(device),
        "audio_input_ids_mask": torch.ones((1, len(audio)), dtype=torch.bool, device=device),
        "max_new_tokens": frames + 9,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 0.95,
    }
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like the engine rows
    try:
        with torch.inference_mode():
            model.generate(**{**kwargs, "max_new_tokens": 10})
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            out = model.generate(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
    finally:
        model.generation_config.eos_token_id = saved_eos
    steps = out.shape[1] - len(audio) if out.dim() == 3 else frames + 9
    generated = steps - 9  # like the engine, count audio frames: not the opening bos frame, staircases, eos
    result = {
        "batch_size": 1,
        "steps": int(steps),
        "wall_s": round(wall, 3),
        "frames_per_s": round(generated / wall, 1),
        "x_real_time": round(generated / FRAME_RATE / wall, 2),
    }
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--frames", type=int, default=250, help="frames generated per row (10 s)")
    parser.add_argument("--text-tokens", type=int, default=300)
    parser.add_argument("--ref-frames", type=int, default=250)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    started = time.perf_counter()
    engine = build_engine(args.config, device)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows = requests(max(sizes), args.frames, args.text_tokens, args.ref_frames, engine.processor.tokenizer)
    report = {
        "benchmark": "gpu_engine",
        "config": args.config,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "parameters_b": round(sum(p.numel() for p in engine.model.parameters()) / 1e9, 3),
        "build_s": round(time.perf_counter() - started, 1),
        "baseline_transformers_generate": baseline_generate(engine, args.frames, rows[0]),
        "engine": [],
    }
    for size in sizes:
        try:
            report["engine"].append(measure(engine, size, args.frames, rows))
        except torch.OutOfMemoryError:
            report["engine"].append({"batch_size": size, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(json.dumps(report["engine"][-1]), file=sys.stderr, flush=True)
    base = report["baseline_transformers_generate"]["frames_per_s"]
    for run in report["engine"]:
        if "frames_per_s" in run:
            run["speedup_vs_transformers_b1"] = round(run["frames_per_s"] / base, 2)
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
