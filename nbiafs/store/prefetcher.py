"""The pool that fetches ahead of readers, under one global budget (the policy is :mod:`.readahead`).

Parts and their back-pressure:

* a queue per series, the series kept in the order they were last wanted: workers always take from
  the series a reader touched most recently, so the file a reader is about to open comes before
  read-ahead of a series it left; a series nobody has wanted for ``stale_after`` seconds loses what it
  still had queued (its reader went elsewhere);
* the :class:`~.readahead.Budget`: a worker starts a fetch only while the bytes in flight and the bytes
  fetched ahead but not opened yet stay within their bounds; otherwise it waits for a fetch to end or a
  fetched-ahead file to be opened;
* holds: a series whose zip is running alone (:mod:`.zipmode`) keeps its queue, but no worker starts
  from it until it is let go; and ``leave``: a series whose next item another way brings sooner (its
  zip, near where zip and singles meet) is passed over the same way, for as long as that holds;
* ``workers`` threads (started in :meth:`Prefetcher.start`, after the mount daemonized), each running
  ``fetch(item)`` (the store's single-flight fetch, shared with opens); a fetch's failure is logged and
  counted, never raised: the reader's own open asks again and gets the error.

Waking. A change that may let one more item start (a file fetched ahead was opened: budget freed)
wakes one idle worker, not all: a worker that takes an item wakes the next one while items are
queued, so a change that lets several start still starts them all, one wake each. Waking all eight
at every open cost a cold read of 300 small files about 2,400 thread switches for nothing: the
items of a series whose zip brings them are queued but left to the zip, and every woken worker
only found that out and slept again. A worker that ends its fetch looks for the next item itself.
Where nothing wakes them, idle workers look again after ``RECHECK`` (a second) while items are
queued (an item left to the zip may become the singles' as time passes).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .readahead import Budget

log = logging.getLogger(__name__)

#: A series not wanted for this long loses its queued read-ahead.
STALE_AFTER = 30.0
#: Seconds idle workers wait before looking at the queue again while items are queued and nothing
#: woke them (an item left to the zip may become the singles' as time passes).
RECHECK = 1.0


@dataclass(frozen=True, slots=True)
class Item:
    """One file to fetch ahead: its key (the store's), size (to budget) and what to fetch."""

    key: Hashable
    size: int
    ref: Any


class Prefetcher:
    """Fetches queued items ahead of readers (see the module docstring). Thread-safe."""

    def __init__(self, fetch: Callable[[Item], bool], *, workers: int, budget: Budget,
                 stale_after: float = STALE_AFTER, clock: Callable[[], float] = time.monotonic,
                 leave: Callable[[Hashable, Item], bool] | None = None, recheck: float = RECHECK) -> None:
        """``leave(series, item)``: whether ``item``, next in its series' queue, is better left to another
        way of fetching for now (asked with the lock held: it must not call back into the prefetcher;
        call :meth:`wake` when its answer may have turned). ``recheck``: see :data:`RECHECK`."""
        self._fetch = fetch
        self._leave = leave
        self._recheck = recheck
        self._workers = max(0, workers)
        self.budget = budget
        self._stale_after = stale_after
        self._clock = clock
        self._cond = threading.Condition()
        self._series: collections.OrderedDict[Hashable, collections.deque[Item]] = collections.OrderedDict()
        self._wanted_at: dict[Hashable, float] = {}
        self._queued: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._ahead: dict[Hashable, int] = {}  # fetched ahead, not opened yet: key -> bytes
        self._held: set[Hashable] = set()  # series whose queue waits (their zip runs alone)
        self._threads: list[threading.Thread] = []
        self._idle_waiters = 0  # callers of idle(): they share the condition, so they are woken all at once
        self._stopped = False
        self.fetched = 0
        self.failed = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._threads or self._stopped:
                return
            for n in range(self._workers):
                thread = threading.Thread(target=self._work, name=f"nbiafs-prefetch-{n}", daemon=True)
                self._threads.append(thread)
                thread.start()

    @property
    def running(self) -> bool:
        with self._cond:
            return bool(self._threads) and not self._stopped

    def stop(self, timeout: float = 30.0) -> None:
        """Drop what is queued and join the workers (a fetch in progress ends by the client's deadline, or
        at once when the client was closed first)."""
        with self._cond:
            self._stopped = True
            self._series.clear()
            self._queued.clear()
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("a prefetch worker did not stop within %.0f s", timeout)

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs and nothing queued can start (all done, or what is left waits for the
        budget: files fetched ahead to be opened); False when ``timeout`` passed first."""
        with self._cond:
            self._idle_waiters += 1
            try:
                return self._cond.wait_for(lambda: not self._running and (not self._queued or self._blocked()),
                                           timeout)
            finally:
                self._idle_waiters -= 1

    def _wake(self, n: int = 1) -> None:
        """Wake ``n`` idle workers (all waiters while someone waits in :meth:`idle`, who shares the
        condition and could otherwise take a wake meant for a worker); lock held."""
        if self._idle_waiters:
            self._cond.notify_all()
        else:
            self._cond.notify(n)

    def _blocked(self) -> bool:
        """Whether the next queued item waits for the budget or for its series to be let go (lock held)."""
        held = False
        for series in reversed(self._series):
            queue = self._series[series]
            if queue and (series in self._held or self._left(series, queue[0])):
                held = True
            elif queue:
                return not self.budget.may_start(queue[0].size)
        return held

    # ------------------------------------------------------------------ what readers want
    def want(self, series: Hashable, items: list[Item], *, from_end: bool = False) -> int:
        """Queue ``items`` of ``series`` (skipping those queued or running); the series becomes the most
        recent. ``from_end``: fetch them last first, before what the series had queued (the zip takes
        the window from its start). Returns how many were queued."""
        with self._cond:
            if self._stopped or not self._threads:
                return 0
            now = self._clock()
            self._wanted_at[series] = now
            queue = self._series.get(series)
            if queue is None:
                queue = self._series[series] = collections.deque()
            self._series.move_to_end(series)
            added = 0
            for item in items:
                if item.key in self._queued or item.key in self._running or item.key in self._ahead:
                    continue
                if from_end:
                    queue.appendleft(item)
                else:
                    queue.append(item)
                self._queued.add(item.key)
                added += 1
            if added:
                self._wake(added)
            return added

    def touch(self, series: Hashable) -> None:
        """A reader opened a file of ``series``: it is the most recent (even with nothing new to queue)."""
        with self._cond:
            self._wanted_at[series] = self._clock()
            if series in self._series:
                self._series.move_to_end(series)

    def hold(self, series: Hashable, held: bool = True) -> None:
        """Keep ``series``' queue from starting (``held``) or let it go again."""
        with self._cond:
            if held:
                self._held.add(series)
            elif series in self._held:
                self._held.discard(series)
                self._cond.notify_all()

    def wake(self) -> None:
        """Something a worker waits for may have changed (a zip ended): they look again."""
        with self._cond:
            self._cond.notify_all()

    def _left(self, series: Hashable, item: Item) -> bool:
        """``leave``, where a failure of it never stops a worker (lock held)."""
        if self._leave is None:
            return False
        try:
            return self._leave(series, item)
        except Exception:  # an optimisation: the item is fetched as if it had said no
            log.warning("could not tell whether %s is better fetched another way", item.key, exc_info=True)
            return False

    def opened(self, key: Hashable) -> None:
        """A file was opened: if it was fetched ahead, its bytes no longer count as ahead."""
        with self._cond:
            size = self._ahead.pop(key, None)
            if size is not None:
                self.budget.opened(size)
                if self._queued:  # only a queued item can have waited for the budget
                    self._wake()

    def note_ahead(self, key: Hashable, size: int) -> None:
        """A file fetched ahead another way (the series zip) waits to be opened: it counts in the budget."""
        with self._cond:
            if key not in self._ahead:
                self._ahead[key] = size
                self.budget.unread += size

    def forget(self, key: Hashable) -> None:
        """A file fetched ahead left the cache (evicted, dropped): it is no longer ahead."""
        self.opened(key)

    # ------------------------------------------------------------------ workers
    def _next(self) -> Item | None:
        """The next item to fetch, honouring recency, staleness and the budget (lock held)."""
        now = self._clock()
        for series in [s for s, at in self._wanted_at.items() if now - at > self._stale_after]:
            for item in self._series.pop(series, ()):
                self._queued.discard(item.key)
            del self._wanted_at[series]
        for series in reversed(self._series):  # most recent first
            queue = self._series[series]
            if not queue or series in self._held:
                continue
            item = queue[0]
            if self._left(series, item):
                continue
            if not self.budget.may_start(item.size):
                return None  # over budget: wait for a fetch to end or a file to be opened
            queue.popleft()
            if not queue:
                del self._series[series]
            self._queued.discard(item.key)
            return item
        for series in [s for s, q in self._series.items() if not q]:
            del self._series[series]
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                item = None
                while not self._stopped:
                    item = self._next()
                    if item is not None:
                        break
                    self._cond.wait(self._recheck if self._queued else None)
                if self._stopped or item is None:
                    return
                self._running.add(item.key)
                self.budget.started(item.size)
                if self._queued:  # the next item may start too: its worker passes the wake on in turn
                    self._wake()
            kept = False
            try:
                kept = self._fetch(item)
                self.fetched += 1
            except Exception as exc:  # noqa: BLE001 - logged and counted; the reader's open asks again
                self.failed += 1
                log.info("prefetch of %s failed: %s", getattr(item.ref, "sop_uid", item.key), exc)
            with self._cond:
                self._running.discard(item.key)
                self.budget.ended(item.size, kept)
                if kept:
                    self._ahead[item.key] = item.size
                if self._idle_waiters and not self._running:  # (this worker looks for the next item itself)
                    self._cond.notify_all()
