"""How often a synthesis call has started on the same rows, so that rows that kill their worker are not
retried forever.

Ray Data restarts a dead synthesis actor and retries its batch without limit (`max_restarts` and
`max_task_retries` of -1). That is right for a node lost or a process killed from outside, but a row that
kills the process itself (a native crash in a decoder, a GPU fault that aborts, host memory exhausted) would
be retried forever, loading the model again each time, and the job would never end. So every synthesis call
records that it started on its rows, under the output prefix, and forgets it when it returns:

- a call whose rows already started MAX_STARTS times runs them one at a time, so that a culprit is alone;
- a row that, alone, already started MAX_STARTS times is not run again: it gets an error row saying so
  (`retry_errors=true` on a later run tries it again).

The records live in ATTEMPTS_DIR under the output for the length of one run: a run clears them when it
starts and when it ends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TypeVar

from pipeline.storage import Storage

T = TypeVar("T")
R = TypeVar("R")

ATTEMPTS_DIR = "_attempts"
MAX_STARTS = 2


class AttemptLog:
    """Starts of synthesis calls on a set of row ids, counted in the output's storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def guard(
        self,
        items: list[T],
        mark: Callable[[T], str],
        work: Callable[[list[T]], list[R]],
        abandon: Callable[[T, int], R],
    ) -> list[R]:
        """`work(items)`, one result per item, with its start recorded under the items' marks: after
        MAX_STARTS starts that never returned, the items one at a time, and for an item that has had as
        many alone, `abandon(item, deaths)` in its place."""
        marks = [mark(item) for item in items]
        starts = self.start(marks)
        if starts <= MAX_STARTS:
            results = work(items)
        elif len(items) == 1:
            results = [abandon(items[0], starts - 1)]
        else:
            results = [result for item in items for result in self.guard([item], mark, work, abandon)]
        self.finish(marks)
        return results

    def start(self, ids: list[str]) -> int:
        """Record one more start on `ids`; returns how many there have been, this one included."""
        key = self._key(ids)
        try:
            starts = json.loads(self.storage.read_text(key))["starts"] + 1
        except FileNotFoundError:
            starts = 1
        self.storage.write_text(key, json.dumps({"ids": sorted(ids), "starts": starts}))
        return starts

    def finish(self, ids: list[str]) -> None:
        """The call on `ids` returned: its starts are forgotten."""
        self.storage.delete(self._key(ids))

    def clear(self) -> int:
        """Forget every record (a run starting or ending); returns how many there were."""
        keys = self.storage.list(ATTEMPTS_DIR)
        for key in keys:
            self.storage.delete(key)
        self.storage.drop_empty_folder(ATTEMPTS_DIR)
        return len(keys)

    @staticmethod
    def _key(ids: list[str]) -> str:
        digest = hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=16).hexdigest()
        return f"{ATTEMPTS_DIR}/{digest}.json"
