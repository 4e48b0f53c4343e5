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

With `flex_decode` (RowBlocks), each row reads its own slot only up to its last written column, in blocks of
FLEX_BLOCK, through FlexAttention: sdpa reads every row up to the batch's span, the longest row's, and rows
of a refilled batch are at all stages of their audio (about a third of the span unused on average for rows
of 6-14 s: scripts/bench_attention.py --own-spread 225). FlexAttention is compiled on a GPU (a fused kernel
that skips the unused blocks); on a CPU it runs its unfused reference implementation (same results, for
tests).
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)
PACKED_SDPA = "higgs_batch_packed_sdpa"
FLEX_BLOCK = 128  # FlexAttention's default sparse block: the unit a row's reads are rounded up to


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    slot_prefix=None,
    slot_blocks: BlockMask | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if slot_blocks is not None and query.shape[2] == 1:
        prefix = slot_prefix.prefix_for(module.layer_idx) if slot_prefix is not None else None
        return flex_decode_attention(query, key, value, slot_blocks, scale, prefix), None
    if slot_prefix is not None and query.shape[2] == 1:
        keys, values, mask = slot_prefix.prefix_for(module.layer_idx)
        return prefix_attention(query, key, value, attention_mask, keys, values, mask, scale), None
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


class RowBlocks:
    """Which of its slot's columns each row reads in a decode step: 0 through its write position (the token
    this step writes), as FlexAttention's block mask. Built in the step from the slots' write positions, so a
    captured graph replays it with the step."""

    def __init__(self, write_pos: torch.Tensor, length: int) -> None:
        if length % FLEX_BLOCK:
            raise ValueError(f"slots of {length} columns are not whole blocks of {FLEX_BLOCK}")
        self.write_pos, self.length = write_pos, length
        blocks = length // FLEX_BLOCK
        # Every row's blocks in order; the kernel reads the first kv_num_blocks of them.
        order = torch.arange(blocks, dtype=torch.int32, device=write_pos.device)
        self.order = order.expand(write_pos.shape[0], 1, 1, blocks).contiguous()  # the kernel's layout

        # Reads the write positions when the kernel runs: in a replayed graph, that step's.
        def within_row(b, h, q, kv):
            return kv <= write_pos[b]

        self.within_row = within_row

    def mask(self, rows: int) -> BlockMask:
        """The block mask of the first `rows` slots."""
        used = torch.div(self.write_pos[:rows] + FLEX_BLOCK, FLEX_BLOCK, rounding_mode="floor")
        return BlockMask.from_kv_blocks(
            used.to(torch.int32).view(rows, 1, 1),
            self.order[:rows],
            BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=self.within_row,
            seq_lengths=(1, self.length),
            compute_q_blocks=False,  # only the backward pass needs them
        )


def flex_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: BlockMask,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token per row over the blocks of its own slot that `blocks` (RowBlocks.mask) lets it read,
    and, given `prefix` (keys, values, bias as prefix_attention takes them), over the batch's shared prefix
    too, as one softmax: the two parts meet through their log-sum-exps.

    query (b, heads, 1, d); key/value (b, kv_heads, length, d), whole slots. Returns (b, 1, heads, d)."""
    if prefix is None:
        return _flex(query, key, value, blocks, scale).transpose(1, 2).contiguous()
    # Compiled on a CPU, FlexAttention gives no log-sum-exp (torch 2.11): a compiled step falls back to eager.
    out, aux = _flex(query, key, value, blocks, scale, return_aux=AuxRequest(lse=True))
    prefix_keys, prefix_values, bias = prefix
    b, heads, _, d = query.shape
    kv_heads = prefix_keys.shape[0]
    groups = heads // kv_heads
    scores = torch.add(bias, _against_prefix(query, prefix_keys), alpha=scale)
    shared_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - shared_lse).to(prefix_values.dtype)
    shared = _matmul(weights, prefix_values).view(kv_heads, b, groups, d).transpose(0, 1).reshape(b, heads, d)
    shared_lse = shared_lse.view(kv_heads, b, groups).transpose(0, 1).reshape(b, heads, 1)
    own_lse = aux.lse.reshape(b, heads, 1).to(shared_lse.dtype)
    total = torch.logaddexp(shared_lse, own_lse)
    own = out.reshape(b, heads, d).to(shared.dtype)
    merged = shared * torch.exp(shared_lse - total) + own * torch.exp(own_lse - total)
    return merged.to(query.dtype).view(b, 1, heads, d)


def flex_runs(keys: torch.Tensor, query_heads: int, prefix: bool = False) -> bool:
    """Whether compiled FlexAttention runs on slots like `keys` (slots, kv_heads, length, d), and with a
    shared prefix beside them where the cache has room for one: tried on one and on two empty rows (its
    compilations: one row, and any number) before a decode step relies on it, so that a GPU without a
    working Triton decodes with sdpa."""
    _, kv_heads, length, dim = keys.shape
    try:
        for rows, with_prefix in itertools.product((1, 2), (False, True) if prefix else (False,)):
            # Keys and values apart: compiled FlexAttention rejects one buffer for both.
            key, value = (keys.new_zeros((rows, kv_heads, length, dim)) for _ in range(2))
            query = keys.new_zeros((rows, query_heads, 1, dim))
            blocks = RowBlocks(torch.zeros(rows, dtype=torch.long, device=keys.device), length).mask(rows)
            shared = (keys.new_zeros((kv_heads, FLEX_BLOCK, dim)),) * 2
            bias = torch.zeros(FLEX_BLOCK, dtype=torch.float32, device=keys.device)
            flex_decode_attention(query, key, value, blocks, 1.0, (*shared, bias) if with_prefix else None)
    except Exception as exc:  # noqa: BLE001 - the kernel's compiler fails in many ways
        log.warning("FlexAttention does not run here (%s); decoding with sdpa", str(exc).splitlines()[0])
        return False
    return not _flex.failed


class FlexKernel:
    """FlexAttention, compiled on a GPU (uncompiled, it reads every column): once, for any number of rows and
    slot length. Should a later compilation fail, the same attention runs unfused from then on: mid-step,
    the rows' state has already moved on."""

    def __init__(self, compiled_on: tuple[str, ...] = ("cuda",)) -> None:
        self.compiled_on = compiled_on
        self.compiled = None
        self.failed = False

    def __call__(self, query, key, value, blocks: BlockMask, scale: float, **aux):
        args = (query, key, value)
        options = {"block_mask": blocks, "scale": scale, "enable_gqa": True, **aux}
        if query.device.type not in self.compiled_on or torch.compiler.is_compiling() or self.failed:
            return flex_attention(*args, **options)
        if self.compiled is None:
            self.compiled = torch.compile(flex_attention, fullgraph=True, dynamic=True)
        try:
            return self.compiled(*args, **options)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - compiler failures come as many types
            log.warning("FlexAttention not compiled (%s); running it unfused", str(exc).splitlines()[0])
            self.failed = True
            return flex_attention(*args, **options)


_flex = FlexKernel()


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
