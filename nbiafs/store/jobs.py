"""The bulk jobs of the commands over the instance cache: ensure, verify, describe, clear.

What it owns: the work ``nbiafs download``, ``nbiafs prefetch`` and ``nbiafs cache`` do over many
instances at once, as opposed to what a reader of the mount does one file at a time (the rest of
:mod:`nbiafs.store`):

* :meth:`CacheJobs.ensure`: make instances cached and, on request, checked against the server's md5;
  a re-run skips what is cached and verified, a mismatch is fetched again once and never kept;
* :meth:`CacheJobs.verify_all`: check every cached file against what was recorded when it was fetched,
  and drop what fails;
* :meth:`CacheJobs.info`, :meth:`CacheJobs.clear`, :meth:`CacheJobs.evict_all`: what the cache
  directory holds, and emptying it.

Why a mixin of :class:`~nbiafs.store.InstanceStore` and not an object of its own: a job fetches
through the store's single flight (``_join_or_start`` and ``_run``: an instance a reader of the mount is
fetching at that moment is joined, never fetched twice) and keeps the store's index and counters
true, so it needs the store's own parts, and callers keep one object for one cache. What it uses of
the store is spelled out by :class:`_Store`, which the methods take as ``self``: nothing else of the
store is reached from here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import IntegrityError, NbiaError
from .index import CacheIndex, Digests
from .ref import InstanceRef, ids

if TYPE_CHECKING:
    from ..client import NbiaClient
    from .download import Download

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :meth:`CacheJobs.ensure` did for one instance."""

    node: Any
    status: str  # "cached" (was there and verified), "fetched", "failed"
    size: int = 0
    error: str | None = None


@dataclass(slots=True)
class EnsureReport:
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: bool = False

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.stopped and not self.failed


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)  # paths of files that failed (removed)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    directory: str
    bytes: int
    instances: int
    series: int
    bound: int
    namespaces: dict[str, int]  # namespace -> instances


class _Counting(Protocol):
    def add(self, name: str, amount: int = 1) -> None: ...


class _Store(Protocol):
    """What the jobs use of the store they are part of."""

    directory: Path
    _index: CacheIndex
    _counters: _Counting
    _client: NbiaClient | None
    _offline: bool
    _workers: int
    _stall: float
    _size_limit: int

    def _check_open(self) -> None: ...
    def _join_or_start(self, path: str, node: Any, server_md5: str | None = None, *,
                       reader: bool = False) -> tuple[Download, bool] | None: ...
    def _run(self, path: str, download: Download, body: Callable[[], Any] | None = None) -> None: ...
    def _note_length(self, node: Any, length: int | None) -> None: ...


class CacheJobs:
    """The bulk jobs of :class:`~nbiafs.store.InstanceStore` (see the module docstring)."""

    __slots__ = ()

    def ensure(self: _Store, nodes: Sequence[InstanceRef], *, verify_md5: bool = True,
               workers: int | None = None, on_outcome: Callable[[Outcome], None] | None = None,
               stop: threading.Event | None = None) -> EnsureReport:
        """Make every one of ``nodes`` cached and, with ``verify_md5``, checked against the server's md5.

        What is cached and already verified is skipped (a re-run fetches only what is missing); a cached
        file whose md5 was never compared with the server's is compared now (read from disk); a
        mismatch is fetched again once, then reported, and never kept. ``on_outcome`` is called for every
        instance as it is done (from worker threads); ``stop`` ends the job early (the instances in
        progress finish). Parallel: ``workers`` (default: the store's) at once, within the client's
        connection bound.
        """
        self._check_open()
        report = EnsureReport()
        lock = threading.Lock()
        stop = stop or threading.Event()

        def one(node: InstanceRef) -> None:
            if stop.is_set():
                return
            try:
                outcome = _ensure_one(self, node, verify_md5)
            except Exception as exc:  # noqa: BLE001 - reported per instance
                outcome = Outcome(node, "failed", int(node.size or 0), str(exc) or type(exc).__name__)
            with lock:
                report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        with ThreadPoolExecutor(max(1, workers or self._workers), thread_name_prefix="nbiafs-ensure") as pool:
            pending: set[Future[None]] = {pool.submit(one, node) for node in nodes}
            try:
                while pending and not stop.is_set():
                    _done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop.set()
                raise
            finally:
                for future in pending:
                    future.cancel()  # what has not started does not; what runs finishes (bounded)
        report.stopped = stop.is_set() and len(report.outcomes) < len(nodes)
        return report

    def verify_all(self: _Store, *, all_namespaces: bool = True,
                   on_file: Callable[[str, bool], None] | None = None) -> VerifyReport:
        """Check every cached file: its length against what was fetched, and its md5 against the one
        recorded (of the bytes fetched, and the server's where known). Drops what fails."""
        self._index.scan()
        report = VerifyReport()
        for entry in self._index.entries(all_namespaces=all_namespaces):
            digests = self._index.digests(entry.path)
            ok = True
            try:
                length = os.path.getsize(entry.path)
                if digests.length is not None and length != digests.length:
                    ok = False
                elif digests.fetched is not None or digests.server is not None:
                    actual = md5_of_file(entry.path)
                    ok = actual == (digests.server or digests.fetched) and (
                        digests.fetched is None or actual == digests.fetched)
            except OSError:
                ok = False
            report.checked += 1
            report.bytes += entry.size
            if not ok:
                report.dropped.append(entry.path)
                self._index.remove(entry.path)
            if on_file is not None:
                on_file(entry.path, ok)
        return report

    def info(self: _Store) -> CacheInfo:
        """What the cache directory holds (every namespace)."""
        self._index.scan()
        entries = self._index.entries(all_namespaces=True)
        names = self._index.namespaces()
        per: dict[str, int] = {}
        series: set[str] = set()
        for e in entries:
            ns_id = os.path.relpath(e.path, self.directory).split(os.sep, 1)[0]
            per[names.get(ns_id, ns_id)] = per.get(names.get(ns_id, ns_id), 0) + 1
            series.add(os.path.dirname(e.path))
        return CacheInfo(str(self.directory.parent), sum(e.size for e in entries), len(entries), len(series),
                         self._size_limit, per)

    def clear(self: _Store) -> int:
        """Remove every cached instance of every namespace; returns how many were removed."""
        self._index.scan()
        removed = 0
        for entry in self._index.entries(all_namespaces=True):
            removed += bool(self._index.remove(entry.path))
        legacy = self.directory.parent / "instances"  # the diskcache store of nbiafs before 0.2
        if legacy.is_dir():
            shutil.rmtree(legacy, ignore_errors=True)
        return removed

    def evict_all(self: _Store) -> int:
        """Remove this namespace's instances; returns how many were removed."""
        self._index.scan()
        removed = 0
        for entry in self._index.entries():
            removed += bool(self._index.remove(entry.path))
        return removed


