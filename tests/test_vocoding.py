"""Vocoding rows of any length in windows of one size: the same waveform as decoding each row whole, in a
few codec calls; and vocoding a call's rows in groups beside its decoding, with the same waveforms."""

import threading

import numpy as np
import pytest
import torch

from model.engine import EngineOptions, SynthesisEngine
from model.requests import SynthesisRequest, SynthesisResult
from model.vocoding import PROBE_FRAMES, cut


@pytest.mark.parametrize("frames", [1, 88, 89, 150, 151, 216, 333])
def test_windows_tile_the_row_and_keep_only_frames_the_reach_fully_covers(frames):
    margin, core = 12, 64
    pieces = cut(0, frames, margin, core)
    assert pieces[0].keep_from == 0 and pieces[-1].keep_to == frames
    for before, after in zip(pieces, pieces[1:], strict=False):
        assert before.keep_to == after.keep_from
    for p in pieces:
        assert p.length == (frames if frames <= core + 2 * margin else core + 2 * margin)
        assert p.start >= 0 and p.start + p.length <= frames
        assert p.keep_from == 0 or p.keep_from >= p.start + margin
        assert p.keep_to == frames or p.keep_to <= p.start + p.length - margin


def test_an_unknown_reach_decodes_the_row_whole():
    assert [(p.start, p.length) for p in cut(3, 500, None)] == [(0, 500)]


def test_the_probe_finds_a_reach_inside_the_probe(engine):
    assert 0 < engine._vocode_margin < PROBE_FRAMES // 2


@pytest.fixture
def windowed(engine) -> SynthesisEngine:
    return SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, vocode_windows=True))


def counted_calls(engine: SynthesisEngine, monkeypatch) -> list:
    calls = []
    original = engine.vocode
    monkeypatch.setattr(engine, "vocode", lambda codes: calls.append(codes.shape) or original(codes))
    return calls


def random_results(lengths: list[int], seed: int = 0) -> list[SynthesisResult]:
    gen = torch.Generator().manual_seed(seed)
    return [
        SynthesisResult(
            id=f"r{i}",
            audio_codes=torch.randint(0, 1024, (8, n), generator=gen).numpy(),
            generated_frames=n,
        )
        for i, n in enumerate(lengths)
    ]


def test_windowed_vocoding_gives_each_row_its_whole_decoded_waveform(windowed):
    results = random_results([40, 150, 233, 97])
    windowed._vocode_results(results)
    for r in results:
        whole = windowed.vocode(torch.from_numpy(r.audio_codes))
        assert r.waveform.shape == whole.shape == (r.generated_frames * 960,)
        np.testing.assert_allclose(r.waveform, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_rows_of_many_lengths_vocode_in_a_few_windowed_codec_calls(windowed, monkeypatch):
    assert windowed._vocode_margin  # probed before counting
    monkeypatch.setattr("model.engine.VOCODE_CPU_FRAMES", 16 * 256)  # a GPU's calls for 16 slots
    calls = counted_calls(windowed, monkeypatch)
    windowed._vocode_results(random_results([150 + 13 * i for i in range(16)]))
    assert len(calls) <= 2 and len({shape[-1] for shape in calls}) == 1, calls


def test_by_default_rows_vocode_whole_one_call_per_length_on_a_cpu(engine, monkeypatch):
    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16))
    calls = counted_calls(plain, monkeypatch)
    plain._vocode_results(random_results([50, 63, 50, 76]))
    assert sorted(shape[-1] for shape in calls) == [50, 63, 76]


def test_rows_vocode_whole_when_windows_are_off(engine, monkeypatch):
    whole = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16, vocode_windows=False))
    calls = counted_calls(whole, monkeypatch)
    whole._vocode_results(random_results([50, 63, 50]))
    assert sorted(shape[-1] for shape in calls) == [50, 63]


def test_on_a_cpu_a_vocoding_call_takes_at_most_256_frames_whatever_the_slots(engine, monkeypatch):
    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16))
    calls = counted_calls(plain, monkeypatch)
    plain._vocode_results(random_results([60] * 8 + [300]))
    assert sorted(shape[0] * shape[-1] for shape in calls) == [240, 240, 300]  # a longer row goes alone


def short_of_memory(engine: SynthesisEngine, monkeypatch, most_frames: int) -> list:
    """The codec raises OutOfMemoryError, as a full GPU would, on calls of more than `most_frames` frames."""
    calls = []
    original = engine.vocode

    def vocode(codes):
        frames = codes.shape[0] * codes.shape[-1] if codes.dim() == 3 else codes.shape[-1]
        calls.append(frames)
        if frames > most_frames:
            raise torch.OutOfMemoryError(f"{frames} frames")
        return original(codes)

    monkeypatch.setattr(engine, "vocode", vocode)
    return calls


