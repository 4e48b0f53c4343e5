"""Chapter mastering to the ACX audiobook rules, and the QC measurements that check them.

ACX (Audible) rejects files unless: RMS -23..-18 dBFS over the whole file, sample peak <= -3 dBFS,
noise floor (RMS of room tone) <= -60 dBFS, 0.5-1 s of room tone at the head and 1-5 s at the tail,
44.1 kHz. ``master_chapter`` produces that from raw 24 kHz TTS output; ``measure_qc`` checks it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyloudnorm
import torch
import torchaudio.functional as AF

ACX_RATE = 44100
# Below this a 50 ms window counts as "silence" for head/tail measurement and for gating pauses. It is
# well above the -60 dB room tone and well below speech at -20 dB RMS, so the split is unambiguous.
SILENCE_DB = -50.0
_EPS = 1e-12


@dataclass
class Pauses:
    sentence_s: float = 0.35
    paragraph_s: float = 0.8
    chapter_head_s: float = 0.75  # room tone before the first word (ACX: 0.5-1 s)
    chapter_tail_s: float = 2.0  # room tone after the last word (ACX: 1-5 s)


@dataclass
class QC:
    rms_db: float
    peak_db: float
    noise_floor_db: float
    lufs: float
    duration_s: float
    sample_rate: int
    head_silence_s: float
    tail_silence_s: float
    rms_ok: bool
    peak_ok: bool
    noise_floor_ok: bool
    head_ok: bool
    tail_ok: bool
    sample_rate_ok: bool
    passed: bool


def _db(x: float) -> float:
    return float(20.0 * np.log10(max(float(x), _EPS)))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _window_rms(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    """RMS of every `win`-sample window starting at multiples of `hop` (cumulative sums: O(n))."""
    if x.size < win:
        return np.array([_rms(x)])
    csum = np.concatenate([[0.0], np.cumsum(np.square(x, dtype=np.float64))])
    starts = np.arange(0, x.size - win + 1, hop)
    return np.sqrt(np.maximum(csum[starts + win] - csum[starts], 0.0) / win)


def stitch(chunks: list[np.ndarray], sample_rate: int, gaps_s: list[float]) -> np.ndarray:
    """Concatenate chunks with digital silence between them; mastering turns the silence into room tone."""
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    if len(gaps_s) != len(chunks) - 1:
        raise ValueError(f"need {len(chunks) - 1} gaps for {len(chunks)} chunks, got {len(gaps_s)}")
    parts: list[np.ndarray] = []
    for i, chunk in enumerate(chunks):
        parts.append(np.asarray(chunk, dtype=np.float32).reshape(-1))
        if i < len(gaps_s):
            parts.append(np.zeros(round(gaps_s[i] * sample_rate), dtype=np.float32))
    return np.concatenate(parts)


def _speech_mask(x: np.ndarray, sr: int, min_gap_s: float = 0.1) -> np.ndarray:
    """Per-sample True where there is speech, for `x` already at roughly the target loudness.

    The gate opens 6 dB above the hiss level (5th percentile of 50 ms windows, i.e. in the pauses), but
    never lower than SILENCE_DB (so trimmed head/tail lengths match what QC measures) and never
    higher than 20 dB under the loud speech (90th percentile), so signals with no pauses (noise, music)
    are left whole. Silent runs shorter than `min_gap_s` (stop-consonant closures) stay speech so the
    gate never chatters inside words.
    """
    hop = max(1, sr // 100)
    win = max(hop, sr // 20)
    levels = _window_rms(x, win, hop)
    levels_db = 20 * np.log10(np.maximum(levels, _EPS))
    hiss_db, speech_db = np.percentile(levels_db, [5, 90])
    threshold = 10 ** (min(max(hiss_db + 6.0, SILENCE_DB), speech_db - 20.0) / 20)
    # A sample is speech if any 50 ms window covering it is loud: this keeps soft onsets/decays whole.
    starts = np.flatnonzero(levels >= threshold) * hop
    cover = np.zeros(x.size + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, np.minimum(starts + win, x.size), -1)
    frame_mask = np.cumsum(cover[:-1]) > 0
    # Re-admit silent runs too short to be a pause.
    min_gap = int(min_gap_s * sr)
    edges = np.flatnonzero(np.diff(np.concatenate([[1], frame_mask.astype(np.int8), [1]])))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        if start > 0 and stop < x.size and stop - start < min_gap:
            frame_mask[start:stop] = True
    return frame_mask


def _moving_average(a: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of odd `width`, edges padded by repetition; O(n) via cumulative sums."""
    half = width // 2
    padded = np.concatenate([np.full(half, a[0]), a, np.full(half, a[-1])]).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    return ((csum[width:] - csum[:-width]) / width).astype(np.float32)


