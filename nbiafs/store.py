"""The instance store: bytes of DICOM files, an on-disk LRU cache, single-flight fetches, prefetch.

What it owns
  * The persistent instance cache, a ``diskcache.Cache`` under ``cache_dir/"instances"``. Every value is a
    file (``disk_min_file_size=0``) so an open instance is an ordinary fd read with ``os.pread`` from any
    number of threads; an entry evicted while open stays readable through its fd. Keys carry the
    namespace (server URL + account), so a guest mount never serves what a named account fetched.
  * Handles: small ints over either a cached file or, when the disk is full, the fetched bytes in memory.
  * Fetching: a miss is fetched in the *calling* thread (a direct open never queues behind prefetch);
    concurrent opens of one instance share one fetch (single flight) and its result or its error.
    Errors are never cached. Followers wait at most the client's deadline plus a margin.
  * Prefetch: a bounded pool of worker threads (started in :meth:`start`, after the mount daemonizes)
    that fetches the rest of a series once one of its files has been opened (:meth:`on_open`).

Integrity: the length of every fetched body is checked against ``node.size`` before it is stored, and
every open from the cache checks the cached file's length against ``node.size`` and against the length
recorded beside the value; a mismatch deletes the entry and fetches again. diskcache writes a value's
file completely before the row naming it is committed, so a process killed mid-write leaves at most an
unreferenced file, never an entry (``tests/test_store.py`` proves it with a real ``kill -9``); a failed
write removes its partial file (:class:`_TidyDisk`).
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import cachetools
import diskcache
import pydicom

from .errors import ConfigError, NbiaError, OfflineError, ServerError
from .singleflight import Flight

if TYPE_CHECKING:
    from .client import NbiaClient

log = logging.getLogger(__name__)

#: Entries evicted per write once the cache is over its bound. Instances are 0.1-1 MB, so ten per write
#: keeps the cache within a few MB of its limit without long pauses in the writing thread.
CULL_LIMIT = 10
#: SQLite's write-ahead log is checkpointed every this many pages and cut back to WAL_LIMIT bytes after:
#: left to its defaults it grows to ~4 MB (1000 pages) and stays that big, beyond any --cache-size.
WAL_CHECKPOINT_PAGES = 64
WAL_LIMIT = 256 * 1024
#: Seconds a waiting opener allows on top of the client's own deadline before it gives up (the leader's
#: fetch is itself bounded by that deadline; the margin covers writing the value to the cache).
WAIT_MARGIN = 15.0
#: SQLite lock timeout of the cache database. Short, because a timeout here is handled (a read falls
#: back to fetching, a write to serving from memory) instead of blocking a FUSE thread for a minute.
DB_TIMEOUT = 10.0
#: A series whose prefetch was scheduled is not scheduled again for this long (seconds): the cache
#: is given time to hold it; after that an open may schedule what was evicted or failed meanwhile.
SERIES_MEMORY_TTL = 3600.0
SERIES_MEMORY_SIZE = 10_000
#: An entry is re-marked as used in the LRU at most this often (seconds): marking costs a SQLite write
#: transaction per open, and a minute is nothing against the time a 10 GB cache takes to turn over.
TOUCH_INTERVAL = 60.0
#: Share of the cache bound one series' prefetch may fill: the rest stays for what is being read and
#: for other series, so a series larger than the cache never evicts its own first files.
PREFETCH_SHARE = 0.5
#: Recently opened entries remembered for the fast open path (value file path, time, verified length).
RECENT_SIZE = 4096


@dataclass(frozen=True)
class _Ref:
    """An instance known only by its UIDs (size 0 = unknown), for :meth:`InstanceStore.probe`."""

    series_uid: str
    sop_uid: str
    size: int = 0


def _instance_number(stream: BinaryIO, sop_uid: str) -> int | None:
    """InstanceNumber from a DICOM header, or None when absent or unreadable (logged)."""
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=["InstanceNumber"], force=True)
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except Exception as exc:  # noqa: BLE001 - a malformed header must not hide the file: it sorts last
        log.info("no InstanceNumber in %s: %s", sop_uid, exc)
        return None


class InstanceRef(Protocol):
    """What the store needs of a catalog ``Node``: the instance's identifiers and exact size."""

    @property
    def series_uid(self) -> str | None: ...
    @property
    def sop_uid(self) -> str | None: ...
    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's counters (for benchmarks, tests and ``nbiafs cache info``)."""

    hits: int = 0  # opens served from the cache without waiting for anything
    misses: int = 0  # opens that found nothing (usable) in the cache
    fetches: int = 0  # single_image calls made (direct and prefetch)
    bytes_fetched: int = 0
    prefetches: int = 0  # instances fetched by prefetch workers
    prefetch_errors: int = 0
    joined: int = 0  # opens that waited for another thread's fetch instead of fetching
    memory_fallbacks: int = 0  # fetched bytes served from memory because the cache could not keep them
    corrupt_dropped: int = 0  # cached values dropped because their length was wrong
    size_mismatches: int = 0  # complete bodies of another length than the metadata said


