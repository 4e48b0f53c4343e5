"""The fixed-shape KV cache the decode loop runs on (and CUDA graphs replay on a GPU): same codes as the
plain DynamicCache path, rows packed to the front of their slots, slots reused."""

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.decode_step import DecodeStep, bucket_for, compile_options
from model.engine import EngineOptions, SynthesisEngine
from model.slot_cache import SPARE_COLUMNS, SlotCache, round_up
from model.speech_length import estimate_seconds
from tests.helpers import compile_with_backend
from tests.test_engine import clone, requests_of_mixed_lengths, smart


def codes(engine: SynthesisEngine, rows) -> list[np.ndarray]:
    return [r.audio_codes for r in engine.generate(rows)]


def rows_ending_both_ways() -> list:
    """Rows that stop at max_new_tokens and rows that stop on stream-eos, between the engine's looks."""
    return requests_of_mixed_lengths() + [smart(i, max_new_tokens=200) for i in range(20, 26)]


def test_some_rows_end_on_eos_before_max_new_tokens(engine):
    frames = [r.generated_frames for r in engine.generate(rows_ending_both_ways()[-6:])]
    assert any(n % 8 and n < 200 - 8 for n in frames), frames


def test_a_result_says_whether_the_model_ended_it_or_max_new_tokens_cut_it_off(engine):
    results = engine.generate(rows_ending_both_ways()[-6:])
    # 200 steps: the opening bos frame and the 7-step staircase leave 192 frames to a row never ended.
    assert {r.finish_reason for r in results if r.generated_frames < 192 - 7} == {"eos"}
    fixed = SynthesisEngine(engine.checkpoint, EngineOptions(ignore_eos=True))
    assert {r.finish_reason for r in fixed.generate(rows_ending_both_ways()[-2:])} == {"max_new_tokens"}


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("refill", [True, False])
def test_the_static_cache_gives_the_same_codes_as_the_dynamic_cache(engine, temperature, refill):
    rows = [replace(r, temperature=temperature) for r in rows_ending_both_ways()]
    dynamic = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, static_cache=False))
    static = SynthesisEngine(
        engine.checkpoint, EngineOptions(max_batch_size=3, static_cache=True, refill=refill)
    )
    for a, b in zip(codes(dynamic, rows), codes(static, rows), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_static_cache_matches_one_request_at_a_time_on_the_dynamic_cache(engine):
    rows = rows_ending_both_ways()
    alone = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1, static_cache=False))
    batched = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=8, static_cache=True))
    for a, b in zip(codes(alone, rows), codes(batched, rows), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("static_cache", [True, False], ids=["slots", "dynamic"])
def test_rows_prefilled_ahead_of_their_slots_give_the_same_codes(engine64, monkeypatch, static_cache):
    from model.batch_state import DynamicBatch
    from tests.test_engine import rows_finishing_one_by_one

    taken = []
    take = DynamicBatch.take
    monkeypatch.setattr(DynamicBatch, "take", lambda self, n: taken.append(n) or take(self, n))
    rows = rows_finishing_one_by_one(40)
    alone = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1, static_cache=False))
    refilled = SynthesisEngine(
        engine64.checkpoint, EngineOptions(max_batch_size=16, static_cache=static_cache)
    )
    for a, b in zip(codes(alone, rows), codes(refilled, rows), strict=True):
        np.testing.assert_array_equal(a, b)
    assert taken  # some rows waited prefilled while the slots before them freed


def test_a_prefilled_row_lands_at_the_front_of_its_slot(engine):
    short, long = smart(1), clone(2)
    prepared = [engine._prepare(0, short), engine._prepare(1, long)]
    batch = engine._prefill(prepared)  # left-padded to the longer prompt
    n_short, n_long = (len(p.input_ids) for p in prepared)
    assert n_short < n_long

    cache = SlotCache(engine.model.config, 4, 512, torch.float32, torch.device("cpu"))
    assert cache.load([3, 1], batch.cache, batch.attention) == [n_short, n_long]

    padding = n_long - n_short
    source = batch.cache.layers[0].keys
    torch.testing.assert_close(cache.layers[0].keys[3, :, :n_short], source[0, :, padding:])
    torch.testing.assert_close(cache.layers[0].keys[1, :, :n_long], source[1])
    assert cache.mask[3].sum() == n_short and cache.mask[3, :n_short].all()
    assert cache.mask[1].sum() == n_long
    assert cache.write_pos.tolist() == [0, n_long, 0, n_short]


