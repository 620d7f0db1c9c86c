"""Walk-ahead: listing the folders below a folder that a program walks, before it gets there.

Why: ``find``, ``du``, ``ls -lR`` and every indexer visit a tree one directory at a time, each visit
waiting for its listing, so a cold walk of a collection was one round trip after another (100 patients
x study x series: four hundred calls in a row). The listings are independent, so they can be fetched
in parallel while the walker reads the ones already there.

Policy (:func:`walk_starts`, pure, tested without threads): a walk is detected when a folder is listed
(``readdir``) within ``window`` seconds after its parent was listed: the program is going down into the
parent's children one by one. The walk then covers the parent's subtree: its folders are listed by a
bounded pool in the order the walker will visit them (depth first, siblings by name: the order of the
paths' components), each listing adding its own sub-folders (never instance files: they are fetched
only when opened). So the next listing the walker needs is always done or in flight, while the other
workers get ahead on the folders after it. Of a study's series only the first is queued at first: its
listing drills down every series of the study in one pair of calls, so the others are queued once it
is done (they then cost no call), instead of idling workers that would wait for that same pair.
Listing alone (``ls`` of a folder) starts nothing. Series are listed ahead only while the drill-down
works (the catalog says so): without it, listing a series means fetching its files to learn their
sizes, and nobody asked for those bytes. Before any drill-down was tried (a cold mount), one series is
listed ahead as the probe, and the studies whose series come after it wait for its answer (then go on,
or drop their series when the drill-down does not work), so a cold walk is not left to list every
series itself.

Bounds: at most ``workers`` listings at once (they share the client's connections with readers, so a walk
never starves an ``open``), at most ``max_queued`` folders waiting, and a walk ends when its queue is
empty or nobody has listed anything under it for ``idle`` seconds (the walker stopped or went
elsewhere). Listings go through the catalog, so they land in the same caches as the walker's own
requests and a listing in progress is joined, never made twice (single flight in the metadata cache).
A listing that fails is logged and dropped: the walker's own request will ask again and see the error.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import NbiaError

log = logging.getLogger(__name__)

#: A child listed within this many seconds after its parent means a walk (find lists a child at once).
WALK_WINDOW = 30.0
#: A walk nobody continued for this long stops.
WALK_IDLE = 20.0
WALK_WORKERS = 8
#: Folders waiting to be listed ahead, over all walks.
MAX_QUEUED = 5000
DIRECTORY_KINDS = frozenset({"root", "collection", "patient", "study", "series"})


class _Dir(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> str: ...


class _Tree(Protocol):  # the part of Catalog the walk-ahead uses
    @property
    def series_listing_is_cheap(self) -> bool | None: ...  # None: not known yet
    def lookup(self, path: str) -> _Dir: ...
    def children_of(self, node: Any) -> Sequence[_Dir]: ...  # node: one this tree returned


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def walk_starts(path: str, listed_at: dict[str, float], now: float, window: float = WALK_WINDOW) -> str | None:
    """The root of the walk that listing ``path`` at ``now`` reveals, or None.

    ``listed_at`` maps folders to when they were last listed by a program. Listing ``path`` soon after
    its parent was listed means the program goes down into the parent's children: the walk covers the
    parent's subtree.
    """
    if path == "/":
        return None
    parent = parent_of(path)
    when = listed_at.get(parent)
    if when is not None and now - when <= window:
        return parent
    return None


@dataclass(slots=True)
class _Walk:
    root: str
    touched: float  # last time the program listed something under root
    failed: bool = False  # a listing failed: the subtree is not known to be complete


class WalkAhead:
    """Lists folders ahead of a walking program (see the module docstring). Thread-safe."""

    def __init__(self, tree: _Tree, *, workers: int = WALK_WORKERS, max_queued: int = MAX_QUEUED,
                 window: float = WALK_WINDOW, idle: float = WALK_IDLE, complete_for: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tree = tree
        self._workers = max(1, workers)
        self._max_queued = max_queued
        self._window = window
        self._idle = idle
        self._complete_for = complete_for
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._listed_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._walks: dict[str, _Walk] = {}
        #: subtrees a walk listed completely, and when: walking them again needs nothing ahead
        self._complete: dict[str, float] = {}
        # (visiting order, walk root, folder): a heap, so the walker's next folder comes first
        self._queue: list[tuple[tuple[str, ...], str, _Dir]] = []
        self._queued: set[str] = set()
        #: series held back until the first of their study is listed (its drill-down covers them)
        self._after: dict[str, list[_Dir]] = {}
        #: the series listed ahead to learn whether the drill-down works, and the studies waiting for it
        self._probe: str | None = None
        self._waiting: list[tuple[str, _Dir]] = []
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.listed_ahead = 0  # for tests and stats

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            if self._threads or self._stopped:
                return
            for n in range(self._workers):
                thread = threading.Thread(target=self._work, name=f"nbiafs-walk-{n}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers (a listing in progress ends by the client's deadline, or at once when the
        client was closed first)."""
        with self._wake:
            self._stopped = True
            self._queue.clear()
            self._queued.clear()
            self._after.clear()
            self._waiting.clear()
            self._wake.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)

    def idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being listed (for tests and benchmarks)."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)

    # ------------------------------------------------------------------ the program's listings
    def on_readdir(self, path: str, kind: str) -> None:
        """A program listed the folder ``path`` (of ``kind``): maybe a walk starts or goes on."""
        now = self._clock()
        with self._wake:
            if self._stopped:
                return
            for walk in self._walks.values():
                if _under(path, walk.root):
                    walk.touched = now
            root = walk_starts(path, self._listed_at, now, self._window)
            self._listed_at[path] = now
            self._listed_at.move_to_end(path)
            while len(self._listed_at) > 4 * self._max_queued:
                self._listed_at.popitem(last=False)
            if root is None or not self._may_walk(root, now):
                return
        try:
            node = self._tree.lookup(root)  # listed by the program a moment ago: a cache hit
        except Exception:  # noqa: BLE001 - no walk then
            return
        with self._wake:
            if self._stopped or not self._may_walk(root, now):
                return  # another thread started it meanwhile
            self._walks[root] = _Walk(root, now)
            self._enqueue(root, [node])
            self._wake.notify_all()
        log.debug("walk detected under %s: listing ahead", root)

    def _may_walk(self, root: str, now: float) -> bool:
        """Whether a walk of ``root`` should start (lock held): none covers it, it was not just done."""
        if any(_under(root, w) for w in self._walks):
            return False
        return not any(_under(root, r) and now - when < self._complete_for for r, when in self._complete.items())

    # ------------------------------------------------------------------ internals
    def _enqueue(self, walk_root: str, folders: Iterable[_Dir]) -> None:
        """Queue ``folders`` for listing (lock held)."""
        for folder in folders:
            if folder.path in self._queued or len(self._queue) >= self._max_queued:
                if len(self._queue) >= self._max_queued:
                    self._walks[walk_root].failed = True  # not all of it will be listed ahead
                continue
            heapq.heappush(self._queue, (tuple(folder.path.split("/")), walk_root, folder))
            self._queued.add(folder.path)

    def _next(self) -> tuple[str, _Dir] | None:
        """The next folder to list (lock held): skips walks that ended."""
        now = self._clock()
        for root, walk in list(self._walks.items()):
            if now - walk.touched > self._idle:
                log.debug("walk under %s stopped: nobody went on", root)
                del self._walks[root]
        while self._queue:
            _, walk_root, folder = heapq.heappop(self._queue)
            self._queued.discard(folder.path)
            if walk_root in self._walks:
                return walk_root, folder
            if folder.path == self._probe:  # its walk ended: the probe will not be listed
                self._release_waiting()
        if not self._busy:  # nothing left to list: every walk still on is complete
            for root, walk in self._walks.items():
                if not walk.failed:
                    self._complete[root] = now
            self._walks.clear()
        return None

    def _work(self) -> None:
        while True:
            with self._wake:
                item = None
                while not self._stopped:
                    item = self._next()
                    if item is not None:
                        break
                    self._wake.wait()
                if self._stopped or item is None:
                    return
                self._busy += 1
            walk_root, folder = item
            subfolders: list[_Dir] = []
            failed = False
            try:
                # series folders are listed too: their listing is the drill-down with the exact sizes
                subfolders = [c for c in self._tree.children_of(folder) if c.kind in DIRECTORY_KINDS]
            except NbiaError as exc:
                failed = True
                log.debug("walk-ahead listing of %s failed (%s); the walker will ask again", folder.path, exc)
            except Exception:
                failed = True
                log.warning("walk-ahead listing of %s failed", folder.path, exc_info=True)
            with self._wake:
                self._busy -= 1
                self.listed_ahead += 1
                walk = self._walks.get(walk_root)
                held = self._after.pop(folder.path, [])
                cheap = self._tree.series_listing_is_cheap
                if folder.path == self._probe:  # the drill-down answered (or not): the waiting go on
                    self._release_waiting()
                if walk is not None:
                    walk.failed = walk.failed or failed
                    series = [c for c in subfolders if c.kind == "series"]
                    others = [c for c in subfolders if c.kind != "series"]
                    if series and cheap is None:  # not known yet: one series asks, the others wait
                        if self._probe is None:
                            self._probe = series[0].path
                        else:
                            self._waiting.append((walk_root, folder))
                            series = []
                    elif series and not cheap:
                        series = []  # no drill-down: listing a series would fetch its files for their sizes
                    if not cheap:
                        held = [c for c in held if c.kind != "series"]
                    if folder.kind == "study" and len(series) > 1:
                        self._after[series[0].path] = series[1:]
                        series = series[:1]
                    self._enqueue(walk_root, [*others, *series, *held])
                    if self._probe is not None and self._probe not in self._queued and not self._busy:
                        self._release_waiting()  # the probe found no room in the queue: nobody waits for it
                self._wake.notify_all()

    def _release_waiting(self) -> None:
        """The probe is done (or will never be listed): the studies waiting for it are queued again
        (lock held); listing them again comes from the catalog's listings, without a call."""
        self._probe = None
        waiting, self._waiting = self._waiting, []
        for walk_root, study in waiting:
            if walk_root in self._walks:
                self._enqueue(walk_root, [study])


def _under(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root + "/")
