"""The GPU's one-row int8 product (model.int8_matvec): run through Triton's interpreter on this CPU (in a
subprocess, since the interpreter is chosen when Triton is imported), and built for a Hopper GPU."""

import re

import pytest

from tests.triton_kernels import hopper_build, interpreted


def test_every_block_config_gives_the_rows_product_with_the_int8_weights():
    # Channel and feature counts that no config's blocks divide, so every mask is partial somewhere; float32
    # shows the indexing (only the sum's order differs), bfloat16 the rounding (the CPU path's, within an ulp
    # or two of the result).
    errors = interpreted(
        """
import json, torch
from model.int8_matvec import CONFIGS, _matvec, grid
from model.int8_weights import one_row_product, quantize
torch.manual_seed(0)
out = {}
for n, k, dtype in ((37, 1500, torch.float32), (70, 3072, torch.bfloat16)):
    q, scale = quantize(torch.randn(n, k, dtype=dtype))
    x = torch.randn(k, dtype=dtype)
    expected = one_row_product(x, q, scale)
    for c in CONFIGS:
        got = x.new_empty(n)
        _matvec[grid(n)](x, q, scale, got, n, k, num_warps=c.num_warps, **c.kwargs)
        key = f"{dtype} {c.kwargs} warps {c.num_warps} stages {c.num_stages}"
        out[key] = ((got.float() - expected.float()).abs().max() / expected.abs().max()).item()
print(json.dumps(out))
"""
    )
    assert len(errors) == 16
    for key, relative in errors.items():
        assert relative < (1e-6 if "float32" in key else 2**-6), key


def test_the_op_compiles_into_a_whole_graph_with_its_input_computed_around_it():
    # As in the compiled decode step: dynamo traces the op (its fake gives the shape) with no graph break,
    # and inductor's code computes the op's input, calls the op and adds after it.
    result = interpreted(
        """
import json, torch
import torch.nn.functional as F
from model.int8_matvec import CONFIGS, _tuned, int8_matvec
from model.int8_weights import one_row_product, quantize
_tuned.configs = CONFIGS[:1]  # Triton's autotuner times configs on a GPU only
torch.manual_seed(0)
q, scale = quantize(torch.randn(48, 256))
def step(x):
    return int8_matvec((F.silu(x) * 2).reshape(-1), q, scale).view(1, 1, -1) + 1
x = torch.randn(1, 1, 256)
got = torch.compile(step, fullgraph=True)(x)
expected = one_row_product(F.silu(x) * 2, q, scale) + 1
print(json.dumps({"shape": list(got.shape), "error": (got - expected).abs().max().item()}))
"""
    )
    assert result["shape"] == [1, 1, 48]
    assert result["error"] < 1e-4


def hopper_build_of(config, k: int) -> tuple[str, str]:
    """The kernel built for an H100/H200 for `k` input features, with `config`'s block sizes."""
    from model.int8_matvec import _matvec

    signature = {"x_ptr": "*bf16", "w_ptr": "*i8", "scale_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32"}
    return hopper_build(_matvec, signature, {"K": k}, config)


@pytest.mark.parametrize("k", [3072, 8192])  # the release's input features: hidden and MLP widths
def test_every_block_config_builds_for_hopper_with_16_byte_weight_loads_unrolled_and_nothing_spilled(k):
    # A kernel that fails to build, or spills, shows only on a GPU, whose time is scarce: built here, each
    # config's weight loads are 16-byte vectors marked to leave the cache first, written out for every chunk
    # (the walk unrolled, so they can be in flight together), and nothing goes to local memory.
    from model.int8_matvec import CONFIGS

    for config in CONFIGS:
        ptx, usage = hopper_build_of(config, k)
        weight_loads = re.findall(r"ld\.global\.L1::evict_first\S*", ptx)
        assert all(load.endswith(".v4.b32") for load in weight_loads), (config, weight_loads)
        assert len(weight_loads) >= k // config.kwargs["BLOCK_K"], (config, len(weight_loads))
        assert re.search(r"\bLOCAL:0\b", usage) and re.search(r"\bSTACK:0\b", usage), (config, usage)
