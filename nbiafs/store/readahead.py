"""Read-ahead that follows the reader: which files of a series to fetch before they are opened.

The problem. A reader that walks a series (``cat *``, dcm2niix, a viewer) opens its files one after the
other; fetched one at a time, each open waits a round trip to the server. Fetching the rest of the series
as soon as one file is opened (what nbiafs did before) makes that fast, but a header scan (one file of
each series: every DICOM indexer, ``dcmdump``, a PACS import) then downloads whole collections, and
nothing bounded it across series.

The policy, in four parts (mountpoint-s3's prefetcher is the model: a pure plan, a pool apart):

* per series, :func:`plan` (pure, tested without threads): the first open of a series fetches that
  file only. An open of the file right after the one opened before (the reader walks in order) grows
  a window, doubling as the kernel's readahead does (2, 4, 8, ... up to the whole series), and asks
  for the files ahead of it within the window. Any other open (random, backwards, one file per series)
  shrinks the window back to nothing: little more than what is opened is ever fetched.
* from series to series, :func:`walk_on` (pure): a reader that has just read a whole series in order
  and then opens the first file of another one (``cp -r`` of a study, dcm2niix of a patient) is taken
  to walk that one too: its window opens at that first open, without the round trips of a first and
  a second file. The sign lasts :data:`WALK_ON_WITHIN` seconds from the last series read to its end,
  and a reader that leaves the series it was guessed for after its first file (a scan after all) drops
  it: a header scan never pays for it more than once.
* per series too, :func:`read_soon_range` (pure): which cached files of the window are asked of the
  disk now (:mod:`.readsoon`), a bounded number of bytes ahead of the reader, one more per open;
* across series, the :class:`Budget`: one global bound on the bytes being fetched ahead at once and on
  the bytes fetched ahead but not opened yet (a share of the cache, so read-ahead never evicts what is
  being read); the scheduler (:mod:`.prefetcher`) serves the series opened most recently first and drops
  what a series nobody has opened for ``stale_after`` seconds still had queued.

How the window is fetched (measured, see docs/performance.md): by parallel ``getSingleImage`` on the
pooled connections, and, for a reader that walks a series from near its start (:func:`wants_zip`),
also by the series' ``getImage`` zip, which brings the files in reading order on one connection,
compressed and without a round trip per file, while the singles take the window from its far end
backwards where that was measured faster than the zip alone (:mod:`.zipmode`). The zip never runs
past the window (:func:`zip_limit`): what nobody reads is not fetched that way either.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

#: The first window a sequential reader gets, and the most it can grow to (files).
FIRST_WINDOW = 2
MAX_WINDOW = 1 << 16
#: A series gets its zip when its reader walks on from one of its first ZIP_NEAR_START files ...
ZIP_NEAR_START = 4
#: ... and at least this many files follow (a short series is as fast by singles alone).
ZIP_MIN_REST = 16
#: Seconds after a reader read a series to its end in order during which the first open of another
#: series takes it to walk that one too (:func:`walk_on`).
WALK_ON_WITHIN = 30.0


@dataclass(frozen=True, slots=True)
class ReaderState:
    """How one series is being read: the last file opened (its position) and the read-ahead window."""

    last: int
    window: int
    #: the highest position already asked for (so a growing window asks only for what is new)
    asked: int


def plan(state: ReaderState | None, opened: int, count: int, *, max_window: int = MAX_WINDOW) -> tuple[ReaderState, range]:
    """The new state of a series after the file at position ``opened`` (of ``count``) was opened, and the
    positions to fetch ahead now (those beyond what was asked before)."""
    if state is None:
        return ReaderState(opened, 0, opened), range(0)
    if opened == state.last:  # the same file again (a reader that opens twice): nothing changes
        return state, range(0)
    if opened == state.last + 1:  # walking in order: the window grows
        window = min(max(FIRST_WINDOW, state.window * 2), max_window, max(count - 1 - opened, 0))
        start = max(opened + 1, state.asked + 1)
        stop = min(opened + 1 + window, count)
        asked = max(state.asked, stop - 1, opened)
        return ReaderState(opened, window, asked), range(start, max(start, stop))
    # a jump (random access, backwards, a second reader elsewhere): no read-ahead until it walks again
    return ReaderState(opened, 0, opened), range(0)


def finished_in_order(before: ReaderState | None, opened: int, count: int) -> bool:
    """Whether the open of position ``opened`` ends a walk through the series (of ``count``): its last
    file, opened right after the one before by a reader whose window was open."""
    return before is not None and before.window > 0 and opened == before.last + 1 == count - 1


@dataclass(frozen=True, slots=True)
class WalkOn:
    """The sign that a reader walks series after series: when a series was last read to its end in
    order, and the series it was then guessed to walk next (None until a first open took the sign)."""

    finished_at: float
    guessed: Hashable | None = None


def walk_on(sign: WalkOn | None, now: float, series: Hashable, opened: int,
            guessed_state: ReaderState | None) -> tuple[WalkOn | None, ReaderState | None, Hashable | None]:
    """At the first open of ``series`` (position ``opened``): the sign kept, the state to :func:`plan`
    from (None: a first open like any other, which fetches that file only), and the series the sign
    had been taken for whose reader went no further than its first file (its zip can stop), if any.

    ``guessed_state`` is the reader state of ``sign.guessed``. Only an open of a series' first file
    walks on; a reader that left the guessed series after its first file was scanning, and the sign
    goes."""
    if sign is None:
        return None, None, None
    if now - sign.finished_at > WALK_ON_WITHIN:
        return None, None, None
    if opened != 0:
        return sign, None, None
    if sign.guessed is not None and sign.guessed != series and (guessed_state is None or guessed_state.last < 1):
        return None, None, sign.guessed
    return WalkOn(sign.finished_at, series), ReaderState(opened - 1, 0, opened - 1), None


def wants_zip(before: ReaderState | None, after: ReaderState, count: int, *, cached_ahead: int = 0,
              rest_bytes: int = 0, byte_limit: int = 0) -> bool:
    """Whether the series' zip should be read for this reader: it just started walking in order (its
    window opened), from near the start, with enough files after it, none of the next ones cached
    (``cached_ahead``: how many of the next :data:`ZIP_MIN_REST` are), and the rest of the series
    (``rest_bytes``) within the read-ahead budget (``byte_limit``): the zip and the singles then share
    the series between them, and neither waits on the other's unread files."""
    return (before is not None and before.window == 0 and after.window > 0 and after.last < ZIP_NEAR_START
            and count - 1 - after.last >= ZIP_MIN_REST and cached_ahead == 0 and rest_bytes <= byte_limit)


