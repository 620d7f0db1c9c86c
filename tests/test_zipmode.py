"""The trial that decides whether singles run beside a series zip (pure), and the prefetcher's hold."""

from __future__ import annotations

import threading

from nbiafs.store.prefetcher import Item, Prefetcher
from nbiafs.store.readahead import Budget
from nbiafs.store.zipmode import ALONE, BOTH, MIXED, ZIP_ONLY, Trial

MB = 1_000_000


def feed(trial: Trial, start: float, seconds: float, rate: float, *, via_zip: bool, step: float = 0.01) -> float:
    """Bytes arriving at ``rate`` for ``seconds`` from ``start`` in chunks every ``step``; returns the end."""
    t = start
    while t < start + seconds - 1e-9:
        t += step
        trial.add(t, int(rate * step), via_zip=via_zip)
    return t


def test_singles_wait_while_the_zip_is_measured_alone_and_run_while_both_are() -> None:
    trial = Trial(span=0.099, mixed_span=0.099, min_bytes=0, settle_sources=1)
    assert trial.phase == ALONE and not trial.singles_allowed
    # a single's bytes (the reader's own open) before the zip's first byte start nothing
    assert not trial.add(0.0, 500_000, via_zip=False)
    assert trial.since is None
    trial.add(0.05, 1000, via_zip=True)  # the zip's first byte: ALONE is timed from here
    assert trial.since == 0.05
    feed(trial, 0.05, 0.1, 50 * MB, via_zip=True)
    assert trial.phase == MIXED and trial.singles_allowed
    assert 45 * MB < trial.alone_rate < 55 * MB


def test_the_zip_alone_wins_when_singles_beside_it_bring_less() -> None:
    trial = Trial(span=0.099, mixed_span=0.099, min_bytes=0, settle_sources=1)
    trial.add(0.0, 1, via_zip=True)
    t = feed(trial, 0.0, 0.1, 100 * MB, via_zip=True)  # a shared link: the zip alone fills it, compressed
    # MIXED is timed from a single's first byte: the zip's bytes during the singles' round trip do not count
    t = feed(trial, t, 0.04, 10 * MB, via_zip=True)
    assert trial.phase == MIXED and trial.since is None
    trial.add(t, 1, via_zip=False)
    feed(trial, t, 0.1, 45 * MB, via_zip=False)
    assert trial.phase == ZIP_ONLY and trial.decided and not trial.singles_allowed
    assert not trial.add(t + 1, 10 * MB, via_zip=True)  # decided: nothing moves it any more
    assert "zip only" in trial.describe()


def test_zip_and_singles_win_when_faster_and_on_a_tie() -> None:
    for alone, mixed in ((27 * MB, 75 * MB), (50 * MB, 49 * MB)):  # per-connection caps; a stored zip
        trial = Trial(span=0.099, mixed_span=0.099, min_bytes=0, settle_sources=1)
        trial.add(0.0, 1, via_zip=True)
        t = feed(trial, 0.0, 0.1, alone, via_zip=True)
        trial.add(t, 1, via_zip=False)
        feed(trial, t, 0.1, mixed, via_zip=False)
        assert trial.phase == BOTH and trial.singles_allowed, (alone, mixed)


def test_a_clear_loss_ends_mixed_early_and_a_gain_or_a_near_tie_is_looked_at_for_the_whole_span() -> None:
    def mixed_after(alone: float, mixed: float, seconds: float) -> Trial:
        trial = Trial(settle_sources=1)  # the real spans: 0.15 s alone, 0.3 s mixed, 0.1 s early
        trial.add(0.0, 1, via_zip=True)
        t = feed(trial, 0.0, 0.16, alone, via_zip=True)
        assert trial.phase == MIXED
        trial.add(t, 1, via_zip=False)
        feed(trial, t, seconds, mixed, via_zip=False)
        return trial

    # one shared 200 Mbps link: zip and singles bring about half the zip alone's files
    trial = mixed_after(54 * MB, 29 * MB, 0.06)
    assert trial.phase == MIXED  # not before the early span
    trial = mixed_after(54 * MB, 29 * MB, 0.12)
    assert trial.phase == ZIP_ONLY and 25 * MB < trial.mixed_rate < 33 * MB
    # a small loss, a tie or a gain: not decided early, whatever the first tenth of a second showed
    for mixed in (45 * MB, 54 * MB, 120 * MB):
        assert mixed_after(54 * MB, mixed, 0.2).phase == MIXED, mixed
    assert mixed_after(54 * MB, 45 * MB, 0.32).phase == ZIP_ONLY  # the whole span: the margin decides
    assert mixed_after(54 * MB, 120 * MB, 0.32).phase == BOTH
    # too few bytes for an early verdict: the early span is not enough on its own
    trial = Trial(settle_sources=1, min_bytes=8 * MB)
    trial.add(0.0, 1, via_zip=True)
    t = feed(trial, 0.0, 0.5, 20 * MB, via_zip=True)
    trial.add(t, 1, via_zip=False)
    feed(trial, t, 0.12, 10 * MB, via_zip=False)
    assert trial.phase == MIXED


