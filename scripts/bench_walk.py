#!/usr/bin/env python3
"""Benchmark: a cold walk (``find -ls``) of a wide collection through a real mount, with and without
walk-ahead, against the emulator with a per-request latency.

The collection is the emulator's ``wide`` profile: 100 patients x 5 series x 60 instances (30,000
files). Each run mounts on an empty cache dir and times ``find MP/<collection> -ls > /dev/null``, counts
the API calls per endpoint (the emulator's own counters), reads the peak RSS (VmHWM) of the mount
process, then walks again (0 calls expected). The baseline, in the same run, is the same walk with
``--no-walk-ahead``: one listing after another, as every walk was before.

Targets (issue 7, point 5): calls <= 1 per patient/study listing + 2 per study; time <= 0.3x the
one-call-after-another walk; peak RSS <= 150 MiB; a second walk makes 0 calls. ``find -ls`` also
stats the collection's ``.collection.json``, whose size costs two calls of its own (the collection's
description and its series): measured alone on a fresh mount and printed apart from the listings'.

Numbers, not a test. Usage: ``python scripts/bench_walk.py [--latency 0.04] [--profile wide] [--data DIR]``.
Every mount is unmounted in a ``finally``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nbiafs import daemon
from nbiafs.emulator import Emulator

MOUNT_TIMEOUT = 180.0


@contextmanager
def mounted(url: str, cache: Path, extra: list[str]) -> Iterator[tuple[Path, int]]:
    mp = Path(tempfile.mkdtemp(prefix="nbiafs-bench-walk-"))
    done = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(mp), "--server", url, "--cache-dir",
                           str(cache), *extra], capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    if done.returncode != 0:
        raise SystemExit(f"mount failed: {done.stderr}")
    pids = daemon.mount_processes(mp)
    try:
        yield mp, pids[0]
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=60)
        for pid in pids:
            daemon.wait_for_exit(pid, 30)
        mp.rmdir()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_ls(path: Path) -> tuple[float, int]:
    started = time.monotonic()
    done = subprocess.run(["find", str(path), "-ls"], capture_output=True, timeout=3600)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"find failed: {done.stderr.decode(errors='replace')[:500]}")
    return elapsed, done.stdout.count(b"\n")


def walk(emu: Emulator, url: str, cache: Path, extra: list[str]) -> dict[str, object]:
    with mounted(url, cache, extra) as (mp, pid):
        collection = mp / sorted(name for name in os.listdir(mp) if not name.startswith("."))[0]
        before = emu.stats()
        cpu_mount, cpu_emulator = cpu_seconds(pid), cpu_seconds(os.getpid())
        cold, entries = find_ls(collection)
        spent = emu.stats() - before
        cpu_mount, cpu_emulator = cpu_seconds(pid) - cpu_mount, cpu_seconds(os.getpid()) - cpu_emulator
        before = emu.stats()
        warm, _ = find_ls(collection)
        again = emu.stats() - before
        return {"cold": cold, "warm": warm, "entries": entries, "calls": spent, "again": sum(again.values()),
                "rss": peak_rss_mib(pid), "cpu_mount": cpu_mount, "cpu_emulator": cpu_emulator}


def collection_json_calls(emu: Emulator, url: str, cache: Path) -> int:
    """Calls that a stat of ``.collection.json`` makes in a listed collection (its size is its content's:
    the collection's description and all its series), so the walk's listing calls can be told apart."""
    with mounted(url, cache, ["--no-walk-ahead"]) as (mp, _):  # the listdir below must start no walk
        collection = mp / sorted(name for name in os.listdir(mp) if not name.startswith("."))[0]
        os.listdir(collection)
        before = emu.stats()
        os.stat(collection / ".collection.json")
        return sum((emu.stats() - before).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.04)
    parser.add_argument("--profile", default="wide")
    parser.add_argument("--data", default=None, help="archive folder (reused; built on first use)")
    args = parser.parse_args()
    data = Path(args.data) if args.data else Path(tempfile.gettempdir()) / f"nbiafs-bench-{args.profile.replace(':', '_')}"
    print(f"building/loading the {args.profile} archive in {data} ...", flush=True)
    emu = Emulator(data, profile=args.profile, latency=args.latency).start()
    studies = len(emu.archive.studies)
    patients = len(emu.archive.patients)
    files = len(emu.archive.instances)
    try:
        results = {}
        for label, extra in (("walk-ahead (default)", []), ("one call after another (--no-walk-ahead)",
                                                            ["--no-walk-ahead"])):
            with tempfile.TemporaryDirectory(prefix="nbiafs-bench-walk-cache-") as cache:
                results[label] = walk(emu, emu.url, Path(cache), extra)
        with tempfile.TemporaryDirectory(prefix="nbiafs-bench-walk-cache-") as cache:
            metafile_calls = collection_json_calls(emu, emu.url, Path(cache))
    finally:
        emu.stop()
    ahead, base = results["walk-ahead (default)"], results["one call after another (--no-walk-ahead)"]
    calls: Counter[str] = ahead["calls"]  # type: ignore[assignment]
    listing_budget = 1 + patients + studies + 2 * studies  # collection + patients + studies listings + 2/study
    print(f"\ncold find -ls of {files} files ({patients} patients, {studies} studies) at {args.latency * 1000:.0f} ms latency\n")
    print(f"{'':44} {'walk-ahead':>12} {'baseline':>12}   target")
    print(f"{'cold walk, seconds':44} {ahead['cold']:12.2f} {base['cold']:12.2f}   "
          f"<= 0.3x baseline: {ahead['cold'] / base['cold']:.2f}x")  # type: ignore[operator]
    print(f"{'API calls (all)':44} {sum(calls.values()):12d} {sum(base['calls'].values()):12d}   "  # type: ignore[union-attr]
          f"-")
    listing_calls = sum(calls.values()) - metafile_calls
    print(f"{'  for the listings':44} {listing_calls:12d} {sum(base['calls'].values()) - metafile_calls:12d}   "  # type: ignore[union-attr]
          f"<= {listing_budget} (1 per listing + 2 per study)")
    print(f"{'  for the size of .collection.json':44} {metafile_calls:12d} {metafile_calls:12d}   "
          "- (its description and series: measured alone)")
    for name in ("getCollectionValues", "getCollectionDescriptions", "getPatient", "getPatientStudy", "getSeries",
                 "getStudyDrillDownWithSeriesIds", "getImageDrillDown", "getSingleImage", "token"):
        print(f"  {name:42} {calls[name]:12d} {base['calls'][name]:12d}")  # type: ignore[index]
    print(f"{'CPU seconds of the mount process (cold)':44} {ahead['cpu_mount']:12.2f} {base['cpu_mount']:12.2f}")
    print(f"{'CPU seconds of the emulator (cold)':44} {ahead['cpu_emulator']:12.2f} {base['cpu_emulator']:12.2f}")
    print(f"{'peak RSS of the mount, MiB':44} {ahead['rss']:12.1f} {base['rss']:12.1f}   <= 150")
    print(f"{'second walk: seconds':44} {ahead['warm']:12.2f} {base['warm']:12.2f}")
    print(f"{'second walk: API calls':44} {ahead['again']:12d} {base['again']:12d}   0")
    print(f"{'entries listed by find':44} {ahead['entries']:12d} {base['entries']:12d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
