"""The decode step's attention: grouped query heads packed per key/value head give transformers' sdpa result."""

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model.attention import (
    chunks_for,
    own_columns_attention,
    packed_sdpa_attention,
    prefix_attention,
    split_prefix_attention,
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


def _rows_beside_a_prefix(own_of_row_1: int) -> tuple:
    """prefix_attention's arguments for 4 rows (6 query heads on 2 key/value heads) reading the first 40
    columns of their slots, 30 of them in use, row 1 only `own_of_row_1`, beside a 20-token shared prefix."""
    torch.manual_seed(0)
    rows, kv_heads, groups, dim = 4, 2, 3, 16
    query = torch.randn(rows, kv_heads * groups, 1, dim, dtype=torch.float64)
    slots = [torch.randn(8, kv_heads, 80, dim, dtype=torch.float64) for _ in range(2)]
    key, value = (slot[:rows, :, :40] for slot in slots)
    prefix_keys, prefix_values = (torch.randn(kv_heads, 24, dim, dtype=torch.float64) for _ in range(2))
    lowest = torch.finfo(torch.float64).min
    mask = torch.zeros(rows, 1, 1, 40, dtype=torch.float64)
    mask[:, :, :, 30:] = lowest  # slot columns not in use yet
    mask[1, :, :, own_of_row_1:] = lowest  # a row with fewer tokens of its own
    prefix_mask = torch.zeros(24, dtype=torch.float32)
    prefix_mask[20:] = torch.finfo(torch.float32).min  # the prefix's span rounds up past its 20 tokens
    return query, key, value, mask, prefix_keys, prefix_values, prefix_mask, 0.25


def test_attention_over_a_shared_prefix_and_each_rows_own_keys_is_one_softmax_over_both():
    args = _rows_beside_a_prefix(own_of_row_1=12)
    query, key, value, mask, prefix_keys, prefix_values, prefix_mask, scale = args
    rows, heads, _, dim = query.shape
    groups = heads // key.shape[1]

    got = prefix_attention(*args)

    # The same attention with the prefix copied in front of every row's keys.
    whole_keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), key], dim=2)
    whole_values = torch.cat([prefix_values.expand(rows, -1, -1, -1), value], dim=2)
    lowest = torch.finfo(mask.dtype).min
    whole_mask = torch.cat([prefix_mask.to(mask.dtype).clamp(min=lowest).expand(rows, 1, 1, -1), mask], dim=3)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
    expected, _ = sdpa_attention_forward(module, query, whole_keys, whole_values, whole_mask, scaling=scale)
    assert got.shape == (rows, 1, heads, dim)
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


def test_a_shared_prefix_joined_through_log_sum_exps_gives_the_one_softmax_result():
    args = _rows_beside_a_prefix(own_of_row_1=1)  # a row with one token of its own so far

    got = split_prefix_attention(*args, kernel="efficient")

    assert got.shape == (4, 1, 6, 16)
    torch.testing.assert_close(got, prefix_attention(*args))


def test_each_rows_own_columns_read_alone_give_the_masked_attention_over_the_whole_span():
    args = _rows_beside_a_prefix(own_of_row_1=7)
    query, key, value, mask = args[:4]
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    columns = torch.tensor([30, 7, 30, 30])  # the unmasked columns, the first ones of each slot

    got, _ = packed_sdpa_attention(module, query, key, value, mask, scaling=0.25, slot_columns=columns)

    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == (4, 1, 6, 16)
    torch.testing.assert_close(got, expected)


def test_own_columns_read_alone_give_their_log_sum_exp_per_query_head():
    query, key, value = _rows_beside_a_prefix(own_of_row_1=7)[:3]
    columns = torch.tensor([30, 7, 30, 30])

    _, lse = own_columns_attention(query, key, value, columns, 0.25, log_sum_exp=True)

    scores = torch.einsum("bhgd,bhkd->bhgk", query.view(4, 2, 3, 16), key) * 0.25
    used = torch.arange(40) < columns[:, None, None, None]
    expected = torch.logsumexp(scores.masked_fill(~used, float("-inf")), dim=-1, keepdim=True)
    assert lse.shape == (4, 2, 3, 1)
    torch.testing.assert_close(lse, expected.float())


def test_a_shared_prefix_joined_to_each_rows_own_columns_read_alone_gives_the_one_softmax_result():
    args = _rows_beside_a_prefix(own_of_row_1=1)

    got = split_prefix_attention(*args, columns=torch.tensor([30, 1, 30, 30]))

    torch.testing.assert_close(got, prefix_attention(*args))


def test_few_rows_are_cut_into_chunks_of_columns_until_the_gpu_has_enough_sequences():
    assert chunks_for(1 * 8, 768) == 8  # one row, 8 key/value heads: chunks of 96 columns
    assert chunks_for(16 * 8, 768) == 2
    assert chunks_for(256 * 8, 768) == 1
    assert chunks_for(1 * 8, 256) == 4  # no chunk under 64 columns


def test_own_columns_read_in_chunks_give_the_masked_attention_and_its_log_sum_exp():
    torch.manual_seed(1)
    query = torch.randn(2, 6, 1, 16, dtype=torch.float64)
    slots = [torch.randn(4, 2, 512, 16, dtype=torch.float64) for _ in range(2)]
    key, value = (slot[:2, :, :256] for slot in slots)
    columns = torch.tensor([200, 30])  # row 1's columns end in its first chunk of 32
    assert chunks_for(2 * 2, 512) == 8  # the slots' length decides: 8 chunks of 32 over this span of 256

    out, lse = own_columns_attention(query, key, value, columns, 0.25, log_sum_exp=True)

    scores = torch.einsum("bhgd,bhkd->bhgk", query.view(2, 2, 3, 16), key) * 0.25
    scores = scores.masked_fill(torch.arange(256) >= columns[:, None, None, None], float("-inf"))
    expected = torch.einsum("bhgk,bhkd->bhgd", torch.softmax(scores, dim=-1), value)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1, keepdim=True).float())


def test_a_compiled_step_reads_its_chunks_with_one_graph_for_every_span():
    # One row's chunks follow its slot's length, not the step's span: a compiled decode step does not
    # compile again each time the span grows (GPU run 9 compiled a one-row step once per chunk count).
    graphs = []

    def counting(graph, inputs):
        graphs.append(graph)
        return graph.forward

    attend = torch.compile(own_columns_attention, backend=counting, dynamic=True, fullgraph=True)
    torch.manual_seed(2)
    slots = [torch.randn(1, 2, 1024, 16, dtype=torch.float64) for _ in range(2)]
    query = torch.randn(1, 6, 1, 16, dtype=torch.float64)
    for span in (256, 512, 768, 1024):
        key, value = (slot[:, :, :span] for slot in slots)
        columns = torch.tensor([span - 10])

        out, _ = attend(query, key, value, columns, 0.25)

        scores = torch.einsum("bhgd,bhkd->bhgk", query.view(1, 2, 3, 16), key) * 0.25
        scores = scores.masked_fill(torch.arange(span) >= columns[:, None, None, None], float("-inf"))
        torch.testing.assert_close(out, torch.einsum("bhgk,bhkd->bhgd", torch.softmax(scores, dim=-1), value))
    assert len(graphs) == 1
