"""Attention for the decode step: one query token per row, grouped query heads attended per key/value head.

transformers' sdpa attention already packs a single query token's head groups instead of repeating the keys
and values for every query head, but not while torch.compile traces it: there it falls back to repeating
them, which writes and reads the whole KV cache three times over in every layer of every step (the release
has 24 query heads on 8 key/value heads). This variant packs under compilation too and hands everything
else (prefill) to transformers' sdpa unchanged.

With a shared prompt prefix (`slot_prefix`, see model.slot_cache), a decode step attends to two key sets: the
prefix every row of the batch shares (system prompt and reference voice), stored once, and each row's own
tokens in its slot. The prefix is read once per step for all rows instead of once per row: rows of one
reference voice repeat ~350 of a ~700-token prompt, which at large batches is most of the memory a step reads.

At 256 rows this attention takes ~14 of a decode step's ~18 ms on an H100 (GPU run 7, docs/benchmarks.md),
reading the rows' own columns at ~1.4 TB/s through matrix products (`prefix_attention`), where sdpa's fused
kernel read whole prompts at ~2.3 TB/s. `split_prefix_attention` reads the own columns with that kernel and
joins the prefix's part through the log-sum-exps; OWN_KERNEL picks one (bench_attention.py and bench_gpu.py's
`split` modes measure them).

Every row of a step reads the same span of columns, up to the longest row's, rounded up: in a refilled batch,
whose rows are at all stages of their audio, ~40 % of the own columns read are masked out (rows of 231-681
own tokens under a 768-column span). `own_columns_attention` reads each row's own columns only, through the
memory-efficient kernel's variable-length mode (OWN_KERNEL "varlen"; the decode step then passes each row's
column count, `slot_columns`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

try:
    from model.split_attention import split_attention
except ImportError:  # Triton comes with torch on Linux only; elsewhere few rows take sdpa
    split_attention = None
from model.kernel_grid import pieces_for

PACKED_SDPA = "higgs_batch_packed_sdpa"
# How a decode step reads the rows' own columns beside a shared prefix: "bmm" (prefix_attention) or sdpa's
# fused kernels with their log-sum-exp (split_prefix_attention): "efficient" or "cudnn" on a GPU (a CPU runs
# its own flash kernel for either). "varlen": each row only its columns in use (own_columns_attention), with
# or without a shared prefix, in caches of MIN_OWN_COLUMNS_SLOTS slots or more (below, "bmm"). On an H100
# (GPU run 8) 1,024 rows of 150-349 frames through 256 slots ran at 401.8x real time with "varlen" against
# 371.8x with "bmm", and their codes matched the plain path's on the GPU (docs/benchmarks.md).
OWN_KERNEL = "varlen"
# The fewest slots a decode step reads each row's own columns alone in (OWN_KERNEL "varlen"). With few rows
# the kernel has too few sequences for the GPU even cut into chunks: one request ran at 5.54x real time that
# way against 6.69x over its whole slot (GPU run 8), and one layer's attention at 64 rows took 2.1x the time
# of whole prompts in the slots, at 128 rows 0.94x (bench_attention.py, not in CUDA graphs).
MIN_OWN_COLUMNS_SLOTS = 128
# How a decode step of fewer rows than that attends where Triton runs (a GPU): "sdpa", the packed query heads
# over the step's whole span with its mask (cuDNN's kernel on a GPU: 0.61 ms a one-row step of the release on
# an H200, GPU run 9, where its keys and values take ~30 us to read), or "split", each row's own columns in
# use through model.split_attention's Triton kernels, cut into splits for all the SMs (not yet measured on a
# GPU: bench_gpu's `_split` modes and bench_attention.py measure it against "sdpa").
FEW_ROWS_KERNEL = "sdpa"


def reads_own_columns(slots: int, device: torch.device) -> bool:
    """Whether a decode step over a cache of `slots` slots on `device` passes each row's columns in use to its
    attention (`slot_columns`), which then reads those alone (own_columns_attention): with the
    variable-length kernel from MIN_OWN_COLUMNS_SLOTS slots (OWN_KERNEL "varlen"), with model.split_attention's
    below (FEW_ROWS_KERNEL "split")."""
    if slots >= MIN_OWN_COLUMNS_SLOTS:
        return OWN_KERNEL == "varlen"
    return FEW_ROWS_KERNEL == "split" and _triton_runs_on(device)


def _triton_runs_on(device: torch.device) -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) runs its kernels on a CPU's tensors too.
    return split_attention is not None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    slot_prefix=None,
    slot_columns: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if slot_prefix is not None and query.shape[2] == 1:
        keys, values, mask = slot_prefix.prefix_for(module.layer_idx)
        if slot_columns is not None:
            split = split_prefix_attention(
                query, key, value, attention_mask, keys, values, mask, scale, columns=slot_columns
            )
            return split, None
        attend = split_prefix_attention if OWN_KERNEL in ("efficient", "cudnn") else prefix_attention
        return attend(query, key, value, attention_mask, keys, values, mask, scale), None
    if slot_columns is not None and query.shape[2] == 1:
        b, heads, _, d = query.shape
        out, _ = own_columns_attention(query, key, value, slot_columns, scale)
        return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    # (batch, kv_heads, groups, dim): a key/value head's query heads stand in for query positions.
    out = F.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim),
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per row over the batch's shared prefix and then each row's own keys, as one softmax.

    query (b, heads, 1, d); key/value (b, kv_heads, span, d), a row's own columns; mask (b, 1, 1, span),
    additive; prefix_keys/values (kv_heads, p, d), shared by every row; prefix_mask (p,), additive.
    Returns (b, 1, heads, d), as transformers' attention functions do.
    """
    b, heads, _, d = query.shape
    kv_heads, span, p = key.shape[1], key.shape[2], prefix_keys.shape[1]
    groups = heads // kv_heads
    # A key/value head's query heads stand in for query positions. `view`, not `reshape`, on the slots: their
    # keys must be read where they lie, never copied.
    q = query.reshape(b, kv_heads, groups, d)
    own = _matmul(q.view(b * kv_heads, groups, d), key.view(b * kv_heads, span, d).transpose(1, 2))
    shared = _against_prefix(query, prefix_keys)
    scores = torch.cat(
        [shared.view(kv_heads, b, groups, p).transpose(0, 1), own.view(b, kv_heads, groups, span)], dim=-1
    )
    bias = torch.cat([prefix_mask.expand(b, 1, 1, p), mask.float()], dim=-1)
    # Probabilities meet the values in the values' dtype, as flash attention does; sums stay in float32.
    weights = torch.softmax(torch.add(bias, scores, alpha=scale), dim=-1).to(value.dtype)
    mine = weights[..., p:].view(b * kv_heads, groups, span)
    theirs = weights[..., :p].transpose(0, 1).reshape(kv_heads, b * groups, p)
    out = _matmul(mine, value.view(b * kv_heads, span, d)).view(b, kv_heads, groups, d)
    out = out + _matmul(theirs, prefix_values).view(kv_heads, b, groups, d).transpose(0, 1)
    return out.to(query.dtype).reshape(b, heads, 1, d).transpose(1, 2).contiguous()


