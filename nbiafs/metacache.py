"""The metadata cache: listings (lists of records) in memory over a persistent on-disk cache.

Owns: where listings are kept, for how long, under which keys, and single-flight loading (one
loader call per key however many threads ask at once; a lock per key, never one global lock held
while loading, so a slow listing never blocks another).

* Memory: a ``cachetools.TTLCache`` (``ttl`` seconds, at most ``maxsize`` listings holding at most
  ``max_records`` records in all), guarded by a lock. A listing bigger than ``max_records`` is kept on
  disk only.
* Disk: a ``diskcache.Cache`` at ``path`` (``cache_dir/"metadata"``), entries expire after
  ``disk_ttl`` seconds (30 days by default: published TCIA data does not change). ``path=None``
  keeps everything in memory only.
* Keys are ``(SCHEMA_VERSION, namespace, what, *ids)``; the namespace is the server URL plus the
  account name, so a guest mount never sees what a named account listed.

Only answers are cached, never errors (a loader that raises caches nothing). Empty listings are
cached: the client verifies an empty answer against auth before returning it. A disk entry that
cannot be read (corrupt, from another schema) is dropped and loaded again; a disk that cannot be
written (full, read-only) is logged once and the cache keeps serving from memory.

The disk cache lives on its own thread (:class:`nbiafs.dbthread.DbThread`): one SQLite connection for
the cache's life, whatever thread asks (libfuse's native threads lose thread-local state between
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
SCHEMA_VERSION = 2  # 2: slotted records
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
                 max_records: int = DEFAULT_MAX_RECORDS, db_timeout: float = DEFAULT_DB_TIMEOUT) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if maxsize <= 0 or max_records <= 0:
            raise ValueError("maxsize and max_records must be positive")
        self.namespace = namespace
        self.ttl = ttl
        self.disk_ttl = disk_ttl
        self.wait_timeout = wait_timeout
        # One weighted cache enforces both bounds: a listing weighs its record count + 1, and at least
        # max_records / maxsize, so no more than maxsize listings fit either.
        least = max(1, max_records // maxsize)
        self._memory: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(
            max_records, ttl, timer, getsizeof=lambda value: max(least, _records(value) + 1))
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

    # -- keys ---------------------------------------------------------------------------------
    def key(self, what: str, *ids: object) -> tuple[object, ...]:
        """The full cache key of a listing."""
        return (SCHEMA_VERSION, self.namespace, what, *ids)

    # -- plain access -------------------------------------------------------------------------
    def get(self, what: str, *ids: object, default: Any = None) -> Any:
        """The cached value of ``(what, *ids)`` from memory or disk, or ``default``."""
        value = self._lookup(self.key(what, *ids))
        return default if value is _MISSING else value

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
        value = self._lookup(key, validate)
        if value is not _MISSING:
            return value
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
            value = self._lookup(key, validate)  # another leader may have finished just before us
            if value is _MISSING:
                value = loader()
                self._store(key, value)
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
        with self._lock:
            value = self._memory.get(key, _MISSING)
        if value is not _MISSING:
            return value
        disk, db = self._disk, self._db
        if disk is None or db is None:
            return _MISSING
        try:
            value = db.call(lambda: disk.get(key, default=_MISSING), timeout=self.db_timeout)
        except (DbTimeout, diskcache.Timeout) as exc:  # busy, not broken: load it, keep the entry
            log.info("metadata cache did not answer (%s); asking the server instead", exc)
            return _MISSING
        except Exception as exc:  # noqa: BLE001 - any unreadable entry (unpickling can raise anything)
            self._drop_unreadable(key, exc)
            return _MISSING
        if value is not _MISSING and validate is not None and not validate(value):
            self._drop_unreadable(key, ValueError("cached value has the wrong shape"))
            return _MISSING
        if value is not _MISSING:
            self._remember(key, value)
        return value

    def _drop_unreadable(self, key: Hashable, exc: BaseException) -> None:
        log.warning("dropping unreadable metadata cache entry %r: %s", key[2:], exc)  # type: ignore[index]
        disk, db = self._disk, self._db
        if disk is not None and db is not None:
            db.submit(lambda: disk.delete(key))

    def _remember(self, key: Hashable, value: Any) -> None:
        with self._lock:
            try:
                self._memory[key] = value
            except ValueError:  # bigger than the whole memory bound: served from disk only
                self._memory.pop(key, None)

    def _store(self, key: Hashable, value: Any) -> None:
        self._remember(key, value)
        disk, db = self._disk, self._db
        if disk is None or db is None:
            return
        db.submit(lambda: self._write(disk, key, value))

    def _write(self, disk: diskcache.Cache, key: Hashable, value: Any) -> None:
        """On the database thread: write one entry; a failure is logged once, memory keeps serving."""
        try:
            disk.set(key, value, expire=self.disk_ttl)
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
