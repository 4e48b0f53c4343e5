"""RMSNorm fused into one kernel: the same numbers as transformers' eight-kernel version."""

import pytest
import torch
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2RMSNorm

from model.rms_norm import use_fused_rms_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_fused_rms_norm_gives_transformers_numbers_bit_for_bit_on_cpu(dtype):
    torch.manual_seed(0)
    norm = HiggsAudioV2RMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(64, dtype=dtype)
    x = torch.randn(3, 5, 64, dtype=dtype) * 4
    expected = norm(x)
    holder = torch.nn.Sequential(norm)
    assert use_fused_rms_norms(holder) == 1
    assert norm.forward.__func__.__name__ == "_fused_forward"
    assert torch.equal(norm(x), expected)


def test_fused_norms_can_be_switched_back_to_transformers_own(engine):
    model = engine.model
    count = use_fused_rms_norms(model, fused=False)
    assert count == 2 * model.config.num_hidden_layers * 2 + 1  # text and audio norms per layer, final norm
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    use_fused_rms_norms(model)
    assert all("forward" in m.__dict__ for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
