"""Per-row next-frame selection for batched audio generation.

Every row carries its own temperature, top-k, top-p, RAS window and seed. Random numbers come from a
counter-based generator keyed by (seed, step, codebook), so a row draws the same numbers whatever batch it
sits in: a request's codes depend only on the request, its seed and the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import cached_property

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch shifts int64 arithmetically; mask to get the logical shift splitmix64 needs.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniform floats in [0, 1) of shape (B, n), a pure function of (seed, step, stream, column): splitmix64."""
    # `| 0` makes the column a value: Inductor would otherwise fold (column * _MIX2) into the kernel's index
    # arithmetic, and Triton indexes small tensors in int32, where _MIX2 does not fit (a compiled step failed
    # to build on an H200 so).
    cols = (torch.arange(n, device=seeds.device, dtype=torch.int64) + stream * 1024) | 0
    x = seeds[:, None] * _signed(_MIX1) + steps[:, None] * _signed(_GOLDEN) + cols[None, :] * _signed(_MIX2)
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    x = x ^ _shr(x, 31)
    return _shr(x, 40).to(torch.float32) / float(1 << 24)


@dataclass
class RowParams:
    """Sampling parameters of the rows of one batch, as (B,) tensors on the model's device."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    ras_win_len: torch.Tensor  # 0 turns RAS off for the row
    ras_max_repeat: torch.Tensor
    seeds: torch.Tensor

    @classmethod
    def stack(cls, rows: list[dict], device: torch.device) -> RowParams:
        def col(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([r[name] for r in rows], dtype=dtype, device=device)

        return cls(
            temperature=col("temperature", torch.float32),
            top_k=col("top_k", torch.int64),
            top_p=col("top_p", torch.float32),
            ras_win_len=col("ras_win_len", torch.int64),
            ras_max_repeat=col("ras_max_repeat", torch.int64),
            seeds=col("seed", torch.int64),
        )

    def select(self, keep: torch.Tensor) -> RowParams:
        return RowParams(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def concat(self, other: RowParams) -> RowParams:
        return RowParams(
            **{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)}
        )

    # Read once per batch composition rather than every step: each read waits for the GPU.
    @cached_property
    def widest_top_k(self) -> int:
        return widest_top_k(self.top_k.tolist())

    @cached_property
    def any_ras(self) -> bool:
        return bool((self.ras_win_len > 0).any())


def widest_top_k(top_ks: Iterable[int]) -> int:
    """How many of the largest logits a draw must sort: the largest top-k, 0 when a row has none."""
    top_ks = list(top_ks)
    return 0 if min(top_ks) <= 0 else max(top_ks)


def advance_counters(
    frame: torch.Tensor,
    steps: torch.Tensor,
    eos_steps: torch.Tensor,
    max_steps: torch.Tensor,
    stream_eos: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After choosing (B, C) `frame`: each row's eos step (set at its first stream-eos), its step count, and
    whether it has finished (every codebook at stream-eos, or max_steps reached)."""
    is_eos = frame == stream_eos
    eos_steps = torch.where((eos_steps < 0) & is_eos.any(-1), steps, eos_steps)
    steps = steps + 1
    return eos_steps, steps, is_eos.all(-1) | (steps >= max_steps)


def _sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    widest_top_k: int,
) -> torch.Tensor:
    """Draw from (B, C, V) logits with per-row temperature, then top-k, then top-p (transformers' warper
    order), by inverse CDF with (B, C) uniforms. One sort serves the filters and the draw: when every row
    has a top-k (widest_top_k > 0: the largest of them), only that many logits are sorted (topk), which is
    most of a decode step's sampling cost."""
    scores = logits / temperature.clamp(min=1e-5)[:, None, None]
    vocab = scores.shape[-1]
    widest = min(vocab, widest_top_k) if widest_top_k > 0 else vocab
    if widest < vocab:
        sorted_scores, order = scores.topk(widest, dim=-1, largest=True, sorted=True)
    else:
        sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(widest, device=scores.device)[None, None, :]
    drop = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None, None]
    probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop = drop | ((probs.cumsum(dim=-1) - probs >= top_p[:, None, None]) & (ranks > 0))
    cdf = probs.masked_fill(drop, 0.0).cumsum(dim=-1)
    target = (u * cdf[..., -1]).unsqueeze(-1).contiguous()
    pos = torch.searchsorted(cdf.contiguous(), target).clamp(max=widest - 1)
    return order.gather(-1, pos).squeeze(-1)


