"""A decode step's attention for few rows on a GPU: each (row, key/value head)'s columns in use cut into
splits that separate programs read at once, then joined through their log-sum-exps (flash decoding), as two
Triton kernels behind one op.

At one row, the step's attention is 8 sequences of one query token (the release's 8 key/value heads, each
with its 3 query heads), ~0.1 GB of keys and values a step over ~940 columns, ~30 us of reading at an H200's
bandwidth. cuDNN's fused kernel spends 0.61 ms a step on it (GPU run 9, H200): it gives each sequence one
CTA, 8 of the card's 132 SMs. The memory-efficient kernel on chunks of columns (model.attention.
own_columns_attention) took 0.20 ms plus 0.08 ms of joins in separate kernels. Here every split of every
sequence is a program, model.kernel_grid.MIN_PROGRAMS of them or more, each reading its columns' keys and
values once with all of its key/value head's query heads (padded to 16 for the tensor cores), and a second
kernel joins a sequence's splits in one pass. The splits divide each row's own columns in use, not the
step's span, so no program reads a masked column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernel_grid import pieces_for

# The most splits a sequence is cut into (a model of few key/value heads): the join holds them all at once.
MAX_SPLITS = 64
# Warps of the join: built for Hopper, 122 registers a thread at MAX_SPLITS and 80 at one row's 32, with 8.
JOIN_WARPS = 8

# (BLOCK_N columns a load, num_warps), tuned per split count and head shape (Triton's autotuner, cached on
# disk) in the warm-up step that precedes CUDA graph capture.
CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1) for n, w in ((32, 4), (64, 4), (64, 8), (128, 8))
]


@triton.jit
def _attend_splits(
    q_ptr,
    k_ptr,
    v_ptr,
    columns_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
    stride_row,
    stride_head,
    KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    COMPUTE: tl.constexpr = part_out_ptr.dtype.element_ty  # the sums' dtype: compute_dtype's, as allocated
    pair = tl.program_id(0)  # row * KV_HEADS + key/value head
    split = tl.program_id(1)
    row = pair // KV_HEADS
    columns = tl.load(columns_ptr + row).to(tl.int32)
    width = tl.cdiv(columns, SPLITS)
    start = split * width
    end = tl.minimum(start + width, columns)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (pair * GROUPS + g)[:, None] * D + d[None, :], mask=(g < GROUPS)[:, None], other=0.0)
    q = q.to(COMPUTE)
    base = row.to(tl.int64) * stride_row + (pair % KV_HEADS).to(tl.int64) * stride_head
    top = tl.full((BLOCK_G,), float("-inf"), COMPUTE)
    total = tl.zeros((BLOCK_G,), COMPUTE)
    acc = tl.zeros((BLOCK_G, D), COMPUTE)
    first = start
    # A while loop, not range(start, end): Triton's interpreter (the CPU tests) takes no tensor bound there.
    while first < end:
        cols = first + tl.arange(0, BLOCK_N)
        ok = cols < end
        at = base + cols[:, None] * D + d[None, :]
        k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0).to(COMPUTE)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(ok[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_top[:, None])
        shrink = tl.exp(top - new_top)
        total = total * shrink + tl.sum(weights, axis=1)
        acc = acc * shrink[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        top = new_top
        first += BLOCK_N
    # A split past the row's columns read nothing: it weighs 0 in the join (log-sum-exp -inf).
    out = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
    at = (pair * SPLITS + split) * GROUPS + g
    tl.store(part_out_ptr + at[:, None] * D + d[None, :], out, mask=(g < GROUPS)[:, None])
    tl.store(part_lse_ptr + at, top + tl.log(total), mask=g < GROUPS)


@triton.jit
def _join_splits(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    GROUPS: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pair = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < GROUPS
    s = tl.arange(0, SPLITS)
    at = (pair * SPLITS + s)[:, None] * GROUPS + g[None, :]  # (SPLITS, BLOCK_G)
    lses = tl.load(part_lse_ptr + at, mask=g_ok[None, :], other=0.0)
    # Every split's part loaded at once, not one after another: their loads are in flight together.
    parts = tl.load(part_out_ptr + at[:, :, None] * D + d[None, None, :], mask=g_ok[None, :, None], other=0.0)
    # Finite: a row has at least one column, so its first split read something.
    top = tl.max(lses, axis=0)
    weights = tl.exp(lses - top[None, :])
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, :, None], axis=0) / total[:, None]
    at = pair * GROUPS + g
    tl.store(out_ptr + at[:, None] * D + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_ptr + at, top + tl.log(total), mask=g_ok)


_tuned = triton.autotune(configs=CONFIGS, key=["KV_HEADS", "GROUPS", "D", "SPLITS"], cache_results=True)(
    _attend_splits
)


def splits_for(sequences: int, length: int) -> int:
    """Into how many splits each of `sequences` (row, key/value head) pairs over at most `length` columns is
    cut (model.kernel_grid): at most MAX_SPLITS, none empty."""
    return pieces_for(sequences, length, min_width=1, most=MAX_SPLITS)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The sums' dtype: float32, as flash attention's; float64 for a float64 model (the CPU tests' exact
    comparisons)."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


@torch.library.custom_op("higgs_batch::split_attention", mutates_args=())
def split_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, columns: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per (row, key/value head), its query heads packed: query (b, kv_heads, groups, d) over
    the first `columns[r]` (>= 1) of row r's keys/values (b, kv_heads, span, d), read in place (a slot cache's
    first slots: any row and head strides, columns contiguous). Returns the output (b, kv_heads, groups, d) in
    query's dtype and its log-sum-exp (b, kv_heads, groups) in compute_dtype."""
    b, kv_heads, groups, d = query.shape
    if key.stride() != value.stride() or key.stride(3) != 1 or key.stride(2) != d:
        raise ValueError(f"keys {key.stride()} and values {value.stride()} need the strides of a slot cache")
    splits = splits_for(b * kv_heads, key.shape[2])
    compute = compute_dtype(query)
    parts = query.new_empty((b * kv_heads * splits * groups, d), dtype=compute)
    part_lse = query.new_empty(b * kv_heads * splits * groups, dtype=compute)
    # tl.dot's smallest block is 16: the query heads padded. 16-bit keys and values are exact in tf32, the
    # tensor cores' input for float32 products.
    block_g = max(16, triton.next_power_of_2(groups))
    precision = "tf32" if query.element_size() == 2 else "ieee"
    _tuned[(b * kv_heads, splits)](
        query.contiguous(), key, value, columns, parts, part_lse, scale, key.stride(0),
        key.stride(1), kv_heads, groups, d, splits, block_g, precision,
    )  # fmt: skip
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    lse = query.new_empty((b, kv_heads, groups), dtype=compute)
    join = (parts, part_lse, out, lse, groups, d, splits, triton.next_power_of_2(groups))
    _join_splits[(b * kv_heads,)](*join, num_warps=JOIN_WARPS)
    return out, lse


@split_attention.register_fake
def _(query, key, value, columns, scale):
    b, kv_heads, groups, _ = query.shape
    lse = query.new_empty((b, kv_heads, groups), dtype=compute_dtype(query))
    return torch.empty_like(query, memory_format=torch.contiguous_format), lse
