"""Rows decoded together on a SlotCache: the engine's default decode path.

Each row owns a slot. A DecodeStep advances every slot of the batch's bucket by one frame, sampling included,
without asking the GPU anything; the engine looks at which rows finished only every few steps (LOOK_EVERY,
fewer when a row's max_new_tokens comes sooner), retires them and frees their slots for waiting rows. A row
that finishes between looks steps on in its own slot; those frames are discarded, so a row's codes are the
same as on the plain path (tests/test_slot_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.decode_step import DecodeStep, bucket_for
from model.sampling import widest_top_k
from model.slot_cache import round_up

LOOK_EVERY = 8


@dataclass
class _Row:
    item: object  # the engine's prepared request
    tokens: int  # context tokens so far
    left: int  # steps before max_new_tokens, or the end of its slot, ends the row
    top_k: int
    ras: bool


class SlotBatch:
    def __init__(self, step: DecodeStep) -> None:
        self.step = step
        self.rows: dict[int, _Row] = {}  # by slot

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def items(self) -> list:
        return [row.item for row in self.rows.values()]

    @property
    def length(self) -> int:
        return max((row.tokens for row in self.rows.values()), default=0)

    def merge(self, prefill) -> None:
        """Take in a prefilled model.batch_state.DynamicBatch."""
        cache = self.step.cache
        slots = cache.allocate(len(prefill))
        counts, limits = cache.admit(slots, prefill)
        top_ks = prefill.params.top_k.tolist()
        ras = prefill.params.ras_win_len.tolist()
        rows = zip(slots, prefill.items, counts, limits, top_ks, ras, strict=True)
        for slot, item, n, limit, top_k, window in rows:
            self.rows[slot] = _Row(item, n, limit, top_k, window > 0)

    @property
    def sampling_shape(self) -> tuple[int, bool]:
        """What the decode step's sampling needs of the batch: the widest top-k, and whether RAS runs."""
        rows = self.rows.values()
        return widest_top_k(row.top_k for row in rows), self.step.cache.window > 0 and any(
            r.ras for r in rows
        )

    def advance(self, engine, then: Callable[[], None] | None = None) -> list[tuple]:
        """Run up to LOOK_EVERY steps, then retire the rows that finished. Returns them as
        (item, (steps, C) frames on the CPU). `then` runs once the steps are queued, before the look waits
        for them: GPU work it queues on another stream runs beside them."""
        cache = self.step.cache
        rows = self.rows.values()
        widest, any_ras = self.sampling_shape
        steps = max(1, min(LOOK_EVERY, *(row.left for row in rows)))
        engine._guard(len(self), self.length + steps)
        highest = max(self.rows) + 1
        # Columns up to the longest row's last write before the next look; a slot sized for a generous
        # estimate (or all of max_new_tokens) is mostly unused while rows stop on their own sooner.
        span = min(cache.length, round_up(self.length + steps))
        for _ in range(steps):
            self.step(highest, span, widest, any_ras)
        if then is not None:
            then()
        for row in rows:
            row.tokens += steps
            row.left -= steps
        slots = list(self.rows)
        done_at = cache.done_at[torch.tensor(slots, device=cache.mask.device)].tolist()
        finished = [(slot, n) for slot, n in zip(slots, done_at, strict=True) if n >= 0]
        # A copy: on CPU .cpu() would return a view of a slot the next row overwrites.
        retired = [
            (self.rows.pop(slot).item, cache.frames[slot, :n].to("cpu", copy=True)) for slot, n in finished
        ]
        cache.release([slot for slot, _ in finished])
        self._pack()
        return retired

    def _pack(self) -> None:
        """Once rows have left, move the ones above the smallest bucket that holds them all down into free
        slots, so the step runs on that bucket instead of the highest occupied slot's."""
        if not self.rows:
            return
        cache = self.step.cache
        bucket = bucket_for(len(self.rows), cache.slots)
        high = sorted(slot for slot in self.rows if slot >= bucket)
        if not high:
            return
        free = sorted(set(range(bucket)) - set(self.rows))[: len(high)]
        cache.move(high, free)
        for src, dst in zip(high, free, strict=True):
            self.rows[dst] = self.rows.pop(src)