def byte_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each file of a series starts, counted in bytes from the series' start (reading order), and
    the series' total last: ``offsets[i]`` is the bytes of the files before position ``i``. Computed
    once per listing, so that nothing an open does grows with the series."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + max(int(size), 0))
    return offsets


def zip_limit(state: ReaderState, offsets: Sequence[int], byte_limit: int) -> int:
    """The position (exclusive) up to which the zip may deliver: the end of the window asked for, and no
    more than ``byte_limit`` bytes past the reader (``offsets``: :func:`byte_offsets` of the series'
    file sizes). The next file always may come."""
    count = len(offsets) - 1
    stop = min(state.asked + 1, count)
    first = state.last + 1
    if first >= stop:
        return stop
    # the first position whose file ends past the bound: files first..position hold > byte_limit bytes
    over = bisect_right(offsets, offsets[first] + byte_limit) - 1
    if over < stop:
        return max(over, state.last + 2)
    return stop


def read_soon_range(state: ReaderState, offsets: Sequence[int], hinted: int | None,
                    byte_limit: int) -> tuple[int, range]:
    """After an open that left ``state``: the last position hinted so far (pass it back in at the next
    open; None: nothing hinted yet) and the positions whose cached pages should be asked of the disk now
    (:mod:`.readsoon`): those of the window asked for, beyond ``hinted``, whose files start within
    ``byte_limit`` bytes past the end of the file being read (``offsets``: :func:`byte_offsets`). The
    next file always may. A jump (no window) asks for nothing and starts over.

    Why a bound of its own: the disk serves what it was asked in order. Hinting a whole window at once
    (64, 128 files as it doubles) queued tens of MB ahead of the file the reader needed next, which
    then waited behind them: after a remount with dropped caches, a ``cat`` of a cached series read at
    about half the disk's speed. Kept a few MB ahead, one more file per open, the disk stays busy and
    the next file is always near the front of its queue."""
    if not state.window:
        return state.last, range(0)
    done = state.last if hinted is None else max(hinted, state.last)
    stop = min(state.asked + 1, len(offsets) - 1)
    end = offsets[state.last + 1] + byte_limit  # files starting before this byte are near enough
    near = max(bisect_left(offsets, end), state.last + 2)
    soon = range(done + 1, max(done + 1, min(stop, near)))
    return (soon[-1] if soon else done), soon


@dataclass(slots=True)
class Budget:
    """The global bounds of read-ahead: bytes in flight, and bytes fetched ahead but not opened yet."""

    in_flight_limit: int
    unread_limit: int
    in_flight: int = 0
    unread: int = 0

    def may_start(self, size: int) -> bool:
        """Whether a fetch of ``size`` bytes ahead fits now (one always fits when nothing is in flight)."""
        if self.in_flight and self.in_flight + size > self.in_flight_limit:
            return False
        return self.unread + self.in_flight + size <= self.unread_limit or not (self.unread or self.in_flight)

    def started(self, size: int) -> None:
        self.in_flight += size

    def ended(self, size: int, kept: bool) -> None:
        """A fetch ahead ended; ``kept``: its bytes are in the cache, waiting to be opened."""
        self.in_flight = max(0, self.in_flight - size)
        if kept:
            self.unread += size

    def opened(self, size: int) -> None:
        """A file fetched ahead was opened: its bytes are read, no longer ahead."""
        self.unread = max(0, self.unread - size)
