"""The batched engine on the tiny checkpoint: mixed batches, per-row seeds and parameters, errors, cache."""

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.requests import ContextTurn, Reference, SynthesisRequest

VOICES = Path(__file__).resolve().parent.parent / "examples" / "voices"


def voice(name: str) -> Reference:
    return Reference(
        audio=(VOICES / f"{name}.wav").read_bytes(), transcript=(VOICES / f"{name}.txt").read_text()
    )


def smart(i: int, **kw) -> SynthesisRequest:
    kw.setdefault("max_new_tokens", 30)
    return SynthesisRequest(id=f"smart{i}", text=f"Sentence number {i} is spoken here.", seed=i, **kw)


def clone(i: int, **kw) -> SynthesisRequest:
    return SynthesisRequest(
        id=f"clone{i}",
        text=f"Clone {i}.",
        references=[voice("en_woman")],
        seed=100 + i,
        max_new_tokens=30,
        **kw,
    )


def test_a_batch_mixing_requests_with_and_without_references_synthesises_every_row(engine):
    results = engine.generate([smart(1), clone(1), smart(2), clone(2)])
    assert [r.id for r in results] == ["smart1", "clone1", "smart2", "clone2"]
    for r in results:
        assert r.ok, r.error
        assert r.sample_rate == 24000
        assert r.audio_codes.shape[0] == 8
        assert r.waveform.dtype == np.float32
        assert len(r.waveform) == r.generated_frames * 960  # 25 frames/s at 24 kHz
        assert np.isfinite(r.waveform).all()


def test_a_result_carries_token_counts_and_timings(engine):
    (result,) = engine.generate([clone(3)])
    assert result.prompt_tokens > result.audio_codes.shape[1]  # the reference codes are in the prompt
    assert set(result.timings) == {"reference_encode_s", "prefill_s", "decode_s", "vocode_s"}
    assert all(v >= 0 for v in result.timings.values())


def test_each_request_keeps_its_own_max_new_tokens(engine):
    short = replace(smart(4, ras_win_len=0), id="short", max_new_tokens=12, temperature=0.0)
    long = replace(smart(4, ras_win_len=0), id="long", max_new_tokens=40, temperature=0.0)
    a, b = engine.generate([short, long])
    # 8 steps of delay-pattern staircase plus the opening bos frame carry no audio.
    assert a.generated_frames <= 12 - 8
    assert b.generated_frames > a.generated_frames


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_requests_codes_do_not_depend_on_its_batch(engine, temperature):
    target = replace(clone(7), temperature=temperature)
    alone = engine.generate([target])[0].audio_codes
    companions = [smart(i, temperature=0.7) for i in range(3)] + [clone(i) for i in range(20, 23)]
    in_small = engine.generate([companions[0], target, companions[4]])[1].audio_codes
    in_large = engine.generate([*companions, target, *[smart(i) for i in range(30, 39)]])[6].audio_codes
    np.testing.assert_array_equal(alone, in_small)
    np.testing.assert_array_equal(alone, in_large)


def test_smart_voice_codes_do_not_depend_on_their_batch_either(engine):
    target = smart(11, top_k=20, top_p=0.8)
    alone = engine.generate([target])[0].audio_codes
    batched = engine.generate([clone(5), smart(12), target])[2].audio_codes
    np.testing.assert_array_equal(alone, batched)


def test_different_seeds_give_different_audio(engine):
    a, b = engine.generate([replace(smart(1), id="s1", seed=1), replace(smart(1), id="s2", seed=2)])
    assert not np.array_equal(a.audio_codes[:, :4], b.audio_codes[:, :4])


def test_the_same_seed_gives_the_same_audio_run_after_run(engine):
    first = engine.generate([smart(13)])[0].audio_codes
    second = engine.generate([smart(13)])[0].audio_codes
    np.testing.assert_array_equal(first, second)


def test_a_reference_clip_is_encoded_once_and_then_served_from_the_cache(engine):
    engine.reference_cache.clear()
    hits, misses = engine.reference_cache.hits, engine.reference_cache.misses
    engine.generate([clone(40), clone(41), clone(42)])
    assert engine.reference_cache.misses - misses == 1
    assert engine.reference_cache.hits - hits == 2


