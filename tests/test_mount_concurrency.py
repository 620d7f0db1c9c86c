"""Through a real mount: many readers share one fetch per instance; a slow fetch blocks nobody else."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
from pathlib import Path

import pytest
from conftest import ls, series_of_count, wait_until

pytestmark = pytest.mark.fuse

READERS = 16


def _read_all(paths: list[str], barrier, results) -> None:
    """One reader process: wait for all the others, then read every file; report the hashes."""
    barrier.wait(timeout=60)
    out = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
    results.put(out)


def test_sixteen_processes_opening_the_same_uncached_files_cause_one_fetch_each(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch",))
    series = series_of_count(m.path, "Demo-Head-MR", "DHM-0001", 12)
    paths = [str(series / n) for n in ls(series)]
    emulator.reset_stats()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(READERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(paths, barrier, results)) for _ in range(READERS)]
    for p in procs:
        p.start()
    try:
        answers = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert all(a == answers[0] for a in answers)
    assert emulator.stats()["getSingleImage"] == len(paths)
    expected = sorted(hashlib.sha256(i.path.read_bytes()).hexdigest()
                      for s in archive.series_of_study(archive.studies_of("Demo-Head-MR", "DHM-0001")[0].uid)
                      if s.image_count == 12 for i in archive.instances_of(s.uid))
    assert sorted(answers[0].values()) == expected


def test_a_slow_fetch_does_not_block_listing_or_reading_other_files(emulator, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch",))
    slow_series = series_of_count(m.path, "Demo-Chest-CT", "DCC-0001", 3)
    other_series = series_of_count(m.path, "Demo-Chest-CT", "DCC-0002", 6)
    slow_file = slow_series / "1-001.dcm"
    emulator.reset_stats()  # (the session's emulator has counted earlier tests' fetches)
    emulator.inject_fault("getSingleImage", delay=5, count=1)
    slow_done = threading.Event()
    outcome: list[object] = []

    def slow_reader() -> None:
        try:
            outcome.append(slow_file.read_bytes())
        except OSError as exc:
            outcome.append(exc)
        slow_done.set()

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        # wait until the slow request has reached the server (it takes the only fault): before it does,
        # one of the reads below could take the fault instead
        assert wait_until(lambda: emulator.stats()["getSingleImage"] >= 1, timeout=10)
        # meanwhile: list a directory never listed before, and read other files
        assert len(ls(m.path / "Demo-Head-MR" / "DHM-0002")) == 1
        for name in ls(other_series):
            assert len((other_series / name).read_bytes()) == (other_series / name).stat().st_size
        assert not slow_done.is_set(), "the other reads waited for the slow fetch"
    finally:
        emulator.clear_faults()
        assert slow_done.wait(30)
        reader.join(5)
    assert isinstance(outcome[0], bytes) and len(outcome[0]) == slow_file.stat().st_size
