"""Finished rows vocoded in groups while the call goes on decoding.

A call's rows finish over its whole length, but vocoding them all after the last one leaves the codec's work
(19 % of a 1,024-row call on an H100, GPU run 7) to run alone at the end. Groups of about one vocoding
call's frames go to `vocode` as they fill instead: in a worker thread when `beside` is given
(EngineOptions.overlap_vocoding), whose codec calls queue on a CUDA stream of their own beside the decode
step's (SynthesisEngine._beside_decoding), and inline otherwise. A group that runs out of memory beside the
decoding is vocoded again by `vocode` (which narrows calls down on its own) once the rows before it are; any
other failure is raised where the group's rows are handed back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

from model.requests import SynthesisResult

Key = TypeVar("Key")
Vocode = Callable[[list[SynthesisResult]], None]


class VocodingGroups(Generic[Key]):
    """(key, result) pairs in, the same pairs out with their waveforms, in the order they came in.

    `vocode(results)` vocodes in the caller's thread and never raises OutOfMemoryError; `beside(results)`,
    when given, runs in the worker thread and may. `budget()`: a group's frames (None: one group
    of every row, vocoded at close)."""

    def __init__(
        self,
        vocode: Vocode,
        budget: Callable[[], int] | None,
        beside: Vocode | None = None,
    ) -> None:
        self._vocode, self._beside, self._budget = vocode, beside, budget
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vocoding") if beside else None
        self._group: list[tuple[Key, SynthesisResult]] = []
        self._frames = 0
        self._sent: deque[tuple[list[tuple[Key, SynthesisResult]], Future | None]] = deque()

    def __enter__(self) -> VocodingGroups[Key]:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, key: Key, result: SynthesisResult) -> None:
        self._group.append((key, result))
        if _needs_audio(result):
            self._frames += result.generated_frames
        if self._budget is not None and self._frames >= self._budget():
            self._send()

    def ready(self) -> list[tuple[Key, SynthesisResult]]:
        """The pairs of the groups vocoded so far, up to the first still in flight."""
        out: list[tuple[Key, SynthesisResult]] = []
        while self._sent and (self._sent[0][1] is None or self._sent[0][1].done()):
            out += self._collect(*self._sent.popleft())
        return out

    def close(self) -> list[tuple[Key, SynthesisResult]]:
        """Every pair not handed back yet, vocoded: the groups in flight waited for, the last one here."""
        out = [pair for group, future in self._sent for pair in self._collect(group, future)]
        self._sent.clear()
        group, self._group, self._frames = self._group, [], 0
        self._vocode(_to_vocode(group))
        return out + group

    def _send(self) -> None:
        group, self._group, self._frames = self._group, [], 0
        todo = _to_vocode(group)
        if self._pool is None:
            self._vocode(todo)
            self._sent.append((group, None))
        else:
            self._sent.append((group, self._pool.submit(self._beside, todo)))

    def _collect(
        self, group: list[tuple[Key, SynthesisResult]], future: Future | None
    ) -> list[tuple[Key, SynthesisResult]]:
        if future is not None and isinstance(future.exception(), torch.OutOfMemoryError):
            self._vocode(_to_vocode(group))
        elif future is not None:
            future.result()  # raises the group's failure, if any
        return group


def _needs_audio(result: SynthesisResult) -> bool:
    return result.ok and result.waveform is None


def _to_vocode(group: list[tuple[Key, SynthesisResult]]) -> list[SynthesisResult]:
    return [result for _, result in group if _needs_audio(result)]