def test_a_call_encodes_its_reference_clips_while_another_call_decodes(engine):
    # A GPU synthesis actor takes two calls at once (pipeline.dataset_job.CALLS_PER_GPU_ACTOR): the second
    # prepares beside the first's decoding, then waits for its own turn to decode.
    from model.engine import SynthesisEngine
    from model.options import EngineOptions

    two = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, reference_cache_size=0))
    encoded, decoding = threading.Event(), threading.Event()
    encode, decode_all = two.encode_reference, two._decode_all

    def encode_reference(ref):
        codes = encode(ref)
        encoded.set()
        return codes

    def decode_all_once_the_other_call_encoded(prepared, **kw):
        decoding.set()
        assert encoded.wait(60), "the other call encoded nothing while this one held its turn to decode"
        yield from decode_all(prepared, **kw)

    two.encode_reference = encode_reference
    two._decode_all = decode_all_once_the_other_call_encoded
    first_call, second_call = [smart(50), smart(51)], [clone(50), clone(51)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(two.generate, first_call)
        assert decoding.wait(60)
        second = pool.submit(two.generate, second_call)
        overlapped = first.result(timeout=120) + second.result(timeout=120)

    alone = engine.generate(first_call) + engine.generate(second_call)
    assert [r.id for r in overlapped] == ["smart50", "smart51", "clone50", "clone51"]
    for a, b in zip(overlapped, alone, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)
        np.testing.assert_array_equal(a.waveform, b.waveform)


def test_a_bad_request_errors_alone_and_its_batch_mates_succeed(engine):
    silent = Reference(audio=np.zeros(24000, dtype=np.float32), sample_rate=24000, transcript="...")
    bad_ref = SynthesisRequest(id="silent", text="Hello.", references=[silent])
    too_long = SynthesisRequest(id="huge", text="Hello.", max_new_tokens=10_000_000)
    results = {r.id: r for r in engine.generate([smart(1), bad_ref, too_long, clone(1)])}
    assert results["smart1"].ok and results["clone1"].ok
    assert results["silent"].error_field == "references[0].audio"
    assert "silent" in results["silent"].error
    assert results["huge"].error_field == "max_new_tokens"
    assert "context" in results["huge"].error


def test_ras_defaults_to_upstreams_window_and_turns_off_per_request_or_per_engine(engine):
    from model.engine import _Prepared

    def ras(request, enabled=True):
        engine.options.ras_enabled = enabled
        try:
            p = engine._row_params([_Prepared(index=0, request=request, input_ids=[1], audio_codes=None)])
        finally:
            engine.options.ras_enabled = True
        return int(p.ras_win_len[0]), int(p.ras_max_repeat[0])

    assert ras(smart(1)) == (7, 2)
    assert ras(replace(smart(1), ras_win_len=0)) == (0, 2)
    assert ras(smart(1), enabled=False)[0] == 0


def requests_of_mixed_lengths() -> list[SynthesisRequest]:
    rows = [smart(i, max_new_tokens=12 + 7 * i) for i in range(5)] + [clone(i) for i in range(3)]
    return [replace(r, id=f"{r.id}-{k}") for k, r in enumerate(rows)]


def test_continuous_batching_gives_the_same_codes_as_one_request_at_a_time(engine):
    from model.engine import EngineOptions, SynthesisEngine

    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1, refill=False))
    refilled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3, refill=True))
    for a, b in zip(
        plain.generate(requests_of_mixed_lengths()),
        refilled.generate(requests_of_mixed_lengths()),
        strict=True,
    ):
        assert a.id == b.id
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_static_batches_give_the_same_codes_as_refilled_ones(engine):
    from model.engine import EngineOptions, SynthesisEngine

    static = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, refill=False))
    refilled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, refill=True))
    for a, b in zip(
        static.generate(requests_of_mixed_lengths()),
        refilled.generate(requests_of_mixed_lengths()),
        strict=True,
    ):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def rows_finishing_one_by_one(n: int) -> list[SynthesisRequest]:
    return [smart(i, max_new_tokens=12 + (i * 7) % 41) for i in range(n)]


