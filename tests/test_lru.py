"""Specification of the thread-safe LRU cache used for encoded reference codes."""

from __future__ import annotations

import threading

import pytest

from model.lru import LRUCache


def test_stored_value_is_returned():
    cache = LRUCache(2)
    cache.put("a", 1)

    assert cache.get("a") == 1


def test_missing_key_returns_none():
    assert LRUCache(2).get("absent") is None


def test_least_recently_inserted_is_evicted_first():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)

    assert "a" not in cache
    assert "b" in cache
    assert "c" in cache
    assert len(cache) == 2


def test_get_refreshes_recency():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    cache.put("c", 3)

    assert "a" in cache
    assert "b" not in cache


def test_put_on_existing_key_replaces_value_and_refreshes_recency():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)

    assert cache.get("a") == 10
    assert "b" not in cache
    assert len(cache) == 2


def test_get_counts_hits_and_misses():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.get("a")
    cache.get("a")
    cache.get("b")

    assert (cache.hits, cache.misses) == (2, 1)


def test_get_of_an_evicted_key_is_a_miss():
    cache = LRUCache(1)
    cache.put("a", 1)
    cache.put("b", 2)

    assert cache.get("a") is None
    assert cache.misses == 1


def test_membership_test_neither_counts_nor_refreshes():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert "a" in cache
    cache.put("c", 3)

    assert "a" not in cache
    assert (cache.hits, cache.misses) == (0, 0)


def test_maxsize_zero_stores_nothing():
    cache = LRUCache(0)
    cache.put("a", 1)

    assert len(cache) == 0
    assert "a" not in cache
    assert cache.get("a") is None
    assert cache.misses == 1


def test_negative_maxsize_is_rejected():
    with pytest.raises(ValueError, match="maxsize"):
        LRUCache(-1)


def test_none_cannot_be_stored():
    with pytest.raises(ValueError, match="None"):
        LRUCache(2).put("a", None)


def test_clear_empties_the_cache():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.clear()

    assert len(cache) == 0


def test_concurrent_use_keeps_size_bound_and_counts_every_get():
    cache = LRUCache(8)
    threads, per_thread = 8, 2000

    def worker(seed: int) -> None:
        for i in range(per_thread):
            key = (seed * 7 + i) % 32
            if cache.get(key) is None:
                cache.put(key, key)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    assert len(cache) <= 8
    assert cache.hits + cache.misses == threads * per_thread
