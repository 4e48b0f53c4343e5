"""Prefill routes text and audio tokens by index lists: transformers' results, one wait for the mask."""

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2DecoderLayer

from model.engine import EngineOptions, SynthesisEngine
from model.token_routing import use_indexed_routing
from tests.test_engine import clone, smart


def rows(engine: SynthesisEngine) -> list:
    """Prepared rows with and without reference audio: a left-padded prefill group."""
    return [engine._prepare(i, r) for i, r in enumerate([clone(1), smart(2), clone(3)])]


def prefill(engine: SynthesisEngine, group: list, indexed: bool):
    use_indexed_routing(engine.model, indexed)
    try:
        with torch.inference_mode():
            return engine._prefill(group)
    finally:
        use_indexed_routing(engine.model)


def test_indexed_routing_gives_transformers_prefill_bit_for_bit(engine):
    group = rows(engine)
    masked, indexed = prefill(engine, group, False), prefill(engine, group, True)
    assert torch.equal(masked.logits, indexed.logits)
    for a, b in zip(masked.cache.layers, indexed.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys)
        assert torch.equal(a.values, b.values)


def mask_selections(engine: SynthesisEngine, indexed: bool) -> int:
    """How many times a prefill forward counts a mask's True entries (aten::nonzero), each a wait on a GPU."""
    group = rows(engine)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prefill(engine, group, indexed)
    return sum(1 for e in prof.events() if e.name == "aten::nonzero")


def test_a_prefill_forward_no_longer_selects_tokens_by_mask_in_every_layer(engine):
    layers = engine.model.config.num_hidden_layers
    assert mask_selections(engine, False) >= 6 * layers
    assert mask_selections(engine, True) <= 1  # the audio embeddings' placement, before the layers


def test_an_engine_routes_its_models_layers_by_index(tiny_checkpoint):
    from model.checkpoint import CheckpointSpec, load_checkpoint

    loaded = load_checkpoint(CheckpointSpec(source=tiny_checkpoint, device="cpu"))
    layers = [m for m in loaded.model.modules() if isinstance(m, HiggsAudioV2DecoderLayer)]
    assert layers and not any("forward" in layer.__dict__ for layer in layers)
    SynthesisEngine(loaded, EngineOptions())
    assert all("forward" in layer.__dict__ for layer in layers)