def sizes_of_calls(monkeypatch, engine, method: str) -> list[int]:
    """The len() of the first argument of each call of engine.<method> (a prefill group, a batch stepped)."""
    sizes = []
    original = getattr(engine, method)
    monkeypatch.setattr(
        engine, method, lambda first, *rest: sizes.append(len(first)) or original(first, *rest)
    )
    return sizes


def test_waiting_rows_join_a_running_batch_in_groups_not_slot_by_slot(engine, monkeypatch):
    from model.engine import EngineOptions, SynthesisEngine

    refilled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, refill=True))
    groups = sizes_of_calls(monkeypatch, refilled, "_prefill")
    refilled.generate(rows_finishing_one_by_one(40))
    assert sum(groups) == 40 and groups[0] == 16 and len(groups) > 2
    # A refill prefills at least 2 of the 16 slots' rows (REFILL_SHARE), except the one that takes the last
    # waiting row.
    assert all(n >= 2 for n in groups[1:-1]), groups


def test_rows_prefilled_ahead_take_slots_as_they_free_so_no_slot_idles_while_rows_wait(engine, monkeypatch):
    from model.engine import EngineOptions, SynthesisEngine

    refilled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, refill=True))
    occupied = sizes_of_calls(monkeypatch, refilled, "_step")
    refilled.generate(rows_finishing_one_by_one(40))
    # Every look steps all 16 slots until the last waiting row has joined; then the batch only drains.
    full = next(i for i, n in enumerate(occupied) if n < 16)
    assert full > 2, occupied
    assert occupied[:full] == [16] * full
    assert occupied[full:] == sorted(occupied[full:], reverse=True), occupied


def test_a_batch_fills_its_free_slots_in_prefill_groups_of_max_prefill_rows_before_it_steps(
    engine, monkeypatch
):
    from model.engine import EngineOptions, SynthesisEngine

    capped = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, max_prefill_rows=4))
    events = []
    prefill, step = capped._prefill, capped._step
    monkeypatch.setattr(
        capped, "_prefill", lambda batch, *rest: events.append(len(batch)) or prefill(batch, *rest)
    )
    monkeypatch.setattr(capped, "_step", lambda *args: events.append("step") or step(*args))
    results = capped.generate(rows_finishing_one_by_one(24))
    first_step = events.index("step")
    assert events[:first_step] == [4, 4, 4, 4]  # all 16 slots full before the first step
    assert all(n <= 4 for n in events if n != "step")
    whole = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16))
    for a, b in zip(whole.generate(rows_finishing_one_by_one(24)), results, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_a_call_admits_the_rows_expected_to_run_longest_first(engine, monkeypatch):
    from model.admission import LENGTH_CLASS
    from model.engine import EngineOptions, SynthesisEngine

    refilled = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4))
    admitted = []
    prefill = refilled._prefill
    monkeypatch.setattr(
        refilled,
        "_prefill",
        lambda batch, *rest: admitted.extend(p.reserve for p in batch) or prefill(batch, *rest),
    )
    results = refilled.generate(rows_finishing_one_by_one(12))
    # Each row reserves its max_new_tokens (12-52 steps, under half its estimated length); as the call
    # drains, the rows still running are the shortest, so few steps run with slots idle.
    classes = [n // LENGTH_CLASS for n in admitted]
    assert classes == sorted(classes, reverse=True) and classes[0] > classes[-1]
    alone = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1))
    for a, b in zip(alone.generate(rows_finishing_one_by_one(12)), results, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_a_prefill_group_passes_over_rows_that_would_pad_it_and_they_keep_their_place(engine):
    from collections import deque

    from model.engine import EngineOptions, SynthesisEngine

    grouped = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=8))
    short = [grouped._prepare(i, smart(i)) for i in range(4)]
    long = [grouped._prepare(10 + i, replace(smart(i), text="Many more words. " * 8)) for i in range(4)]
    waiting = deque(p for pair in zip(short, long, strict=True) for p in pair)  # short, long, short, ...
    group = grouped._admit(waiting, free=8)
    assert group == short
    assert list(waiting) == long


