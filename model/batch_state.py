"""Rows decoded together on transformers' DynamicCache: the plain path, and every prefill.

Rows leave as soon as they finish, so the batch shrinks instead of decoding padding; waiting requests can
join a running batch (continuous batching). Every row is left-padded to the batch's common length, carries
its own position ids and its own step counter, so what a row computes does not depend on when it joined.
The engine decodes on model.slot_batch by default and keeps this path as the reference the fast one is
tested against (`EngineOptions(static_cache=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.sampling import RowParams, advance_counters, select_next_frame


def _pad_front(x: torch.Tensor, amount: int, dim: int, value: float = 0) -> torch.Tensor:
    if amount == 0:
        return x
    shape = list(x.shape)
    shape[dim] = amount
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)


@dataclass
class DynamicBatch:
    items: list  # the engine's prepared requests, one per row
    cache: DynamicCache
    attention: torch.Tensor  # (B, T) 1 for real tokens
    positions: torch.Tensor  # (B,) position id of each row's last token
    logits: torch.Tensor  # (B, C, V) for the next frame
    params: RowParams
    steps: torch.Tensor  # (B,) frames generated per row
    eos_steps: torch.Tensor  # (B,) step of the row's first stream-eos, -1 before
    max_steps: torch.Tensor  # (B,)
    history: torch.Tensor  # (B, W, C) last frames for RAS
    frames: torch.Tensor  # (B, S, C) generated frames, right-aligned: row r's are its last steps[r]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def length(self) -> int:
        return self.attention.shape[1]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows at `keep` (a 1-D index tensor), then drop columns no row uses any more."""
        idx = keep.tolist()
        self.items = [self.items[i] for i in idx]
        self.cache.batch_select_indices(keep)
        for name in (
            "attention",
            "positions",
            "logits",
            "steps",
            "eos_steps",
            "max_steps",
            "history",
            "frames",
        ):
            setattr(self, name, getattr(self, name)[keep])
        self.params = self.params.select(keep)
        self._trim()

    def take(self, n: int) -> DynamicBatch:
        """The first `n` rows as a batch of their own, the others staying in this one: rows prefilled ahead
        of the slots they will join (SynthesisEngine._decode_all)."""
        device = self.attention.device
        head = torch.arange(n, device=device)
        cache = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[:n], layer.values[:n], i)
        taken = DynamicBatch(
            items=self.items[:n],
            cache=cache,
            attention=self.attention[:n],
            positions=self.positions[:n],
            logits=self.logits[:n],
            params=self.params.select(head),
            steps=self.steps[:n],
            eos_steps=self.eos_steps[:n],
            max_steps=self.max_steps[:n],
            history=self.history[:n],
            frames=self.frames[:n],
        )
        self.select(torch.arange(n, len(self), device=device))
        return taken

    def _trim(self) -> None:
        if not len(self.items):
            return
        unused = int((self.attention.cumsum(dim=1) == 0).all(dim=0).sum().item())
        if unused:
            self.attention = self.attention[:, unused:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
        longest = int(self.steps.max().item())
        if self.frames.shape[1] > longest:
            self.frames = self.frames[:, self.frames.shape[1] - longest :]

    def merge(self, other: DynamicBatch) -> None:
        """Append `other`'s rows, left-padding whichever side is shorter in cache and frame columns."""
        total = max(self.length, other.length)
        mine, theirs = total - self.length, total - other.length
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_pad_front(a.keys, mine, 2), _pad_front(b.keys, theirs, 2)], dim=0)
            a.values = torch.cat([_pad_front(a.values, mine, 2), _pad_front(b.values, theirs, 2)], dim=0)
        self.attention = torch.cat(
            [_pad_front(self.attention, mine, 1), _pad_front(other.attention, theirs, 1)]
        )
        width = max(self.frames.shape[1], other.frames.shape[1])
        self.frames = torch.cat(
            [
                _pad_front(self.frames, width - self.frames.shape[1], 1),
                _pad_front(other.frames, width - other.frames.shape[1], 1),
            ]
        )
        window = max(self.history.shape[1], other.history.shape[1])
        self.history = torch.cat(
            [
                _pad_front(self.history, window - self.history.shape[1], 1, -1),
                _pad_front(other.history, window - other.history.shape[1], 1, -1),
            ]
        )
        self.items = self.items + other.items
        for name in ("positions", "logits", "steps", "eos_steps", "max_steps"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.params = self.params.concat(other.params)

    def append_frame(self, frame: torch.Tensor) -> None:
        """Record the step's frame; finished rows leave before the next one, so every row advances."""
        self.frames = torch.cat([self.frames, frame[:, None, :]], dim=1)
        if self.history.shape[1]:
            self.history = torch.cat([self.history[:, 1:], frame[:, None, :]], dim=1)

    def row_frames(self, row: int) -> torch.Tensor:
        n = int(self.steps[row].item())
        return self.frames[row, self.frames.shape[1] - n :]

    def extend_attention(self) -> None:
        self.attention = F.pad(self.attention, (0, 1), value=1)
        self.positions = self.positions + 1

    def advance(self, engine) -> list[tuple]:
        """Choose one frame for every row, retire the finished rows, run the model for the others.
        Returns the retired rows as (item, (steps, C) frames on the CPU)."""
        frame = select_next_frame(
            self.logits, self.params, self.steps, self.eos_steps, self.history, self.steps,
            engine.stream_bos, engine.stream_eos, engine.options.ignore_eos,
        )  # fmt: skip
        self.append_frame(frame)
        self.eos_steps, self.steps, finished = advance_counters(
            frame, self.steps, self.eos_steps, self.max_steps, engine.stream_eos
        )
        done_rows = finished.nonzero().flatten().tolist()
        retired = [(self.items[r], self.row_frames(r).cpu()) for r in done_rows]
        if done_rows:
            keep = (~finished).nonzero().flatten()
            frame = frame[keep]
            self.select(keep)
        if len(self):
            self.extend_attention()
            engine._guard(len(self), self.length)
            out = engine.model(
                audio_input_ids=frame[:, None, :],
                attention_mask=self.attention,
                position_ids=self.positions[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
            self.logits = out.logits[:, -1, :].view(len(self), engine.num_codebooks, -1)
        return retired