def test_released_slots_are_cleared_and_handed_out_lowest_first():
    from transformers import HiggsAudioV2Config

    config = HiggsAudioV2Config(
        num_hidden_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    cache = SlotCache(config, 4, 16, torch.float32, torch.device("cpu"))
    assert cache.allocate(3) == [0, 1, 2]
    cache.mask[1, :5] = True
    cache.write_pos[1] = 5
    cache.release([1])
    assert cache.write_pos[1] == 0 and cache.mask[1].tolist() == [True] + [False] * (15 + SPARE_COLUMNS)
    assert cache.allocate(2) == [1, 3]
    assert cache.free == 0
    with pytest.raises(RuntimeError, match="free slots"):
        cache.allocate(1)


def test_decode_buckets_are_powers_of_two_from_two_rows_capped_by_the_slot_count():
    assert [bucket_for(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [2, 2, 4, 8, 32, 48, 48]
    assert bucket_for(1, 1) == 1


def test_one_cache_serves_successive_batches_of_similar_length(engine):
    fast = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, reserve="max_new_tokens"))
    fast.generate([smart(i) for i in range(4)])
    first = fast._decode_step
    fast.generate([smart(i + 10) for i in range(3)])
    assert fast._decode_step is first
    fast.generate([smart(1, max_new_tokens=900)])  # needs a longer slot: a new cache
    assert fast._decode_step is not first and fast._decode_step.cache.length >= 900


def test_rows_left_behind_are_packed_into_the_lowest_slots(engine, monkeypatch):
    from model.decode_step import DecodeStep

    buckets = []
    original = DecodeStep.__call__
    monkeypatch.setattr(
        DecodeStep, "__call__", lambda self, rows, *a: buckets.append(rows) or original(self, rows, *a)
    )
    fast = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=8, ignore_eos=True))
    rows = [smart(i, max_new_tokens=12) for i in range(6)] + [smart(i, max_new_tokens=60) for i in (6, 7)]
    results = fast.generate(rows)
    assert [r.generated_frames for r in results] == [4] * 6 + [52] * 2
    # 12 steps with all eight rows, then the two long rows step on in slots 0 and 1.
    assert buckets[:12] == [8] * 12 and set(buckets[12:]) == {2}


def test_a_compiled_decode_step_gives_the_same_codes(engine, monkeypatch):
    # Traced whole (fullgraph, dynamic shapes) and the slot cache's in-place updates functionalized, as on a
    # GPU, but not lowered by inductor: its CPU kernels are torch's to test and are not the GPU's Triton
    # ones, and lowering them took 97 s with a cold cache, as CI has (44 s so), when the step compiled 3 times.
    compile_with_backend(monkeypatch, "aot_eager")
    rows = [replace(r, temperature=0.9) for r in rows_ending_both_ways()]
    eager = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3))
    compiled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, compile=True))
    for a, b in zip(codes(eager, rows), codes(compiled, rows), strict=True):
        np.testing.assert_array_equal(a, b)
    assert compiled._decode_step.compiled  # compiled, not fallen back to the eager step


def test_a_compiled_step_is_traced_once_however_its_batch_shrinks_and_its_span_grows(engine, monkeypatch):
    # Every trace is a compilation: minutes with inductor on a GPU, in the middle of a call.
    graphs = []
    compile_with_backend(monkeypatch, lambda graph, inputs: graphs.append(graph) or graph.forward)
    steps = []
    run = DecodeStep._run

    def watched(self, b, span, *rest):
        steps.append((b, span, self.cache.length))
        return run(self, b, span, *rest)

    monkeypatch.setattr(DecodeStep, "_run", watched)
    SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, compile=True)).generate(
        rows_ending_both_ways()
    )

    assert {b for b, _, _ in steps} == {2, 3}  # down to the last row of a call, in a bucket of 2
    assert {span == length for _, span, length in steps} == {True, False}  # spans of whole slots and of less
    assert len(graphs) == 1


