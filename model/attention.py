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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "higgs_batch_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    slot_prefix=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if slot_prefix is not None and query.shape[2] == 1:
        keys, values, mask = slot_prefix.prefix_for(module.layer_idx)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
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
    # Every row's queries against the one prefix, (kv_heads, b * groups, p): the prefix is read once.
    shared = _matmul(q.transpose(0, 1).reshape(kv_heads, b * groups, d), prefix_keys.transpose(1, 2))
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


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b in float32, without float32 copies of the operands (the keys and values)."""
    if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).float()


def use_packed_sdpa(model) -> bool:
    """Switch a model on transformers' sdpa to the packed variant (same results); False if it uses another."""
    if model.config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False
    if PACKED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return True
