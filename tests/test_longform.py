"""Long-form generation: chunks in order, the last N chunks' codes carried into the next chunk's context."""

import numpy as np
import pytest
import torch

from model.longform import LongformText, chunk_request, generate_longform
from model.requests import ContextTurn, SynthesisRequest


def base(**kw) -> SynthesisRequest:
    return SynthesisRequest(text="", max_new_tokens=24, seed=5, **kw)


def chapter(key: str, n: int) -> LongformText:
    return LongformText(key=key, base=base(), chunks=[f"Sentence {i} of {key}." for i in range(n)])


def delayed_codes(engine, codes: np.ndarray) -> torch.Tensor:
    """The frames a chunk's codes occupy in a prompt: stream bos/eos added, delay pattern applied."""
    framed = np.concatenate([np.full((8, 1), 1024), codes, np.full((8, 1), 1025)], axis=1)
    return engine.processor.build_delay_pattern(torch.as_tensor(framed)[None])[0].transpose(0, 1)


def test_every_chunk_is_generated_in_order_and_reported(engine):
    seen = []
    (text,) = generate_longform(
        engine, [chapter("a", 3)], buffer_size=2, on_chunk=lambda t, k, r: seen.append(k)
    )
    assert seen == [0, 1, 2]
    assert [turn.text for turn in text.done] == text.chunks
    assert all(turn.codes.shape[0] == 8 and turn.codes.shape[1] > 0 for turn in text.done)


def test_the_context_of_chunk_k_holds_the_codes_of_chunks_k_minus_n_to_k_minus_1(engine):
    (text,) = generate_longform(engine, [chapter("b", 4)], buffer_size=2)
    request = chunk_request(text, 3, buffer_size=2)
    assert [turn.text for turn in request.context] == text.chunks[1:3]
    _, audio = engine.prepare(request)
    expected = torch.cat(
        [delayed_codes(engine, text.done[1].codes), delayed_codes(engine, text.done[2].codes)]
    )
    assert torch.equal(audio, expected)


def test_the_reference_is_always_kept_ahead_of_the_buffer(engine):
    ref = engine.generate([SynthesisRequest(text="Voice.", max_new_tokens=30, seed=1)])[0]
    from model.requests import Reference

    reference = Reference(audio=ref.waveform, sample_rate=ref.sample_rate, transcript="Voice.")
    text = LongformText(key="c", base=base(references=[reference]), chunks=["One.", "Two.", "Three."])
    generate_longform(engine, [text], buffer_size=1)
    _, audio = engine.prepare(chunk_request(text, 2, buffer_size=1))
    ref_codes = engine.encode_reference(reference).numpy()
    expected = torch.cat([delayed_codes(engine, ref_codes), delayed_codes(engine, text.done[1].codes)])
    assert torch.equal(audio, expected)


def test_a_resumed_text_generates_only_its_missing_chunks_and_matches_an_uninterrupted_run(engine):
    (full,) = generate_longform(engine, [chapter("d", 3)], buffer_size=2)
    resumed = chapter("d", 3)
    resumed.done = [ContextTurn(full.done[0].text, full.done[0].codes)]
    seen = []
    generate_longform(engine, [resumed], buffer_size=2, on_chunk=lambda t, k, r: seen.append(k))
    assert seen == [1, 2]
    for a, b in zip(full.done, resumed.done, strict=True):
        np.testing.assert_array_equal(a.codes, b.codes)


def test_a_failing_chapter_stops_alone(engine):
    bad = LongformText(key="bad", base=base(), chunks=["Fine.", " \n "])
    good = chapter("good", 3)
    generate_longform(engine, [bad, good], buffer_size=1)
    assert bad.error is not None and bad.error.startswith("chunk 1:")
    assert len(bad.done) == 1
    assert good.error is None and len(good.done) == 3


def running_to_max_new_tokens(engine64, **options):
    """The float64 tiny engine, every row running to max_new_tokens: chunk lengths are set by the test."""
    from model.engine import EngineOptions, SynthesisEngine

    return SynthesisEngine(engine64.checkpoint, EngineOptions(ignore_eos=True, **options))


def paced(key: str, n: int, frames: int) -> LongformText:
    return LongformText(
        key=key,
        base=SynthesisRequest(text="", max_new_tokens=frames, seed=len(key)),
        chunks=[f"Part {i} of {key}." for i in range(n)],
    )


def test_a_chapters_next_chunk_starts_without_waiting_for_the_other_chapters_chunks(engine64):
    engine = running_to_max_new_tokens(engine64, max_batch_size=4)
    seen = []
    generate_longform(
        engine,
        [paced("slow", 2, 90), paced("quick", 3, 16)],
        buffer_size=2,
        on_chunk=lambda t, k, r: seen.append(f"{t.key}#{k}"),
    )
    assert seen == ["quick#0", "quick#1", "quick#2", "slow#0", "slow#1"]


@pytest.mark.parametrize("overlap_prefill", [False, True], ids=["prefill_then_step", "prefill_beside"])
def test_chapters_generated_together_match_each_chapter_generated_alone(engine64, overlap_prefill):
    engine = running_to_max_new_tokens(engine64, max_batch_size=3, overlap_prefill=overlap_prefill)
    together = generate_longform(
        engine, [paced("a", 4, 20), paced("bb", 2, 45), paced("ccc", 3, 12)], buffer_size=2
    )
    for text in together:
        (alone,) = generate_longform(engine, [paced(text.key, len(text.chunks), text.base.max_new_tokens)])
        assert len(alone.done) == len(text.done)
        for a, b in zip(alone.done, text.done, strict=True):
            np.testing.assert_array_equal(a.codes, b.codes)


def test_a_chunk_whose_prompt_outgrows_the_slots_waits_for_them_to_be_laid_out_again(engine64):
    engine = running_to_max_new_tokens(engine64, max_batch_size=2)
    columns = []
    step = engine._step
    engine._step = lambda state, outgrown: columns.append(state.step.cache.length) or step(state, outgrown)
    # Chunk 1 of "grows" holds chunk 0's 150 frames in its prompt: more columns than the call's slots have.
    grows, other = generate_longform(engine, [paced("grows", 2, 150), paced("other", 1, 200)], buffer_size=1)
    assert len(grows.done) == 2 and len(other.done) == 1
    assert columns[0] < columns[-1] and columns == sorted(columns)
    (alone,) = engine.generate([chunk_request(grows, 1, buffer_size=1)])
    np.testing.assert_array_equal(alone.audio_codes, grows.done[1].codes)


def test_the_chapters_with_the_most_text_left_take_free_slots_first(engine):
    from model.engine import EngineOptions, SynthesisEngine

    one_slot = SynthesisEngine(engine.checkpoint, EngineOptions(max_batch_size=1))
    short = LongformText(key="short", base=base(), chunks=["Hi."])
    long = LongformText(key="long", base=base(), chunks=[f"Part {i} of the long one." for i in range(3)])
    seen = []
    generate_longform(one_slot, [short, long], on_chunk=lambda t, k, r: seen.append(f"{t.key}#{k}"))
    assert seen == ["long#0", "long#1", "long#2", "short#0"]
