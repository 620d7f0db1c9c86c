"""The instance store: DICOM bytes for the file system and the commands, cached on disk, fetched once.

One job per module:

* :mod:`.index`: which instances are complete on disk, their use order, the bound (the file system is
  the index: no database on any path);
* :mod:`.download`: one fetch, streamed into a part file, readable while it arrives, renamed into place
  once checked;
* :mod:`.handles`: open instances (a complete file, or one still arriving);
* :mod:`.readahead`: the policy (which files to fetch before they are opened) and its global budget;
* :mod:`.prefetcher`: the pool that fetches ahead, most recently read series first;
* :mod:`.zipfetch`: a series read through its ``getImage`` zip, feeding the cache in reading order;
* :mod:`.zipmode`: whether singles run beside a zip or it runs alone, measured at each zip's start;
* :mod:`.ref`: what the store needs of an instance (:class:`~.ref.InstanceRef`);
* :mod:`.jobs`: the bulk jobs of the commands (:meth:`~.jobs.CacheJobs.ensure`, ``verify_all``,
  ``info``, ``clear``), a part of :class:`InstanceStore` that fetches through its single flight;
* this module: :class:`InstanceStore`, which ties them together for the file system, fsspec and the
  commands: opens, reads and releases, the read-ahead a reader's opens plan, the series zip's
  claims on the cache, one fetch per instance.

Reading an instance: an open of a cached file is one ``open`` and one ``fstat`` (its use is noted in
memory and written in batches); an open of one that is not cached starts its fetch (or joins the one in
flight: one fetch per instance however many readers) in a thread of its own and returns as soon as the
first bytes are there; reads then wait only for the bytes they ask for. Every fetched body is checked
against its own Content-Length, and a body whose length differs from the metadata's is the true file
(reported once through ``on_size_mismatch``). A cached file whose length differs from what was
fetched is dropped and fetched again.

Threads (the read-ahead pool, the background scan of the cache and the writer of use times) start in
:meth:`InstanceStore.start`, after the mount daemonized, and stop in :meth:`InstanceStore.close`;
close the HTTP client first so that no worker waits out a stalled transfer.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import cachetools
import pydicom

from ..errors import ConfigError, IntegrityError, NbiaError, OfflineError, ServerError
from .download import MEMORY_LIMIT, Download
from .handles import DownloadHandle, FileHandle, HandleTable
from .index import OBJECTS, CacheIndex, Digests
from .jobs import CacheInfo, CacheJobs, EnsureReport, Outcome, VerifyReport
from .prefetcher import Item, Prefetcher
from .readahead import (
    ZIP_MIN_REST,
    Budget,
    ReaderState,
    WalkOn,
    byte_offsets,
    finished_in_order,
    plan,
    read_soon_range,
    walk_on,
    wants_zip,
    zip_limit,
)
from .readsoon import ReadSoon, will_need
from .ref import InstanceRef
from .ref import ids as _ids
from .zipfetch import ZipFetch
from .zipmode import ZIP_ONLY, Trial

if TYPE_CHECKING:
    from ..client import NbiaClient

log = logging.getLogger(__name__)

__all__ = ["InstanceStore", "StoreStats", "EnsureReport", "Outcome", "VerifyReport", "CacheInfo"]

#: Share of the cache bound that files fetched ahead but not opened yet may fill.
READ_AHEAD_SHARE = 0.25
#: Of a cached file just opened, this much is asked of the disk at once (the kernel reads it while the
#: reader's first requests come through FUSE): DICOM readers read the whole file, in small requests.
READ_SOON = 8 << 20
#: A walking reader's cached files are asked of the disk up to this many bytes ahead of it, one more
#: file per open (readahead.read_soon_range): a whole window at once made the next file wait behind it.
READ_SOON_AHEAD = 16 << 20
#: Bytes being fetched ahead at once, at most (files of any size: one always may be).
IN_FLIGHT_LIMIT = 64 * 1024 * 1024
#: open() returns once this much of an instance (or all of it) has arrived: its first bytes.
FIRST_BYTES = 1
#: Seconds a waiting reader allows beyond the client's read timeout before it calls a transfer stalled.
STALL_MARGIN = 5.0
#: Seconds an opener joining another's fetch allows beyond the client's deadline for its first bytes.
WAIT_MARGIN = 15.0
#: Uses of cached files are written to disk (their mtimes) at most this often.
TOUCH_FLUSH = 30.0
#: Read-ahead state is kept for this many series (the most recently read).
READERS = 10_000
#: Series zips read at once, at most (the Data Retriever downloads 2 series at once).
ZIPS = 2
#: An open of a file a running zip is about to bring waits this long for it at most, then fetches it alone.
ZIP_WAIT = 2.0
#: Weight of the newest getSingleImage in the moving average of their durations (the zip's meeting point).
SINGLE_EWMA = 0.3
#: ... kept for at most this many series.
SINGLE_SERIES = 1024
#: A trial's verdict holds for the zips that start within this many seconds after it (the network
#: seldom changes between two series of one reading); later zips are measured again.
VERDICT_TTL = 300.0


@dataclass(frozen=True, slots=True)
class _Ref:
    series_uid: str
    sop_uid: str
    size: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the store's counters (``.nbiafs/stats.json``, benchmarks, tests)."""

    hits: int = 0  # opens served from the cache
    misses: int = 0  # opens that had to fetch (or join a fetch)
    fetches: int = 0  # getSingleImage transfers started
    bytes_fetched: int = 0
    prefetches: int = 0  # instances fetched ahead of readers
    prefetch_errors: int = 0
    joined: int = 0  # opens that joined another's fetch instead of starting one
    memory_fallbacks: int = 0  # fetches kept in memory because the cache could not be written
    corrupt_dropped: int = 0  # cached files dropped because their length was wrong
    size_mismatches: int = 0  # complete bodies of another length than the metadata said
    md5_mismatches: int = 0  # bodies whose md5 was not the server's
    fetch_errors: int = 0
    zips: int = 0  # series zips started
    zip_files: int = 0  # instances written from a series zip
    zips_alone: int = 0  # zips that ran without singles beside them (measured faster so, see zipmode)
    zip_waits: int = 0  # opens that waited for the zip to bring their file instead of fetching it apart
    walks_on: int = 0  # first opens of a series whose window opened at once (a reader walking series on)


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(StoreStats.__dataclass_fields__, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> StoreStats:
        with self._lock:
            return StoreStats(**self._values)


class InstanceStore(CacheJobs):
    """Instance bytes for the file system and the commands (see the module docstring)."""

    def __init__(self, client: NbiaClient | None, cache_dir: Path, *, size_limit: int, namespace: str,
                 offline: bool = False, workers: int = 8, wait_timeout: float | None = None,
                 on_size_mismatch: Callable[[InstanceRef, int], None] | None = None,
                 read_ahead_share: float = READ_AHEAD_SHARE, in_flight_limit: int = IN_FLIGHT_LIMIT,
                 series_zip: bool = True, zip_trial: Callable[[], Trial] = Trial) -> None:
        if size_limit <= 0:
            raise ConfigError("the instance cache size limit must be positive")
        if workers < 0:
            raise ConfigError("the number of prefetch workers cannot be negative")
        if not namespace:
            raise ConfigError("the instance cache needs a namespace (server URL + account)")
        self._client = client
        self._offline = offline
        self._on_size_mismatch = on_size_mismatch
        deadline = float(getattr(client, "deadline", 120.0))
        self._wait_timeout = wait_timeout if wait_timeout is not None else deadline + WAIT_MARGIN
        transport = getattr(client, "transport", None)
        read_timeout = float(transport.timeout[1]) if transport is not None else 60.0
        self._stall = read_timeout + STALL_MARGIN
        self.directory = Path(cache_dir) / OBJECTS
        try:
            self._index = CacheIndex(Path(cache_dir), namespace, size_limit)
        except OSError as exc:
            raise ConfigError(f"cannot use the cache directory {cache_dir}: {exc}") from exc
        self._size_limit = size_limit
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when a fetch has fully ended
        self._downloads: dict[str, Download] = {}
        self._reported: set[str] = set()
        self._handles = HandleTable()
        self._counters = _Counters()
        self._readers: cachetools.LRUCache[str, ReaderState] = cachetools.LRUCache(READERS)
        self._hinted: cachetools.LRUCache[str, int] = cachetools.LRUCache(READERS)  # series -> last hinted
        self._walk_on: WalkOn | None = None  # a reader read a series to its end in order lately (readahead)
        # series -> (its listing, position of each instance, byte offsets): computed once per listing
        self._positions: cachetools.LRUCache[str, tuple[Sequence[Any], dict[str, int], list[int]]] = \
            cachetools.LRUCache(256)
        self._workers = max(1, workers)
        self._series_zip = series_zip and not offline and workers > 0
        self._zips: dict[str, ZipFetch] = {}
        self._trials: dict[str, Trial] = {}  # series -> the measurement of its running zip (zipmode)
        self._zip_trial = zip_trial
        self._verdict: tuple[str, float] | None = None  # the last trial's decision and when it was made
        self._trial_lock = threading.Lock()
        self._zip_bytes = int(size_limit * read_ahead_share)
        self._prefetcher = Prefetcher(self._fetch_ahead, workers=0 if offline else workers,
                                      budget=Budget(in_flight_limit, int(size_limit * read_ahead_share)),
                                      leave=self._zip_brings_sooner)
        self._read_soon = ReadSoon(READ_SOON)  # cached files of a reader's window, read from disk ahead of it
        # series -> how long its getSingleImage fetches take lately (a moving average; a series' files
        # are alike, another series' may be 400 times bigger). Single values written whole: no lock.
        self._single_seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._background: threading.Thread | None = None
        self._warned_memory = False
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the read-ahead workers and the background scan and use-time writer (idempotent)."""
        with self._lock:
            if self._closed:
                raise NbiaError("the instance store is closed")
            if self._background is None:
                self._background = threading.Thread(target=self._maintain, name="nbiafs-cache-index", daemon=True)
                self._background.start()
        self._prefetcher.start()

    def close(self) -> None:
        """Stop the workers, close every handle, write the use times (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._lock:
            zips = list(self._zips.values())
        for zf in zips:
            zf.stop()
        for zf in zips:
            if not zf.done.wait(30):
                log.warning("the zip of series %s did not stop within 30 s", zf.series_uid)
        self._prefetcher.stop()
        self._read_soon.close()
        self._stop.set()
        if self._background is not None:
            self._background.join(30)
        self._handles.close_all()
        self._index.flush_touches()

    def __enter__(self) -> InstanceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _maintain(self) -> None:
        try:
            found = self._index.scan()
            log.debug("cache index: %d files, %d bytes", found, self._index.total)
        except Exception:
            log.warning("scanning the instance cache failed", exc_info=True)
        while not self._stop.wait(TOUCH_FLUSH):
            self._index.flush_touches()

    # ----------------------------------------------------------------- file operations
    def open(self, node: InstanceRef, then: Callable[[], None] | None = None) -> int:
        """A handle over the bytes of ``node``: from the cache, else fetched (once, however many ask).

        ``then`` (the read-ahead policy's :meth:`on_open`, which must not raise) runs once ``node`` is
        claimed: at once for a cached file, else as soon as its fetch is started or joined, before the
        open waits for its first bytes. Read-ahead planned there (a zip, the window's singles) goes out
        beside that fetch instead of one round trip after it."""
        self._check_open()
        series_uid, sop_uid = _ids(node)
        path = self._index.path_for(series_uid, sop_uid)
        cached = self._open_cached(path, node)
        if cached is not None:
            self._counters.add("hits")
            self._prefetcher.opened(path)
            handle_id = self._handles.add(cached)
            if then is not None:
                then()
            return handle_id
        if self._offline:
            self._counters.add("misses")
            raise OfflineError(f"{sop_uid} is not in the cache (offline mode)")
        self._await_zip(path, series_uid, sop_uid)
        joined = self._join_or_start(path, node, reader=True)
        if joined is None:  # completed by another thread a moment ago
            return self.open(node, then)
        download, leader = joined
        self._counters.add("misses")
        if leader:
            threading.Thread(target=self._run, args=(path, download), name="nbiafs-fetch", daemon=True).start()
        else:
            self._counters.add("joined")
        handle = DownloadHandle(download, self._stall)
        try:
            if then is not None:
                then()
            download.wait_started(self._wait_timeout)
            length = download.length
            download.wait_for(min(FIRST_BYTES, length) if length is not None else 1, self._stall)
            self._note_length(node, download.length)
        except BaseException:
            handle.close()
            raise
        return self._handles.add(handle)

    @property
    def open_timeout(self) -> float:
        """The longest an :meth:`open` waits: for its fetch to start, then for its first bytes."""
        return self._wait_timeout + self._stall

    def read(self, handle: int, size: int, offset: int) -> bytes:
        """Exactly the bytes ``[offset, offset+size)`` (fewer at the end, b"" past it)."""
        if size < 0 or offset < 0:
            raise OSError(22, f"bad read: size={size} offset={offset}")
        return self._handles.get(handle).read(size, offset)

    def size(self, handle: int) -> int:
        """The length of the file behind ``handle`` (differs from st_size only after a size mismatch)."""
        return self._handles.get(handle).size()

    def release(self, handle: int) -> None:
        self._handles.pop(handle).close()

    def probe(self, series_uid: str, sop_uid: str) -> tuple[int, int | None]:
        """Exact size and InstanceNumber of an instance the drill-down could not describe, by fetching it
        (once, kept in the cache: a later open is a hit)."""
        ref = _Ref(series_uid, sop_uid)
        self._check_open()
        path = self._index.path_for(series_uid, sop_uid)
        entry = self._index.lookup(path)
        if entry is None:
            if self._offline:
                raise OfflineError(f"{sop_uid} is not in the cache (offline mode)")
            joined = self._join_or_start(path, ref)
            if joined is not None:
                download, leader = joined
                if leader:
                    self._run(path, download)
                download.wait_for(1 << 62, self._stall)
                if download.in_memory is not None:
                    data = bytes(download.in_memory)
                    return len(data), _instance_number(io.BytesIO(data), sop_uid)
            entry = self._index.lookup(path)
            if entry is None:
                raise ServerError(f"{sop_uid}: fetched, but gone from the cache at once")
        with open(entry.path, "rb") as fh:
            return os.fstat(fh.fileno()).st_size, _instance_number(fh, sop_uid)

    # ----------------------------------------------------------------- read-ahead
    def on_open(self, node: InstanceRef, siblings: Sequence[InstanceRef]) -> int:
        """The read-ahead policy: ``node`` was opened; ``siblings`` are its series' files in reading order
        (the same sequence object each time: positions are computed once per series listing)."""
        series_uid, sop_uid = _ids(node)
        positions, offsets = self._position(series_uid, siblings)
        position = positions.get(sop_uid)
        if position is None:
            return 0
        abandoned_zip: ZipFetch | None = None
        walked_on = False
        with self._lock:
            before = self._readers.get(series_uid)
            if before is None:  # a first open: maybe the next series of a reader walking series on
                sign = self._walk_on
                guessed = self._readers.get(str(sign.guessed)) if sign is not None and sign.guessed is not None else None
                self._walk_on, start, abandoned = walk_on(sign, time.monotonic(), series_uid, position, guessed)
                if abandoned is not None:
                    abandoned_zip = self._zips.get(str(abandoned))
                before, walked_on = start, start is not None
            state, ahead = plan(before, position, len(siblings))
            self._readers[series_uid] = state
            self._hinted[series_uid], soon = read_soon_range(state, offsets, self._hinted.get(series_uid),
                                                             READ_SOON_AHEAD)
            if finished_in_order(before, position, len(siblings)):
                self._walk_on = WalkOn(time.monotonic())
            zf = self._zips.get(series_uid)
        if walked_on:
            self._counters.add("walks_on")
        if abandoned_zip is not None:  # the guessed series was scanned, not walked: its zip has no reader
            abandoned_zip.stop()
        self._prefetcher.touch(series_uid)
        opened = zf is None and self._series_zip and before is not None and before.window == 0 and state.window
        if opened and wants_zip(before, state, len(siblings), cached_ahead=self._cached_ahead(siblings, position),
                                rest_bytes=offsets[-1] - offsets[position + 1], byte_limit=self._zip_bytes):
            zf = self._start_zip(series_uid, siblings)
        if zf is not None:
            zf.allow(zip_limit(state, offsets, self._zip_bytes))
        looked = {i: self._in_cache(siblings[i]) for i in {*soon, *ahead}}  # each position looked up once
        cached = [path for path, there in (looked[i] for i in soon) if there]
        if cached:  # their pages come from the disk while the reader is on the files before
            self._read_soon.hint(cached)
        if not ahead:
            return 0
        items = []
        for i in ahead:
            path, there = looked[i]
            if path and not there:
                items.append(Item(path, max(int(siblings[i].size or 0), 0), siblings[i]))
        return self._prefetcher.want(series_uid, items, from_end=zf is not None)

    def _in_cache(self, node: InstanceRef) -> tuple[str, bool]:
        """The cache path of ``node`` ("" when it names no instance) and whether the index knows it is there."""
        if not node.series_uid or not node.sop_uid:
            return "", False
        path = self._index.path_for(node.series_uid, node.sop_uid)
        return path, self._index.known(path) is not None  # (a worker looks at the disk before it fetches)

    def prefetch(self, nodes: Iterable[InstanceRef]) -> int:
        """Fetch ``nodes`` in the background (skipping what is cached); returns how many were queued."""
        by_series: dict[str, list[Item]] = {}
        for node in nodes:
            if not node.series_uid or not node.sop_uid:
                continue
            path = self._index.path_for(node.series_uid, node.sop_uid)
            if self._index.lookup(path) is None:
                by_series.setdefault(node.series_uid, []).append(Item(path, max(int(node.size or 0), 0), node))
        return sum(self._prefetcher.want(series, items) for series, items in by_series.items())

    def wait_prefetched(self, timeout: float) -> bool:
        """Wait until no read-ahead is queued or running and every series zip waits for its reader (or
        ended); False when ``timeout`` passed first."""
        end = time.monotonic() + timeout
        if not self._prefetcher.idle(timeout):
            return False
        with self._lock:
            zips = list(self._zips.values())
        for zf in zips:
            if not zf.wait_idle(max(0.0, end - time.monotonic())):
                return False
        return self._prefetcher.idle(max(0.0, end - time.monotonic()))

    def wait_fetched(self, timeout: float, node: InstanceRef | None = None) -> bool:
        """Wait until no fetch (of ``node``, or at all) is in flight: each recorded in the index, or failed."""
        path = self._index.path_for(*_ids(node)) if node is not None else None
        with self._settled:
            return self._settled.wait_for(lambda: not self._downloads if path is None else path not in self._downloads,
                                          timeout)

    def _position(self, series_uid: str, siblings: Sequence[InstanceRef]) -> tuple[dict[str, int], list[int]]:
        """Each instance's position in ``siblings`` and the files' byte offsets (once per listing)."""
        with self._lock:
            known = self._positions.get(series_uid)
            if known is not None and known[0] is siblings:
                return known[1], known[2]
        positions = {str(s.sop_uid): i for i, s in enumerate(siblings) if s.sop_uid}
        offsets = byte_offsets([max(int(f.size or 0), 0) for f in siblings])
        with self._lock:
            self._positions[series_uid] = (siblings, positions, offsets)
        return positions, offsets

    # ----------------------------------------------------------------- the series zip
    def _cached_ahead(self, siblings: Sequence[InstanceRef], position: int) -> int:
        """How many of the next files are cached, on disk (once per series read from its start: a
        series another process cached gets no zip, though memory does not know its files yet)."""
        ahead = siblings[position + 1:position + 1 + ZIP_MIN_REST]
        return sum(1 for f in ahead if f.series_uid and f.sop_uid
                   and self._index.lookup(self._index.path_for(f.series_uid, f.sop_uid)) is not None)

    def _start_zip(self, series_uid: str, siblings: Sequence[InstanceRef]) -> ZipFetch | None:
        client = self._client
        if client is None:
            return None
        files = [f for f in siblings if f.series_uid and f.sop_uid]
        with self._lock:
            if self._closed or series_uid in self._zips or len(self._zips) >= ZIPS:
                return self._zips.get(series_uid)
            zf = ZipFetch(series_uid=series_uid, files=files,
                          open_zip=lambda: client.image_zip(series_uid, include_md5=True),
                          skip=self._claimed, deliver=self._deliver_from_zip, record_md5=self._record_zip_md5)
            self._zips[series_uid] = zf
        with self._trial_lock:  # the zip starts alone: singles wait for the trial (zipmode) ...
            trial = self._zip_trial()
            trial.settle_sources = max(1, self._workers - 1)
            verdict = self._verdict
            if verdict is not None and time.monotonic() - verdict[1] < VERDICT_TTL:
                trial.phase = verdict[0]  # ... unless a recent trial decided already
            self._trials[series_uid] = trial
            self._prefetcher.hold(series_uid, not trial.singles_allowed)
        self._counters.add("zips")
        if trial.phase == ZIP_ONLY:
            self._counters.add("zips_alone")
        threading.Thread(target=self._run_zip, args=(zf,), name="nbiafs-zip", daemon=True).start()
        return zf

    def _run_zip(self, zf: ZipFetch) -> None:
        try:
            zf.run()
        finally:
            with self._trial_lock:  # whatever the zip left is the singles' again
                self._trials.pop(zf.series_uid, None)
                self._prefetcher.hold(zf.series_uid, False)
            with self._lock:
                if self._zips.get(zf.series_uid) is zf:
                    del self._zips[zf.series_uid]
                self._settled.notify_all()  # openers waiting for it to bring their file
            self._prefetcher.wake()  # what was left to it is the singles' again
            log.debug("zip of series %s: %d files written, %d went by", zf.series_uid, zf.delivered, zf.skipped)

    def _zip_brings_sooner(self, series_uid: Hashable, item: Item) -> bool:
        """Whether the series' running zip brings ``item`` sooner than a single would (the prefetcher
        then leaves it to the zip): near where the two meet, a single started for a file a few members
        ahead of the zip makes the reader wait a round trip for what the zip had ready."""
        zf = self._zips.get(str(series_uid))
        single = self._single_seconds.get(str(series_uid))
        if zf is None or single is None:
            return False
        position = zf.position_of(str(getattr(item.ref, "sop_uid", "")))
        return position is not None and zf.brings_within(position, single, time.monotonic())

    def _on_chunk(self, download: Download, nbytes: int) -> None:
        """Bytes of ``download`` arrived (in its thread): the trial of its series' zip counts them. A
        measurement never fails a fetch: if it breaks, the series goes on with zip and singles."""
        trial = self._trials.get(download.series_uid)
        if trial is None or trial.decided:
            return
        with self._trial_lock:
            try:
                if self._trials.get(download.series_uid) is not trial or not trial.add(
                        time.monotonic(), nbytes, via_zip=download.via_zip, source=id(download)):
                    return
                if trial.decided:  # measured: the next zips start from this verdict (VERDICT_TTL)
                    self._verdict = (trial.phase, time.monotonic())
            except Exception:
                log.warning("the zip trial of series %s failed; zip and singles go on", download.series_uid,
                            exc_info=True)
                trial.abandon()
            self._prefetcher.hold(download.series_uid, not trial.singles_allowed)
        if trial.decided:
            log.info("zip of series %s: %s", download.series_uid, trial.describe())
            if trial.phase == ZIP_ONLY:
                self._counters.add("zips_alone")

    def _await_zip(self, path: str, series_uid: str, sop_uid: str) -> None:
        """An open of a file that the series' running zip is about to bring waits for the zip to bring
        it (and then joins that fetch) instead of fetching it apart: the zip would read its bytes anyway,
        and on a shared link a second copy costs the reader. Bounded by :data:`ZIP_WAIT`."""
        zf = self._zips.get(series_uid)
        if zf is None:
            return
        position = zf.position_of(sop_uid)
        if position is None or not zf.about_to(position):
            return
        zf.allow(position + 1)

        def claimed() -> bool:  # (the open looked at the disk just before: memory says the rest)
            return path in self._downloads or self._index.known(path) is not None

        with self._settled:
            if claimed():
                return
            self._counters.add("zip_waits")
            if self._settled.wait_for(lambda: claimed() or not zf.about_to(position),
                                      min(ZIP_WAIT, self._wait_timeout)):
                return
        # the zip stalls: no opener waits for it again, and the singles take the series back
        log.info("zip of series %s brought nothing for %.0f s: single images take over", series_uid, ZIP_WAIT)
        zf.distrust()
        with self._trial_lock:
            trial = self._trials.get(series_uid)
            if trial is not None:
                trial.abandon()
            self._prefetcher.hold(series_uid, False)
        self._prefetcher.wake()  # what was left to the zip is the singles' again

    def _claimed(self, node: InstanceRef) -> bool:
        """Whether ``node`` is cached or being fetched (the zip lets its member go by)."""
        path = self._index.path_for(*_ids(node))
        with self._lock:
            if path in self._downloads:
                return True
        return self._index.known(path) is not None  # (one on disk unknown to memory: its delivery finds it)

    def _deliver_from_zip(self, node: InstanceRef, member: Any) -> bool | None:
        """Fetch ``node`` with the zip ``member`` as its body (in the zip's thread); a body that breaks
        off is fetched again alone. None when another fetch claimed it first."""
        path = self._index.path_for(*_ids(node))
        joined = self._join_or_start(path, node)
        if joined is None or not joined[1]:
            return None
        download = joined[0]
        download.via_zip = True
        if member.length is None:
            member.length = download.expected_size
        client = self._client
        assert client is not None
        bodies = iter([member])

        def body() -> Any:
            first = next(bodies, None)
            return first if first is not None else client.open_single_image(download.series_uid, download.sop_uid)

        self._run(path, download, body)
        if download.ok and download.on_disk:
            self._counters.add("zip_files")
            self._prefetcher.note_ahead(path, int(download.length or 0))
            return True
        return False

    def _record_zip_md5(self, node: InstanceRef, md5: str) -> None:
        """The zip's ``md5hashes.csv`` gave the server's md5 of a file it wrote: keep it, or drop the file."""
        path = self._index.path_for(*_ids(node))
        if self._index.lookup(path) is None:
            return
        digests = self._index.digests(path)
        if digests.fetched is not None and digests.fetched != md5:
            log.warning("%s from the series zip is not the server's file (md5 %s, the server says %s): dropped",
                        node.sop_uid, digests.fetched, md5)
            self._counters.add("md5_mismatches")
            self._index.remove(path)
            return
        self._index.set_digests(path, Digests(digests.fetched, md5, digests.length))

    def _fetch_ahead(self, item: Item) -> bool:
        """A read-ahead worker's fetch (in its own thread); True when it fetched the file into the cache."""
        path = str(item.key)
        if self._closed or self._index.lookup(path) is not None:
            return False
        joined = self._join_or_start(path, item.ref)
        if joined is None:
            return False
        download, leader = joined
        if not leader:  # an open, another worker or the zip fetches it already
            if not download.via_zip:  # (the zip brings it in its turn: this worker has better to do)
                download.wait_for(1 << 62, self._stall)
            return False
        self._run(path, download)
        if download.error is not None:
            self._counters.add("prefetch_errors")
            raise download.error
        self._counters.add("prefetches")
        return download.on_disk

    # ----------------------------------------------------------------- fetching
    def _join_or_start(self, path: str, node: InstanceRef, server_md5: str | None = None, *,
                       reader: bool = False) -> tuple[Download, bool] | None:
        """The fetch of ``path`` in flight (joined) or a new one (leader: the caller runs it); None when
        the file became complete meanwhile. ``reader``: the caller will read from it (counted at once,
        so the fetch keeps its bytes readable for it even if it ends before the caller reads)."""
        series_uid, sop_uid = _ids(node)
        with self._lock:
            download = self._downloads.get(path)
            if download is not None and download.failed:
                download = None  # failed a moment ago, not yet forgotten: a failure is never remembered
            if download is not None:
                if reader:
                    download.acquire()
                return download, False
            if os.path.exists(path):
                return None
            expected = int(node.size) if node.size and node.size > 0 else None
            download = Download(final=path, part=self._index.part_for(path), series_uid=series_uid,
                                sop_uid=sop_uid, expected_size=expected, server_md5=server_md5)
            download.on_chunk = self._on_chunk
            if reader:
                download.acquire()
            self._downloads[path] = download
            self._settled.notify_all()  # an opener waiting for the zip to claim this file
            return download, True

    def _run(self, path: str, download: Download, body: Callable[[], Any] | None = None) -> None:
        """Fetch ``download`` in this thread (``body``: its stream, by default ``getSingleImage``); record
        it in the cache index when it is complete."""
        client = self._client
        assert client is not None
        if body is None:
            self._counters.add("fetches")
        started = time.monotonic()
        try:
            download.run(body or (lambda: client.open_single_image(download.series_uid, download.sop_uid)))
            self._record(path, download)
            if body is None and download.error is None:
                took, times = time.monotonic() - started, self._single_seconds
                last = times.get(download.series_uid)
                if last is None and len(times) >= SINGLE_SERIES:
                    times.clear()  # (rare: a bound, not an LRU)
                times[download.series_uid] = took if last is None else last + SINGLE_EWMA * (took - last)
        finally:
            with self._lock:
                if self._downloads.get(path) is download:
                    del self._downloads[path]
                self._settled.notify_all()
            download.finished()

    def _record(self, path: str, download: Download) -> None:
        """A fetch ended: its file into the index (with its md5 and length), or its failure counted."""
        if download.error is not None:
            self._counters.add("fetch_errors")
            if isinstance(download.error, IntegrityError):
                self._counters.add("md5_mismatches")
            return
        length = int(download.length or 0)
        self._counters.add("bytes_fetched", length)
        if download.on_disk:
            self._index.set_digests(path, Digests(download.md5, download.server_md5, length))
            self._index.add(path, length)
        else:
            self._counters.add("memory_fallbacks")
            if not self._warned_memory:
                self._warned_memory = True
                log.warning("cannot write to the instance cache in %s (%s); serving downloads from memory "
                            "(up to %d MiB each)", self.directory, download.disk_refused, MEMORY_LIMIT >> 20)

    def _note_length(self, node: InstanceRef, length: int | None) -> None:
        """A body of another length than the metadata said is the true file: say so once."""
        if length is None or not node.size or node.size <= 0 or length == node.size:
            return
        key = f"{node.series_uid}/{node.sop_uid}"
        with self._lock:
            first = key not in self._reported
            self._reported.add(key)
        if first:
            self._counters.add("size_mismatches")
            if self._on_size_mismatch is not None:
                self._on_size_mismatch(node, length)

    def _open_cached(self, path: str, node: InstanceRef) -> FileHandle | None:
        entry = self._index.lookup(path)
        if entry is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # evicted (here or by another process) since
            self._index.remove(path)
            return None
        length = os.fstat(fd).st_size
        recorded = self._index.fetched_length(entry)
        if (recorded is not None and length != recorded) or length == 0:
            os.close(fd)
            log.warning("cached %s has %d bytes instead of %s: dropped, fetching again", node.sop_uid, length,
                        recorded)
            self._counters.add("corrupt_dropped")
            self._index.remove(path)
            return None
        self._note_length(node, length)
        self._index.touch(entry)
        will_need(fd, min(length, READ_SOON))
        return FileHandle(fd, length)

    # ----------------------------------------------------------------- what the cache holds
    def md5_of(self, node: InstanceRef) -> str | None:
        """The server's md5 of a cached instance, when it is known (checked by a prefetch or download)."""
        if not node.series_uid or not node.sop_uid:
            return None
        path = self._index.path_for(node.series_uid, node.sop_uid)
        if self._index.lookup(path) is None:
            return None
        return self._index.digests(path).server

    def md5s_of(self, nodes: Sequence[InstanceRef]) -> list[str | None]:
        """:meth:`md5_of` of each of ``nodes`` (a series' files): a series whose cache folder does not
        exist holds none of them, which one look at the disk says instead of one per file (a
        `.series.json` of a series never read, made at each `find -ls`, looked 60 times)."""
        folders: dict[str, bool] = {}
        out: list[str | None] = []
        for node in nodes:
            if not node.series_uid or not node.sop_uid:
                out.append(None)
                continue
            folder = os.path.dirname(self._index.path_for(node.series_uid, node.sop_uid))
            present = folders.get(folder)
            if present is None:
                present = folders[folder] = os.path.isdir(folder)
            out.append(self.md5_of(node) if present else None)
        return out

    def cached_path(self, node: InstanceRef) -> Path | None:
        """The cached file of ``node`` (for hard links), or None."""
        if not node.series_uid or not node.sop_uid:
            return None
        path = self._index.path_for(node.series_uid, node.sop_uid)
        return Path(path) if self._index.lookup(path) is not None and os.path.exists(path) else None

    def contains(self, node: InstanceRef) -> bool:
        if not node.series_uid or not node.sop_uid:
            return False
        return self._index.lookup(self._index.path_for(node.series_uid, node.sop_uid)) is not None

    def volume(self) -> int:
        """Bytes of the cached instances (every namespace)."""
        return self._index.total

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def _check_open(self) -> None:
        if self._closed:
            raise NbiaError("the instance store is closed")


def _instance_number(stream: BinaryIO, sop_uid: str) -> int | None:
    """InstanceNumber from a DICOM header, or None when absent or unreadable (logged)."""
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=["InstanceNumber"], force=True)
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except Exception as exc:  # noqa: BLE001 - a malformed header must not hide the file: it sorts last
        log.info("no InstanceNumber in %s: %s", sop_uid, exc)
        return None