def test_refilling_in_groups_gives_the_same_codes_as_static_batches(engine64):
    from model.engine import EngineOptions, SynthesisEngine

    static = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=16, refill=False))
    refilled = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=16, refill=True))
    rows = rows_finishing_one_by_one(24)
    for a, b in zip(static.generate(rows), refilled.generate(rows), strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_prefill_groups_keep_left_padding_under_the_waste_bound(engine, monkeypatch):
    from model.engine import EngineOptions, SynthesisEngine

    bucketed = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, max_padding_waste=0.15))
    groups = []
    original = bucketed._prefill
    monkeypatch.setattr(
        bucketed,
        "_prefill",
        lambda batch, *rest: groups.append([len(p.input_ids) for p in batch]) or original(batch, *rest),
    )
    bucketed.generate(requests_of_mixed_lengths())
    assert sum(len(g) for g in groups) == 8
    for lengths in groups:
        assert sum(max(lengths) - n for n in lengths) / (max(lengths) * len(lengths)) <= 0.15


def test_ignoring_eos_generates_exactly_max_new_tokens_frames(engine):
    from model.engine import EngineOptions, SynthesisEngine

    fixed = SynthesisEngine(engine.checkpoint, EngineOptions(ignore_eos=True))
    results = fixed.generate([smart(i, max_new_tokens=30) for i in range(3)])
    # 30 steps = the opening bos frame + 7 staircase steps + 22 frames of audio
    assert [r.generated_frames for r in results] == [22, 22, 22]


def test_the_kv_cache_of_the_release_costs_about_112_kb_per_token_in_bf16():
    import torch
    from transformers import HiggsAudioV2Config

    from model.engine import fitting_batch_size, kv_bytes_per_token

    config = HiggsAudioV2Config()
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 28 * 8 * 128 * 2  # 114,688 bytes
    # Per row: 1.25 x 114,688 bytes x (1,024-token slot + 688-token prefill) = 245 MB, as measured on an H200.
    assert fitting_batch_size(config, torch.bfloat16, 10 * 10**9, 1024, 688) == 32  # 0.8 x 10 GB / 245 MB
    assert fitting_batch_size(config, torch.bfloat16, 10**8, 1024, 688) == 1
    assert fitting_batch_size(config, torch.bfloat16, 80 * 10**9, 1024, 688) == 256  # the cap


def test_only_one_prefill_group_of_rows_needs_room_for_its_prompts():
    import torch
    from transformers import HiggsAudioV2Config

    from model.engine import fitting_batch_size

    config = HiggsAudioV2Config()
    # 0.8 x 30 GB, less 64 rows x 98.6 MB of prompt, over 147 MB slots of 1,024 tokens; 97 if every row
    # prefilled at once (245 MB each).
    assert fitting_batch_size(config, torch.bfloat16, 30 * 10**9, 1024, 688, prefill_rows=64) == 120
    assert fitting_batch_size(config, torch.bfloat16, 30 * 10**9, 1024, 688, prefill_rows=1 << 30) == 97


def test_out_of_memory_splits_the_batch_and_retries_without_failing_rows(engine, caplog):
    from model.engine import EngineOptions, SynthesisEngine

    rows = [smart(i, max_new_tokens=20) for i in range(4)]
    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1)).generate(rows)
    # Four rows of ~50-token prompts overflow the guard; two rows fit.
    tight = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, max_frames_per_batch=150))
    results = tight.generate(rows)
    assert "retrying them at batch size 2" in caplog.text
    assert all(r.ok for r in results)
    for a, b in zip(plain, results, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_a_row_that_never_fits_errors_with_out_of_memory_and_the_others_succeed(engine):
    from model.engine import EngineOptions, SynthesisEngine

    tight = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, max_frames_per_batch=200))
    long_text = replace(smart(1), id="long", text="word " * 300)
    results = {r.id: r for r in tight.generate([smart(2), long_text, smart(3)])}
    assert results["smart2"].ok and results["smart3"].ok
    assert "out of memory" in results["long"].error


