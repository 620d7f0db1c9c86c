"""The read-ahead pool's wake-ups: a worker waiting for the budget goes on once a file fetched ahead is
opened, idle() returns once the last fetch ends, and nothing else wakes the workers."""

from __future__ import annotations

import threading

from nbiafs.store.prefetcher import Item, Prefetcher
from nbiafs.store.readahead import Budget

WAIT = 5.0  # seconds a test waits for an event before failing (never reached when things work)


def test_a_worker_held_by_the_unread_bound_goes_on_once_a_file_fetched_ahead_is_opened() -> None:
    fetched: list[str] = []
    second = threading.Event()

    def fetch(item: Item) -> bool:
        fetched.append(str(item.key))
        if len(fetched) == 2:
            second.set()
        return True  # kept: its bytes count as ahead until opened

    pool = Prefetcher(fetch, workers=2, budget=Budget(in_flight_limit=1 << 20, unread_limit=100))
    pool.start()
    try:
        assert pool.want("s", [Item("a", 100, None), Item("b", 100, None)]) == 2
        assert pool.idle(WAIT)  # "a" fetched; "b" waits: "a" fills the unread bound
        assert fetched == ["a"] and not second.is_set()
        pool.opened("a")  # the reader got to "a": the budget has room again
        assert second.wait(WAIT)
        assert fetched == ["a", "b"]
    finally:
        pool.stop()


def test_idle_returns_once_the_last_fetch_ends_with_nothing_queued() -> None:
    release = threading.Event()
    started = threading.Event()

    def fetch(item: Item) -> bool:
        started.set()
        assert release.wait(WAIT)
        return False

    pool = Prefetcher(fetch, workers=3, budget=Budget(1 << 30, 1 << 30))
    pool.start()
    try:
        pool.want("s", [Item("only", 10, None)])
        assert started.wait(WAIT)
        assert not pool.idle(0.05)  # it runs
        out: list[bool] = []
        waiter = threading.Thread(target=lambda: out.append(pool.idle(WAIT)))
        waiter.start()
        release.set()
        waiter.join(WAIT)
        assert out == [True]
    finally:
        pool.stop()


def test_opens_and_ends_with_nothing_queued_wake_no_worker() -> None:
    wakes = 0
    pool = Prefetcher(lambda item: True, workers=4, budget=Budget(1 << 30, 1 << 30))
    pool.start()
    try:
        pool.want("s", [Item(f"f{i}", 10, None) for i in range(8)])
        assert pool.idle(WAIT)
        original = pool._cond.notify_all

        def counting() -> None:
            nonlocal wakes
            wakes += 1
            original()

        pool._cond.notify_all = counting  # type: ignore[method-assign]
        for i in range(8):  # the reader opens every file fetched ahead: nobody waits for that
            pool.opened(f"f{i}")
        assert wakes == 0
        assert pool.budget.unread == 0
    finally:
        pool.stop()