def _ensure_one(store: _Store, node: InstanceRef, verify_md5: bool) -> Outcome:
    """:meth:`CacheJobs.ensure` for one instance (in a worker of its pool)."""
    series_uid, sop_uid = ids(node)
    path = store._index.path_for(series_uid, sop_uid)
    server_md5 = None
    entry = store._index.lookup(path)
    if entry is not None and not _still_there(store, path, entry):
        entry = None  # gone or cut under the index (another process, a hand): fetched again below
    if entry is not None:
        digests = store._index.digests(path)
        if not verify_md5:
            return Outcome(node, "cached", entry.size)
        if digests.server is not None and digests.fetched == digests.server:
            return Outcome(node, "cached", entry.size)
        server_md5 = _server_md5(store, sop_uid)
        if md5_of_file(path) == server_md5:
            store._index.set_digests(path, Digests(server_md5, server_md5, entry.size))
            return Outcome(node, "cached", entry.size)
        log.warning("cached %s is not the server's file (md5): fetching it again", sop_uid)
        store._counters.add("md5_mismatches")
        store._index.remove(path)
    if store._offline:
        return Outcome(node, "failed", int(node.size or 0), "not cached (offline)")
    if verify_md5 and server_md5 is None:
        server_md5 = _server_md5(store, sop_uid)
    last = "fetch failed"
    for _attempt in range(2):  # a mismatch is fetched again once
        joined = store._join_or_start(path, node, server_md5 if verify_md5 else None)
        if joined is None:  # completed by another a moment ago: check it as a cached file
            return _ensure_one(store, node, verify_md5)
        download, leader = joined
        if leader:
            store._run(path, download)
        else:
            try:
                download.wait_for(1 << 62, store._stall)
            except NbiaError:
                pass
        if download.ok and download.on_disk:
            if verify_md5 and download.md5 != server_md5:  # joined a fetch that did not check it
                store._index.remove(path)
                last = f"md5 {download.md5} is not the server's {server_md5}"
                continue
            store._note_length(node, download.length)
            return Outcome(node, "fetched", int(download.length or 0))
        if download.ok:
            return Outcome(node, "failed", int(download.length or 0),
                           f"the cache cannot be written ({download.disk_refused})")
        last = str(download.error)
        if not isinstance(download.error, IntegrityError):
            break
    return Outcome(node, "failed", int(node.size or 0), last)


def _still_there(store: _Store, path: str, entry: Any) -> bool:
    """Whether the cached file of ``entry`` is on disk with the length it was fetched with; if not,
    it leaves the index (as an open finds out)."""
    try:
        length = os.stat(path).st_size
    except FileNotFoundError:
        length = None
    recorded = store._index.fetched_length(entry)
    if length is not None and length > 0 and (recorded is None or length == recorded):
        return True
    log.warning("cached %s is %s: fetching it again", path,
                "gone" if length is None else f"{length} bytes instead of {recorded}")
    store._counters.add("corrupt_dropped")
    store._index.remove(path)
    return False


def _server_md5(store: _Store, sop_uid: str) -> str:
    client = store._client
    assert client is not None
    return client.md5_for_image(sop_uid)


def md5_of_file(path: str) -> str:
    """The md5 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["CacheJobs", "CacheInfo", "EnsureReport", "Outcome", "VerifyReport", "md5_of_file"]
