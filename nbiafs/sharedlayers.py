"""Layers shared by every user of one process that asks for the same settings, and safe across fork.

What it owns: a per-process table ``settings -> (Layers, reference count)`` for callers that cannot
own their layers the way a mount process does (the fsspec file system: fsspec makes one instance per
thread and per set of keyword arguments, and a DataLoader forks or pickles it into workers). Two
callers with equal settings (and password) get the same :class:`nbiafs.app.Layers`: one HTTP pool,
one prefetch pool, one token, one metadata cache writer, as a mount has.

Why it is shaped so:

* **Reference counts, closed once.** :meth:`SharedLayers.acquire` returns a :class:`Lease`;
  :meth:`SharedLayers.release` drops it and the last one closes the layers (client first, so
  transfers in flight are cut; then the store's workers; then the token; then the metadata writes,
  in :meth:`Layers.close`'s order). A release from the garbage collector (``wait=False``) closes on a
  short-lived thread of its own: a finaliser may run on any thread, a store worker's included, and
  a store must never join its own worker.
* **Process exit.** :meth:`close_all` runs before Python joins non-daemon threads (through
  ``threading._register_atexit``, the hook ``concurrent.futures`` itself uses), so queued prefetches
  are cancelled instead of drained, and queued metadata writes reach the disk. It runs in
  ``multiprocessing`` children too (their bootstrap calls ``threading._shutdown``).
* **Fork.** A forked child would inherit the layers' sockets and SQLite connections without their
  threads, and SQLite's in-process lock bookkeeping with them: a cache write in flight in the
  parent at the moment of the fork leaves a lock in the child that no thread will ever release, and
  every cache open there then fails "database is locked" (seen in tests/test_fsspec.py). So the
  layers are closed *before* every ``os.fork`` (a ``register_at_fork`` hook; ``subprocess`` does not
  run it), the child inherits none, and both processes build fresh layers on their next use: the
  parent loses its queued prefetches and in-memory listings (the disk caches keep everything), the
  child shares nothing with it. Leases remember their process and their entry, so a lease whose
  layers were closed, or that came from the parent, is never used or released again.

The table is one object per class that uses it (a class attribute of the fsspec file system), like
fsspec's own instance cache; nothing here is module-level state.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .app import Layers, build_layers
from .config import Settings

log = logging.getLogger(__name__)

Builder = Callable[[Settings, str], Layers]


@dataclass(slots=True, eq=False)
class _Entry:
    layers: Layers
    refs: int
    closed: bool = False


@dataclass(slots=True, eq=False)
class Lease:
    """One holder's claim on shared layers (release it once)."""

    key: str
    entry: _Entry
    pid: int
    released: bool = False

    @property
    def layers(self) -> Layers:
        return self.entry.layers

    @property
    def usable(self) -> bool:
        """Still this process's, not released, and its layers not closed (at a fork, or by close_all)."""
        return not self.released and not self.entry.closed and self.pid == os.getpid()


def settings_key(settings: Settings, password: str) -> str:
    """What makes two callers' layers interchangeable: every setting, and the password (hashed, so the
    key can be logged or shown without showing it)."""
    values = sorted((name, str(value)) for name, value in settings.values().items())
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()[:16] if password else ""
    return repr((values, digest))


def _at_exit(func: Callable[[], None]) -> None:
    """Run ``func`` at exit before non-daemon threads are joined (else at the ordinary atexit)."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(func)
            return
        except RuntimeError:  # the interpreter is already shutting down
            pass
    atexit.register(func)


class SharedLayers:
    """Layers by settings for one process, reference counted, rebuilt after a fork."""

    def __init__(self, build: Builder = build_layers) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pid = os.getpid()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)
        _at_exit(self.close_all)

    def acquire(self, settings: Settings, password: str) -> Lease:
        """Layers for ``settings`` (built and started on first need in this process)."""
        key = settings_key(settings, password)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                layers = self._build(settings, password)
                try:
                    layers.start()
                except BaseException:
                    layers.close()
                    raise
                entry = self._entries[key] = _Entry(layers, 0)
                log.debug("built shared layers for %s (%s)", settings.base_url, settings.cache_dir)
            entry.refs += 1
            return Lease(key, entry, os.getpid())

    def release(self, lease: Lease, *, wait: bool = True) -> None:
        """Drop ``lease``; the last one closes the layers (on a thread of its own when not ``wait``)."""
        with self._lock:
            if lease.released or lease.pid != os.getpid():
                return  # released already, or inherited from the parent process: not ours
            lease.released = True
            entry = lease.entry
            if entry.closed or self._entries.get(lease.key) is not entry:
                return  # closed by close_all already
            entry.refs -= 1
            if entry.refs > 0:
                return
            entry.closed = True
            del self._entries[lease.key]
        if wait:
            entry.layers.close()
        else:
            threading.Thread(target=entry.layers.close, name="nbiafs-close-layers").start()

    def close_all(self) -> None:
        """Close every set of layers this process built (at exit; the leases become no-ops)."""
        with self._lock:
            if self._pid != os.getpid():  # pragma: no cover - _after_fork_in_child resets it
                return
            entries, self._entries = list(self._entries.values()), {}
            for entry in entries:
                entry.closed = True
        for entry in entries:
            entry.layers.close()

    def active(self) -> int:
        """How many sets of layers are open in this process (for tests and diagnostics)."""
        with self._lock:
            return len(self._entries)

    def _before_fork(self) -> None:
        try:
            self.close_all()
        except Exception:  # never break the caller's fork
            log.exception("could not close the shared layers before a fork")

    def _after_fork_in_child(self) -> None:
        # Nothing is inherited (closed before the fork); a lock held by another thread of the parent
        # at that moment would never be released here.
        self._lock = threading.Lock()
        self._entries = {}
        self._pid = os.getpid()
