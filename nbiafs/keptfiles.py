"""Metadata files where the kernel keeps their pages (FUSE ``no_open``): lengths that never change, and
a worker that has the kernel forget what it read.

Why. Where the kernel opens files itself (:mod:`nbiafs.kernelopens`) no file gets ``direct_io``: the
kernel keeps the size it was told of a file and the pages it read of it, for the mount's attribute
timeout, and it may drop an answer to GETATTR that crossed another change of the file (its
``attr_version``), keeping the size it had. A file whose length changed would then be read as the
pages of one version under the size of another: cut short, or padded with zeros. No protocol of ours
can tell which size the kernel applied, so the length of a metadata file never changes under it:

* ``.collection.json`` and ``.series.json`` are made from listings only (in this mode a
  ``.series.json`` lists no md5s, which appear as files are cached; a cached file's extended
  attribute ``user.nbia.md5`` has its md5 where known): the same bytes at each request. One exception is a
  file whose true size proved other than the listing's: the series' ``.series.json`` then changes
  once, and the file system has the kernel forget it;
* ``stats.json`` (counters that change at every fetch) is padded with spaces to whole pages (4096
  bytes; its counters take a few hundred): every version has the same length, and a version that
  fits one page is read whole by each READ. A read that reaches its end has the kernel forget its
  pages (here, from one worker thread: the kernel waits for the reads in flight on the file, so never
  from inside a request), and the next reader gets the counters as they are then.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The kernel's page: a changing file is padded to whole pages (one, for the store's counters).
PAGE = 4096


def padded(data: bytes) -> bytes:
    """``data`` (JSON text ending in a newline) padded with spaces, before that newline, to whole pages."""
    body = data[:-1] if data.endswith(b"\n") else data
    size = -(-(len(body) + 1) // PAGE) * PAGE
    return body + b" " * (size - len(body) - 1) + b"\n"


class Forgetter:
    """Has the kernel forget files' sizes and pages, from one worker thread; a file asked for again
    before its turn is forgotten once. ``invalidate(path)`` may block until the kernel's reads of the
    file end."""

    def __init__(self, invalidate: Callable[[str], None]) -> None:
        self._invalidate = invalidate
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._closed = False

    def forget(self, path: str) -> None:
        with self._lock:
            if self._closed or path in self._pending:
                return
            self._pending.add(path)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="nbiafs-forget", daemon=True)
                self._worker.start()
        self._queue.put(path)

    def close(self) -> None:
        """Stop the worker (the mount is going away: nothing is left to forget)."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            self._queue.put(None)
            worker.join(timeout=1.0)

    def _work(self) -> None:
        while (path := self._queue.get()) is not None:
            with self._lock:  # a read from here on is of content made after it: it asks again
                self._pending.discard(path)
            try:
                self._invalidate(path)
            except Exception:
                log.debug("could not have the kernel forget %s", path, exc_info=True)
