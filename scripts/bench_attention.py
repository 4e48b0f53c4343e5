"""One decode step's attention at the release's head shapes: every row's whole prompt in its slot (sdpa over
the packed query heads, the default) vs the rows' shared prefix kept once beside the slots
(model.attention.prefix_attention, `generation.engine.shared_prefix_cache`), the latter also with the rows' own
columns read by sdpa's fused kernels (model.attention.split_prefix_attention: `efficient`, `cudnn`), and both
with each row reading only its own columns in use (model.attention.own_columns_attention, `varlen`), and
whole prompts read through model.split_attention's Triton kernels (`split`, a GPU only), as JSON, with each
variant's largest difference from the one it stands in for.

    python scripts/bench_attention.py                                   # CPU, float32
    python scripts/bench_attention.py --device cuda --out attention.json   # GPU, bfloat16
    python scripts/bench_attention.py --device cuda --graphs --batch-sizes 1,8,64   # replayed from CUDA graphs

Rows of one reference voice: a --prefix-token shared prompt prefix (system prompt and 10 s reference turn)
and --own-tokens of their own (script and frames so far) on average, spread evenly over +-(--own-spread)
as a refilled batch's rows are at all stages of their audio; sdpa reads every row up to the longest one,
rounded up as the engine's span is. Times one layer's attention, averaged over --repeats calls, per batch
size, launched one by one or (--graphs) replayed from a CUDA graph as the decode step runs it; a step runs it
once per layer (28 in the release). GPU run 7 also timed FlexAttention reading each row's own blocks: 2.1-4.4x
slower than sdpa on an H100, so it is gone (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.attention import (  # noqa: E402
    packed_sdpa_attention,
    prefix_attention,
    split_attention,
    split_prefix_attention,
)
from model.checkpoint import resolve_device  # noqa: E402
from model.slot_cache import round_up  # noqa: E402
from scripts.bench_report import emit, header, replayed_us  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 24, 8, 128  # HiggsAudioV2Config defaults


class _Layer:
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True
    training = False


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e3


def measure(
    batch: int,
    prefix: int,
    own: int,
    spread: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    graphs: bool = False,
) -> dict:
    lowest = torch.finfo(dtype).min
    scale = HEAD_DIM**-0.5
    # Each row's own tokens; its write position is the last of them.
    spread = spread if batch > 1 else 0
    owns = torch.linspace(own - spread, own + spread, batch).round().long().clamp(min=1).to(device)

    def slots(columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Slots longer than the span in use, as a KV cache reserving max_new_tokens has them.
        shape = (batch, KV_HEADS, 2 * columns, HEAD_DIM)
        keys, values = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
        return keys[:, :, :columns], values[:, :, :columns]

    def mask(columns: int, used: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros((batch, 1, 1, columns), dtype=dtype, device=device)
        return bias.masked_fill_(torch.arange(columns, device=device) >= used[:, None, None, None], lowest)

    def run(name: str, fn) -> float | None:
        try:
            if graphs:
                return round(replayed_us(fn, launches=repeats) / 1e3, 4)
            return round(timed(fn, repeats, device), 4)
        except Exception as exc:  # a compiler that cannot build this variant here
            print(f"{name}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return None

    query = torch.randn((batch, HEADS, 1, HEAD_DIM), dtype=dtype, device=device)
    whole = round_up(prefix + int(owns.max()))

    def whole_prompts() -> tuple[dict, dict]:
        # In a function of its own: these slots are freed before the next ones are made.
        keys, values = slots(whole)
        args = (_Layer(), query, keys, values, mask(whole, prefix + owns))
        varlen = {"scaling": scale, "slot_columns": prefix + owns}
        times = {
            "whole_prompt_in_slots_ms": run("whole", lambda: packed_sdpa_attention(*args, scaling=scale)),
            "whole_prompt_varlen_ms": run("whole_varlen", lambda: packed_sdpa_attention(*args, **varlen)),
        }
        # Each row's own columns in use through the split kernels, which the step calls with its query heads
        # packed per key/value head (model.attention.FEW_ROWS_KERNEL "split", below 128 rows).
        packed = query.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)

        def split() -> torch.Tensor:
            return split_attention(packed, keys, values, prefix + owns, scale)[0]

        times["whole_prompt_split_ms"] = run("whole_split", split) if split_attention else None
        expected = packed_sdpa_attention(*args, scaling=scale)[0].float()
        differences = {}
        if times["whole_prompt_varlen_ms"] is not None:
            got = packed_sdpa_attention(*args, **varlen)[0].float()
            differences["whole_prompt_varlen"] = float((got - expected).abs().max())
        if times["whole_prompt_split_ms"] is not None:
            got = split().float().reshape(expected.shape)
            differences["whole_prompt_split"] = float((got - expected).abs().max())
        return times, differences

    times, differences = whole_prompts()
    span, shared_span = round_up(int(owns.max())), round_up(prefix)
    keys, values = slots(span)
    shared = [torch.randn((KV_HEADS, shared_span, HEAD_DIM), dtype=dtype, device=device) for _ in range(2)]
    shared_mask = torch.zeros(shared_span, dtype=torch.float32, device=device)
    shared_mask[prefix:] = torch.finfo(torch.float32).min
    own_mask = mask(span, owns)
    args = (query, keys, values, own_mask, *shared, shared_mask, scale)
    times["prefix_once_ms"] = run("prefix_once", lambda: prefix_attention(*args))
    expected = prefix_attention(*args).float()
    variants = {f"prefix_once_split_{kernel}": {"kernel": kernel} for kernel in ("efficient", "cudnn")}
    variants["prefix_once_split_varlen"] = {"columns": owns}
    for name, how in variants.items():
        times[f"{name}_ms"] = run(name, lambda how=how: split_prefix_attention(*args, **how))
        if times[f"{name}_ms"] is not None:
            got = split_prefix_attention(*args, **how).float()
            differences[name] = float((got - expected).abs().max())
    base = times["whole_prompt_in_slots_ms"]
    return {
        "batch_size": batch,
        **times,
        "speed_up_vs_whole_prompt": {k: round(base / v, 2) for k, v in times.items() if v and base},
        "columns_read_per_row": {
            "whole": whole,
            "whole_varlen": prefix + float(owns.float().mean()),
            "prefix_once": span + shared_span / batch,
            "prefix_once_varlen": float(owns.float().mean()) + shared_span / batch,
        },
        # Each variant's against the one it stands in for: whole_prompt_varlen's and whole_prompt_split's
        # against whole_prompt_in_slots, the prefix_once_split ones' against prefix_once.
        "largest_difference": differences,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,16,64,128,256")
    parser.add_argument("--prefix-tokens", type=int, default=357, help="the bench_gpu rows' shared prefix")
    parser.add_argument("--own-tokens", type=int, default=456, help="331 of script + 125 frames so far")
    parser.add_argument("--own-spread", type=int, default=0, help="rows' own tokens spread evenly +- this")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graphs", action="store_true", help="time calls replayed from CUDA graphs (a GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {
        **header("decode_attention_one_layer", device),
        "dtype": str(dtype),
        "prefix_tokens": args.prefix_tokens,
        "own_tokens": args.own_tokens,
        "own_spread": args.own_spread,
        "cuda_graphs": args.graphs,
        "runs": [],
    }
    with torch.inference_mode():
        for batch in (int(n) for n in args.batch_sizes.split(",")):
            run = measure(
                batch,
                args.prefix_tokens,
                args.own_tokens,
                args.own_spread,
                dtype,
                device,
                args.repeats,
                args.graphs and device.type == "cuda",
            )
            report["runs"].append(run)
            print(run, file=sys.stderr, flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
