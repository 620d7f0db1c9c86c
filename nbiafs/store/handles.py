"""Open instances: what a handle number stands for, and reading from it.

Two kinds: a complete cached file (read with ``os.pread`` on its own fd: any number of threads at
once; a file evicted while open stays readable through the fd), and an instance fetched for this open
(reads go through its :class:`~.download.Download`, each waiting only for the bytes it asks for, from
its part file, or from memory when the cache could not be written). The table
hands out small integers, never reused while open, and defers closing a file until the reads in
progress on it are done, so a read never lands on a recycled fd number.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from typing import Protocol

from .download import Download


class Handle(Protocol):
    def read(self, size: int, offset: int) -> bytes: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


class FileHandle:
    """A complete file of the cache (or any complete file)."""

    __slots__ = ("_fd", "_size", "_lock", "_users", "_closed")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def size(self) -> int:
        return self._size

    def read(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "instance handle already released")
            self._users += 1
        try:
            chunks: list[bytes] = []
            end = min(offset + size, self._size)  # complete and immutable: no read past its end
            while offset < end:
                chunk = os.pread(self._fd, end - offset, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            with self._lock:
                self._users -= 1
                if self._closed and self._users == 0:
                    self._really_close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users == 0:
                self._really_close()

    def _really_close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DownloadHandle:
    """An instance still arriving: reads wait for their bytes (or the transfer's error)."""

    __slots__ = ("_download", "_stall", "_closed")

    def __init__(self, download: Download, stall: float) -> None:
        self._download = download  # acquired by the store for this handle (released by close)
        self._stall = stall
        self._closed = False

    def size(self) -> int:
        length = self._download.length
        if length is not None:
            return length
        return self._download.expected_size or 0

    def read(self, size: int, offset: int) -> bytes:
        if self._closed:
            raise OSError(errno.EBADF, "instance handle already released")
        return self._download.read(size, offset, self._stall)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._download.release()


class HandleTable:
    """Handle numbers -> open handles. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._numbers = itertools.count(1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    def add(self, handle: Handle) -> int:
        with self._lock:
            number = next(self._numbers)
            self._handles[number] = handle
        return number

    def get(self, number: int) -> Handle:
        with self._lock:
            handle = self._handles.get(number)
        if handle is None:
            raise OSError(errno.EBADF, f"unknown instance handle {number}")
        return handle

    def pop(self, number: int) -> Handle:
        with self._lock:
            handle = self._handles.pop(number, None)
        if handle is None:
            raise OSError(errno.EBADF, f"unknown instance handle {number}")
        return handle

    def close_all(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()