def _min_filter(a: np.ndarray, half: int, fill: float) -> np.ndarray:
    """Centred running minimum of width 2*half+1 (van Herk/Gil-Werman: O(n), not O(n*width))."""
    width = 2 * half + 1
    n_blocks = -(-(a.size + 2 * half) // width)
    padded = np.full(n_blocks * width, fill, dtype=a.dtype)
    padded[half : half + a.size] = a
    blocks = padded.reshape(n_blocks, width)
    prefix = np.minimum.accumulate(blocks, axis=1).reshape(-1)
    suffix = np.minimum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].reshape(-1)
    # A window starting at i spans the tail of i's block (suffix) and the head of the next (prefix).
    return np.minimum(suffix[: a.size], prefix[width - 1 : width - 1 + a.size])


def _smooth_gate(mask: np.ndarray, sr: int, fade_s: float = 0.005) -> np.ndarray:
    """0/1 mask -> gain with short linear fades, so gating does not click."""
    return _moving_average(mask.astype(np.float32), 2 * max(1, int(fade_s * sr / 2)) + 1)


def _true_peak_envelope(x: np.ndarray, block: int = 1 << 20, margin: int = 64) -> np.ndarray:
    """Per-sample max |x| over 4x oversampling (the BS.1770 true-peak method), in bounded memory.

    Speech from a 24 kHz model has energy up to 12 kHz; at 44.1 kHz such content peaks up to ~1 dB
    between samples, and the MP3 decoder reproduces those peaks. ACX measures the decoded MP3, so
    limiting must see them. Blocks overlap by `margin` samples so the interpolation filter never sees
    an artificial edge.
    """
    env = np.empty_like(x)
    for start in range(0, x.size, block):
        lo, hi = max(0, start - margin), min(x.size, start + block + margin)
        up = AF.resample(torch.from_numpy(np.ascontiguousarray(x[lo:hi])), 1, 4).numpy()
        seg = np.abs(up[: 4 * (hi - lo)].reshape(hi - lo, 4)).max(axis=1)
        stop = min(x.size, start + block)
        env[start:stop] = np.maximum(seg[start - lo : stop - lo], np.abs(x[start:stop]))
    return env


def _limit(
    x: np.ndarray, peaks: np.ndarray, sr: int, ceiling: float, lookahead_s: float = 0.005
) -> np.ndarray:
    """Lookahead peak limiter: a smooth gain that is never above what each sample needs.

    The gain each sample requires is min(1, ceiling/peak) with `peaks` the true-peak envelope of x. A
    min-filter of half-width L spreads each dip to its neighbours, then a centred moving average of the
    same width smooths it; every value averaged at n came from a min over a window containing n, so
    the smoothed gain is still <= the requirement at n. Peaks land at or below the ceiling without hard
    clipping, and the gain ramps over ~2L samples (a few ms: inaudible on speech, and none of a
    clipper's square corners, which would themselves overshoot between samples).
    """
    need = np.minimum(1.0, ceiling / np.maximum(peaks, _EPS)).astype(np.float32)
    if need.size == 0 or need.min() >= 1.0:
        return x
    half = max(1, int(lookahead_s * sr))
    gain = _moving_average(_min_filter(need, half, fill=1.0), 2 * half + 1)
    # Float rounding in the average can leave a sample a hair over; clip that last ulp.
    return np.clip(x * gain, -ceiling, ceiling)


def _room_tone(n: int, rms_db: float, seed: int = 0) -> np.ndarray:
    # Seeded so re-mastering a chapter is byte-identical (resumable jobs compare outputs).
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n)
    return (noise / max(_rms(noise), _EPS) * 10 ** (rms_db / 20)).astype(np.float32)


