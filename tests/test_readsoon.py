"""Cached files hinted to the page cache ahead of a reader (nbiafs.store.readsoon)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from nbiafs.store.readsoon import ReadSoon, read_soon


def test_hints_come_from_one_worker_for_the_first_bytes_and_a_missing_file_is_no_error(tmp_path: Path, monkeypatch):
    seen: list[tuple[str, int, int, str]] = []
    done = threading.Event()

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        seen.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length,
                     threading.current_thread().name))
        if len(seen) == 2:
            done.set()

    monkeypatch.setattr(os, "posix_fadvise", advise)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x" * 10)
    hints = ReadSoon(limit=1 << 20)
    try:
        hints.hint([str(tmp_path / "a"), str(tmp_path / "gone"), str(tmp_path / "b")])
        assert done.wait(10)
        assert seen == [("a", 0, 1 << 20, "nbiafs-read-soon"), ("b", 0, 1 << 20, "nbiafs-read-soon")]
    finally:
        hints.close()
    hints.hint([str(tmp_path / "a")])  # closed: ignored
    assert len(seen) == 2
    assert not [t for t in threading.enumerate() if t.name == "nbiafs-read-soon"]


def test_the_queue_keeps_the_newest_hints(tmp_path: Path):
    hints = ReadSoon(limit=1, queued=2)
    with hints._wake:  # no worker yet: fill the queue as a burst would
        hints._paths.extend(["1", "2", "3"])
        assert list(hints._paths) == ["2", "3"]
    hints.close()


def test_read_soon_of_a_path_that_cannot_be_opened_does_nothing(tmp_path: Path):
    read_soon(str(tmp_path / "nothing"), 100)  # no exception