def select_next_frame(
    logits: torch.Tensor,
    params: RowParams,
    steps: torch.Tensor,
    eos_steps: torch.Tensor,
    history: torch.Tensor,
    history_len: torch.Tensor,
    stream_bos: int,
    stream_eos: int,
    ignore_eos: bool = False,
    widest_top_k: int | None = None,
    any_ras: bool | None = None,
) -> torch.Tensor:
    """Choose the next (B, C) audio frame.

    logits: (B, C, V) for the C codebooks. steps: frames generated so far per row. eos_steps: the step at
    which the row first emitted a stream eos, -1 before. history: (B, W, C) last generated frames,
    right-aligned, with history_len valid frames per row. ignore_eos: stream-eos is never chosen.
    widest_top_k / any_ras: the batch's sampling shape, read from `params` when not given (a captured graph
    gives them: reading them from the GPU is not allowed there).
    The delay pattern forces codebook k to stream-bos for the first k+1 steps and to stream-eos from k+1
    steps after the first eos, so codebooks end in the same staircase they started in.
    """
    widest_top_k = params.widest_top_k if widest_top_k is None else widest_top_k
    any_ras = params.any_ras if any_ras is None else any_ras
    batch, codebooks, _ = logits.shape
    logits = logits.float()
    cb = torch.arange(codebooks, device=logits.device)[None, :]
    force_bos = steps[:, None] <= cb
    force_eos = (eos_steps[:, None] >= 0) & (steps[:, None] >= eos_steps[:, None] + 1 + cb)
    # After its opening staircase a codebook never needs stream-bos again.
    logits = logits.clone()
    logits[..., stream_bos] = float("-inf")
    if ignore_eos:
        logits[..., stream_eos] = float("-inf")

    greedy = params.temperature <= 0
    u = counter_uniform(params.seeds, steps, 0, codebooks)
    sampled = _sample(logits, params.temperature, params.top_k, params.top_p, u, widest_top_k)
    chosen = torch.where(greedy[:, None], logits.argmax(dim=-1), sampled)

    # RAS (repetition-aware sampling): a code already repeated ras_max_repeat times within the last
    # ras_win_len frames is redrawn from the untempered distribution.
    window = history.shape[1]
    if window and any_ras:
        positions = torch.arange(window, device=logits.device)[None, :]
        in_window = (positions >= window - torch.minimum(history_len, params.ras_win_len)[:, None])[..., None]
        real = (history != stream_bos) & (history != stream_eos)
        repeats = ((history == chosen[:, None, :]) & real & in_window).sum(dim=1)
        redraw = (repeats >= params.ras_max_repeat[:, None]) & (params.ras_win_len > 0)[:, None]
        # On a GPU (and in a compiled step) the redraw is cheaper to compute for every row than to ask
        # whether any row needs it, which would wait for the GPU every step (and break the compiled graph).
        if logits.device.type == "cuda" or torch.compiler.is_compiling() or bool(redraw.any()):
            ones = torch.ones_like(params.temperature)
            u = counter_uniform(params.seeds, steps, 1, codebooks)
            redrawn = _sample(logits, ones, torch.zeros_like(params.top_k), ones, u, 0)
            chosen = torch.where(redraw, redrawn, chosen)

    chosen = torch.where(force_bos, torch.full_like(chosen, stream_bos), chosen)
    return torch.where(force_eos, torch.full_like(chosen, stream_eos), chosen)