def test_a_slow_link_is_measured_longer_but_not_for_ever() -> None:
    trial = Trial(span=0.099, mixed_span=0.099, min_bytes=2 * MB)
    trial.add(0.0, 1, via_zip=True)
    feed(trial, 0.0, 0.5, 1 * MB, via_zip=True)  # 0.5 MB after 0.5 s: still ALONE
    assert trial.phase == ALONE
    feed(trial, 0.5, 0.6, 1 * MB, via_zip=True)  # at 10 x span it ends, whatever it saw
    assert trial.phase == MIXED
    assert 0.9 * MB < trial.alone_rate < 1.1 * MB


def test_a_held_series_keeps_its_queue_until_let_go_and_counts_as_idle() -> None:
    fetched: list[str] = []
    done = threading.Event()

    def fetch(item: Item) -> bool:
        fetched.append(str(item.key))
        if len(fetched) == 3:
            done.set()
        return False

    pool = Prefetcher(fetch, workers=2, budget=Budget(1 << 30, 1 << 30))
    pool.start()
    try:
        pool.hold("s")
        assert pool.want("s", [Item(f"f{i}", 10, None) for i in range(3)]) == 3
        assert pool.idle(5.0)  # what is queued waits for the hold: nothing can start
        assert fetched == []
        pool.hold("s", False)
        assert done.wait(5.0)
        assert sorted(fetched) == ["f0", "f1", "f2"]
    finally:
        pool.stop()


def test_a_series_whose_next_item_is_left_to_its_zip_waits_while_others_go_then_goes_when_woken() -> None:
    fetched: list[str] = []
    lock = threading.Lock()
    other_done, all_done = threading.Event(), threading.Event()
    left = {"s2"}

    def fetch(item: Item) -> bool:
        with lock:
            fetched.append(str(item.key))
            if "t0" in fetched:
                other_done.set()
            if len(fetched) == 4:
                all_done.set()
        return False

    pool = Prefetcher(fetch, workers=2, budget=Budget(1 << 30, 1 << 30),
                      leave=lambda series, item: str(item.key) in left)
    pool.start()
    try:
        assert pool.want("t", [Item("t0", 10, None)]) == 1
        # from the end, as beside a zip: s2 comes first, and while it is left nothing of s starts
        assert pool.want("s", [Item(f"s{i}", 10, None) for i in range(3)], from_end=True) == 3
        assert other_done.wait(5.0)  # the older series goes meanwhile
        assert pool.idle(5.0)  # what is left to the zip counts as waiting, like a hold
        assert fetched == ["t0"]
        left.clear()  # the zip ended (or stalls): the store wakes the workers
        pool.wake()
        assert all_done.wait(5.0)
        assert sorted(fetched) == ["s0", "s1", "s2", "t0"]
    finally:
        pool.stop()


def test_a_failing_leave_never_stops_a_worker() -> None:
    done = threading.Event()

    def leave(series: object, item: Item) -> bool:
        raise RuntimeError("broken estimate")

    pool = Prefetcher(lambda item: done.set() or False, workers=1, budget=Budget(1 << 30, 1 << 30), leave=leave)
    pool.start()
    try:
        pool.want("s", [Item("f0", 10, None)])
        assert done.wait(5.0)
    finally:
        pool.stop()


def test_mixed_is_timed_once_the_singles_all_run_not_while_the_zip_still_has_the_link() -> None:
    trial = Trial(span=0.099, mixed_span=0.099, min_bytes=0, settle_sources=3)
    trial.add(0.0, 1, via_zip=True)
    t = feed(trial, 0.0, 0.1, 100 * MB, via_zip=True)
    assert trial.phase == MIXED
    # the first singles arrive while the zip still has most of the link: not counted yet
    trial.add(t + 0.01, 1, via_zip=False, source="a")
    trial.add(t + 0.02, 80 * MB, via_zip=True)
    trial.add(t + 0.03, 1, via_zip=False, source="b")
    assert trial.since is None
    trial.add(t + 0.04, 1, via_zip=False, source="c")  # all three run: from here
    assert trial.since == t + 0.04
    feed(trial, t + 0.04, 0.1, 45 * MB, via_zip=False)
    assert trial.phase == ZIP_ONLY, trial.describe()


def test_mixed_is_timed_a_span_after_the_first_single_when_fewer_run() -> None:
    trial = Trial(span=0.05, min_bytes=0, settle_sources=8)
    trial.add(0.0, 1, via_zip=True)
    t = feed(trial, 0.0, 0.06, 30 * MB, via_zip=True)
    trial.add(t, 1, via_zip=False, source="only")
    trial.add(t + 0.06, 1, via_zip=False, source="only")
    assert trial.since == t + 0.06
