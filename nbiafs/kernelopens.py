"""Files the kernel opens without asking (FUSE ``no_open``): one store handle per file, made at its first read.

Why. Every ``open`` and ``close`` of a file on a FUSE mount is a request into Python (OPEN, RELEASE):
about 55 us each through mfusepy, measured as a file system whose ``open`` only returns 0. That alone
makes a re-read of a cached series twice a local disk's time, before nbiafs does any work. A kernel
that offers ``FUSE_CAP_NO_OPEN_SUPPORT`` (Linux 4.19+) stops sending OPEN and RELEASE once an open is
answered ENOSYS, keeps every file's page cache across opens (as ``keep_cache``) and sends READs with
file handle 0: a re-read of a file whose pages the kernel kept never reaches the mount at all (a
series re-read took 1.05-1.1x a local disk's time so in the same measurement, against 2x).

What it owns: the table of those handles.

* A file's first READ opens it in the store, once however many threads read a new file at once (the
  first opens it, the others wait for that, within their deadline). A read holds the handle while it
  uses it; a read that fails drops it, so the next read starts afresh.
* A failure is not the file's state either, with one exception: the kernel retries a failed
  read-ahead itself, at once, one page, in the same ``read()`` of the same thread; that one retry
  fails at once with the same error instead of waiting out the deadline a second time. The reader's
  next read tries again.
* Nothing says when a reader is done (no RELEASE comes), so handles are let go by use: at once once
  a file was read to its end (the kernel holds its pages; the caller says so), else beyond ``keep``
  the least recently read unused ones, and any unused for ``idle`` seconds, checked at each read.
  A handle kept a little longer only keeps one open fd of a cached file (whose bytes never change;
  one evicted from the cache meanwhile holds its disk space until then), or a reference to a
  transfer that goes on anyway.

Pure bookkeeping: what opening and closing mean is the caller's (``opener``/``closer``); no thread of
its own; the clock is injectable for tests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

#: libfuse 3 capability: the kernel lets an ``open`` answered ENOSYS stand for every later open.
FUSE_CAP_NO_OPEN_SUPPORT = 1 << 17
#: Unused handles kept, the most recently read ones (a reader of many files at once keeps its own).
KEEP = 16
#: An unused handle is let go after this many seconds.
IDLE = 10.0
#: The kernel retries a failed read-ahead at once, one page, in the same read() of the same thread: a
#: read-ahead that failed (its open, or its bytes) fails that retry at once (within this many seconds)
#: instead of waiting out the deadline a second time.
FAILED_HOLD = 1.0

Info = TypeVar("Info")


@dataclass(slots=True, eq=False)
class _Slot(Generic[Info]):
    handle: int | None = None
    info: Any = None
    users: int = 0
    used: float = 0.0
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class KernelOpens(Generic[Info]):
    """Handles of files the kernel opened itself, keyed by path (see the module's comment). Thread-safe."""

    def __init__(self, closer: Callable[[int], None], *, keep: int = KEEP, idle: float = IDLE,
                 failed_hold: float = FAILED_HOLD, clock: Callable[[], float] = time.monotonic) -> None:
        self._closer = closer
        self._keep = keep
        self._idle = idle
        self._failed_hold = failed_hold
        self._failed: dict[Hashable, tuple[float, BaseException]] = {}  # (key, reader) -> when, error
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: collections.OrderedDict[Hashable, _Slot[Info]] = collections.OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    @contextmanager
    def use(self, key: Hashable, opener: Callable[[], tuple[int, Info]], wait: float, *,
            reader: Callable[[], Hashable] | None = None, retried: bool = False) -> Iterator[tuple[int, Info]]:
        """The handle of ``key`` (and what ``opener`` said of it), opened by ``opener`` if none is, held
        while the block runs. A block that raises drops the handle; a waiter gives up after ``wait``.

        ``reader()`` names who reads (the thread); ``retried``: the kernel retries this read itself if it
        fails (a read-ahead). If such a use fails, that reader's next use of ``key`` (the kernel's
        retry, within FAILED_HOLD) fails at once with the same error; the use after it tries again."""
        if self._failed and reader is not None:
            who = (key, reader())
            with self._lock:
                held = self._failed.pop(who, None)
            if held is not None and self._clock() - held[0] < self._failed_hold:
                raise held[1]
        with self._lock:
            if self._closed:
                raise OSError(9, "the file system is closing")
            slot = self._slots.get(key)
            leader = slot is None
            if slot is None:
                slot = self._slots[key] = _Slot()
            else:
                self._slots.move_to_end(key)
            slot.users += 1
        failed = False
        try:
            if leader:
                self._open(key, slot, opener)
            elif not slot.ready.wait(wait):
                raise TimeoutError(f"{key}: still being opened by another reader after {wait:g} s")
            if slot.error is not None:
                raise slot.error  # the opener's own error, mapped to its errno like the leader's
            assert slot.handle is not None
            yield slot.handle, slot.info
        except BaseException as exc:
            failed = True
            if retried and reader is not None:  # the kernel's own retry of this read fails at once
                self._hold((key, reader()), exc)
            raise
        finally:
            self._done(key, slot, failed)

    def _open(self, key: Hashable, slot: _Slot[Info], opener: Callable[[], tuple[int, Info]]) -> None:
        try:
            slot.handle, slot.info = opener()
        except BaseException as exc:
            slot.error = exc
            with self._lock:  # not kept: the next read opens it again
                if self._slots.get(key) is slot:
                    del self._slots[key]
            raise
        finally:
            slot.ready.set()

    def _hold(self, who: Hashable, exc: BaseException) -> None:
        with self._lock:
            now = self._clock()
            for old in [k for k, (at, _) in self._failed.items() if now - at >= self._failed_hold]:
                del self._failed[old]
            self._failed[who] = (now, exc)

    def _done(self, key: Hashable, slot: _Slot[Info], failed: bool) -> None:
        closing: list[int] = []
        with self._lock:
            slot.users -= 1
            slot.used = self._clock()
            if failed and self._slots.get(key) is slot:
                del self._slots[key]
            if self._slots.get(key) is not slot:  # let go of (failed, read to its end, closed)
                closing.extend(_unused_handle(slot))
            closing.extend(self._trim())
        self._close(closing)

    def _trim(self) -> list[int]:
        """Unused handles to let go (called with the lock held): beyond ``keep``, and idle ones."""
        closing: list[int] = []
        now = self._clock()
        excess = len(self._slots) - self._keep
        going: list[Hashable] = []
        for key, slot in self._slots.items():  # least recently read first
            if slot.users or slot.handle is None:
                continue
            if excess <= 0 and now - slot.used < self._idle:
                break  # the rest were read more recently
            going.append(key)
            closing.extend(_unused_handle(slot))
            excess -= 1
        for key in going:
            del self._slots[key]
        return closing

    def _close(self, handles: list[int]) -> None:
        for handle in handles:
            try:
                self._closer(handle)
            except Exception:
                log.warning("could not let go of handle %d", handle, exc_info=True)

    def let_go(self, key: Hashable) -> None:
        """Let go of ``key``'s handle once its reads are done (the file was read to its end: the kernel
        holds its pages, and a later read opens it again)."""
        with self._lock:
            slot = self._slots.pop(key, None)
            closing = _unused_handle(slot) if slot is not None else []
        self._close(closing)

    def close(self) -> None:
        """Let go of every handle; later uses fail (the file system is being unmounted)."""
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots.values()), collections.OrderedDict()
            closing = [h for slot in slots for h in _unused_handle(slot)]
        self._close(closing)


def _unused_handle(slot: _Slot[Any]) -> list[int]:
    """(lock held) The handle of a slot taken out of the table, to close now: none while a read still
    uses it (its last reader closes it then) or once closed."""
    if slot.users or slot.handle is None:
        return []
    handle, slot.handle = slot.handle, None
    return [handle]