def master_chapter(
    audio: np.ndarray,
    sample_rate: int,
    pauses: Pauses,
    target_rate: int = ACX_RATE,
    target_rms_db: float = -20.0,
    peak_ceiling_db: float = -3.5,
    noise_floor_db: float = -65.0,
) -> np.ndarray:
    """Resample, gate pauses, set loudness, limit peaks and wrap in room tone to meet ACX.

    Only ``pauses.chapter_head_s``/``chapter_tail_s`` are used here; sentence/paragraph gaps are laid
    down earlier by ``stitch`` and only have their contents replaced by room tone.
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate != target_rate and x.size:
        x = AF.resample(torch.from_numpy(x), sample_rate, target_rate).numpy()
    sr = target_rate
    head = int(round(pauses.chapter_head_s * sr))
    tail = int(round(pauses.chapter_tail_s * sr))
    target = 10 ** (target_rms_db / 20)
    ceiling = 10 ** (peak_ceiling_db / 20)

    # Find pauses at output level (preliminary gain to the target RMS): residual decoder hiss in them
    # would otherwise come up with the gain and fail the noise floor, so it is replaced by room tone.
    speech = _speech_mask(x * (target / max(_rms(x), _EPS)), sr)
    if speech.any():
        first, last = np.flatnonzero(speech)[[0, -1]]
        # Trim so the head/tail room tone has exactly the requested length.
        x, speech = x[first : last + 1], speech[first : last + 1]
        x = x * _smooth_gate(speech, sr)

    # ACX measures plain RMS in dBFS over the whole file (room tone included), not LUFS: pyloudnorm's
    # integrated loudness is K-weighted and gated, so it can sit several dB away from what ACX's meter
    # reads. So the gain is solved directly from the speech energy against the final file length.
    # Limiting shaves a little energy off, so re-solve against the limited result a few times.
    n_total = x.size + head + tail
    energy = float(np.sum(np.square(x, dtype=np.float64)))
    gain = target * np.sqrt(n_total / max(energy, _EPS))
    peaks = _true_peak_envelope(x)  # scales linearly with gain, so computed once
    y = x
    for _ in range(4):
        y = _limit(x * gain, peaks * gain, sr, ceiling)
        got = np.sqrt(np.sum(np.square(y, dtype=np.float64)) / n_total)
        if abs(_db(got) - target_rms_db) < 0.05:
            break
        gain *= target / max(got, _EPS)

    out = np.concatenate([np.zeros(head, np.float32), y.astype(np.float32), np.zeros(tail, np.float32)])
    # Continuous room tone under everything: pauses and head/tail sound like the same room, not digital
    # silence (which ACX also flags). At -65 dB it is inaudible under speech.
    out += _room_tone(out.size, noise_floor_db)
    return np.clip(out, -ceiling, ceiling).astype(np.float32)


def _loudness_lufs(x: np.ndarray, sr: int) -> float:
    try:
        return float(pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64)))
    except ValueError:  # shorter than one 400 ms gating block
        return float("nan")


def _silent_run_s(levels: np.ndarray, hop_s: float, win_s: float, threshold: float) -> float:
    loud = np.flatnonzero(levels >= threshold)
    if loud.size == 0:
        return float((levels.size - 1) * hop_s + win_s)
    # Windows before the first loud one are silent; together they cover (i-1)*hop + win seconds.
    return 0.0 if loud[0] == 0 else float((loud[0] - 1) * hop_s + win_s)


def measure_qc(audio: np.ndarray, sample_rate: int) -> QC:
    """Measure a chapter the way ACX's checks describe them."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    sr = sample_rate
    rms_db = _db(_rms(x))
    peak_db = _db(float(np.max(np.abs(x))) if x.size else 0.0)
    # ACX's noise floor is the RMS of the room tone; the quietest 500 ms stretch is where that lives.
    noise_floor_db = _db(float(np.min(_window_rms(x, max(1, sr // 2), max(1, sr // 10)))))
    hop, win = max(1, sr // 100), max(1, sr // 20)
    levels = _window_rms(x, win, hop)
    thr = 10 ** (SILENCE_DB / 20)
    head_s = min(_silent_run_s(levels, hop / sr, win / sr, thr), x.size / sr)
    tail_s = min(_silent_run_s(levels[::-1], hop / sr, win / sr, thr), x.size / sr)
    checks = {
        "rms_ok": bool(-23.0 <= rms_db <= -18.0),
        "peak_ok": bool(peak_db <= -3.0),
        "noise_floor_ok": bool(noise_floor_db <= -60.0),
        "head_ok": bool(0.5 <= head_s <= 1.0),
        "tail_ok": bool(1.0 <= tail_s <= 5.0),
        "sample_rate_ok": bool(sr == ACX_RATE),
    }
    return QC(
        rms_db=round(rms_db, 2),
        peak_db=round(peak_db, 2),
        noise_floor_db=round(noise_floor_db, 2),
        lufs=round(_loudness_lufs(x, sr), 2),
        duration_s=round(x.size / sr, 3),
        sample_rate=int(sr),
        head_silence_s=round(head_s, 3),
        tail_silence_s=round(tail_s, 3),
        **checks,
        passed=all(checks.values()),
    )


def qc_table(rows: list[tuple[str, QC]]) -> list[dict]:
    """Flat dict rows (chapter + every QC field) ready for a CSV/Parquet writer."""
    return [{"chapter": name, **asdict(qc)} for name, qc in rows]
