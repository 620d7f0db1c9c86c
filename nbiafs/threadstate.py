"""A Python thread state kept on each libfuse thread, so a FUSE request does not build one and tear it down.

What it owns: the cost of entering Python from libfuse's native threads. libfuse calls the mount from
threads Python did not create; ctypes enters Python with ``PyGILState_Ensure`` and leaves with
``PyGILState_Release``, and on such a thread the release deletes the thread state the ensure had to
create. So every request (every open, release, read, getattr) built a thread state and deleted it
again: about 60 % of a warm open+close of a file that does nothing else (measured: 114 us against 49
us per open+close on a file system whose ``open`` only returns 0, on this project's benchmark
machine). This is also why ``threading.local`` state did not survive between callbacks.

:meth:`ThreadStates.keep`, called at the start of a request, takes one more ``PyGILState_Ensure`` on
the thread the first time it sees it, and never releases it: the thread state then outlives the
callback (ctypes' own release still hands the GIL back), and the next request on that thread finds it.

Why a bound: a thread state kept on a thread that libfuse later ends is never freed (CPython frees
it at exit). libfuse is told to keep as many idle threads as it may run (``max_idle_threads`` =
``max_threads``, see :mod:`nbiafs.fs`), so it ends none; but a libfuse older than 3.12 has no
``max_threads`` and may start more at a burst, then end those beyond the idle limit. So the states
kept are bounded (:data:`KEEP_LIMIT`): past it, a new thread takes the slow path, as before. A kept
state is a ``PyThreadState`` and its first 16 KiB chunk of frame stack.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Thread states kept at most over a mount's life (those of threads libfuse ended included).
KEEP_LIMIT = 256


class ThreadStates:
    """Keeps the current thread's Python thread state alive after its callback (see the module doc)."""

    __slots__ = ("_local", "_lock", "_kept", "_reused", "_limit", "_ensure")

    def __init__(self, limit: int = KEEP_LIMIT) -> None:
        self._local = threading.local()  # survives between callbacks exactly when the state is kept
        self._lock = threading.Lock()
        self._kept = 0
        self._reused = 0
        self._limit = limit
        self._ensure: Callable[[], int] | None = None
        api = getattr(ctypes, "pythonapi", None)  # None on a Python without its C API in ctypes (PyPy)
        if api is not None:
            ensure = api.PyGILState_Ensure
            ensure.restype = ctypes.c_int
            ensure.argtypes = []
            self._ensure = ensure

    def counts(self) -> dict[str, int]:
        """``kept``: thread states kept so far; ``reused``: requests that found theirs kept (without
        :meth:`keep` working, there are none: ``threading.local`` would be new at every request)."""
        return {"kept": self._kept, "reused": self._reused}

    def keep(self) -> None:
        """Keep this thread's state past the current callback (once per thread, within the bound)."""
        if getattr(self._local, "kept", False):
            self._reused += 1  # a statistic: an increment lost to a race changes nothing
            return
        if self._ensure is None:
            return
        with self._lock:
            if self._kept >= self._limit:
                return
            self._kept += 1
            if self._kept == self._limit:
                log.info("kept the Python thread states of %d libfuse threads: later threads build their own "
                         "per request", self._limit)
        self._ensure()  # never released: the state lives as long as the thread
        self._local.kept = True
