"""One row times a matrix of int8 weights with a scale per output channel, on a GPU: a Triton kernel that reads
each weight once and converts it in registers, for the compiled one-request decode step (model.int8_weights).

GPU run 9 (H200, docs/benchmarks.md) profiled that step with the products written as multiply-and-sum
reductions for inductor: with coordinate-descent tuning they read the int8 weights at 1.0-2.4 of the card's
4.8 TB/s, ~1.75 ms of the step's 2.81. Inductor fuses each product's input into it (the RMSNorm before q/k/v,
silu(gate) * up before down), so every program recomputes the whole input for its few output channels, and a
down projection's silu costs more than its weights' loads. Behind this op inductor computes the input once
(the op's argument is a buffer), and the kernel does only what a matrix-vector product needs: each program
takes BLOCK_N output channels and walks the input features in chunks of BLOCK_K, long enough for each
thread to load 16 contiguous weight bytes at once. The walk is unrolled (the feature count is a constant of
each build), so a thread's loads of every chunk can be in flight together: built for Hopper, an 8,192-wide
down projection issues 19 of its 25 loads before its first multiply, against 3 as a loop, which waits for
each chunk's 32 bytes before it asks for the next (tests/test_int8_matvec.py builds it). Triton tunes the
block sizes once per weight shape (4 in the release model, with or without fused projections; the result
is cached on disk) in the warm-up step that precedes CUDA graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps): few channels and long chunks of 16 weight bytes a thread a load, for the
# release's 3,072- and 8,192-wide rows, which every BLOCK_K divides (only the channel mask is ever partial
# there); more channels a program for the wide outputs, fewer for k/v's 1,024; and two that load 64 bytes a
# thread a chunk instead of 16-32, more loads in flight. No software pipelining (num_stages): built for
# Hopper, this loop's code is the same with or without it (no cp.async), so such configs only cost tuning.
CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)
    for n, k, w in (
        (4, 1024, 4),
        (8, 512, 4),
        (2, 1024, 4),
        (8, 1024, 8),
        (16, 256, 4),
        (1, 1024, 2),
        (8, 1024, 4),
        (16, 512, 4),
    )
]


@triton.jit
def _matvec(
    x_ptr, w_ptr, scale_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in tl.static_range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # A weight is read once a step, the input by every program: let the weights leave the cache first.
        w = tl.load(
            w_ptr + rows[:, None] * K + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * x[None, :]
    # Rounded as model.int8_weights.one_row_product: the float32 sum to the input's dtype, then the scale.
    out_type = out_ptr.dtype.element_ty
    total = tl.sum(acc, axis=1).to(out_type).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, (total * scale).to(out_type), mask=row_ok)


_tuned = triton.autotune(configs=CONFIGS, key=["N", "K"], cache_results=True)(_matvec)


def grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)


@torch.library.custom_op("higgs_batch::int8_matvec", mutates_args=())
def int8_matvec(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (K,) times weight (N, K) int8, each output channel times its scale: (N,) in x's dtype."""
    n, k = weight.shape
    out = x.new_empty(n)
    _tuned[grid(n)](x.contiguous(), weight.contiguous(), scale, out, n, k)
    return out


@int8_matvec.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(weight.shape[0])
