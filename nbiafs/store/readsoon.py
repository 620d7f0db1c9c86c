"""Cached files a reader is about to open, read from the disk ahead of it (``posix_fadvise(WILLNEED)``).

Why. After a remount the cache's pages are cold. Where the kernel opens files itself (FUSE ``no_open``,
:mod:`nbiafs.kernelopens`) the first read of a file is also its open, so a hint given there leaves the
disk no head start: the read waits for the disk in turn (a ``cp -r`` of a cached 200-file series after
a remount spent 0.11 s in ``pread`` so, against 0.04 s where the open came a round trip before the
read). The read-ahead policy knows which files the reader comes to next (its window); the cached ones
among the next few MB (``readahead.read_soon_range``: one more file per open, never a whole window at
once, which made the next file wait behind the rest in the disk's queue) are hinted here, so that
their pages are read while the reader is still on the file before.

Shape: one worker thread and a bounded queue of paths (the newest kept: a reader that jumped
elsewhere makes old hints moot). A hint is only a hint: a file gone since, or a platform without
``posix_fadvise``, changes nothing. The hint is for the first ``limit`` bytes of a file, as the store's
own at open.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)

#: Paths waiting to be hinted, at most (the oldest go first).
QUEUED = 64


class ReadSoon:
    """Hints cached files to the kernel's page cache from one worker thread. Thread-safe."""

    def __init__(self, limit: int, queued: int = QUEUED) -> None:
        self._limit = limit
        self._paths: collections.deque[str] = collections.deque(maxlen=queued)
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def hint(self, paths: Iterable[str]) -> None:
        with self._wake:
            if self._closed:
                return
            self._paths.extend(paths)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbiafs-read-soon", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._paths.clear()
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._paths and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                path = self._paths.popleft()
            read_soon(path, self._limit)


def read_soon(path: str, limit: int) -> None:
    """Ask the kernel to read the first ``limit`` bytes of the file at ``path`` now; a hint only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        will_need(fd, limit)
    finally:
        os.close(fd)


def will_need(fd: int, length: int) -> None:
    """Ask the kernel to read the first ``length`` bytes of open file ``fd`` now (after a remount the
    cache's pages are cold, and each FUSE read would otherwise wait for the disk in turn); a hint:
    failure changes nothing."""
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):  # AttributeError: a platform without posix_fadvise
        pass