def break_prefills(engine, monkeypatch) -> None:
    """Every prefill of `engine` that holds the row with id "broken" raises, as a failing kernel would."""
    prefill = engine._prefill

    def failing(batch, *rest):
        if any(p.request.id == "broken" for p in batch):
            raise RuntimeError("a kernel failed")
        return prefill(batch, *rest)

    monkeypatch.setattr(engine, "_prefill", failing)


def test_a_request_that_breaks_generation_errors_alone(engine, monkeypatch):
    from model.engine import SynthesisEngine

    fragile = SynthesisEngine(engine.checkpoint, engine.options)
    break_prefills(fragile, monkeypatch)
    results = {r.id: r for r in fragile.generate([smart(6), replace(smart(5), id="broken"), smart(7)])}
    assert results["smart6"].ok and results["smart7"].ok
    assert results["broken"].error_field == "synthesis"
    assert "generation failed: a kernel failed" in results["broken"].error


def test_a_reference_clip_too_short_for_the_codec_errors_its_row_and_its_batch_mates_succeed(engine):
    # 100 samples: the codec's encoder cannot run on fewer than 119, and its failure took the whole call.
    click = Reference(audio=np.full(100, 0.25, np.float32), sample_rate=24000, transcript="Hi.")
    short = SynthesisRequest(id="click", text="Hello.", references=[click], max_new_tokens=12)
    results = {r.id: r for r in engine.generate([smart(1), short, clone(1)])}
    assert results["smart1"].ok and results["clone1"].ok
    assert results["click"].error_field == "references[0].audio"
    assert "clip is 0.00417 s long; reference clips must be at least 0.5 s" in results["click"].error


def test_a_row_whose_preparation_fails_unexpectedly_errors_alone(engine, monkeypatch):
    from model.engine import SynthesisEngine

    fragile = SynthesisEngine(engine.checkpoint, engine.options)
    encode = fragile.encode_reference

    def failing(ref):
        if ref.transcript == "broken":
            raise RuntimeError("the codec failed")
        return encode(ref)

    monkeypatch.setattr(fragile, "encode_reference", failing)
    broken = replace(clone(2), id="broken", references=[replace(voice("en_man"), transcript="broken")])
    results = {r.id: r for r in fragile.generate([smart(1), broken, clone(1)])}
    assert results["smart1"].ok and results["clone1"].ok
    assert results["broken"].error_field == "synthesis"
    assert "preparing the prompt failed: the codec failed" in results["broken"].error


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("seed", -1, "must be in [0, 9223372036854775807]"),
        ("seed", 2**70, "must be in [0, 9223372036854775807]"),
        ("max_new_tokens", 20.0, "must be an integer, got 20.0"),
        ("temperature", "0.7", "must be a number, got str"),
        ("top_p", 0.0, "must be in (0, 1]"),
        ("ras_win_len", -1, "must be in [0, 64]"),
    ],
)
def test_a_sampling_parameter_of_the_wrong_type_or_range_errors_its_row_naming_it(
    engine, name, value, reason
):
    bad = replace(smart(2), id="bad", **{name: value})
    results = {r.id: r for r in engine.generate([smart(1), bad])}
    assert results["smart1"].ok
    assert results["bad"].error_field == name
    assert reason in results["bad"].error


@pytest.mark.parametrize(
    "codes, reason",
    [
        (np.full((8, 4), 5000), "codes must lie in [0, 1024), got 5000..5000"),
        (np.full((8, 4), -1), "got -1..-1"),
        (np.zeros((4, 8), dtype=np.int64), "shape (8, frames)"),
        (np.zeros((8, 4), dtype=np.float32), "must be integer codes"),
    ],
)
def test_context_codes_out_of_range_are_refused_before_they_reach_the_model(engine, codes, reason):
    from model.requests import ContextTurn

    bad = replace(smart(5), id="bad", context=[ContextTurn("Before.", codes)])
    results = {r.id: r for r in engine.generate([smart(6), bad])}
    assert results["smart6"].ok
    assert results["bad"].error_field == "context[0].codes"
    assert reason in results["bad"].error


