"""The read-ahead pool's wake-ups: a worker waiting for the budget goes on once a file fetched ahead is
opened, idle() returns once the last fetch ends, nothing else wakes the workers, an open wakes one
worker (not all), and a change that lets several queued items start starts them all (each worker that
takes one wakes the next)."""

from __future__ import annotations

import threading

from nbiafs.store.prefetcher import Item, Prefetcher
from nbiafs.store.readahead import Budget

WAIT = 5.0  # seconds a test waits for an event before failing (never reached when things work)
NEVER = 3600.0  # a recheck period no test reaches: only wakes start items


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


def test_an_open_with_items_left_to_another_way_wakes_one_worker_not_all() -> None:
    pool = Prefetcher(lambda item: True, workers=8, budget=Budget(1 << 30, 1 << 30), recheck=NEVER,
                      leave=lambda series, item: series == "zipped")
    pool.start()
    try:
        pool.want("read", [Item("a", 10, None)])
        assert pool.idle(WAIT)  # "a" fetched ahead, waiting to be opened
        assert pool.want("zipped", [Item(f"z{i}", 10, None) for i in range(20)]) == 20  # left to the zip
        assert pool.idle(WAIT)
        calls = {"notify": 0, "notify_all": 0}
        notify, notify_all = pool._cond.notify, pool._cond.notify_all

        def counting_notify(n: int = 1) -> None:
            calls["notify"] += 1
            notify(n)

        def counting_notify_all() -> None:
            calls["notify_all"] += 1
            notify_all()

        pool._cond.notify = counting_notify  # type: ignore[method-assign]
        pool._cond.notify_all = counting_notify_all  # type: ignore[method-assign]
        pool.opened("a")  # budget freed with items queued: one worker looks, finds them left, sleeps
        assert calls == {"notify": 1, "notify_all": 0}
    finally:
        pool.stop()


def test_a_change_that_lets_several_items_start_starts_them_all() -> None:
    release = threading.Event()
    big_started = threading.Event()
    together = threading.Barrier(3, timeout=WAIT)  # the three small fetches must run at the same time
    small_done: list[str] = []

    def fetch(item: Item) -> bool:
        if item.key == "big":
            big_started.set()
            assert release.wait(WAIT)
        else:
            together.wait()  # raises BrokenBarrierError unless all three are in flight at once
            small_done.append(str(item.key))
        return False

    # "big" fills the in-flight bound: the small ones wait for it, then fit all three at once
    pool = Prefetcher(fetch, workers=4, budget=Budget(in_flight_limit=100, unread_limit=1 << 30), recheck=NEVER)
    pool.start()
    try:
        assert pool.want("s", [Item("big", 100, None)] + [Item(f"s{i}", 10, None) for i in range(3)]) == 4
        assert big_started.wait(WAIT)
        assert not pool.idle(0)  # the small ones wait while "big" runs
        release.set()  # one fetch ends: its worker takes a small one and passes the wake on
        assert pool.idle(WAIT)
        assert sorted(small_done) == ["s0", "s1", "s2"] and pool.failed == 0
    finally:
        pool.stop()
