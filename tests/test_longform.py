"""Long-form generation: chunks in order, the last N chunks' codes carried into the next chunk's context."""

import numpy as np
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
    ref = engine.generate([SynthesisRequest(text="Voice.", max_new_tokens=20, seed=1)])[0]
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


def test_chapters_advance_in_lockstep_and_a_failing_one_stops_alone(engine):
    bad = LongformText(key="bad", base=base(), chunks=["Fine.", " \n "])
    good = chapter("good", 3)
    generate_longform(engine, [bad, good], buffer_size=1)
    assert bad.error is not None and bad.error.startswith("chunk 1:")
    assert len(bad.done) == 1
    assert good.error is None and len(good.done) == 3
