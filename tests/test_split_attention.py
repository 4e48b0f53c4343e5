"""The GPU's attention for few rows (model.split_attention): run through Triton's interpreter on this CPU, and
built for a Hopper GPU."""

import re

import pytest
import torch
import triton

from model import attention
from model.split_attention import CONFIGS, JOIN_WARPS, MAX_SPLITS, _attend_splits, _join_splits, splits_for
from tests.triton_kernels import hopper_build, interpreted

# One subprocess for the module (Triton's interpreter is chosen when Triton is imported, and each start
# imports torch again): each part leaves its measurements in `out`, which the tests below read.
INTERPRETED = """
import json, tempfile, torch
from model import attention, kernel_grid, split_attention as split
from model.split_attention import CONFIGS, _tuned
attention.FEW_ROWS_KERNEL = "split"
out = {}
ran = []
launch = _tuned.run
def watched(*args, **kwargs):
    ran.append(args[1].data_ptr())  # the keys the kernel reads
    return launch(*args, **kwargs)
_tuned.run = watched

def reference(query, key, value, columns, scale):
    outs, lses = [], []
    for r in range(query.shape[0]):
        scores = torch.einsum("hgd,hnd->hgn", query[r].double(), key[r, :, : columns[r]].double()) * scale
        outs.append(torch.einsum("hgn,hnd->hgd", torch.softmax(scores, -1), value[r, :, : columns[r]].double()))
        lses.append(torch.logsumexp(scores, -1))
    return torch.stack(outs), torch.stack(lses)

# Three rows of 2 key/value heads, 3 query heads each (padded to 16), in slots of 200 columns read up to a
# span of 150: a row of 1 column (all but its first split empty), one of 77 (splits of 20, partial blocks),
# one of the whole span. Every block size in float64 (exact indexing), the first in bfloat16 (rounding).
torch.manual_seed(0)
kernel_grid.MIN_PROGRAMS = 24  # 4 splits a (row, head)
columns = torch.tensor([1, 77, 150])
for dtype, configs in ((torch.float64, CONFIGS), (torch.bfloat16, CONFIGS[:1])):
    slots = [torch.randn(4, 2, 200, 32, dtype=dtype) for _ in range(2)]
    key, value = (s[:3, :, :150] for s in slots)
    query = torch.randn(3, 2, 3, 32, dtype=dtype)
    expected, expected_lse = reference(query, key, value, columns, 0.3)
    for config in configs:
        _tuned.configs = [config]
        got, lse = split.split_attention(query, key, value, columns, 0.3)
        out[f"{dtype} {config.kwargs} warps {config.num_warps}"] = {
            "splits": split.splits_for(6, 150),
            "error": ((got.double() - expected).abs().max() / expected.abs().max()).item(),
            "lse_error": (lse.double() - expected_lse).abs().max().item(),
            "dtype": str(got.dtype),
        }
_tuned.configs = CONFIGS[:1]  # Triton's autotuner times configs on a GPU only

# Beside a shared prefix: the split kernel's log-sum-exp joins the prefix's as one softmax.
from model.attention import prefix_attention, split_prefix_attention
query = torch.randn(2, 6, 1, 16, dtype=torch.float64)
key, value = (torch.randn(2, 2, 64, 16, dtype=torch.float64) for _ in range(2))
mask = torch.zeros(2, 1, 1, 64, dtype=torch.float64)
mask[1, ..., 9:] = torch.finfo(torch.float64).min
prefix_keys, prefix_values = (torch.randn(2, 32, 16, dtype=torch.float64) for _ in range(2))
prefix_mask = torch.zeros(32, dtype=torch.float64)
prefix_mask[20:] = torch.finfo(torch.float64).min
args = (query, key, value, mask, prefix_keys, prefix_values, prefix_mask, 0.25)
ran.clear()
joined = split_prefix_attention(*args, columns=torch.tensor([64, 9]))
out["prefix_error"] = (joined - prefix_attention(*args)).abs().max().item()
out["prefix_split_ran"] = len(ran)

# Compiled as the decode step is (fullgraph, a symbolic span, inductor), each row's new key and value
# written into its slot first (model.slot_cache.SlotLayer.update): the op stays one call, and reads the
# slots where they lie, not a copy of them or of the step's span.
slots = [torch.randn(4, 2, 64, 16) for _ in range(2)]
def step(query, new, columns, span):
    rows = torch.arange(2)
    for s in slots:
        s[rows, :, columns - 1] = new
    key, value = (s[:2, :, :span] for s in slots)
    return attention.own_columns_attention(query * 2, key, value, columns, 0.25)[0] + 1
query, new, columns = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 16), torch.tensor([5, 40])
ran.clear()
got = torch.compile(step, fullgraph=True, dynamic=True)(query, new, columns, 48)
out["compiled_reads_slots_in_place"] = ran == [slots[0].data_ptr()]
out["compiled_wrote_slots"] = torch.equal(slots[0][1, :, 39], new[1])
attention.FEW_ROWS_KERNEL = "sdpa"
out["compiled_error"] = (got - step(query, new, columns, 48)).abs().max().item()
attention.FEW_ROWS_KERNEL = "split"

# The engine: rows of three lengths through 2 slots (refilled), on the tiny checkpoint in float64, against
# the default attention (the step's span, masked).
from model.checkpoint import CheckpointSpec
from model.engine import EngineOptions, SynthesisEngine
from model.tiny import build_tiny_checkpoint
from tests.test_engine import requests_of_mixed_lengths
kernel_grid.MIN_PROGRAMS = 4  # 2 splits a row of one slot: fewer programs for the interpreter to run
spec = CheckpointSpec(source=str(build_tiny_checkpoint(tempfile.mkdtemp())), device="cpu", dtype="float64")
loaded = SynthesisEngine.from_spec(spec, EngineOptions()).checkpoint
rows = requests_of_mixed_lengths()[:3]
def codes(few_rows_kernel):
    attention.FEW_ROWS_KERNEL = few_rows_kernel
    engine = SynthesisEngine(loaded, EngineOptions(max_batch_size=2))
    got = [r.audio_codes.tolist() for r in engine.generate(rows)]
    return got, engine._decode_step.own_columns
ran.clear()
expected, _ = codes("sdpa")
out["engine_default_ran"] = len(ran)
got, own_columns = codes("split")
out["engine_split_ran"] = len(ran)
out["engine_own_columns"] = own_columns
out["engine_same_codes"] = got == expected
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    return interpreted(INTERPRETED)


def test_every_block_size_gives_attention_over_each_rows_columns_and_its_log_sum_exp(results):
    kernel = {key: value for key, value in results.items() if key.startswith("torch.")}
    assert len(kernel) == len(CONFIGS) + 1
    for key, measured in kernel.items():
        assert measured["splits"] == 4
        if "float64" in key:
            assert measured["error"] < 1e-12 and measured["lse_error"] < 1e-12, key
        else:  # the output rounded to bfloat16; sums in float32
            assert measured["dtype"] == "torch.bfloat16"
            assert measured["error"] < 2**-7 and measured["lse_error"] < 1e-5, key


def test_a_shared_prefix_joins_the_split_kernels_rows_as_one_softmax(results):
    assert results["prefix_split_ran"] == 1
    assert results["prefix_error"] < 1e-6  # the join takes each part in float32


def test_a_compiled_step_calls_the_kernel_on_the_slots_in_place(results):
    assert results["compiled_reads_slots_in_place"] and results["compiled_wrote_slots"]
    assert results["compiled_error"] < 1e-5


def test_the_engine_gives_the_same_codes_with_few_rows_read_through_the_split_kernel(results):
    assert results["engine_default_ran"] == 0
    assert results["engine_split_ran"] > 0 and results["engine_own_columns"]
    assert results["engine_same_codes"]


def test_few_rows_use_the_split_kernel_only_where_chosen_and_triton_runs(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not attention.reads_own_columns(1, cuda)  # FEW_ROWS_KERNEL "sdpa" by default
    monkeypatch.setattr("model.attention.FEW_ROWS_KERNEL", "split")
    assert attention.reads_own_columns(1, cuda)
    assert attention.reads_own_columns(attention.MIN_OWN_COLUMNS_SLOTS - 1, cuda)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not attention.reads_own_columns(1, cpu)


def test_one_row_is_cut_into_enough_splits_for_every_sm():
    assert splits_for(1 * 8, 1024) == 32  # one row of the release's 8 key/value heads: 256 programs
    assert splits_for(8 * 8, 1024) == 4
    assert splits_for(64 * 8, 1024) == 1
    assert splits_for(1 * 8, 16) == 16  # never more splits than columns
    assert splits_for(1, 4096) == 64  # at most MAX_SPLITS


def test_both_kernels_build_for_hopper_with_16_byte_loads_and_nothing_spilled():
    # The release's heads (8 key/value heads of 128, 3 query heads each), one row's 32 splits, bfloat16; the
    # join at the most splits, all held at once.
    pointers = ("q_ptr", "k_ptr", "v_ptr", "columns_ptr", "part_out_ptr", "part_lse_ptr")
    signature = dict(zip(pointers, ("*bf16", "*bf16", "*bf16", "*i32", "*fp32", "*fp32"), strict=True))
    signature |= {"scale": "fp32", "stride_row": "i32", "stride_head": "i32"}
    constants = {"KV_HEADS": 8, "GROUPS": 3, "D": 128, "SPLITS": 32, "BLOCK_G": 16}
    constants["PRECISION"] = "tf32"
    builds = [hopper_build(_attend_splits, signature, constants, config) for config in CONFIGS]
    join = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
    join_constants = {"GROUPS": 3, "D": 128, "SPLITS": MAX_SPLITS, "BLOCK_G": 4}  # the most it holds
    builds.append(hopper_build(_join_splits, join, join_constants, triton.Config({}, num_warps=JOIN_WARPS)))
    for ptx, usage in builds[:-1]:
        # Keys and values: each thread loads 16 contiguous bytes (8 of a column's 128 bfloat16s) at once.
        assert re.search(r"ld\.global(\.\S+)?\.v4\.b32", ptx), usage
        assert "mma" in ptx  # scores and sums on the tensor cores
    for _, usage in builds:
        assert re.search(r"\bLOCAL:0\b", usage) and re.search(r"\bSTACK:0\b", usage), usage
