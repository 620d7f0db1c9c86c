"""The metadata cache: listings (lists of records) in memory over a persistent on-disk cache.

Owns: where listings are kept, for how long, under which keys, and single-flight loading (one
loader call per key however many threads ask at once; a lock per key, never one global lock held
while loading, so a slow listing never blocks another).

* Lifetimes: listings that can change (collections gain patients, patients studies, studies series)
  live ``ttl`` seconds (``--metadata-ttl``, a day by default), in memory and on disk alike; the
  ``stable`` ones (a series' instances: published series never change) live ``disk_ttl`` (30 days)
  on disk and as long as memory allows. :meth:`MetadataCache.drop` forgets one at once (``nbiafs
  refresh``), and every entry remembers when it was fetched (:meth:`MetadataCache.fetched_at`).
* Memory: a ``cachetools.TLRUCache`` (at most ``maxsize`` listings holding at most ``max_records``
  records in all), guarded by a lock. A listing bigger than ``max_records`` is kept on disk only.
* Disk: a ``diskcache.Cache`` at ``path`` (``cache_dir/"metadata"``). ``path=None`` keeps everything
  in memory only.
* Keys are ``(SCHEMA_VERSION, namespace, what, *ids)``; the namespace is the server URL plus the
  account name, so a guest mount never sees what a named account listed.

Only answers are cached, never errors (a loader that raises caches nothing). Empty listings are
cached: the client verifies an empty answer against auth before returning it. A disk entry that
cannot be read (corrupt, from another schema) is dropped and loaded again; a disk that cannot be
written (full, read-only) is logged once and the cache keeps serving from memory.

The disk cache lives on its own thread (:class:`nbiafs.dbthread.DbThread`): one SQLite connection for
the cache's life, whatever thread asks (libfuse's native threads may lose thread-local state between
callbacks). Reads wait at most ``db_timeout``; a database that does not answer in time (locked by
another process, a slow disk) is a miss, and the listing is loaded from the server instead of failing.
Writes are queued, not waited for.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import cachetools
import diskcache

from .dbthread import DbThread, DbTimeout
from .errors import ServerError
from .singleflight import Flight

log = logging.getLogger(__name__)

#: Bump when the shape of cached records changes: old disk entries are then ignored.
SCHEMA_VERSION = 3  # 2: slotted records; 3: (fetched_at, value) entries
#: What never changes once published: kept ``disk_ttl`` on disk, however short ``ttl`` is.
STABLE_KINDS = frozenset({"instances", "manifest"})
#: Disk entries live 30 days: TCIA data is immutable once published; new series appear rarely.
DEFAULT_DISK_TTL = 30 * 24 * 3600.0
#: Listings kept in memory (a listing is one directory: a few records up to a few thousand).
DEFAULT_MAXSIZE = 4096
#: Records kept in memory over all listings (~0.3 KB each): a walk over a huge tree (series of
#: thousands of instances) would otherwise keep DEFAULT_MAXSIZE big listings, gigabytes.
DEFAULT_MAX_RECORDS = 500_000
#: How long a thread waits for another thread's load of the same key before giving up. The loader is
#: bounded by the client's own deadline; this only guarantees that nothing waits forever.
DEFAULT_WAIT_TIMEOUT = 600.0
#: How long a read of the disk cache may take before the listing is loaded from the server instead.
DEFAULT_DB_TIMEOUT = 5.0

_MISSING = object()


def _records(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 1


class MetadataCache:
    """Listings by key, in memory and on disk, loaded at most once at a time per key."""

    def __init__(self, path: Path | None, namespace: str, ttl: float,
                 disk_ttl: float | None = DEFAULT_DISK_TTL, maxsize: int = DEFAULT_MAXSIZE, *,
                 wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
                 timer: Callable[[], float] = time.monotonic,
                 max_records: int = DEFAULT_MAX_RECORDS, db_timeout: float = DEFAULT_DB_TIMEOUT,
                 stable: frozenset[str] = STABLE_KINDS) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if maxsize <= 0 or max_records <= 0:
            raise ValueError("maxsize and max_records must be positive")
        self.namespace = namespace
        self.ttl = ttl
        self.disk_ttl = disk_ttl
        self.wait_timeout = wait_timeout
        self.stable = stable
        self._clock = time.time  # fetch times are wall-clock: getUpdatedSeries takes dates
        # One weighted cache enforces both bounds: a listing weighs its record count + 1, and at least
        # max_records / maxsize, so no more than maxsize listings fit either.
        least = max(1, max_records // maxsize)
        self._memory: cachetools.TLRUCache[Hashable, Any] = cachetools.TLRUCache(
            max_records, lambda key, value, now: now + self._memory_ttl(key), timer,
            getsizeof=lambda entry: max(least, _records(entry[1]) + 1))
        self._lock = threading.Lock()  # guards _memory and _flights; never held while loading
        self._flights: dict[Hashable, Flight[Any]] = {}
        self.db_timeout = db_timeout
        self._disk: diskcache.Cache | None = None
        self._db: DbThread | None = None
        self._disk_write_failed = False
        if path is not None:
            db = DbThread("nbiafs-metadata-db")
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
                self._disk = db.call(lambda: diskcache.Cache(str(path)), timeout=max(db_timeout, 30.0))
                self._db = db
            except (OSError, sqlite3.Error, DbTimeout) as exc:
                db.close()
                log.warning("metadata cache at %s unusable (%s); keeping metadata in memory only", path, exc)

    # -- keys and lifetimes -------------------------------------------------------------------
    def key(self, what: str, *ids: object) -> tuple[object, ...]:
        """The full cache key of a listing."""
        return (SCHEMA_VERSION, self.namespace, what, *ids)

    def _is_stable(self, key: Hashable) -> bool:
        return isinstance(key, tuple) and len(key) > 2 and key[2] in self.stable

    def _memory_ttl(self, key: Hashable) -> float:
        return 10 * 365 * 86400.0 if self._is_stable(key) else self.ttl

    def _disk_ttl(self, key: Hashable) -> float | None:
        if self._is_stable(key):
            return self.disk_ttl
        return self.ttl if self.disk_ttl is None else min(self.ttl, self.disk_ttl)

    # -- plain access -------------------------------------------------------------------------
    def get(self, what: str, *ids: object, default: Any = None) -> Any:
        """The cached value of ``(what, *ids)`` from memory or disk, or ``default``."""
        entry = self._lookup(self.key(what, *ids))
        return default if entry is _MISSING else entry[1]

    def fetched_at(self, what: str, *ids: object) -> float | None:
        """When ``(what, *ids)`` was fetched from the server (seconds since the epoch), or None."""
        entry = self._lookup(self.key(what, *ids))
        return None if entry is _MISSING else float(entry[0])

    def drop(self, what: str, *ids: object) -> None:
        """Forget ``(what, *ids)``, in memory and on disk: the next ask loads it again."""
        key = self.key(what, *ids)
        with self._lock:
            self._memory.pop(key, None)
        disk, db = self._disk, self._db
        if disk is not None and db is not None:
            db.submit(lambda: disk.delete(key))

    def put(self, what: str, *ids: object, value: Any) -> None:
        """Keep ``value`` in memory and on disk."""
        self._store(self.key(what, *ids), value)

    def get_or_load(self, what: str, ids: tuple[object, ...], loader: Callable[[], Any],
                    validate: Callable[[Any], bool] | None = None) -> Any:
        """The cached value, else ``loader()``'s result, cached. One loader call per key at a time.

        Threads asking for a key that is being loaded wait for that load and share its value or
        its exception (which is not cached). ``validate`` rejects a cached value of the wrong shape
        (treated as corrupt: dropped and loaded again).
        """
        key = self.key(what, *ids)
        entry = self._lookup(key, validate)
        if entry is not _MISSING:
            return entry[1]
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Flight()
        assert flight is not None
        if not leader:
            return flight.wait(self.wait_timeout, lambda: ServerError(
                f"timed out after {self.wait_timeout:.0f}s waiting for a listing of {what}"))
        try:
            entry = self._lookup(key, validate)  # another leader may have finished just before us
            if entry is _MISSING:
                value = loader()
                self._store(key, value)
            else:
                value = entry[1]
            flight.succeed(value)
            return value
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def close(self) -> None:
        """Write what is queued, close the disk cache (memory stays usable)."""
        disk, self._disk = self._disk, None
        db, self._db = self._db, None
        if db is not None and disk is not None:
            db.close(final=disk.close)

    def __enter__(self) -> MetadataCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _lookup(self, key: Hashable, validate: Callable[[Any], bool] | None = None) -> Any:
        """The entry ``(fetched_at, value)`` of ``key``, or _MISSING."""
        with self._lock:
            entry = self._memory.get(key, _MISSING)
        if entry is not _MISSING:
            return entry
        disk, db = self._disk, self._db
        if disk is None or db is None:
            return _MISSING
        try:
            entry = db.call(lambda: disk.get(key, default=_MISSING), timeout=self.db_timeout)
        except (DbTimeout, diskcache.Timeout) as exc:  # busy, not broken: load it, keep the entry
            log.info("metadata cache did not answer (%s); asking the server instead", exc)
            return _MISSING
        except Exception as exc:  # noqa: BLE001 - any unreadable entry (unpickling can raise anything)
            self._drop_unreadable(key, exc)
            return _MISSING
        if entry is _MISSING:
            return _MISSING
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], (int, float))):
            self._drop_unreadable(key, ValueError("not an entry of this schema"))
            return _MISSING
        if validate is not None and not validate(entry[1]):
            self._drop_unreadable(key, ValueError("cached value has the wrong shape"))
            return _MISSING
        self._remember(key, entry)
        return entry

    def _drop_unreadable(self, key: Hashable, exc: BaseException) -> None:
        log.warning("dropping unreadable metadata cache entry %r: %s", key[2:], exc)  # type: ignore[index]
        disk, db = self._disk, self._db
        if disk is not None and db is not None:
            db.submit(lambda: disk.delete(key))

    def _remember(self, key: Hashable, entry: tuple[float, Any]) -> None:
        with self._lock:
            try:
                self._memory[key] = entry
            except ValueError:  # bigger than the whole memory bound: served from disk only
                self._memory.pop(key, None)

    def _store(self, key: Hashable, value: Any) -> None:
        entry = (self._clock(), value)
        self._remember(key, entry)
        disk, db = self._disk, self._db
        if disk is None or db is None:
            return
        db.submit(lambda: self._write(disk, key, entry))

    def _write(self, disk: diskcache.Cache, key: Hashable, entry: tuple[float, Any]) -> None:
        """On the database thread: write one entry; a failure is logged once, memory keeps serving."""
        try:
            disk.set(key, entry, expire=self._disk_ttl(key))
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            if not self._disk_write_failed:
                log.warning("cannot write the metadata cache (%s); serving listings from memory", exc)
            self._disk_write_failed = True
        else:
            if self._disk_write_failed:
                log.info("metadata cache writable again")
            self._disk_write_failed = False

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the queued writes are on disk (for tests and clean shutdowns)."""
        if self._db is not None:
            self._db.call(lambda: None, timeout)
