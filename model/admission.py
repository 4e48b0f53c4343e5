"""A call's admission policy: the order its waiting rows prefill in, which of them prefill together, and
when they join the running batch (continuous batching). SynthesisEngine._decode_all follows it; each rule
was measured with scripts/bench_lengths.py and bench_gpu.py, which set these constants to compare."""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.engine import _Prepared

# A call's rows of one voice prefill apart from other rows once there are this many: the voice's tokens then
# run through the model once for them all (share_prefix), which outweighs a prefill forward's fixed cost
# (~40 ms on an H200, against ~4 ms of compute a row for a ~350-token reference turn). Voices with fewer
# rows prefill together with other rows, by length, their whole prompts each.
MIN_VOICE_RUN = 8
# Rows expected to run longest are admitted first, so the ones admitted last, as the call drains, finish
# soonest: fewer steps run with slots idle at the end of a call. Rows whose reserves lie within one class of
# this many steps count as alike and go by prompt length instead, so prefill groups keep their padding low.
# On the CPU (bench_lengths.py), calls of rows of 150-349 frames through 32 slots took 1.19x / 1.14x / 1.05x
# fewer decode steps at 2 / 2.5 / 4 rows a slot than by prompt length alone. In an earlier probe (64 rows of
# 40-159 frames, 32 slots), classes of 1 / 16 / 64 steps took 220 / 225 / 245 steps (295 by prompt length,
# 195 at the least).
LENGTH_CLASS = 16
# A prefill group takes rows from up to this many times its size ahead in the queue (admit):
# in that probe, groups of consecutive rows only took 24 prefill forwards instead of 11 (10 by prompt length).
ADMIT_WINDOW = 2
# A running batch's refills prefill at least this share of its slots' rows at once: the rows beyond its free
# slots wait prefilled (their prompts' keys and values, as a prefill group holds them anyway) and take slots
# as rows finish, at the engine's next look. A prefill forward has a fixed cost: on an H200 one row's took 48
# ms against 7 ms a row at 128 rows, so prefilling each row as a slot freed made 512 rows through 128 slots
# slower (132x real time) than not refilling at all (155x). Waiting instead until this share of the slots was
# free (the rule until 2026-11-26 14:28 UTC) left slots idle meanwhile: ~6 % of a 256-slot batch's steps.
REFILL_SHARE = 1 / 8
# Whether refills prefill ahead as above; False: the rule before (bench_gpu.py's `refill_at_share` mode).
PREFILL_AHEAD = True
# Rows that join a running call one at a time (generate_chained's next chunks) wait up to this many looks
# (model.slot_batch.LOOK_EVERY steps each) for more to prefill with, unless REFILL_SHARE of the slots' rows
# already wait: a prefill forward has a fixed cost (on an H100 one 688-token row took 42 ms, ~2-4 decode
# steps of a full batch, against 7.5 ms a row at 128 rows) that stalls every slot, while a waiting row idles
# only its own. scripts/bench_longform.py measures both.
FOLLOWER_LOOKS = 2


def refill_rows(slots: int) -> int:
    """REFILL_SHARE of a batch's slots, in rows."""
    return math.ceil(slots * REFILL_SHARE)


def rank(p: _Prepared) -> tuple:
    """A row's place among the waiting ones (see order), the first first: the highest priority, then each
    voice run together, the longest expected audio (its reserve, in classes of LENGTH_CLASS steps), the
    shortest prompt."""
    return (-p.priority, p.run, -(p.reserve // LENGTH_CLASS), len(p.input_ids))


def order(prepared: list[_Prepared], share_prefix: bool) -> deque[_Prepared]:
    """The call's rows in prefill order (rank): with `share_prefix`, each voice with at least MIN_VOICE_RUN
    rows as a run of its own, then the other rows together; within those, the longest expected audio first
    (its reserve, in classes of LENGTH_CLASS steps), and shortest prompts first within a class."""
    counts = Counter(p.voice for p in prepared)
    big = [v for v, n in counts.items() if v is not None and n >= MIN_VOICE_RUN]
    runs = {voice: i for i, voice in enumerate(big)} if share_prefix else {}
    for p in prepared:
        p.run = runs.get(p.voice, -1)
    return deque(sorted(prepared, key=rank))


def admit(waiting: deque[_Prepared], free: int, max_rows: int, max_padding_waste: float) -> list[_Prepared]:
    """The next prefill group, of at most `free` and `max_rows` rows: the first waiting row (see order), then
    the rows of its run among the next ones whose prompts keep the group's padding waste under
    `max_padding_waste`; rows passed over keep their place. Looking ADMIT_WINDOW groups' worth ahead keeps
    groups large where rows of one expected length have prompts of many lengths, without straying far from
    the order."""
    group = [waiting.popleft()]
    shortest = longest = len(group[0].input_ids)
    size = min(free, max_rows)
    passed: list[_Prepared] = []
    for _ in range(min(len(waiting), ADMIT_WINDOW * size)):
        if len(group) == size:
            break
        item = waiting.popleft()
        n = len(item.input_ids)
        low, high = min(shortest, n), max(longest, n)
        if item.run == group[0].run and (high - low) / high <= max_padding_waste:
            group.append(item)
            shortest, longest = low, high
        else:
            passed.append(item)
    waiting.extendleft(reversed(passed))
    return group


def refills(running: bool, refill: bool, size: int, free: int, waiting: int) -> bool:
    """Whether `waiting` rows are prefilled now for a batch of `size` slots, `free` of them free: always
    into an empty batch; into a `running` one with `refill` (continuous batching), once a slot is free (see
    REFILL_SHARE)."""
    if not running:
        return True
    if not refill:
        return False
    return PREFILL_AHEAD or free >= min(waiting, refill_rows(size))


def group_size(running: bool, size: int, free: int) -> int:
    """Rows the next prefill group takes (at most; see admit): the free slots, and while a batch is `running`
    at least REFILL_SHARE of its slots, the rows beyond the free ones prefilled ahead."""
    if not running or not PREFILL_AHEAD:
        return free
    return max(free, refill_rows(size))