def cache_of(device: str, slots: int) -> SimpleNamespace:
    """What compile_options reads of a SlotCache."""
    return SimpleNamespace(mask=SimpleNamespace(device=torch.device(device)), slots=slots)


def test_only_a_one_slot_step_on_a_gpu_compiles_with_coordinate_descent_tuning():
    assert compile_options(cache_of("cuda", 1)) == {"options": {"coordinate_descent_tuning": True}}
    assert compile_options(cache_of("cuda", 2)) == {}
    assert compile_options(cache_of("cpu", 1)) == {}


def test_a_one_slot_step_compiles_untuned_where_tuning_is_switched_off(monkeypatch):
    # bench_gpu's compiled_int8_untuned: inductor's default block sizes, a far shorter compilation.
    monkeypatch.setattr("model.decode_step.TUNE_ONE_SLOT", False)
    assert compile_options(cache_of("cuda", 1)) == {}


def test_a_step_that_failed_to_compile_is_rebuilt_without_compiling_again(engine, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    compiles = []

    def failing_compile(fn, **options):
        compiles.append(fn)

        def step(*args):
            raise TorchDynamoException("Triton rejected a kernel")

        return step

    monkeypatch.setattr(torch, "compile", failing_compile)
    fast = SynthesisEngine(
        engine.checkpoint, EngineOptions(max_batch_size=2, compile=True, reserve="max_new_tokens")
    )
    first = fast.generate([smart(0)])
    assert first[0].ok and fast._decode_step.compile_failed  # fell back to the uncompiled step
    failed = fast._decode_step
    fast.generate([smart(1, max_new_tokens=600)])  # a longer slot: a new decode step
    assert fast._decode_step is not failed
    assert len(compiles) == 1 and not fast._decode_step.compiled


def test_rows_after_a_shared_prefix_land_in_order_at_the_front_of_their_slots(engine):
    prepared = [
        engine._prepare(0, clone(1)),
        engine._prepare(1, replace(clone(2), text="A longer clone text.")),
    ]
    batch = engine._prefill(prepared)  # the shared prefix, then padding, then each row's own tokens
    shared = engine._shared_prefix(prepared)
    assert shared > 0 and not batch.attention[0].all()

    cache = SlotCache(engine.model.config, 2, 512, torch.float32, torch.device("cpu"))
    counts = cache.load([0, 1], batch.cache, batch.attention)
    assert counts == [len(p.input_ids) for p in prepared]
    for row in range(2):
        real = batch.attention[row].bool()
        torch.testing.assert_close(
            cache.layers[0].keys[row, :, : counts[row]], batch.cache.layers[0].keys[row][:, real]
        )


def test_a_step_attends_only_to_the_columns_in_use_not_the_whole_slot(engine):
    # max_new_tokens=2048 reserves slots of 2,304 columns; rows that stop on their own use a few hundred.
    rows = [replace(smart(i), max_new_tokens=2048) for i in range(3)]
    fast = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, reserve="max_new_tokens"))
    spans: list[int] = []
    original = fast._slots

    def watched(*args):
        step = original(*args)
        real = step._step
        step._step = lambda b, span, *rest: (spans.append(span), real(b, span, *rest))[1]
        return step

    fast._slots = watched
    got = codes(fast, rows)
    assert fast._decode_step.cache.length >= 2048
    assert spans and max(spans) <= 512 and set(spans) <= {256, 512}

    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, static_cache=False))
    for a, b in zip(codes(plain, rows), got, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- slots sized by the text's estimated length -----------------------------------------------------


def test_rows_run_on_past_their_reserve_while_their_slot_has_room_and_run_again_beyond_it(engine):
    rows = [smart(i, max_new_tokens=600) for i in range(20, 36)]
    whole = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, reserve="max_new_tokens"))
    # 40 frames: slots of 256 columns for these 59-token prompts, room for ~190 frames a row.
    tight = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, reserve=40))
    outgrown = []
    check = tight._outgrew
    tight._outgrew = lambda item, frames: check(item, frames) and not outgrown.append(item.request.id)
    expected, got = whole.generate(rows), tight.generate(rows)
    frames = {r.id: r.generated_frames for r in expected}
    assert (frames["smart20"], frames["smart35"]) == (110, 385)  # both end on stream-eos
    assert "smart35" in outgrown and "smart20" not in outgrown
    assert all(frames[i] > 150 for i in outgrown)
    for a, b in zip(expected, got, strict=True):
        assert (a.id, a.finish_reason, a.generated_frames) == (b.id, b.finish_reason, b.generated_frames)
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_a_slot_reserves_the_texts_estimated_length_rather_than_max_new_tokens(engine):
    row = replace(smart(1), max_new_tokens=2048)
    estimated = SynthesisEngine(engine.checkpoint, EngineOptions())
    whole = SynthesisEngine(engine.checkpoint, EngineOptions(reserve="max_new_tokens"))
    prepared = estimated._prepare(0, row)
    # Its speech at the codec's 25 frames/s, then the bos frame and the 8-codebook staircase.
    assert prepared.reserve == math.ceil(estimate_seconds(row.text) * 25) + 1 + 8 < 256
    assert estimated._slot_length([prepared]) == 256
    assert whole._slot_length([whole._prepare(0, row)]) == round_up(len(prepared.input_ids) + 2048)


