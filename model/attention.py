"""Attention for the decode step: one query token per row, grouped query heads attended per key/value head.

transformers' sdpa attention already packs a single query token's head groups instead of repeating the keys
and values for every query head, but not while torch.compile traces it: there it falls back to repeating
them, which writes and reads the whole KV cache three times over in every layer of every step (the release
has 24 query heads on 8 key/value heads). This variant packs under compilation too and hands everything
else (prefill) to transformers' sdpa unchanged.
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
    **kwargs,
) -> tuple[torch.Tensor, None]:
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


def use_packed_sdpa(model) -> bool:
    """Switch a model on transformers' sdpa to the packed variant (same results); False if it uses another."""
    if model.config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False
    if PACKED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return True
