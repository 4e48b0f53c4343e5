"""RMSNorm in one fused kernel instead of eight.

transformers' HiggsAudioV2RMSNorm runs as eight elementwise kernels (cast, pow, mean, add, rsqrt, mul, cast,
mul), and a decode step runs 57 of them: ~450 of the ~600 small kernels a step of the release launches at
batch 1, where launching and draining kernels costs more than the arithmetic. torch's rms_norm does the
normalisation in one kernel on a GPU (aten::_fused_rms_norm); on a CPU it decomposes into the same
operations as transformers', so results there are bit for bit the same (tests/test_rms_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.forward_override import override_forward


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # As transformers does: normalise in float32 (whatever the input's dtype), scale in the input's dtype.
    normed = F.rms_norm(
        hidden_states.to(torch.float32), (hidden_states.shape[-1],), eps=self.variance_epsilon
    )
    return self.weight * normed.to(hidden_states.dtype)


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def use_fused_rms_norms(model: torch.nn.Module, fused: bool = True) -> int:
    """Run every RMSNorm of `model` fused (or, with fused=False, as transformers wrote it again).
    Returns how many there are."""
    norms = [m for m in model.modules() if _is_rms_norm(m)]
    for norm in norms:
        override_forward(norm, _fused_forward if fused else None)
    return len(norms)
