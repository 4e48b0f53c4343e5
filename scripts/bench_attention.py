"""One decode step's attention at the release's head shapes: every row's whole prompt in its slot (sdpa over
the packed query heads, the default) vs the rows' shared prefix kept once beside the slots
(model.attention.prefix_attention, `generation.engine.shared_prefix_cache`), as JSON.

    python scripts/bench_attention.py                                   # CPU, float32
    python scripts/bench_attention.py --device cuda --out attention.json   # GPU, bfloat16

Rows of one reference voice: a --prefix-token shared prompt prefix (system prompt and 10 s reference turn)
and --own-tokens of their own (script and frames so far). Times one layer's attention, averaged over
--repeats calls, per batch size; a step runs it once per layer (28 in the release).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.attention import packed_sdpa_attention, prefix_attention  # noqa: E402
from model.checkpoint import resolve_device  # noqa: E402
from model.slot_cache import round_up  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402

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
    batch: int, prefix: int, own: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> dict:
    lowest = torch.finfo(dtype).min
    scale = HEAD_DIM**-0.5

    def slots(columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Slots longer than the span in use, as a KV cache reserving max_new_tokens has them.
        shape = (batch, KV_HEADS, 2 * columns, HEAD_DIM)
        keys, values = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
        return keys[:, :, :columns], values[:, :, :columns]

    def mask(columns: int, used: int) -> torch.Tensor:
        bias = torch.zeros((batch, 1, 1, columns), dtype=dtype, device=device)
        bias[..., used:] = lowest
        return bias

    query = torch.randn((batch, HEADS, 1, HEAD_DIM), dtype=dtype, device=device)
    whole = round_up(prefix + own)
    keys, values = slots(whole)
    whole_mask = mask(whole, prefix + own)
    whole_ms = timed(
        lambda: packed_sdpa_attention(_Layer(), query, keys, values, whole_mask, scaling=scale),
        repeats,
        device,
    )
    del keys, values
    span, shared_span = round_up(own), round_up(prefix)
    keys, values = slots(span)
    own_mask = mask(span, own)
    shared = [torch.randn((KV_HEADS, shared_span, HEAD_DIM), dtype=dtype, device=device) for _ in range(2)]
    shared_mask = torch.zeros(shared_span, dtype=torch.float32, device=device)
    shared_mask[prefix:] = torch.finfo(torch.float32).min
    once_ms = timed(
        lambda: prefix_attention(query, keys, values, own_mask, *shared, shared_mask, scale), repeats, device
    )
    return {
        "batch_size": batch,
        "whole_prompt_in_slots_ms": round(whole_ms, 4),
        "prefix_once_ms": round(once_ms, 4),
        "ratio": round(whole_ms / once_ms, 2),
        "columns_read_per_row": {"whole": whole, "prefix_once": span + shared_span / batch},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,16,64,128,256")
    parser.add_argument("--prefix-tokens", type=int, default=357, help="the bench_gpu rows' shared prefix")
    parser.add_argument("--own-tokens", type=int, default=456, help="331 of script + 125 frames so far")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {
        **header("decode_attention_one_layer", device),
        "dtype": str(dtype),
        "prefix_tokens": args.prefix_tokens,
        "own_tokens": args.own_tokens,
        "runs": [],
    }
    with torch.inference_mode():
        for batch in (int(n) for n in args.batch_sizes.split(",")):
            run = measure(batch, args.prefix_tokens, args.own_tokens, dtype, device, args.repeats)
            report["runs"].append(run)
            print(run, file=sys.stderr, flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