def test_an_estimate_over_half_of_max_new_tokens_reserves_all_of_it(engine):
    estimated = SynthesisEngine(engine.checkpoint, EngineOptions())
    row = replace(smart(1), max_new_tokens=300)  # an estimated 188 steps would save too little
    assert estimated._prepare(0, row).reserve == 300


def test_rows_that_ignore_eos_reserve_their_whole_max_new_tokens(engine):
    fixed = SynthesisEngine(engine.checkpoint, EngineOptions(ignore_eos=True))
    assert fixed._prepare(0, replace(smart(1), max_new_tokens=2048)).reserve == 2048


def test_a_reserve_never_exceeds_max_new_tokens(engine):
    counted = SynthesisEngine(engine.checkpoint, EngineOptions(reserve=500))
    assert counted._prepare(0, replace(smart(1), max_new_tokens=300)).reserve == 300
    assert counted._prepare(0, replace(smart(1), max_new_tokens=2048)).reserve == 500 + 1 + 8


def one_voice_rows() -> list:
    """Rows of one reference voice whose own texts differ in length, more rows than slots (refill)."""
    return [replace(clone(i), text=f"Row {i} adds its own words." * (1 + i % 3)) for i in range(7)]


@pytest.fixture
def prefix_from_4_rows(monkeypatch):
    """A call keeps its shared prefix once from 4 rows decoding together (128 on a real run)."""
    monkeypatch.setattr("model.engine.MIN_PREFIX_CACHE_ROWS", 4)


def test_a_call_of_one_voice_keeps_the_shared_prefix_once_and_gives_the_same_codes(
    engine64, prefix_from_4_rows
):
    rows = one_voice_rows()
    plain = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4, shared_prefix_cache=False))
    once = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    expected, got = codes(plain, rows), codes(once, rows)

    shared = once._shared_prefix([once._prepare(i, r) for i, r in enumerate(rows)])
    cache = once._decode_step.cache
    assert shared > 0 and cache.prefix_tokens == shared
    # The slots hold each row's own tokens only: shorter slots, less memory for the same rows.
    assert cache.length < plain._decode_step.cache.length
    assert cache.nbytes < plain._decode_step.cache.nbytes
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fewer_slots_than_min_prefix_cache_rows_keep_whole_prompts(engine64):
    # The release's threshold, 128 rows: below it, reading the prefix apart costs more than it saves.
    small = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    codes(small, one_voice_rows())
    assert small._decode_step.cache.prefix_tokens == 0


def test_a_call_of_fewer_rows_than_min_prefix_cache_rows_keeps_whole_prompts(engine64, monkeypatch):
    monkeypatch.setattr("model.engine.MIN_PREFIX_CACHE_ROWS", 5)
    wide = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=8))
    codes(wide, one_voice_rows()[:4])
    assert wide._decode_step.cache.prefix_tokens == 0
    codes(wide, one_voice_rows())
    assert wide._decode_step.cache.prefix_tokens > 0