def test_vocoding_out_of_memory_retries_in_smaller_calls_with_the_same_waveforms(engine, monkeypatch, caplog):
    lengths = [150, 150, 163, 150, 176, 150]
    plain = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16))
    expected = random_results(lengths)
    plain._vocode_results(expected)
    tight = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=16))
    monkeypatch.setattr("model.engine.VOCODE_CPU_FRAMES", 16 * 256)  # a GPU's calls for 16 slots
    calls = short_of_memory(tight, monkeypatch, most_frames=400)
    results = random_results(lengths)
    tight._vocode_results(results)
    assert "retrying in calls of" in caplog.text and max(calls) > 400
    for a, b in zip(expected, results, strict=True):
        assert b.ok
        np.testing.assert_allclose(a.waveform, b.waveform, atol=1e-5)  # float rounding of other batch shapes


def test_a_row_too_long_to_vocode_alone_becomes_an_error_row_and_the_others_finish(engine, monkeypatch):
    tight = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1))
    short_of_memory(tight, monkeypatch, most_frames=200)
    results = random_results([150, 300, 120])
    tight._vocode_results(results)
    assert [r.ok for r in results] == [True, False, True]
    assert (
        results[1].error_field == "synthesis"
        and "out of memory while vocoding 300 frames" in results[1].error
    )
    assert len(results[0].waveform) and len(results[2].waveform)


def rows_to_vocode_in_groups() -> list[SynthesisRequest]:
    """Eight rows of 40-54 frames: ~370 frames, so a group of the CPU's 256 fills before the call ends."""
    return [
        SynthesisRequest(id=f"r{i}", text=f"Row {i} is spoken.", seed=i, max_new_tokens=40 + 2 * i)
        for i in range(8)
    ]


def vocoding_threads(engine: SynthesisEngine, monkeypatch, fail_beside=None) -> list[str]:
    """The name of the thread each codec call runs in; `fail_beside`, raised by calls in the worker."""
    threads = []
    original = engine.vocode

    def vocode(codes):
        threads.append(threading.current_thread().name)
        if fail_beside is not None and threads[-1].startswith("vocoding"):
            raise fail_beside
        return original(codes)

    monkeypatch.setattr(engine, "vocode", vocode)
    return threads


@pytest.fixture
def overlapping(engine) -> SynthesisEngine:
    """The default engine: it vocodes beside the decoding."""
    return SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=4, ignore_eos=True))


@pytest.fixture(scope="module")
def vocoded_after(engine) -> list[SynthesisResult]:
    """The rows vocoded after the whole call decodes (overlap_vocoding off)."""
    plain = SynthesisEngine(
        engine.checkpoint, EngineOptions(max_batch_size=4, ignore_eos=True, overlap_vocoding=False)
    )
    return plain.generate(rows_to_vocode_in_groups())


def assert_same_audio(expected: list[SynthesisResult], results: list[SynthesisResult]) -> None:
    assert [r.id for r in results] == [r.id for r in expected]
    for a, b in zip(expected, results, strict=True):
        assert b.ok and b.timings["vocode_s"] > 0
        np.testing.assert_array_equal(a.audio_codes, b.audio_codes)
        # Exactly: on a CPU rows of distinct lengths vocode alone, whatever group they finish in.
        np.testing.assert_array_equal(a.waveform, b.waveform)


def test_rows_vocoded_beside_the_decoding_get_the_waveforms_of_rows_vocoded_after_it(
    vocoded_after, overlapping, monkeypatch
):
    threads = vocoding_threads(overlapping, monkeypatch)
    assert_same_audio(vocoded_after, overlapping.generate(rows_to_vocode_in_groups()))
    assert any(t.startswith("vocoding") for t in threads)  # groups went to the worker before the call ended


def test_a_group_out_of_memory_beside_the_decoding_is_vocoded_again_in_the_callers_thread(
    vocoded_after, overlapping, monkeypatch
):
    threads = vocoding_threads(overlapping, monkeypatch, fail_beside=torch.OutOfMemoryError("full"))
    assert_same_audio(vocoded_after, overlapping.generate(rows_to_vocode_in_groups()))
    assert any(t.startswith("vocoding") for t in threads)


def test_a_codec_failure_beside_the_decoding_fails_the_call_as_it_would_after_it(overlapping, monkeypatch):
    vocoding_threads(overlapping, monkeypatch, fail_beside=RuntimeError("codec broke"))
    with pytest.raises(RuntimeError, match="codec broke"):
        overlapping.generate(rows_to_vocode_in_groups())


def test_chained_rows_vocoded_beside_the_decoding_come_out_with_their_waveforms(vocoded_after, overlapping):
    expected = {r.id: r for r in vocoded_after}
    pairs = list(overlapping.generate_chained(rows_to_vocode_in_groups(), lambda request, result: None))
    assert sorted(request.id for request, _ in pairs) == sorted(expected)
    assert_same_audio([expected[r.id] for _, r in pairs], [r for _, r in pairs])
