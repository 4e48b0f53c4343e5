"""ACX mastering: stitched synthetic speech in, measured QC out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.mastering import QC, Pauses, master_chapter, measure_qc, qc_table, stitch

SR = 24000
PAUSES = Pauses()


def speech_like(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Syllable-sized voiced (harmonic) and fricative (noise) bursts with envelopes and short gaps."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    while sum(p.size for p in parts) < seconds * sr:
        n = int(rng.uniform(0.08, 0.25) * sr)
        if rng.random() < 0.7:
            f0 = rng.uniform(90, 220) * np.linspace(1.0, 1.1, n)
            phase = 2 * np.pi * np.cumsum(f0) / sr
            burst = sum(np.sin(k * phase) / k for k in range(1, 12))
        else:
            burst = 0.6 * rng.standard_normal(n)
        parts.append(burst * np.hanning(n) ** 0.7 * rng.uniform(0.3, 1.0))
        parts.append(np.zeros(int(rng.uniform(0.02, 0.09) * sr)))
    x = np.concatenate(parts)
    return (x / np.max(np.abs(x))).astype(np.float32)


def chapter_input(seed: int = 0) -> np.ndarray:
    chunks = [speech_like(1.5, seed=seed + i) for i in range(4)]
    return stitch(chunks, SR, [PAUSES.sentence_s, PAUSES.paragraph_s, PAUSES.sentence_s])


def _inputs() -> dict[str, np.ndarray]:
    x = chapter_input()
    rng = np.random.default_rng(7)
    return {
        "quiet": x * 10 ** (-30 / 20),  # peak -30 dBFS
        "loud_clipped": np.clip(x * 4.0, -1.0, 1.0),  # +12 dB into a hard clip
        # What a tiny random-weight model emits: white noise at an arbitrary level, no pauses at all.
        "white_noise": (rng.standard_normal(4 * SR) * rng.uniform(0.01, 0.3)).astype(np.float32),
    }


def test_stitch_inserts_gaps_of_the_right_length() -> None:
    chunks = [np.full(100, 0.5, np.float32), np.full(200, -0.5, np.float32), np.full(50, 0.25, np.float32)]
    out = stitch(chunks, 1000, [0.01, 0.025])
    assert out.dtype == np.float32
    assert out.size == 100 + 10 + 200 + 25 + 50
    assert np.all(out[:100] == 0.5) and np.all(out[100:110] == 0)
    assert np.all(out[110:310] == -0.5) and np.all(out[310:335] == 0)
    assert np.all(out[335:] == 0.25)
    assert stitch([], 1000, []).size == 0
    with pytest.raises(ValueError, match="gaps"):
        stitch(chunks, 1000, [0.1])


@pytest.mark.parametrize("name", ["quiet", "loud_clipped", "white_noise"])
def test_master_chapter_meets_every_acx_rule(name: str) -> None:
    audio = _inputs()[name]
    assert not measure_qc(audio, SR).passed  # raw TTS output is not ACX-ready

    out = master_chapter(audio, SR, PAUSES)
    qc = measure_qc(out, 44100)

    assert out.dtype == np.float32
    assert qc.passed, qc
    assert qc.sample_rate == 44100
    assert abs(qc.rms_db - -20.0) <= 0.5
    assert qc.peak_db <= -3.49
    assert qc.noise_floor_db <= -63.0
    assert abs(qc.head_silence_s - PAUSES.chapter_head_s) <= 0.06
    assert PAUSES.chapter_tail_s - 0.01 <= qc.tail_silence_s <= PAUSES.chapter_tail_s + 0.15
    assert np.isfinite(qc.lufs)


def test_pause_hiss_is_gated_to_room_tone() -> None:
    # Decoder hiss 40 dB under the speech peak would sit near -45 dBFS after gain; ACX wants <= -60.
    x = chapter_input(seed=3)
    x = x + (np.random.default_rng(1).standard_normal(x.size) * 10 ** (-40 / 20)).astype(np.float32)
    out = master_chapter(x, SR, PAUSES)
    head, tail = int(PAUSES.chapter_head_s * 44100), int(PAUSES.chapter_tail_s * 44100)
    body = out[head:-tail]  # the 0.8 s paragraph pause is the only place a 500 ms window fits
    assert measure_qc(body, 44100).noise_floor_db <= -60.0
    assert measure_qc(out, 44100).passed


def test_master_chapter_is_deterministic() -> None:
    x = chapter_input(seed=5)
    assert np.array_equal(master_chapter(x, SR, PAUSES), master_chapter(x, SR, PAUSES))


def test_qc_flags_exactly_the_broken_rules() -> None:
    rng = np.random.default_rng(2)
    loud_noise = (0.5 * rng.standard_normal(3 * SR)).clip(-1, 1).astype(np.float32)
    bad = measure_qc(loud_noise, SR)
    assert not bad.passed
    assert not any(
        [bad.rms_ok, bad.peak_ok, bad.noise_floor_ok, bad.head_ok, bad.tail_ok, bad.sample_rate_ok]
    )
    assert bad.head_silence_s == 0.0 and bad.tail_silence_s == 0.0

    # A good master with its head cut to 0.1 s and 4 s of extra tail room tone: only those two fail.
    good = master_chapter(chapter_input(seed=9), SR, PAUSES)
    cut = int((PAUSES.chapter_head_s - 0.1) * 44100)
    room = good[: int(0.5 * 44100)]
    trimmed = np.concatenate([good[cut:], *([room] * 8)])
    qc = measure_qc(trimmed, 44100)
    assert (qc.rms_ok, qc.peak_ok, qc.noise_floor_ok, qc.sample_rate_ok) == (True, True, True, True)
    assert (qc.head_ok, qc.tail_ok, qc.passed) == (False, False, False)
    assert qc.head_silence_s == pytest.approx(0.1, abs=0.06)
    assert qc.tail_silence_s > 5.0


def test_qc_table_rows_are_plain_and_complete() -> None:
    out = master_chapter(chapter_input(seed=11), SR, PAUSES)
    rows = qc_table([("ch01", measure_qc(out, 44100)), ("ch02", measure_qc(out[:44100], 44100))])
    assert [r["chapter"] for r in rows] == ["ch01", "ch02"]
    assert set(rows[0]) == {"chapter", *QC.__dataclass_fields__}
    assert rows[0]["passed"] is True and rows[1]["passed"] is False
    json.dumps(rows)  # only builtin types, so CSV/Parquet writers take them as-is
