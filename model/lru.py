"""A small thread-safe LRU cache (used for encoded reference-audio codes)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keeps the `maxsize` most recently used entries; `maxsize` 0 disables caching.

    `get` counts `hits` and `misses`. `None` cannot be cached, since `get` uses it to mean "absent".
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        # One lock for entries and counters: worker threads share a cache, and OrderedDict's
        # move_to_end/popitem pairs are not atomic together.
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._entries:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]

    def put(self, key: Hashable, value: V) -> None:
        if value is None:
            raise ValueError("LRUCache cannot store None: get() returns None for a missing key")
        if self.maxsize == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        # A membership test is not a use: it neither refreshes recency nor counts as a hit or miss.
        with self._lock:
            return key in self._entries
