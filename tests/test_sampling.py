"""Per-row frame selection: counter-based randomness, the delay-pattern staircase, RAS."""

import torch

from model.sampling import RowParams, counter_uniform, select_next_frame

BOS, EOS, C, V = 1024, 1025, 8, 1026


def params(rows: int = 1, **kw) -> RowParams:
    base = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "ras_win_len": 0, "ras_max_repeat": 2, "seed": 0}
    return RowParams.stack(
        [{**base, **kw, "seed": kw.get("seed", i)} for i in range(rows)], torch.device("cpu")
    )


def pick(logits, p, step=10, eos_step=-1, history=None):
    rows = logits.shape[0]
    history = history if history is not None else torch.zeros((rows, 0, C), dtype=torch.long)
    steps = torch.full((rows,), step)
    return select_next_frame(logits, p, steps, torch.full((rows,), eos_step), history, steps, BOS, EOS)


def test_counter_uniforms_are_a_function_of_seed_step_and_column_only():
    a = counter_uniform(torch.tensor([5, 6]), torch.tensor([3, 3]), 0, 8)
    b = counter_uniform(torch.tensor([6]), torch.tensor([3]), 0, 8)
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert bool(((a >= 0) & (a < 1)).all())


def test_counter_uniforms_look_uniform():
    u = counter_uniform(torch.arange(2000), torch.zeros(2000, dtype=torch.long), 0, 8).flatten()
    assert abs(u.mean().item() - 0.5) < 0.02
    assert torch.histc(u, bins=10, min=0, max=1).min().item() > 1300


def test_the_first_steps_force_stream_bos_in_a_staircase():
    logits = torch.randn(1, C, V)
    for step in range(C + 1):  # step 0 is the all-bos frame that opens every audio stream
        frame = pick(logits, params(), step=step)[0]
        assert (frame[step:] == BOS).all()
        assert (frame[:step] != BOS).all()


def test_after_the_first_eos_codebooks_end_in_the_same_staircase():
    logits = torch.randn(1, C, V)
    frame = pick(logits, params(), step=20, eos_step=17)[0]  # 3 steps after: codebooks 0..1 forced
    assert (frame[:2] == EOS).all()
    assert (pick(logits, params(), step=25, eos_step=17)[0] == EOS).all()


def test_temperature_zero_is_greedy():
    logits = torch.randn(2, C, V)
    logits[..., BOS] = -1e9
    frame = pick(logits, params(2, temperature=0.0))
    assert torch.equal(frame, logits.argmax(-1))


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = torch.randn(3, C, V)
    logits[..., BOS] = -1e9
    frame = pick(logits, params(3, top_k=1))
    assert torch.equal(frame, logits.argmax(-1))


def test_rows_use_their_own_parameters():
    logits = torch.randn(1, C, V).repeat(2, 1, 1)
    logits[..., BOS] = -1e9
    p = RowParams.stack(
        [
            {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "ras_win_len": 0, "ras_max_repeat": 2, "seed": 1},
            {"temperature": 5.0, "top_k": 0, "top_p": 1.0, "ras_win_len": 0, "ras_max_repeat": 2, "seed": 1},
        ],
        torch.device("cpu"),
    )
    frame = pick(logits, p)
    assert torch.equal(frame[0], logits[0].argmax(-1))
    assert not torch.equal(frame[1], logits[1].argmax(-1))


def test_ras_redraws_a_code_repeated_within_the_window():
    logits = torch.full((1, C, V), -1e9)
    logits[..., 7] = 10.0  # greedy picks 7, the first of two equal favourites
    logits[..., 8] = 10.0
    history = torch.full((1, 4, C), 7)
    frame = pick(logits, params(ras_win_len=4, ras_max_repeat=2, temperature=0.0), history=history)
    assert (frame == 7).sum() < C  # untempered redraws leave 7 sometimes, but not everywhere
    no_ras = pick(logits, params(ras_win_len=0, temperature=0.0), history=history)
    assert (no_ras == 7).all()