def test_rows_sharing_a_reference_voice_run_it_through_the_model_once_and_keep_their_codes(engine):
    from model.engine import EngineOptions, SynthesisEngine

    rows = [clone(i) for i in range(3)]
    prompt = len(engine.prepare(rows[0])[0])
    embedded: list[int] = []
    hook = engine.model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: embedded.append(args[0].numel())
    )
    try:
        batched = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=3)).generate(rows)
    finally:
        hook.remove()
    assert sum(embedded) < 1.2 * prompt  # not 3x: the shared system prompt and reference turn ran once
    alone = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1)).generate(rows)
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def voice_library_rows() -> list[SynthesisRequest]:
    """Rows cycling through two voices, 8 of each: enough of each voice to prefill it as a run of its own."""
    voices = [voice("en_woman"), voice("en_man")]
    return [
        SynthesisRequest(
            id=f"lib{i}",
            text=f"Line {i} of the library.",
            references=[voices[i % 2]],
            seed=i,
            max_new_tokens=20,
        )
        for i in range(16)
    ]


def test_rows_of_a_voice_library_prefill_voice_by_voice_and_share_each_voices_tokens(engine64, monkeypatch):
    from model.engine import EngineOptions, SynthesisEngine

    library = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=16))
    groups, shared = [], []
    original = library._prefill

    def watched(batch, *rest):
        groups.append({p.request.references[0].transcript for p in batch})
        shared.append(library._shared_prefix(batch))
        return original(batch, *rest)

    monkeypatch.setattr(library, "_prefill", watched)
    got = library.generate(voice_library_rows())
    assert all(len(voices) == 1 for voices in groups), groups  # never two voices in one prefill
    assert len(groups) == 2 and all(n > 0 for n in shared)  # each voice's tokens ran once for its rows

    alone = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1)).generate(
        voice_library_rows()
    )
    for a, b in zip(alone, got, strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_voices_with_few_rows_prefill_together_by_length(engine):
    prepared = [engine._prepare(i, r) for i, r in enumerate(voice_library_rows()[:6])]  # 3 rows a voice
    order = engine._order(prepared)
    assert {p.run for p in order} == {-1}
    lengths = [len(p.input_ids) for p in order]
    assert lengths == sorted(lengths)


def chunks_after_one_narrator(n: int) -> list[SynthesisRequest]:
    """Audiobook chunks: one narrator's reference, then each chunk's own earlier chunk as a context turn."""
    rng = np.random.default_rng(7)
    return [
        replace(
            clone(i),
            text=f"Chunk {i} goes on.",
            context=[
                ContextTurn(text=f"Chunk {i - 1} came before.", codes=rng.integers(0, 64, size=(8, 12 + i)))
            ],
        )
        for i in range(n)
    ]


def test_rows_sharing_a_reference_but_not_their_context_turns_share_the_reference(engine64):
    from model.engine import EngineOptions, SynthesisEngine

    rows = chunks_after_one_narrator(4)
    batched = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=4))
    prepared = [batched._prepare(i, r) for i, r in enumerate(rows)]
    shared = batched._shared_prefix(prepared)
    reference_frames = len(engine64.encode_reference(rows[0].references[0]).T) + 2  # with stream bos/eos
    assert batched._frames_before(prepared[0], shared) >= reference_frames  # the whole reference turn
    assert batched._frames_before(prepared[0], shared) < len(prepared[0].audio_codes)  # not the contexts
    alone = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1)).generate(rows)
    for a, b in zip(alone, batched.generate(rows), strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_rows_whose_audio_differs_behind_alike_placeholders_share_up_to_the_first_differing_frame(engine64):
    from model.engine import EngineOptions, SynthesisEngine

    # Same context text and length, other codes from the sixth frame on: the prompts' tokens agree past it.
    codes = np.random.default_rng(3).integers(0, 64, size=(8, 20))
    other = codes.copy()
    other[:, 5:] = (other[:, 5:] + 1) % 64
    rows = [
        replace(smart(0), context=[ContextTurn(text="Same words, said again. " * 8, codes=c)], seed=s)
        for c, s in ((codes, 1), (other, 2))
    ]
    batched = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=2))
    prepared = [batched._prepare(i, r) for i, r in enumerate(rows)]
    first_differing = int((prepared[0].audio_codes != prepared[1].audio_codes).any(dim=1).nonzero()[0])
    shared = batched._shared_prefix(prepared)
    assert shared > 0 and batched._frames_before(prepared[0], shared) == first_differing
    alone = SynthesisEngine(engine64.checkpoint, EngineOptions(max_batch_size=1)).generate(rows)
    for a, b in zip(alone, batched.generate(rows), strict=True):
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)


