"""The decode step's attention: grouped query heads packed per key/value head give transformers' sdpa result."""

from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model.attention import packed_sdpa_attention


def test_packed_attention_of_one_query_token_matches_transformers_sdpa():
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    query = torch.randn(4, 6, 1, 16)  # 6 query heads on 2 key/value heads
    key, value = torch.randn(4, 2, 40, 16), torch.randn(4, 2, 40, 16)
    mask = torch.zeros(4, 1, 1, 40)
    mask[:, :, :, 30:] = torch.finfo(torch.float32).min  # columns not in use yet
    mask[1, :, :, :5] = torch.finfo(torch.float32).min  # a row whose prompt was shorter

    packed, _ = packed_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert packed.shape == (4, 1, 6, 16)
    torch.testing.assert_close(packed, expected)
