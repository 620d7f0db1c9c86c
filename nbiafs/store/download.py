"""One instance being fetched: streamed into a part file, readable while it arrives, shared by all who want it.

What it owns: the life of one fetch (single flight: the store keeps one :class:`Download` per instance
in flight, and every opener and read-ahead of that instance joins it), writing the body to a part file
as it arrives (bounded memory whatever the instance's size), telling waiters how far it got, checking
it when complete (its length against the answer's Content-Length; its md5 against the server's, when
the caller knows it) and renaming it into place only then.

Readers do not wait for the whole body: :meth:`Download.wait_for` returns once the bytes up to an
offset are there, so ``open()`` returns after the first bytes and a ``read()`` at an offset waits for
that offset only. A waiter is woken when the bytes it waits for are there (each says how far, the
fetching thread wakes them only once the nearest is reached), not at every chunk: a 1 MiB read of a
file arriving in 30 chunks took 30 wake-ups, each a thread switch and the GIL. A stall (no byte for
``stall`` seconds, timed from the last chunk) fails that wait with an error (EIO above), however long
the transfer had been going. A transfer that breaks off is
started again from the beginning (the server has no Range requests) a bounded number of times; the
bytes it had already written are the same bytes, so readers ahead are not disturbed.

When the disk refuses the part file (full, read-only), the body goes to memory instead, up to
:data:`MEMORY_LIMIT` bytes (logged once by the store); a bigger instance is then an error (ENOSPC),
never an unbounded buffer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import CacheFullError, IntegrityError, NbiaError, ProtocolError, ServerError

log = logging.getLogger(__name__)

#: The largest body kept in memory when the cache cannot be written.
MEMORY_LIMIT = 64 * 1024 * 1024
#: Attempts of a transfer that breaks off mid-body (each from the start).
BODY_ATTEMPTS = 3


class Download:
    """The fetch of one instance (see the module docstring). Thread-safe."""

    def __init__(self, *, final: str, part: str, series_uid: str, sop_uid: str, expected_size: int | None,
                 server_md5: str | None = None) -> None:
        self.final = final
        self.part = part
        self.series_uid = series_uid
        self.sop_uid = sop_uid
        self.expected_size = expected_size  # the metadata's: only compared, never trusted over the body
        self.server_md5 = server_md5
        self._cond = threading.Condition()
        self.length: int | None = None  # the answer's Content-Length, once the headers are in
        self.available = 0  # bytes readable from the start
        self._progress_at = time.monotonic()  # when the last bytes arrived (a stall is timed from it)
        self._waits: dict[int, int] = {}  # byte counts waited for -> how many waiters each
        self._wake_at: int | None = None  # the least of them: the fetching thread wakes waiters there
        self.done = False
        self.error: BaseException | None = None
        self.in_memory: bytearray | None = None  # the body, when the disk refused it
        self.md5: str | None = None  # of the bytes received, once complete
        self.on_disk = False  # complete and renamed into place
        self._read_fd: int | None = None
        self._users = 0
        self._attempts = 0
        self._fd: int | None = None  # the part file, open for writing during an attempt
        self.disk_refused: OSError | None = None
        self.via_zip = False  # the body comes from a series zip (read-ahead leaves it to the zip)
        #: told of every chunk as it arrives (the store's measurement of zip against singles)
        self.on_chunk: Callable[[Download, int], None] | None = None

    # ------------------------------------------------------------------ the fetching thread
    def run(self, open_stream: Callable[[], Any]) -> None:
        """Fetch (in this thread): ``open_stream()`` gives an ImageStream (``.length``, ``.chunks()``)."""
        last: BaseException | None = None
        for attempt in range(BODY_ATTEMPTS):
            try:
                self._attempt(open_stream)
                return
            except IntegrityError as exc:  # not the server's file: the caller decides whether to try again
                self._fail(exc)
                return
            except ProtocolError as exc:  # broke off mid-body: again from the start (a stall is not retried)
                last = exc
                log.info("%s (attempt %d of %d)", exc, attempt + 1, BODY_ATTEMPTS)
            except BaseException as exc:
                self._fail(exc)
                if not isinstance(exc, Exception):
                    raise
                return
        self._fail(last if last is not None else ServerError(f"{self.sop_uid}: fetch failed"))

    def _attempt(self, open_stream: Callable[[], Any]) -> None:
        stream = open_stream()
        try:
            with self._cond:
                self.length = stream.length
                self._progress_at = time.monotonic()
                self._cond.notify_all()
            digest = hashlib.md5(usedforsecurity=False)
            written = 0
            self._fd = self._open_part() if self.in_memory is None else None
            self._attempts += 1
            try:
                for chunk in stream.chunks():
                    digest.update(chunk)
                    self._write(written, chunk)
                    written += len(chunk)
                    with self._cond:
                        self._progress_at = time.monotonic()  # bytes arrive, even those a restart sends again
                        if written > self.available:
                            self.available = written
                            if self._wake_at is not None and written >= self._wake_at:
                                self._cond.notify_all()
                                self._wake_at = self._next_wake()  # the woken ones are not woken again
                    if self.on_chunk is not None:
                        self.on_chunk(self, len(chunk))
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
        finally:
            stream.close()
        self._complete(written, digest.hexdigest())

    def _open_part(self) -> int | None:
        """The part file for writing (truncated on the first attempt only: a restarted transfer writes
        the same bytes again over what readers may be reading)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if self._attempts == 0 else 0)
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as exc:
            self._to_memory(exc)
            return None
        with self._cond:
            if self._read_fd is None:
                try:
                    self._read_fd = os.open(self.part, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    os.close(fd)
                    self._to_memory(exc)
                    return None
        return fd

    def _write(self, offset: int, chunk: bytes) -> None:
        """Write ``chunk`` at ``offset`` to the part file, or to memory once the disk refused it."""
        fd = self._fd
        if fd is not None:
            try:
                view = memoryview(chunk)
                at = offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view = view[n:]
                    at += n
                return
            except OSError as exc:
                self._fd = None
                os.close(fd)
                self._to_memory(exc)
        memory = self.in_memory
        assert memory is not None
        end = offset + len(chunk)
        if end > MEMORY_LIMIT:
            raise CacheFullError(f"{self.sop_uid}: the cache cannot be written ({self.disk_refused}) and "
                                 f"{end} bytes are too many to keep in memory")
        with self._cond:
            memory[offset:end] = chunk  # appends; or, for a restarted transfer, goes over what it had

    def _to_memory(self, exc: OSError) -> None:
        """The disk refused the part file: keep the body in memory from here (what was written first)."""
        with self._cond:
            self.disk_refused = exc
            data = bytearray()
            if self._read_fd is not None:
                while len(data) < self.available:
                    chunk = os.pread(self._read_fd, min(self.available - len(data), 1 << 20), len(data))
                    if not chunk:
                        break
                    data.extend(chunk)
            self.in_memory = data
        try:
            os.unlink(self.part)
        except OSError:
            pass

    def _complete(self, length: int, md5: str) -> None:
        if self.server_md5 is not None and md5 != self.server_md5:
            raise IntegrityError(f"{self.sop_uid}: md5 {md5} of the bytes received is not the server's "
                                 f"{self.server_md5}")
        if self.in_memory is None:
            os.replace(self.part, self.final)
        with self._cond:
            self.length = length
            self.md5 = md5
            self.on_disk = self.in_memory is None
            self.available = length
            self.done = True
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self.done = True
            self._cond.notify_all()
        try:
            os.unlink(self.part)
        except OSError:
            pass

    # ------------------------------------------------------------------ readers
    def wait_started(self, timeout: float) -> None:
        """Wait until the answer's headers are in (its length known) or it failed; raise its error."""
        with self._cond:
            self._waiting(1)  # the first chunk, for an answer without Content-Length
            try:
                if not self._cond.wait_for(lambda: self.done or self.length is not None or self.available > 0,
                                           timeout):
                    raise ServerError(f"gave up after {timeout:.0f} s waiting for the download of {self.sop_uid}")
            finally:
                self._waiting(1, -1)
            if self.error is not None:
                raise _copy(self.error)

    def wait_for(self, end: int, stall: float) -> None:
        """Wait until bytes ``[0, end)`` are readable (or the body ended); raise its error. Gives up only
        when nothing arrived for ``stall`` seconds: a long transfer that keeps going is waited for."""
        with self._cond:
            if self.done or self.available >= end:
                if self.error is not None and self.available < end:
                    raise _copy(self.error)
                return
            self._waiting(end)
            began = time.monotonic()
            try:
                while not (self.done or self.available >= end):
                    quiet = time.monotonic() - max(self._progress_at, began)
                    if quiet >= stall:
                        raise ServerError(f"no byte of {self.sop_uid} for {stall:.0f} s (the transfer stalled)")
                    self._cond.wait(stall - quiet)
            finally:
                self._waiting(end, -1)
            if self.error is not None and self.available < end:
                raise _copy(self.error)

    def _waiting(self, end: int, change: int = 1) -> None:
        """A waiter for ``[0, end)`` begins (``change`` 1) or ends (-1); under the lock."""
        count = self._waits.get(end, 0) + change
        if count > 0:
            self._waits[end] = count
        else:
            self._waits.pop(end, None)
        self._wake_at = self._next_wake()

    def _next_wake(self) -> int | None:
        """The least byte count waited for that is not in yet (under the lock)."""
        return min((end for end in self._waits if end > self.available), default=None)

    def read(self, size: int, offset: int, stall: float) -> bytes:
        """Bytes ``[offset, offset+size)``, waiting for them if they are still arriving."""
        want = offset + size
        with self._cond:
            if self.length is not None:
                want = min(want, self.length)
        self.wait_for(want, stall)
        with self._cond:
            end = min(offset + size, self.available)
            if end <= offset:
                return b""
            if self.in_memory is not None:
                return bytes(self.in_memory[offset:end])
            fd = self._read_fd
        if fd is None:
            return b""
        chunks = []
        while offset < end:
            chunk = os.pread(fd, end - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def acquire(self) -> None:
        with self._cond:
            self._users += 1

    def release(self) -> None:
        """A reader is done with this download: the read fd is closed when the last one is and it ended."""
        with self._cond:
            self._users -= 1
            self._maybe_close()

    def finished(self) -> None:
        """The fetching side is done with it (called by the store after it ended)."""
        with self._cond:
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self._users <= 0 and self.done and self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    @property
    def failed(self) -> bool:
        with self._cond:
            return self.done and self.error is not None

    @property
    def ok(self) -> bool:
        with self._cond:
            return self.done and self.error is None


def _copy(error: BaseException) -> BaseException:
    from ..singleflight import fresh_copy

    copied = fresh_copy(error)
    return copied if isinstance(copied, (NbiaError, OSError)) else ServerError(str(error))
