"""The decoder's projections with int8 weights, a scale per output channel, for one request at a time.

At one row a decode step of the release reads its ~5.7 GB of bf16 weights once, and on an H100 its 197
matrix products alone took 2.7 ms of the compiled step's 4.1 ms (cuBLAS's split-K matrix-vector kernels,
~2.1 TB/s): the 2.67 ms a step that 15x real time allows is gone before anything else runs (GPU runs 5 and
7). Int8 weights halve those bytes. Their dequantization must happen inside the product, not before it: a
dequantized copy per step would read and write more than the bf16 weights. On a GPU a one-row product
runs model.int8_matvec's Triton kernel, which converts each weight in registers; inductor sees it as one
opaque operation, so the step's other kernels still compile and fuse around it (GPU run 9 measured the
alternative: inductor's own reductions over int8, 12.4x real time on an H200 against 15x wanted). On a CPU a
one-row product is written as a multiply-and-sum over the input features, which inductor compiles into one
reduction that reads the int8 weights and converts them as it goes. Eager, that reduction would be
materialized whole: hence SynthesisEngine takes int8 weights only with `compile` and one row a batch
(EngineOptions).

Symmetric rounding per output channel (the largest magnitude maps to 127) changes each weight by at most half
its channel's step, so codes drift from the bf16 model's, as any weight quantization does. The int8 weights
are made once and kept beside the originals (+50 % weight memory), so engines sharing one model may switch
them at each generate call, as with the fused norms and projections. Prefill, whose many rows make its
products bound by arithmetic rather than by the weights' bytes, keeps multiplying by the originals: the
prompt's keys and values are the model's own, and only the decode steps' products are rounded. A projection
model.fused_projections stacked (q/k/v, gate/up) gets its parts' int8 rows stacked the same way, the parts'
now views into it: a layer's seven one-row products become four kernels, and no int8 weight is held twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.forward_override import override_forward
from model.fused_projections import stack_rows

try:
    from model.int8_matvec import int8_matvec
except ImportError:  # Triton comes with torch on Linux only; elsewhere one-row products take the formula
    int8_matvec = None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale per output channel in the weight's dtype): weight ~= int8 * scale[:, None]."""
    full = weight.detach().float()
    scale = full.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(full / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


# Whether a one-row product on a GPU runs model.int8_matvec's Triton kernel (the default) or the
# multiply-and-sum reduction inductor compiles (GPU run 9: 1.0-2.4 of an H200's 4.8 TB/s); bench_gpu's
# `compiled_int8_reduction` mode turns it off.
TRITON_MATVEC = True


def one_row_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A decode step's one row (..., K) times int8 `weight` (N, K) and `scale` (N,): a reduction in float32
    (as inductor's decomposition computes it), the weights converted inside it, then the scale; compiled,
    one kernel. The rounding model.int8_matvec's GPU kernel follows."""
    row = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    return row.to(x.dtype) * scale.to(x.dtype)


def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.shape[:-1].numel() == 1:
        if x.is_cuda and TRITON_MATVEC and int8_matvec is not None:
            out = int8_matvec(x.reshape(-1), self.int8_weight, self.int8_scale)
            return out.view(*x.shape[:-1], -1)
        return one_row_product(x, self.int8_weight, self.int8_scale)  # Triton runs on GPUs only
    # Prefill's many rows: the original weights, kept beside the int8 ones. Its matrix products are bound by
    # their arithmetic, not by reading the weights, so int8 would only add a conversion of every weight (GPU
    # run 9, H200: a 688-token prefill took 45 ms with the converted weights, 28 ms with the originals), and
    # the prompt's keys and values come out as the model's own.
    return F.linear(x, self.weight)


def _prepare(linear: torch.nn.Linear) -> bool:
    if linear.bias is not None:
        return False
    if hasattr(linear, "int8_weight"):
        return True
    parts = getattr(linear, "parts", ())  # a projection model.fused_projections stacked from these
    if not parts:
        linear.int8_weight, linear.int8_scale = quantize(linear.weight)
        return True
    # Rounding is per output channel, so the parts' int8 rows stacked are the fused weight's, held once.
    for part in parts:
        _prepare(part)
    linear.int8_weight, linear.int8_scale = stack_rows(parts, "int8_weight"), stack_rows(parts, "int8_scale")
    return True


def use_int8_weights(model: torch.nn.Module, on: bool = True) -> int:
    """Run every projection of `model`'s decoder layers (attention and both MLPs; not the embeddings or the
    audio head, ~1 % of the weights) with int8 weights, or with on=False with its own weights again.
    Returns how many run in int8."""
    count = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if type(module) is not torch.nn.Linear:
                continue
            active = on and _prepare(module)
            override_forward(module, _int8_forward if active else None)
            count += active
    return count
