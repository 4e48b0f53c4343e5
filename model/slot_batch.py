"""Rows decoded together on a SlotCache: the engine's default decode path.

Each row owns a slot. A DecodeStep advances every slot of the batch's bucket by one frame, sampling included,
without asking the GPU anything; the engine looks at which rows finished only every few steps (LOOK_EVERY,
fewer when a row's max_new_tokens comes sooner), retires them and frees their slots for waiting rows. A row
that finishes between looks steps on in its own slot; those frames are discarded, so a row's codes are the
same as on the plain path (tests/test_slot_cache.py).
"""

from __future__ import annotations

import torch

from model.decode_step import DecodeStep, bucket_for

LOOK_EVERY = 8


class SlotBatch:
    def __init__(self, step: DecodeStep) -> None:
        self.step = step
        self.rows: dict[int, object] = {}  # slot -> the engine's prepared request
        self.tokens: dict[int, int] = {}  # slot -> context tokens so far
        self.left: dict[int, int] = {}  # slot -> steps before max_new_tokens ends the row
        self.top_k: dict[int, int] = {}
        self.ras: dict[int, bool] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def items(self) -> list:
        return list(self.rows.values())

    @property
    def length(self) -> int:
        return max(self.tokens.values(), default=0)

    def merge(self, prefill) -> None:
        """Take in a prefilled model.batch_state.DynamicBatch."""
        cache = self.step.cache
        slots = cache.allocate(len(prefill))
        counts = cache.admit(slots, prefill)
        for slot, item, n in zip(slots, prefill.items, counts, strict=True):
            request = item.request
            self.rows[slot] = item
            self.tokens[slot] = n
            self.left[slot] = request.max_new_tokens
        for slot, top_k, ras in zip(
            slots, prefill.params.top_k.tolist(), prefill.params.ras_win_len.tolist(), strict=True
        ):
            self.top_k[slot], self.ras[slot] = top_k, ras > 0

    def advance(self, engine) -> list[tuple]:
        """Run up to LOOK_EVERY steps, then retire the rows that finished. Returns them as
        (item, (steps, C) frames on the CPU)."""
        cache = self.step.cache
        top_ks = list(self.top_k.values())
        widest = 0 if min(top_ks) <= 0 else max(top_ks)
        any_ras = any(self.ras.values()) and cache.window > 0
        steps = max(1, min(LOOK_EVERY, *self.left.values()))
        engine._guard(len(self), self.length + steps)
        highest = max(self.rows) + 1
        for _ in range(steps):
            self.step(highest, widest, any_ras)
        for slot in self.rows:
            self.tokens[slot] += steps
            self.left[slot] -= steps
        slots = list(self.rows)
        done_at = cache.done_at[torch.tensor(slots, device=cache.mask.device)].tolist()
        retired = []
        for slot, n in zip(slots, done_at, strict=True):
            if n >= 0:
                # A copy: on CPU .cpu() would return a view of a slot the next row overwrites.
                retired.append((self.rows.pop(slot), cache.frames[slot, :n].to("cpu", copy=True)))
                for table in (self.tokens, self.left, self.top_k, self.ras):
                    del table[slot]
        cache.release([s for s, n in zip(slots, done_at, strict=True) if n >= 0])
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
            for table in (self.rows, self.tokens, self.left, self.top_k, self.ras):
                table[dst] = table.pop(src)