def test_a_shared_prefix_that_leaves_the_slots_as_long_keeps_whole_prompts(engine64, prefix_from_4_rows):
    scene = "A long scene: " + "rain on the windows of a quiet wooden house, " * 2
    rows = [smart(i, scene_prompt=scene) for i in range(6)]
    wide = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    prepared = [wide._prepare(i, r) for i, r in enumerate(rows)]
    shared = wide._shared_prefix(prepared)
    assert shared > 0 and wide._slot_length(prepared, shared) == wide._slot_length(prepared)
    codes(wide, rows)
    assert wide._decode_step.cache.prefix_tokens == 0


def test_a_call_mixing_voices_keeps_no_shared_prefix_and_gives_the_same_codes(engine64, prefix_from_4_rows):
    rows = [*one_voice_rows()[:3], smart(1), smart(2)]
    plain = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4, shared_prefix_cache=False))
    once = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    expected, got = codes(plain, rows), codes(once, rows)
    assert once._decode_step.cache.prefix_tokens == 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_reused_cache_takes_the_next_calls_prefix(engine64, prefix_from_4_rows):
    once = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    first = codes(once, one_voice_rows()[:4])
    step = once._decode_step
    scene = [replace(r, scene_prompt="A quiet room.") for r in one_voice_rows()[:4]]  # another shared prefix
    codes(once, scene)
    assert once._decode_step is step  # the same slots, now behind the other prefix
    alone = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1))
    for a, b in zip(codes(alone, one_voice_rows()[:4]), first, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(codes(alone, scene), codes(once, scene), strict=True):
        np.testing.assert_array_equal(a, b)


def read_own_columns_alone(monkeypatch) -> None:
    """Each row's own columns read alone (OWN_KERNEL "varlen") in caches of any size (from 128 slots on a
    real run); the tests' expected codes come before, from whole spans."""
    monkeypatch.setattr("model.attention.OWN_KERNEL", "varlen")
    monkeypatch.setattr("model.attention.MIN_OWN_COLUMNS_SLOTS", 1)


@pytest.mark.parametrize(("slots", "own_columns"), [(3, False), (4, True)])
def test_each_rows_own_columns_are_read_alone_from_min_own_columns_slots(
    engine64, monkeypatch, slots, own_columns
):
    monkeypatch.setattr("model.attention.MIN_OWN_COLUMNS_SLOTS", 4)
    engine = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=slots))
    codes(engine, requests_of_mixed_lengths()[:slots])
    assert engine._decode_step.cache.slots == slots
    assert engine._decode_step.own_columns == own_columns


@pytest.mark.parametrize("kernel", ["efficient", "varlen", "bmm"])
def test_own_columns_read_apart_from_the_shared_prefix_give_the_same_codes(
    engine64, prefix_from_4_rows, monkeypatch, kernel
):
    # efficient: sdpa's fused kernel over the step's span; varlen: each row's columns in use only; bmm: matrix
    # products over the step's span. Against the step's span read whole, the prefix in every slot.
    rows = one_voice_rows()
    whole = EngineOptions(max_batch_size=4, shared_prefix_cache=False)
    expected = codes(SynthesisEngine(engine64.checkpoint, whole), rows)
    monkeypatch.setattr("model.attention.OWN_KERNEL", kernel)
    monkeypatch.setattr("model.attention.MIN_OWN_COLUMNS_SLOTS", 1)  # 128 on a real run
    split = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    got = codes(split, rows)
    assert split._decode_step.cache.prefix_tokens > 0
    assert split._decode_step.own_columns == (kernel == "varlen")
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_refilled_rows_reading_only_their_own_columns_give_the_same_codes(engine64, monkeypatch):
    # Rows of many lengths through fewer slots: at every step the slots hold rows at different stages.
    rows = rows_ending_both_ways()
    expected = codes(SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=3)), rows)
    read_own_columns_alone(monkeypatch)
    varlen = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=3))
    got = codes(varlen, rows)
    assert varlen._decode_step.own_columns and varlen._decode_step.cache.prefix_tokens == 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_compiled_step_reading_only_each_rows_own_columns_gives_the_same_codes(engine64, monkeypatch):
    # Traced whole by dynamo and run as traced; test_a_compiled_decode_step_gives_the_same_codes functionalizes
    # the step too, at nearly three times the cost.
    compile_with_backend(monkeypatch, "eager")
    rows = requests_of_mixed_lengths()[:5]
    expected = codes(SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=2)), rows)
    read_own_columns_alone(monkeypatch)
    compiled = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=2, compile=True))
    for a, b in zip(expected, codes(compiled, rows), strict=True):
        np.testing.assert_array_equal(a, b)
    assert compiled._decode_step.compiled