class _Counters:
    """Thread-safe mutable counters behind :class:`StoreStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(StoreStats.__dataclass_fields__, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> StoreStats:
        with self._lock:
            return StoreStats(**self._values)


class _TidyDisk(diskcache.Disk):
    """diskcache's Disk, except that a failed value write (disk full) removes its partial file.

    diskcache itself leaves such a file behind unreferenced (never served, but never reclaimed).
    """

    def _write(self, full_path, iterator, mode, encoding=None):
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except BaseException:
            try:
                os.unlink(full_path)
            except OSError:
                pass
            raise


class _Handle:
    """An open instance: a cached file read with pread, or bytes held in memory.

    Reads may run concurrently; :meth:`close` waits for none of them but defers closing the fd until
    the last read in progress is done, so a read never lands on a recycled fd number.
    """

    def __init__(self, file: BinaryIO | None = None, data: bytes | None = None) -> None:
        self._file = file
        self._data = data
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def read(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "instance handle already released")
            self._users += 1
        try:
            if self._data is not None:
                return self._data[offset : offset + size]
            assert self._file is not None
            fd = self._file.fileno()
            chunks: list[bytes] = []
            while size > 0:
                chunk = os.pread(fd, size, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                size -= len(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            with self._lock:
                self._users -= 1
                if self._closed and self._users == 0:
                    self._really_close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users == 0:
                self._really_close()

    def size(self) -> int:
        with self._lock:
            if self._data is not None:
                return len(self._data)
            if self._file is None:
                raise OSError(errno.EBADF, "instance handle already released")
            return os.fstat(self._file.fileno()).st_size

    def _really_close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._data = None


class InstanceStore:
    """Instance bytes for the file system: cached on disk, fetched once, prefetched per series."""

    def __init__(
        self,
        client: NbiaClient,
        cache_dir: Path,
        *,
        size_limit: int,
        namespace: str,
        offline: bool = False,
        workers: int = 8,
        wait_timeout: float | None = None,
        touch_interval: float = TOUCH_INTERVAL,
        on_size_mismatch: Callable[[InstanceRef, int], None] | None = None,
    ) -> None:
        if size_limit <= 0:
            raise ConfigError("the instance cache size limit must be positive")
        if workers < 0:
            raise ConfigError("the number of prefetch workers cannot be negative")
        if not namespace:
            raise ConfigError("the instance cache needs a namespace (server URL + account)")
        self._client = client
        self._size_limit = size_limit
        self._namespace = namespace
        self._offline = offline
        self._workers = workers
        if wait_timeout is None:
            wait_timeout = float(getattr(client, "deadline", 120.0)) + WAIT_MARGIN
        self._wait_timeout = wait_timeout
        self._touch_interval = touch_interval
        self._on_size_mismatch = on_size_mismatch
        self.directory = Path(cache_dir) / "instances"
        try:
            self._cache = diskcache.Cache(
                str(self.directory),
                timeout=DB_TIMEOUT,
                disk=_TidyDisk,
                size_limit=size_limit,
                eviction_policy="least-recently-used",
                cull_limit=CULL_LIMIT,
                disk_min_file_size=0,
                statistics=False,
                sqlite_wal_autocheckpoint=WAL_CHECKPOINT_PAGES,
                sqlite_journal_size_limit=WAL_LIMIT,
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use the cache directory {self.directory}: {exc}") from exc
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a queued prefetch ends
        self._flights: dict[str, Flight[bytes]] = {}
        self._queued: set[str] = set()
        self._series_seen: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            SERIES_MEMORY_SIZE, SERIES_MEMORY_TTL
        )
        self._recent: cachetools.LRUCache[str, tuple[str, float, int]] = cachetools.LRUCache(RECENT_SIZE)
        self._handles: dict[int, _Handle] = {}
        self._next_handle = itertools.count(1)
        self._counters = _Counters()
        self._warned_write = False
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the prefetch workers (idempotent). Call after the mount has daemonized."""
        with self._lock:
            if self._closed:
                raise NbiaError("the instance store is closed")
            if self._pool is None and self._workers > 0 and not self._offline:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="nbiafs-prefetch")

    def close(self) -> None:
        """Cancel queued prefetches, join the workers, close every handle and the cache (idempotent).

        A worker in the middle of a fetch finishes it first; that is bounded by the client's deadline.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
            handles = list(self._handles.values())
            self._handles.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._queued.clear()  # cancelled prefetches never ran to remove themselves
            self._idle.notify_all()
        for handle in handles:
            handle.close()
        self._cache.close()

    def __enter__(self) -> InstanceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- file operations

    def open(self, node: InstanceRef) -> int:
        """A handle over the bytes of ``node``: from the cache, else fetched once (single flight)."""
        key = self._key(node)
        self._check_open()
        file = self._cached_file(key, node)
        if file is not None:
            self._counters.add("hits")
            return self._new_handle(_Handle(file=file))
        self._counters.add("misses")
        if self._offline:
            raise OfflineError(f"{node.sop_uid} is not in the cache (offline mode)")
        data = self._fetch_shared(key, node)
        # A complete body of another length than the metadata said is the true file (see _fetch).
        ref = node if not node.size or len(data) == node.size else _Ref(str(node.series_uid), str(node.sop_uid), len(data))
        file = self._cached_file(key, ref)
        if file is not None:
            return self._new_handle(_Handle(file=file))
        return self._new_handle(_Handle(data=data))  # the cache could not keep it: serve from memory

    def size(self, handle: int) -> int:
        """The length of the bytes behind ``handle`` (differs from st_size only after a size mismatch)."""
        return self._handle(handle).size()

    def read(self, handle: int, size: int, offset: int) -> bytes:
        """Exactly the bytes ``[offset, offset+size)`` of the file (fewer at its end, b"" past it)."""
        if size < 0 or offset < 0:
            raise OSError(errno.EINVAL, f"bad read: size={size} offset={offset}")
        return self._handle(handle).read(size, offset)

    def release(self, handle: int) -> None:
        """Close a handle returned by :meth:`open`."""
        with self._lock:
            h = self._handles.pop(handle, None)
        if h is None:
            raise OSError(errno.EBADF, f"unknown instance handle {handle}")
        h.close()

    def probe(self, series_uid: str, sop_uid: str) -> tuple[int, int | None]:
        """Exact size and InstanceNumber of an instance the drill-down API could not describe.

        The catalog's fallback (no advanced API): sizes are learned by fetching, never guessed. The
        instance is fetched once (single flight, shared with opens), kept in the cache, and its header
        parsed for InstanceNumber; a later open of the file is then a cache hit.
        """
        ref = _Ref(series_uid=series_uid, sop_uid=sop_uid, size=0)
        key = self._key(ref)
        self._check_open()
        file = self._cached_file(key, ref)
        if file is None:
            if self._offline:
                raise OfflineError(f"{sop_uid} is not in the cache (offline mode)")
            data = self._fetch_shared(key, ref)
            return len(data), _instance_number(io.BytesIO(data), sop_uid)
        with file:
            size = os.fstat(file.fileno()).st_size
            return size, _instance_number(file, sop_uid)

    # ----------------------------------------------------------------- prefetch

    def prefetch(self, nodes: Iterable[InstanceRef]) -> int:
        """Queue background fetches of ``nodes``; skips cached, queued and in-flight ones.

        Returns how many were queued. Does nothing offline, before :meth:`start` or after :meth:`close`.
        """
        queued = 0
        for node in nodes:
            if not node.series_uid or not node.sop_uid:
                continue  # not an instance: nothing to fetch
            key = self._key(node)
            with self._lock:
                pool = self._pool
                if pool is None or self._closed:
                    return queued
                if key in self._queued or key in self._flights:
                    continue
            if self._contains_key(key):
                continue
            with self._lock:
                if key in self._queued or key in self._flights or self._pool is None:
                    continue
                self._queued.add(key)
                try:
                    pool.submit(self._prefetch_one, key, node)
                except RuntimeError:  # shut down meanwhile
                    self._queued.discard(key)
                    return queued
            queued += 1
        return queued

    def on_open(self, node: InstanceRef, siblings: Sequence[InstanceRef]) -> int:
        """The prefetch policy: after the first open in a series, prefetch the rest of it (once).

        ``siblings`` are the instances of ``node``'s series in reading order. Returns how many were queued.
        """
        series = node.series_uid or ""
        with self._lock:
            if self._pool is None or series in self._series_seen:
                return 0
            self._series_seen[series] = True
        # Start just after the opened file (readers go through a series in order), then wrap around.
        index = next((i for i, s in enumerate(siblings) if s.sop_uid == node.sop_uid), -1)
        rest = [s for s in (*siblings[index + 1 :], *siblings[: max(index, 0)]) if s.sop_uid != node.sop_uid]
        return self.prefetch(self._within_budget(rest))

    def _within_budget(self, nodes: Sequence[InstanceRef]) -> list[InstanceRef]:
        """The first of ``nodes`` whose sizes add up to at most PREFETCH_SHARE of the cache bound.

        Prefetching more than the cache holds would evict what it has just fetched (and what the
        reader is about to open) to make room for the end of the series.
        """
        budget = self._size_limit * PREFETCH_SHARE
        chosen: list[InstanceRef] = []
        total = 0
        for n in nodes:
            total += max(int(n.size or 0), 0)
            if total > budget:
                log.info("prefetch of series %s limited to %d of %d files by the cache size",
                         n.series_uid, len(chosen), len(nodes))
                break
            chosen.append(n)
        return chosen

    def _prefetch_one(self, key: str, node: InstanceRef) -> None:
        try:
            with self._lock:
                if self._closed:
                    return
            if self._contains_key(key):
                return
            with self._lock:
                if key in self._flights:  # a direct open is fetching it already
                    return
                flight: Flight[bytes] = Flight()
                self._flights[key] = flight
            self._lead(key, node, flight)
            self._counters.add("prefetches")
        except Exception as exc:  # noqa: BLE001 - logged and counted; the next open of this file tries again
            self._counters.add("prefetch_errors")
            log.info("prefetch of %s failed: %s", node.sop_uid, exc)
        finally:
            with self._lock:
                self._queued.discard(key)
                self._idle.notify_all()

    def wait_prefetched(self, timeout: float) -> bool:
        """Wait until no prefetch is queued or running; False when ``timeout`` seconds passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queued, timeout)

    # ----------------------------------------------------------------- cache management

    def contains(self, node: InstanceRef) -> bool:
        """True when ``node``'s bytes are in the cache (for this namespace)."""
        return self._contains_key(self._key(node))

    def volume(self) -> int:
        """Bytes the instance cache uses on disk (values plus its database)."""
        return int(self._cache.volume())

    def evict_all(self) -> int:
        """Remove this namespace's instances from the cache; returns how many were removed."""
        prefix = json.dumps([self._namespace])[:-1] + ","
        removed = 0
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(prefix):
                removed += bool(self._cache.delete(key, retry=True))
        with self._lock:
            self._series_seen.clear()
            self._recent.clear()
        return removed

    def clear(self) -> int:
        """Remove every instance of every namespace from the cache; returns how many were removed."""
        removed = int(self._cache.clear(retry=True))
        with self._lock:
            self._series_seen.clear()
            self._recent.clear()
        return removed

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    # ----------------------------------------------------------------- internals

    def _key(self, node: InstanceRef) -> str:
        if not node.series_uid or not node.sop_uid:
            raise NbiaError(f"not an instance: {node!r}")
        return json.dumps([self._namespace, node.series_uid, node.sop_uid])

    def _check_open(self) -> None:
        if self._closed:
            raise NbiaError("the instance store is closed")

    def _handle(self, handle: int) -> _Handle:
        with self._lock:
            h = self._handles.get(handle)
        if h is None:
            raise OSError(errno.EBADF, f"unknown instance handle {handle}")
        return h

    def _new_handle(self, handle: _Handle) -> int:
        with self._lock:
            if self._closed:
                handle.close()
                raise NbiaError("the instance store is closed")
            number = next(self._next_handle)
            self._handles[number] = handle
        return number

    def _contains_key(self, key: str) -> bool:
        try:
            return key in self._cache
        except (diskcache.Timeout, sqlite3.Error) as exc:
            log.debug("cache lookup failed: %s", exc)
            return False

    def _cached_file(self, key: str, node: InstanceRef) -> BinaryIO | None:
        """The cached value of ``key`` opened for reading, if present and of the right length.

        diskcache records every LRU access in a SQLite write transaction (~0.4 ms). An entry opened
        within the last ``touch_interval`` seconds is therefore opened straight from its value file
        (whose random name is never reused: the file is either this value, complete, or gone) and its
        access time is left as it is, which coarsens LRU order to that interval and nothing else.
        """
        expected = node.size if node.size and node.size > 0 else None
        with self._lock:
            recent = self._recent.get(key)
        if recent is not None and time.monotonic() - recent[1] < self._touch_interval:
            path, _, recorded = recent
            try:
                file: BinaryIO = open(path, "rb")  # noqa: SIM115 - owned by the handle
            except OSError:  # evicted or removed by another process: ask the cache
                file = None  # type: ignore[assignment]
            if file is not None:
                length = os.fstat(file.fileno()).st_size
                if length == recorded and (expected is None or length == expected):
                    return file
                file.close()  # not what was verified: let the slow path check (and drop) it
            with self._lock:
                self._recent.pop(key, None)
        try:
            file, recorded = self._cache.get(key, read=True, tag=True)
        except (diskcache.Timeout, sqlite3.Error, OSError) as exc:
            log.warning("instance cache read failed (%s); fetching instead", exc)
            return None
        if file is None:
            return None
        length = os.fstat(file.fileno()).st_size
        if length == (expected if expected is not None else recorded) and (recorded is None or length == recorded):
            with self._lock:
                self._recent[key] = (file.name, time.monotonic(), length)
            return file
        file.close()
        log.warning("cached %s has %d bytes instead of %s: dropped, fetching again",
                    node.sop_uid, length, expected if expected is not None else recorded)
        self._counters.add("corrupt_dropped")
        try:
            self._cache.delete(key)
        except (diskcache.Timeout, sqlite3.Error) as exc:
            log.debug("could not drop the bad cache entry: %s", exc)
        return None

    def _fetch_shared(self, key: str, node: InstanceRef) -> bytes:
        """Fetch ``node`` in this thread, or wait for the thread already fetching it."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = Flight()
                self._flights[key] = flight
        if leader:
            return self._lead(key, node, flight)
        self._counters.add("joined")
        return flight.wait(self._wait_timeout, lambda: ServerError(
            f"gave up waiting {self._wait_timeout:.0f}s for the download of {node.sop_uid}"))

    def _lead(self, key: str, node: InstanceRef, flight: Flight[bytes]) -> bytes:
        """Fetch, verify and store ``node``, then wake the waiters; the flight always ends."""
        try:
            data = self._fetch(node)
            self._keep(key, data)
            flight.succeed(data)
            return data
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def _fetch(self, node: InstanceRef) -> bytes:
        expected = node.size if node.size and node.size > 0 else None
        assert node.series_uid and node.sop_uid
        self._counters.add("fetches")
        data = self._client.single_image(node.series_uid, node.sop_uid, expected_size=expected)
        self._counters.add("bytes_fetched", len(data))
        if expected is not None and len(data) != expected:
            # The client returns only bodies complete by HTTP's framing: the metadata was wrong, not
            # the transfer. Keep the true bytes (fetching again would give the same) and say so once.
            self._counters.add("size_mismatches")
            if self._on_size_mismatch is not None:
                self._on_size_mismatch(node, len(data))
        return data

    def _keep(self, key: str, data: bytes) -> bool:
        """Store ``data`` in the cache; on a full disk (or any write failure) warn once and go on."""
        try:
            self._cache.set(key, data, tag=len(data))
            return True
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self._counters.add("memory_fallbacks")
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            with self._lock:
                first, self._warned_write = not self._warned_write, True
            if first:
                log.warning("cannot write to the instance cache in %s (%s); serving downloads from memory%s",
                            self.directory, exc, ": the disk is full" if full else "")
            else:
                log.debug("instance cache write failed again: %s", exc)
            return False
