"""One thread that owns a SQLite-backed cache (a ``diskcache.Cache``) and runs every call on it.

Why: diskcache keeps one SQLite connection per thread (``threading.local``). libfuse calls Python from
its own native threads, and a callback there may get a fresh Python thread state (always did, before
:mod:`nbiafs.threadstate` kept one per thread; it still does past that module's bound), so
thread-local state can be lost between callbacks: every callback opened ``cache.db`` again (a warm
remount opened it 24 times for 120 file opens, and the process's fd count doubled). Here the cache is
created, used and closed on one thread, so it has exactly one connection for its whole life, whichever
thread asks.

Every call waits at most its ``timeout`` (the caller's deadline or the store's lock timeout) and then
raises :class:`DbTimeout`: callers fall back (serve from memory, fetch, skip a write) instead of
failing a good listing. Writes that nobody waits for are :meth:`DbThread.submit`-ted.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: At most this many calls wait for the owner thread; more are refused (DbTimeout) at once, so a slow
#: disk cannot pile up unbounded work behind it.
QUEUE_LIMIT = 10_000


class DbTimeout(TimeoutError):
    """The database did not answer in time (busy disk, a lock held by another process)."""


class DbThread:
    """Runs callables on one daemon thread, in order; thread-safe; closed by :meth:`close`."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(QUEUE_LIMIT)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, func: Callable[[], T], timeout: float) -> T:
        """``func()`` run on the owner thread; its result or exception. DbTimeout after ``timeout`` s."""
        if threading.current_thread() is self._thread:
            return func()  # from a callable already running there: just run it
        future = self.submit(func)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()  # not run if it has not started; a started one finishes unobserved
            raise DbTimeout(f"the cache database did not answer within {timeout:g} s") from None

    def submit(self, func: Callable[[], T]) -> Future[T]:
        """Queue ``func`` without waiting for it."""
        future: Future[T] = Future()
        if self._closed.is_set():
            future.set_exception(DbTimeout("the cache database is closed"))
            return future
        try:
            self._queue.put_nowait((func, future))
        except queue.Full:
            future.set_exception(DbTimeout("the cache database is overloaded"))
        return future

    def close(self, final: Callable[[], Any] | None = None, timeout: float = 30.0) -> None:
        """Run ``final`` (e.g. closing the cache) after everything queued, then stop the thread."""
        if self._closed.is_set():
            return
        if final is not None:
            try:
                self.call(final, timeout)
            except Exception:
                log.debug("closing the cache database failed", exc_info=True)
        self._closed.set()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            func, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(func())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