def test_generate_chained_runs_the_requests_follow_names_with_the_codes_generate_gives_them(engine64):
    followed = []

    def follow(request, result):
        followed.append((request.id, result.waveform is None))
        return replace(smart(9), id=f"after-{request.id}") if not request.id.startswith("after") else None

    out = {request.id: result for request, result in engine64.generate_chained([smart(1), clone(2)], follow)}
    # follow saw every row as it left the batch, before its audio was decoded.
    assert sorted(followed) == [(i, True) for i in ["after-clone2", "after-smart1", "clone2", "smart1"]]
    assert sorted(out) == ["after-clone2", "after-smart1", "clone2", "smart1"]
    assert all(r.ok and r.waveform is not None for r in out.values())
    (alone,) = engine64.generate([smart(9)])
    np.testing.assert_array_equal(out["after-smart1"].audio_codes, alone.audio_codes)
    np.testing.assert_array_equal(out["after-clone2"].audio_codes, alone.audio_codes)


def test_generate_chained_reports_a_request_follow_names_that_cannot_be_prepared(engine64):
    bad = SynthesisRequest(id="bad", text="Fine.", max_new_tokens=10**6)
    follow = lambda request, result: bad if request.id == "smart1" else None  # noqa: E731
    out = {request.id: result for request, result in engine64.generate_chained([smart(1)], follow)}
    assert out["smart1"].ok
    assert (out["bad"].ok, out["bad"].error_field) == (False, "max_new_tokens")


def test_a_row_whose_text_holds_a_control_token_errors_alone(engine):
    bad = SynthesisRequest(id="bad", text="Read <|AUDIO_OUT|> aloud.", max_new_tokens=12)
    results = {r.id: r for r in engine.generate([bad, smart(1)])}
    assert (results["bad"].ok, results["bad"].error_field) == (False, "text")
    assert "<|AUDIO_OUT|>" in results["bad"].error
    assert results["smart1"].ok


def test_prompt_ids_are_the_tokenized_prompt_with_every_clip_spelled_out_in_placeholders(engine):
    from model.prompts import build_conversation, render

    processor = engine.processor
    before = ContextTurn("Before.", np.arange(8 * 5).reshape(8, 5) % 1024)
    two_voices = SynthesisRequest(
        text="[SPEAKER0] One. [SPEAKER1] Two.", references=[voice("en_woman"), voice("en_man")]
    )
    for request in [smart(1), clone(2), replace(clone(3), context=[before, before]), two_voices]:
        ids, _ = engine.prepare(request)
        conversation = build_conversation(request)
        widths = iter(
            (
                request.context[i].codes
                if kind == "context"
                else engine.encode_reference(request.references[i])
            ).shape[1]
            + 2  # stream bos and eos
            + engine.num_codebooks
            - 1  # the delay pattern's staircase
            for kind, i in conversation.audio_order
        )
        pieces = render(conversation, processor).split(processor.audio_token)
        spelled = pieces[0] + "".join(
            processor.get_audio_tokens(next(widths)) + piece for piece in pieces[1:]
        )
        assert ids == processor.tokenizer(spelled, add_special_tokens=False).input_ids, request.id
