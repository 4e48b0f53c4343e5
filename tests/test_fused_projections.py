"""q/k/v and gate/up projections as one matrix product each: the same codes, no extra memory."""

import numpy as np
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2Attention, HiggsAudioV2MLP

from model.engine import EngineOptions, SynthesisEngine
from model.fused_projections import use_fused_projections
from tests.test_engine import clone, requests_of_mixed_lengths


def test_fused_projections_give_the_same_codes(engine64):
    rows = [*requests_of_mixed_lengths(), clone(1), clone(2)]
    plain = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    fused = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4, fused_projections=True))
    expected = plain.generate(rows)
    got = fused.generate(rows)
    assert any("forward" in m.__dict__ for m in fused.model.modules() if isinstance(m, HiggsAudioV2MLP))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def storage_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_the_projections_weights_become_views_into_the_fused_ones(tiny_checkpoint):
    from model.checkpoint import CheckpointSpec, load_checkpoint

    model = load_checkpoint(CheckpointSpec(source=tiny_checkpoint, device="cpu")).model
    before = storage_bytes(model)
    assert use_fused_projections(model) == model.config.num_hidden_layers * 3  # attention, text/audio MLPs
    attention = next(m for m in model.modules() if isinstance(m, HiggsAudioV2Attention))
    mlp = next(m for m in model.modules() if isinstance(m, HiggsAudioV2MLP))
    fused = attention.fused_qkv.weight.untyped_storage().data_ptr()
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert linear.weight.untyped_storage().data_ptr() == fused
    gate_up = mlp.fused_gate_up.weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up
    assert storage_bytes(model) == before  # no weight held twice

    use_fused_projections(model, fused=False)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, HiggsAudioV2Attention))
