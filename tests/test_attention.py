"""The decode step's attention: grouped query heads packed per key/value head give transformers' sdpa result."""

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model.attention import (
    FlexKernel,
    RowBlocks,
    flex_decode_attention,
    packed_sdpa_attention,
    prefix_attention,
)


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


def test_attention_over_a_shared_prefix_and_each_rows_own_keys_is_one_softmax_over_both():
    torch.manual_seed(0)
    rows, kv_heads, groups, dim = 4, 2, 3, 16
    query = torch.randn(rows, kv_heads * groups, 1, dim, dtype=torch.float64)
    key, value = (torch.randn(rows, kv_heads, 40, dim, dtype=torch.float64) for _ in range(2))
    prefix_keys, prefix_values = (torch.randn(kv_heads, 24, dim, dtype=torch.float64) for _ in range(2))
    lowest = torch.finfo(torch.float64).min
    mask = torch.zeros(rows, 1, 1, 40, dtype=torch.float64)
    mask[:, :, :, 30:] = lowest  # slot columns not in use yet
    mask[1, :, :, 12:] = lowest  # a row with fewer tokens of its own
    prefix_mask = torch.zeros(24, dtype=torch.float32)
    prefix_mask[20:] = torch.finfo(torch.float32).min  # the prefix's span rounds up past its 20 tokens

    got = prefix_attention(query, key, value, mask, prefix_keys, prefix_values, prefix_mask, 0.25)

    # The same attention with the prefix copied in front of every row's keys.
    whole_keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), key], dim=2)
    whole_values = torch.cat([prefix_values.expand(rows, -1, -1, -1), value], dim=2)
    whole_mask = torch.cat([prefix_mask.to(mask.dtype).clamp(min=lowest).expand(rows, 1, 1, -1), mask], dim=3)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
    expected, _ = sdpa_attention_forward(module, query, whole_keys, whole_values, whole_mask, scaling=0.25)
    assert got.shape == (rows, 1, kv_heads * groups, dim)
    torch.testing.assert_close(got, expected)


def test_attention_over_a_shared_prefix_reads_the_slot_keys_in_place_without_copying_them():
    rows, kv_heads, dim = 3, 2, 8
    slot_keys = torch.randn(8, kv_heads, 64, dim)  # a slot cache's keys; a step reads the first 32 columns
    key, value = slot_keys[:rows, :, :32], slot_keys[:rows, :, :32]
    views = {"view", "_unsafe_view", "transpose", "slice", "expand", "select", "alias", "unsqueeze", "t"}
    copies: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in views and isinstance(out, torch.Tensor) and out.numel() >= key.numel():
                copies.append(name)  # as large as the keys: a copy of them
            return out

    with Watch():
        prefix_attention(
            torch.randn(rows, kv_heads * 3, 1, dim), key, value, torch.zeros(rows, 1, 1, 32),
            torch.randn(kv_heads, 16, dim), torch.randn(kv_heads, 16, dim), torch.zeros(16), 0.5,
        )  # fmt: skip
    assert copies == []


def _rows_at(write_pos: list[int], columns: int, dtype=torch.float64):
    """Four rows' queries and slots, each row's columns past its write position holding stale keys."""
    torch.manual_seed(0)
    query = torch.randn(len(write_pos), 6, 1, 16, dtype=dtype)  # 6 query heads on 2 key/value heads
    key, value = (torch.randn(len(write_pos), 2, columns, 16, dtype=dtype) for _ in range(2))
    written = torch.tensor(write_pos)
    mask = torch.zeros(len(write_pos), 1, 1, columns, dtype=dtype)
    mask.masked_fill_(torch.arange(columns) > written[:, None, None, None], torch.finfo(dtype).min)
    return query, key, value, mask, RowBlocks(written, columns)


def test_flex_decode_attention_reads_each_row_up_to_its_write_position_as_sdpa_does():
    # An empty slot (column 0 only), rows ending inside a block, on a block's last column and the slot's.
    query, key, value, mask, blocks = _rows_at([0, 5, 127, 255], columns=256)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)

    got = flex_decode_attention(query, key, value, blocks.mask(4), 0.25)

    expected, _ = packed_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    assert got.shape == (4, 1, 6, 16)
    torch.testing.assert_close(got, expected)


def test_flex_decode_attention_over_a_shared_prefix_is_one_softmax_over_both():
    query, key, value, mask, blocks = _rows_at([3, 40, 200, 130], columns=256)
    prefix_keys, prefix_values = (torch.randn(2, 24, 16, dtype=torch.float64) for _ in range(2))
    prefix_bias = torch.zeros(24, dtype=torch.float32)
    prefix_bias[20:] = torch.finfo(torch.float32).min  # the prefix's span rounds up past its 20 tokens
    prefix = (prefix_keys, prefix_values, prefix_bias)

    got = flex_decode_attention(query, key, value, blocks.mask(4), 0.25, prefix)

    torch.testing.assert_close(got, prefix_attention(query, key, value, mask, *prefix, 0.25))


def test_row_blocks_let_each_row_read_only_the_blocks_holding_its_tokens():
    blocks = RowBlocks(torch.tensor([0, 127, 128, 300, 511, 9]), 512)
    # The first three slots: column 0 (an empty slot), a block's last column, the next block's first.
    assert blocks.mask(3).kv_num_blocks.flatten().tolist() == [1, 1, 2]
    assert blocks.mask(6).kv_num_blocks.flatten().tolist() == [1, 1, 2, 3, 4, 1]


def test_flex_attention_whose_compilation_fails_runs_unfused_with_the_same_result():
    query, key, value, mask, blocks = _rows_at([3, 40, 200, 130], columns=256)
    flex = FlexKernel(compiled_on=("cpu",))

    def compiler_failure(*args, **kwargs):
        raise RuntimeError("C++ compile error")

    flex.compiled = compiler_failure  # as a later shape's compilation fails, mid-step
    got = flex(query, key, value, blocks.mask(4), 0.25)

    assert flex.failed
    expected = flex_decode_attention(query, key, value, blocks.mask(4), 0.25)
    torch.testing.assert_close(got.transpose(1, 2), expected)