def test_a_slots_columns_in_use_are_always_its_first_ones_up_to_the_column_it_writes(engine, monkeypatch):
    # What the varlen attention reads (slot_columns): the mask's columns, without the mask.
    checked = []
    forward = DecodeStep._forward

    def watched(self, b, span, prefix_span):
        in_use = torch.arange(span) < (self.cache.write_pos[:b, None] + 1)
        checked.append(torch.equal(self.cache.mask[:b, :span], in_use))
        return forward(self, b, span, prefix_span)

    monkeypatch.setattr(DecodeStep, "_forward", watched)
    SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3)).generate(rows_ending_both_ways())
    assert len(checked) > 100 and all(checked)


def prefills_beside(engine: SynthesisEngine, monkeypatch) -> list[int]:
    """Records how many rows running in the slots each refill's prefill ran beside: 0 for one the running
    rows waited for."""
    from model.slot_batch import SlotBatch

    running = []
    advance = SlotBatch.advance
    prefill = engine._prefill

    def advancing(self, engine, then=None):
        running.append(len(self))
        try:
            return advance(self, engine, then)
        finally:
            running.pop()

    monkeypatch.setattr(SlotBatch, "advance", advancing)
    beside: list[int] = []
    monkeypatch.setattr(
        engine,
        "_prefill",
        lambda *a, **kw: beside.append(running[-1] if running else 0) or prefill(*a, **kw),
    )
    return beside


def test_refills_prefilled_while_the_running_rows_decode_give_the_same_codes(engine64, monkeypatch):
    rows = rows_ending_both_ways()
    expected = codes(SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=3)), rows)
    overlapped = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=3, overlap_prefill=True))
    beside = prefills_beside(overlapped, monkeypatch)
    got = codes(overlapped, rows)
    assert beside[0] == 0 and all(beside[1:]), beside  # only the first, into empty slots, runs alone
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_refills_of_one_voice_prefilled_while_the_others_decode_give_the_same_codes(
    engine64, monkeypatch, prefix_from_4_rows
):
    rows = [replace(r, max_new_tokens=6 + 4 * i) for i, r in enumerate(one_voice_rows())]  # ending apart
    expected = codes(SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4)), rows)
    overlapped = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4, overlap_prefill=True))
    beside = prefills_beside(overlapped, monkeypatch)
    got = codes(overlapped, rows)
    assert overlapped._decode_step.cache.prefix_tokens > 0 and any(beside), beside
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_overlap_prefill_the_running_rows_wait_for_each_refills_prefill(engine64, monkeypatch):
    waited = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=3))
    beside = prefills_beside(waited, monkeypatch)
    codes(waited, rows_ending_both_ways())
    assert len(beside) > 1 and not any(beside)


def test_a_refill_whose_prefill_breaks_beside_the_decoding_errors_alone(engine64, monkeypatch):
    from tests.test_engine import break_prefills, smart

    rows = [
        smart(6, max_new_tokens=40),
        smart(7, max_new_tokens=12),
        replace(smart(5, max_new_tokens=12), id="broken"),
    ]
    plain = {
        r.id: r for r in SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1)).generate(rows)
    }
    overlapped = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=2, overlap_prefill=True))
    break_prefills(overlapped, monkeypatch)
    beside = prefills_beside(overlapped, monkeypatch)
    results = {r.id: r for r in overlapped.generate(rows)}
    assert beside[:2] == [0, 1]  # the broken row's prefill ran beside the first row's decoding
    assert "a kernel failed" in results["broken"].error
    for name in ("smart6", "smart7"):
        np.testing.assert_array_equal(results[name].audio_codes, plain[name].audio_codes)
