"""Codes to waveforms in codec calls of equal-length inputs.

The audio tokenizer's decoder is convolutional: an output sample depends only on the frames within its reach
(10 frames, 0.4 s, for the release's codec). So a row of any length is cut into windows of one size that
overlap by that reach on each side, and windows from every row batch into a few calls; each window keeps
its middle, which is what decoding the whole row gives there, up to float rounding (~5e-6 of full scale for
the release's codec on CPU). Decoding rows one call per distinct length cost ~13-26 ms a call on an H200,
and a dataset's rows rarely share lengths. Rows no longer than a window are decoded whole, batched with rows
of their exact length. Padding rows to a common length instead would change how each one ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Frames each window contributes; the window adds the reach on both sides.
WINDOW_CORE = 64
# Frames around the probed one: a reach of half this or more is not trusted, and rows are decoded whole.
PROBE_FRAMES = 128


@dataclass(frozen=True)
class Piece:
    """One codec input cut from a row: frames [start, start + length), of which [keep_from, keep_to) (row
    frames) go into the row's waveform."""

    row: int
    start: int
    length: int
    keep_from: int
    keep_to: int


def margin_for(reach: int | None) -> int | None:
    """Frames of overlap a window needs on either side for a probed reach (None: unknown, no windows)."""
    return None if reach is None else reach + 1


def window_length(margin: int, core: int = WINDOW_CORE) -> int:
    return core + 2 * margin


def cut(row: int, frames: int, margin: int | None, core: int = WINDOW_CORE) -> list[Piece]:
    """The pieces of a row of `frames` frames: windows of core + 2 x margin frames, each keeping its middle
    (and the row's first and last frames, where the row's own edge is the window's); one piece when the row
    fits one window or `margin` is None (reach unknown)."""
    if margin is None or frames <= window_length(margin, core):
        return [Piece(row, 0, frames, 0, frames)]
    window = window_length(margin, core)
    pieces, start, kept = [], 0, 0
    while start + window < frames:
        pieces.append(Piece(row, start, window, kept, start + window - margin))
        kept = start + window - margin
        start += core
    pieces.append(Piece(row, frames - window, window, kept, frames))
    return pieces


def probe_reach(decode: Callable[[torch.Tensor], np.ndarray], codebooks: int) -> int | None:
    """How many frames on either side of a frame its codes change the decoded audio: `decode` ((B, C, T)
    codes -> (B, samples) audio) gets two rows that differ in the middle frame of PROBE_FRAMES, in one call.
    None when the change reaches the probe's edges (windows would not be exact)."""
    codes = torch.zeros((2, codebooks, PROBE_FRAMES), dtype=torch.long)
    middle = PROBE_FRAMES // 2
    codes[1, :, middle] = 1
    audio = decode(codes)
    hop = audio.shape[-1] // PROBE_FRAMES
    changed = np.flatnonzero(audio[0] != audio[1])
    if not len(changed):
        return 0
    reach = max(middle - int(changed[0]) // hop, int(changed[-1]) // hop - middle)
    return reach if reach < middle - 1 else None


def vocode_rows(
    decode: Callable[[torch.Tensor], np.ndarray],
    rows: list[np.ndarray],
    margin: int | None,
    frames_per_call: int,
) -> tuple[list[np.ndarray], list[float]]:
    """Waveforms of `rows` ((C, frames) codes each) and each row's share of the decoding seconds. `decode`
    takes (B, C, T) codes to (B, samples) audio; a call takes about `frames_per_call` frames of windows."""
    by_length: dict[int, list[Piece]] = {}
    for i, codes in enumerate(rows):
        for piece in cut(i, codes.shape[-1], margin) if codes.shape[-1] else []:
            by_length.setdefault(piece.length, []).append(piece)
    waveforms = [np.zeros(0, dtype=np.float32) for _ in rows]
    seconds = [0.0] * len(rows)
    for length, pieces in by_length.items():
        size = max(1, frames_per_call // length)
        for at in range(0, len(pieces), size):
            chunk = pieces[at : at + size]
            started = time.perf_counter()
            audio = decode(
                torch.from_numpy(np.stack([rows[p.row][:, p.start : p.start + length] for p in chunk]))
            )
            share = (time.perf_counter() - started) / len(chunk)
            hop = audio.shape[-1] // length
            for piece, samples in zip(chunk, audio, strict=True):
                if not len(waveforms[piece.row]):
                    waveforms[piece.row] = np.zeros(rows[piece.row].shape[-1] * hop, dtype=np.float32)
                kept = samples[(piece.keep_from - piece.start) * hop : (piece.keep_to - piece.start) * hop]
                waveforms[piece.row][piece.keep_from * hop : piece.keep_to * hop] = kept
                seconds[piece.row] += share
    return waveforms, seconds
