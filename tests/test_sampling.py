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


def splitmix64_uniform(seed: int, step: int, stream: int, column: int) -> float:
    mask = (1 << 64) - 1
    z = seed * 0xBF58476D1CE4E5B9 + step * 0x9E3779B97F4A7C15 + (stream * 1024 + column) * 0x94D049BB133111EB
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)


def test_counter_uniforms_are_splitmix64_of_seed_step_stream_and_column():
    seeds, steps = torch.tensor([0, 7, 2**40 + 3]), torch.tensor([0, 5, 1999])
    for stream in (0, 1):
        u = counter_uniform(seeds, steps, stream, C)
        expected = [
            [splitmix64_uniform(seed, step, stream, col) for col in range(C)]
            for seed, step in zip(seeds.tolist(), steps.tolist(), strict=True)
        ]
        assert u.tolist() == expected


def test_compiled_counter_uniforms_keep_64_bit_constants_out_of_index_arithmetic():
    import re

    from torch._inductor.utils import run_and_get_code

    seeds, steps = torch.tensor([5, 6, 7]), torch.tensor([3, 4, 5])
    compiled = torch.compile(lambda a, b: counter_uniform(a, b, 1, C), fullgraph=True, dynamic=True)
    u, code = run_and_get_code(compiled, seeds, steps)
    assert torch.equal(u, counter_uniform(seeds, steps, 1, C))
    # Triton indexes small tensors in int32: an index times such a constant does not build on a GPU.
    index_times_big = re.compile(r"\d{10,}L?\)?\s*\*\s*\(?x\d|x\d\)?\s*\*\s*\(?-?\d{10,}")
    assert not index_times_big.findall("\n".join(code))


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