def split_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_mask: torch.Tensor,
    scale: float,
    kernel: str | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefix_attention's result, its two parts computed apart: each row's own columns through sdpa's fused
    kernel (`kernel`, OWN_KERNEL by default), which gives their log-sum-exp beside the output, and the shared
    prefix through one matrix product for all rows; the two meet through their log-sum-exps, as one softmax.
    Same arguments and result as prefix_attention; with `columns` (b,), each row's own columns in use, the
    first ones of its slot (the mask's unmasked ones), read alone (own_columns_attention)."""
    b, heads, _, d = query.shape
    kv_heads = prefix_keys.shape[0]
    groups = heads // kv_heads
    if columns is not None:
        own, own_lse = own_columns_attention(query, key, value, columns, scale, log_sum_exp=True)
    else:
        # A key/value head's query heads stand in for query positions, so the kernel reads each key once.
        q = query.reshape(b, kv_heads, groups, d)
        own, own_lse = _fused_attention(
            q, key, value, mask.expand(b, kv_heads, groups, key.shape[2]), scale, kernel
        )
    scores = torch.add(prefix_mask, _against_prefix(query, prefix_keys), alpha=scale)
    shared_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - shared_lse).to(prefix_values.dtype)
    shared = _matmul(weights, prefix_values).view(kv_heads, b, groups, d).transpose(0, 1)
    shared_lse = shared_lse.view(kv_heads, b, groups, 1).transpose(0, 1)
    total = torch.logaddexp(shared_lse, own_lse)
    merged = shared * torch.exp(shared_lse - total) + own.float() * torch.exp(own_lse - total)
    return merged.to(query.dtype).reshape(b, heads, 1, d).transpose(1, 2).contiguous()


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    kernel: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa of query (b, h, m, d) over key/value (b, h, n, d) with an additive bias (b, h, m, n), and its
    log-sum-exp as (b, h, m, 1) in float32. torch's public sdpa keeps the log-sum-exp to itself; its kernels'
    own entry points give it."""
    kernel = kernel or OWN_KERNEL
    bias = bias.to(query.dtype)
    if query.device.type != "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=bias, scale=scale
        )
    elif kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, bias, True, scale=scale
        )[:2]
    elif kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, scale=scale
        )[:2]
    else:
        raise ValueError(f"unknown kernel {kernel!r} for the rows' own columns: efficient or cudnn")
    b, h, m, _ = query.shape
    # The kernels lay the log-sum-exp out as (b, h, m), (b, h, m, 1) or padded along m.
    return out, lse.reshape(b, h, -1)[..., :m, None].float()


# The fewest columns a chunk takes: the kernel reads keys in blocks of 64-128.
MIN_CHUNK = 64


def chunks_for(sequences: int, length: int) -> int:
    """Into how many chunks of equal width each of `sequences` (row, head) pairs' slots of `length` columns is
    cut (model.kernel_grid): chunks of MIN_CHUNK columns or more."""
    return pieces_for(sequences, length, min_width=MIN_CHUNK)


def own_columns_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    scale: float,
    log_sum_exp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query token per row over the first `columns[r]` keys and values of its slot only, however many more
    the step's span holds. Fewer than MIN_OWN_COLUMNS_SLOTS rows with FEW_ROWS_KERNEL "split" (where Triton
    runs): model.split_attention's kernels. Otherwise the memory-efficient kernel's variable-length mode, each
    (row, key/value head) a sequence of its own whose query heads stand in for query positions. Few rows are
    also cut into chunks of columns (see chunks_for), each a sequence, joined through their log-sum-exps.

    query (b, heads, 1, d); key/value (b, kv_heads, span, d), views of a slot cache's first b slots (model.
    slot_cache); columns (b,), at most span. Returns the output (b, kv_heads, groups, d) and, with
    `log_sum_exp`, its log-sum-exp (b, kv_heads, groups, 1) in float32."""
    b, heads, _, d = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if b < MIN_OWN_COLUMNS_SLOTS and FEW_ROWS_KERNEL == "split" and _triton_runs_on(query.device):
        out, lse = split_attention(query.reshape(b, kv_heads, groups, d), key, value, columns, scale)
        return out, (lse[..., None] if log_sum_exp else None)
    keys, length = _as_sequences(key)
    values, _ = _as_sequences(value)
    # The chunk count follows the slots' length, fixed for a cache, not the step's span: a compiled step then
    # takes every span with one graph (run 9 compiled a one-row step twice, once per chunk count). The last
    # chunk may be the shortest.
    chunks = chunks_for(b * kv_heads, length)
    width = -(-span // chunks)
    sequences = b * kv_heads * chunks
    q = query.reshape(b, kv_heads, 1, groups, d).expand(b, kv_heads, chunks, groups, d)
    q = q.reshape(sequences * groups, d)[None, :, None, :]
    i = torch.arange(sequences + 1, dtype=torch.int32, device=query.device)
    key_starts = torch.div(i, chunks, rounding_mode="floor") * length + (i % chunks) * width
    # A chunk's columns in use; at least one, so that no sequence is empty (an empty one's output is 0/0 in
    # the kernel): a chunk past a row's columns reads one column and is weighed out below.
    offsets = torch.arange(chunks, device=query.device) * width
    left = columns[:, None] - offsets  # (b, chunks)
    # expand, not repeat_interleave: that reads its output's size back from the GPU, which a graph cannot.
    lengths = left.clamp(1, width).to(torch.int32)[:, None, :].expand(b, kv_heads, chunks).reshape(sequences)
    attend = torch.ops.aten._efficient_attention_forward if query.device.type == "cuda" else _varlen_on_cpu
    out, lse = attend(
        q, keys, values, None, i * groups, key_starts, groups, width, 0.0, 0, log_sum_exp or chunks > 1,
        scale=scale, seqlen_k=lengths,
    )[:2]  # fmt: skip
    if chunks == 1:
        out = out.view(b, kv_heads, groups, d)
        if not log_sum_exp:
            return out, None
        return out, lse[:, 0, :groups].reshape(b, kv_heads, groups, 1).float()
    out = out.view(b, kv_heads, chunks, groups, d).float()
    lse = lse[:, 0, :groups].reshape(b, kv_heads, chunks, groups).float()
    lse = lse.masked_fill((left <= 0)[:, None, :, None], float("-inf"))
    total = torch.logsumexp(lse, dim=2, keepdim=True)  # finite: every row has a column in its first chunk
    joined = (out * torch.exp(lse - total)[..., None]).sum(dim=2)
    if not log_sum_exp:
        return joined.to(query.dtype), None
    return joined.to(query.dtype), total.view(b, kv_heads, groups, 1)


def _as_sequences(slots: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A slot cache's keys (or values), (b, kv_heads, span, d) of slots (b, kv_heads, length, d), as the
    variable-length kernel reads them: (1, b * kv_heads * length, 1, d), a (row, head)'s columns at every
    `length`-th token, read in place. Returns it with `length`."""
    b, kv_heads, _, d = slots.shape
    length = slots.stride(1) // d
    if slots.stride(3) != 1 or slots.stride(2) != d or slots.stride(0) != kv_heads * slots.stride(1):
        raise ValueError(f"keys of strides {slots.stride()} are not the first slots of a slot cache")
    tokens = b * kv_heads * length
    return slots.as_strided((1, tokens, 1, d), (tokens * d, d, d, 1)), length


def _varlen_on_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    custom_mask_type: int,
    compute_log_sumexp: bool,
    *,
    scale: float,
    seqlen_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.aten._efficient_attention_forward's variable-length mode on a CPU, which lacks the kernel,
    as that kernel reads its arguments: sequence i's queries from cu_seqlens_q[i] on (max_seqlen_q of them,
    as every sequence here has), its keys and values from cu_seqlens_k[i], seqlen_k[i] of them. The output
    (1, queries, 1, d) and the log-sum-exp (sequences, 1, max_seqlen_q rounded up to 32), laid out as the
    kernel's (empty without `compute_log_sumexp`); its padding is NaN, so reading it shows."""
    d = query.shape[-1]
    sequences = cu_seqlens_q.shape[0] - 1
    rows = cu_seqlens_q[:-1, None] + torch.arange(max_seqlen_q, device=query.device)
    cols = cu_seqlens_k[:-1, None] + torch.arange(max_seqlen_k, device=query.device)
    q = query[0, :, 0][rows][:, None]  # (sequences, 1, queries, d)
    k, v = key[0, :, 0][cols][:, None], value[0, :, 0][cols][:, None]
    unused = torch.arange(max_seqlen_k, device=query.device) >= seqlen_k[:, None]
    bias = torch.zeros((sequences, 1, max_seqlen_q, max_seqlen_k), dtype=query.dtype, device=query.device)
    bias.masked_fill_(unused[:, None, None, :], torch.finfo(query.dtype).min)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=bias, scale=scale
    )
    width = -(-max_seqlen_q // 32) * 32 if compute_log_sumexp else 0
    padded = torch.full((sequences, 1, width), torch.nan, device=query.device)
    kept = min(width, max_seqlen_q)
    padded[:, :, :kept] = lse.reshape(sequences, 1, -1)[:, :, :kept]
    return out.reshape(1, sequences * max_seqlen_q, 1, d), padded


def _against_prefix(query: torch.Tensor, prefix_keys: torch.Tensor) -> torch.Tensor:
    """Every row's queries (b, heads, 1, d) against the batch's one shared prefix (kv_heads, p, d), as
    (kv_heads, b * groups, p) raw scores: a key/value head's query heads of all rows in one matrix product,
    so the prefix is read once."""
    b, heads, _, d = query.shape
    kv_heads = prefix_keys.shape[0]
    q = query.reshape(b, kv_heads, heads // kv_heads, d).transpose(0, 1).reshape(kv_heads, -1, d)
    return _matmul(q, prefix_keys.transpose(1, 2))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b in at least float32, without float32 copies of the operands (the keys and values)."""
    if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).to(torch.promote_types(a.dtype, torch.float32))


def use_packed_sdpa(model) -> bool:
    """Switch a model on transformers' sdpa to the packed variant (same results); False if it uses another."""
    if model.config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False
    if PACKED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return True
