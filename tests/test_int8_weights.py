"""Int8 weights for one request at a time: a decode step's products close to the model's own, prefill's exactly
the model's, reversible, and only where they pay (compiled, one row a batch)."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.engine import EngineOptions, SynthesisEngine
from model.fused_projections import use_fused_projections
from model.int8_weights import quantize, use_int8_weights
from tests.helpers import compile_with_backend
from tests.test_engine import clone


def test_an_int8_weight_is_within_half_a_step_of_its_channel_of_the_original():
    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different scales
    q, scale = quantize(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_one_rows_projection_is_the_product_with_the_int8_weights_and_prefills_with_the_originals():
    # On a CPU a decode step's one row goes through a multiply-and-sum (a GPU's through model.int8_matvec);
    # prefill's rows through the original weights' matrix product.
    linear = torch.nn.Linear(48, 64, bias=False)
    rows = torch.randn(5, 1, 48)
    assert use_int8_weights(SimpleNamespace(model=SimpleNamespace(layers=[linear]))) == 1
    with torch.no_grad():
        expected = rows[:1] @ (linear.int8_weight.float() * linear.int8_scale[:, None]).T
        torch.testing.assert_close(linear(rows[:1]), expected)  # one row
        assert torch.equal(linear(rows), F.linear(rows, linear.weight))  # five


def prompt_logits(engine: SynthesisEngine) -> torch.Tensor:
    """The audio logits of a voice-cloning prompt's prefill."""
    input_ids, codes = engine.prepare(clone(1))
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([input_ids]), audio_input_ids=codes[None]).logits


def one_row_logits(engine: SynthesisEngine) -> torch.Tensor:
    """The logits of one token's forward, whose projections each take one row, as a decode step's do."""
    input_ids, _ = engine.prepare(clone(1))
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([input_ids[:1]])).logits


def test_int8_weights_keep_one_rows_logits_within_2_percent_and_switch_back_to_the_originals(engine):
    model = engine.model
    own = one_row_logits(engine)
    try:
        # Every projection of every decoder layer: attention's four, the text and the audio MLP's three each.
        assert use_int8_weights(model) == model.config.num_hidden_layers * 10
        int8 = one_row_logits(engine)
    finally:
        use_int8_weights(model, on=False)
    assert 0 < (int8 - own).abs().max() < 0.02 * own.abs().max()
    assert torch.equal(one_row_logits(engine), own)


def test_a_prompts_prefill_with_int8_weights_gives_the_models_own_logits(engine):
    own = prompt_logits(engine)
    try:
        use_int8_weights(engine.model)
        int8 = prompt_logits(engine)
    finally:
        use_int8_weights(engine.model, on=False)
    assert torch.equal(int8, own)


def test_one_request_decodes_through_the_compiled_step_with_int8_weights(tiny_checkpoint, monkeypatch):
    # Dynamo traces the step whole with the int8 projections in it, as on a GPU; inductor's lowering (where
    # their conversion fuses into the matrix-vector products) is the GPU's to measure (bench_gpu.py).
    compile_with_backend(monkeypatch, "eager")
    from model.checkpoint import CheckpointSpec

    int8 = SynthesisEngine.from_spec(
        CheckpointSpec(source=tiny_checkpoint, device="cpu"),  # a model of its own: int8 stays switched on
        EngineOptions(max_batch_size=1, compile=True, int8_weights=True),
    )
    (result,) = int8.generate([replace(clone(1), max_new_tokens=20)])
    assert result.ok, result.error
    assert int8._decode_step.compiled
    assert int8.model.model.layers[0].audio_mlp.down_proj.int8_weight.dtype == torch.int8
    assert result.audio_codes.shape == (8, result.generated_frames)
    assert len(result.waveform) == result.generated_frames * 960 and np.isfinite(result.waveform).all()


def test_a_fused_projections_int8_weights_are_its_parts_rows_held_once(tiny_checkpoint):
    from model.checkpoint import CheckpointSpec, load_checkpoint

    model = load_checkpoint(CheckpointSpec(source=tiny_checkpoint, device="cpu")).model
    use_fused_projections(model)
    layers = model.model.layers
    separate = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    assert use_int8_weights(model) == model.config.num_hidden_layers * (10 + 3)  # q/k/v, two gate/up

    qkv = layers[0].self_attn.fused_qkv
    int8, scale = quantize(qkv.weight)
    assert torch.equal(qkv.int8_weight, int8) and torch.equal(qkv.int8_scale, scale)
    for part in qkv.parts:
        assert part.int8_weight.untyped_storage().data_ptr() == qkv.int8_weight.untyped_storage().data_ptr()
    int8_storages = {
        m.int8_weight.untyped_storage().data_ptr(): m.int8_weight.untyped_storage().nbytes()
        for m in layers.modules()
        if hasattr(m, "int8_weight")
    }
    fused = sum(m.weight.numel() for m in layers.modules() if hasattr(m, "parts"))
    assert sum(int8_storages.values()) == separate - fused  # one int8 byte a weight, none held twice


def test_fused_projections_in_int8_give_the_same_codes_as_int8_alone(tiny_checkpoint, monkeypatch):
    compile_with_backend(monkeypatch, "eager")
    from model.checkpoint import CheckpointSpec

    codes = []
    for fused in (False, True):
        engine = SynthesisEngine.from_spec(
            CheckpointSpec(source=tiny_checkpoint, device="cpu"),
            EngineOptions(max_batch_size=1, compile=True, int8_weights=True, fused_projections=fused),
        )
        (result,) = engine.generate([replace(clone(1), max_new_tokens=20)])
        assert result.ok, result.error
        codes.append(result.audio_codes)
    qkv = engine.model.model.layers[0].self_attn.fused_qkv
    assert "forward" in qkv.__dict__ and qkv.int8_weight.dtype == torch.int8  # the stacked int8 weights ran
    assert codes[0].shape[1] > 0
    np.testing.assert_array_equal(codes[0], codes[1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile": False, "max_batch_size": 1}, "needs generation.engine.compile=true"),
        ({"compile": True, "max_batch_size": 8}, "runtime.batch_size=1"),
        ({"compile": True, "max_batch_size": 0}, "runtime.batch_size=1"),  # auto
    ],
)
def test_int8_weights_anywhere_but_one_compiled_row_a_batch_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(int8_weights=True, **options)
