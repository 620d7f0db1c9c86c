"""One instance arriving (nbiafs.store.download): who is woken when, and what a stall is."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from nbiafs.errors import ServerError
from nbiafs.store.download import Download

CHUNK = 16 * 1024


class PushedStream:
    """An answer whose chunks the test hands over one by one (None ends it)."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.chunks_in: queue.Queue[bytes | None] = queue.Queue()

    def chunks(self) -> Iterator[bytes]:
        while (chunk := self.chunks_in.get()) is not None:
            yield chunk

    def close(self) -> None:
        pass


class CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def started(tmp_path: Path, length: int | None) -> tuple[Download, PushedStream, threading.Thread]:
    download = Download(final=str(tmp_path / "final"), part=str(tmp_path / "part"), series_uid="1.2",
                        sop_uid="1.2.3", expected_size=length)
    stream = PushedStream(length)
    fetcher = threading.Thread(target=download.run, args=(lambda: stream,), daemon=True)
    fetcher.start()
    download.wait_started(10)
    return download, stream, fetcher


def test_a_waiter_is_woken_when_its_bytes_are_there_not_at_every_chunk(tmp_path: Path) -> None:
    """A read of a whole file that arrives in 30 chunks used to wake at each (a thread switch and the
    GIL each time): the fetching thread now wakes it once, when the bytes it waits for are in."""
    download, stream, fetcher = started(tmp_path, 30 * CHUNK)
    download._cond = cond = CountingCondition()  # counting the wake-ups is the point
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(download.read(20 * CHUNK, 0, 10)), daemon=True)
    reader.start()
    assert wait_until(lambda: download._wake_at == 20 * CHUNK, 10)  # it is waiting
    for i in range(30):
        stream.chunks_in.put(bytes([i]) * CHUNK)
    stream.chunks_in.put(None)
    reader.join(10)
    fetcher.join(10)
    assert got == [b"".join(bytes([i]) * CHUNK for i in range(20))]
    assert cond.notified <= 2  # at its 20th chunk (and at the end of the body), not 30 times
    assert download.ok and download.on_disk


def test_a_transfer_that_keeps_sending_is_no_stall_however_far_off_the_bytes_waited_for(tmp_path: Path) -> None:
    """A waiter is no longer woken by every chunk, so the stall is timed from the last chunk, not from
    the last wake-up: a slow transfer that goes on for twice the stall time is waited for to its end."""
    stall = 0.8
    download, stream, fetcher = started(tmp_path, 13 * CHUNK)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            download.wait_for(13 * CHUNK, stall)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: download._wake_at == 13 * CHUNK, 10)
    ends = time.monotonic() + 2 * stall
    while time.monotonic() < ends:  # a chunk every 0.1 s: never quiet for the stall time
        stream.chunks_in.put(b"x" * 1024)
        time.sleep(0.1)
    for _ in range(13):
        stream.chunks_in.put(b"y" * CHUNK)
    stream.chunks_in.put(None)
    reader.join(10)
    fetcher.join(10)
    assert errors == []


def test_a_stall_fails_the_wait_timed_from_the_last_byte(tmp_path: Path) -> None:
    download, stream, fetcher = started(tmp_path, 10 * CHUNK)
    stream.chunks_in.put(b"z" * CHUNK)
    assert wait_until(lambda: download.available == CHUNK, 10)
    began = time.monotonic()
    with pytest.raises(ServerError, match="stalled"):
        download.wait_for(10 * CHUNK, 0.5)
    assert 0.4 <= time.monotonic() - began < 10
    assert download._waits == {}  # a waiter that gave up waits no more
    stream.chunks_in.put(None)  # let the fetching thread end
    fetcher.join(10)
