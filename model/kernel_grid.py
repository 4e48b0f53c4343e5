"""How finely a decode step's attention kernels cut their work for a GPU's SMs to share it: the chunked
variable-length kernel (model.attention.own_columns_attention) and the split kernel (model.split_attention)
both cut each (row, key/value head)'s columns into pieces, each piece a sequence or program of its own, joined
through their log-sum-exps."""

from __future__ import annotations

# Sequences or programs a kernel should have at least for an H100's 132 SMs to share them: one row's 8
# key/value heads over ~700 columns ran on 8 CTAs, ~19 us a layer where its ~3 MB of keys and values take
# ~1.5 us to read (GPU runs 5 and 7).
MIN_PROGRAMS = 256


def pieces_for(sequences: int, length: int, min_width: int, most: int | None = None) -> int:
    """Into how many pieces each of `sequences` (row, key/value head) pairs over `length` columns is cut: the
    fewest, a power of two, that give MIN_PROGRAMS in all, at most `most` (if given), none under `min_width`
    columns."""
    pieces = 1
    while (
        sequences * pieces < MIN_PROGRAMS
        and (most is None or pieces < most)
        and length // (2 * pieces) >= min_width
    ):
        pieces *= 2
    return pieces
