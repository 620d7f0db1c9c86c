#!/usr/bin/env python3
"""Benchmark of a real nbiafs mount against the emulator, next to the bulk downloaders' way.

Starts an :class:`nbiafs.emulator.Emulator` in this process with an artificial per-request latency,
mounts it through the CLI (``python -m nbiafs mount MP --server URL --cache-dir DIR``, background mode)
and measures, in one run so that the ratios are comparable on a noisy machine:

  * listing: ``ls -lR`` of the whole tree, cold (empty cache), warm (same mount), and after a remount
    on the same cache (no API call expected);
  * a cold read of the 120-instance series in file order, as dcm2niix would, with prefetch (default)
    and with ``--no-prefetch``, each on a fresh cache;
  * the bulk downloaders' way on the same server: one ``getImage`` zip streamed and extracted to a local
    directory (tcia_utils ``downloadSeries``, the NBIA Data Retriever), and ``getSingleImage`` one by one;
  * a warm read of the series through the mount (cached; the kernel page cache dropped by a remount),
    a hot one (same mount again: kernel page cache), vs the same bytes from a local directory;
  * the peak RSS (VmHWM) of each mount process just before it is unmounted.

Numbers, not a test. Usage: ``python scripts/bench_mount.py [--latency 0.05 0.0] [--repeat 3] [--workers 8]``.
Every mount is unmounted in a ``finally`` (lazy unmount, then SIGTERM of the process we started, as
fallbacks); every byte read through the mount is checked against the archive once per run.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nbiafs import daemon
from nbiafs.client import NbiaClient
from nbiafs.emulator import Emulator, ensure_archive

CHUNK = 1 << 20          # what a reader asks per read() (the kernel splits it into max_read pieces)
SERIES_LENGTH = 120
AUTH_ENDPOINTS = frozenset({"token", "logout"})   # login checks, not data: reported apart
MOUNT_TIMEOUT = 120.0


# ------------------------------------------------------------------------------------ measurements
@dataclass
class Row:
    """One measured step: seconds, bytes moved (0 = not a transfer), API calls, and a note."""

    label: str
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0
    calls: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def cells(self) -> tuple[str, str, str]:
        secs = f"{self.median:8.3f}"
        rate = f"{self.nbytes / self.median / 1e6:8.1f}" if self.nbytes and self.median > 0 else " " * 8
        calls = str(int(statistics.median(self.calls))) if self.calls else "-"
        return secs, rate, calls


@dataclass
class Run:
    """The rows of one latency setting, filled once per repeat."""

    latency: float
    rows: dict[str, Row] = field(default_factory=dict)
    rss_kib: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, label: str, seconds: float, nbytes: int = 0, calls: int | None = None,
            note: str = "") -> None:
        row = self.rows.setdefault(key, Row(label, nbytes=nbytes, note=note))
        row.seconds.append(seconds)
        if calls is not None:
            row.calls.append(calls)


def data_calls(before: collections.Counter[str], after: collections.Counter[str]) -> tuple[int, str]:
    """API calls (auth excluded) between two emulator.stats() snapshots, and a per-endpoint summary."""
    diff = after - before
    data = {k: v for k, v in diff.items() if k not in AUTH_ENDPOINTS}
    auth = sum(v for k, v in diff.items() if k in AUTH_ENDPOINTS)
    detail = ", ".join(f"{k}={v}" for k, v in sorted(data.items()))
    return sum(data.values()), detail + (f" (+{auth} auth)" if auth else "")


# ------------------------------------------------------------------------------------ the mount
@dataclass
class Mount:
    path: Path
    pid: int | None


def vm_hwm_kib(pid: int | None) -> int | None:
    """Peak resident set size of a process (VmHWM), in KiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cli(*argv: str, timeout: float = MOUNT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbiafs", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@contextmanager
def mounted(mp: Path, url: str, cache: Path, log_file: Path, *, workers: int,
            prefetch: bool = True) -> Iterator[Mount]:
    """A background nbiafs mount of ``url`` on ``mp``; always unmounted, its process always gone."""
    mp.mkdir(parents=True, exist_ok=True)
    argv = ["mount", str(mp), "--server", url, "--cache-dir", str(cache), "--workers", str(workers),
            "--log-file", str(log_file), "--log-level", "WARNING"]
    if not prefetch:
        argv.append("--no-prefetch")
    pids: list[int] = []
    try:
        done = _cli(*argv)
        pids = daemon.mount_processes(str(mp)) if daemon.mount_entry(str(mp)) else []
        if done.returncode != 0:
            raise SystemExit(f"mount failed ({done.returncode}): {done.stderr.strip()}")
        yield Mount(mp, pids[0] if pids else None)
    finally:
        _unmount(mp, pids)


def _unmount(mp: Path, pids: list[int]) -> None:
    if daemon.mount_entry(str(mp)) is not None:
        done = _cli("unmount", str(mp))
        if done.returncode != 0:
            print(f"  ! unmount failed ({done.stderr.strip()}); lazy unmount", file=sys.stderr)
            _cli("unmount", "--lazy", str(mp))
    for pid in pids:  # only the processes this script started
        if not daemon.wait_for_exit(pid, 10.0):
            print(f"  ! mount process {pid} still running after unmount: SIGTERM", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            daemon.wait_for_exit(pid, 10.0)


# ------------------------------------------------------------------------------------ file helpers
def read_files(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                total += len(chunk)
    return total


def digests(paths: list[Path]) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for path in paths:
        out[hashlib.sha256(path.read_bytes()).hexdigest()] += 1
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def find_series_dir(root: Path) -> Path:
    """The mounted directory of the 120-instance series (the tree is cached by then: no API call)."""
    for dirpath, _dirs, files in os.walk(root):
        if sum(name.endswith(".dcm") for name in files) == SERIES_LENGTH:
            return Path(dirpath)
    raise SystemExit(f"no {SERIES_LENGTH}-file series directory under {root}")


# ------------------------------------------------------------------------------------ one repeat
def one_repeat(emu: Emulator, run: Run, tmp: Path, args: argparse.Namespace, rep: int) -> None:
    archive = emu.archive
    series = next(s for c in archive.public_collections() for st in archive.studies_of(c.name)
                  for s in archive.series_of_study(st.uid) if len(archive.instances_of(s.uid)) == SERIES_LENGTH)
    instances = sorted(archive.instances_of(series.uid), key=lambda i: i.instance_number)
    total = sum(i.size for i in instances)
    expected = digests([i.path for i in instances])
    base = tmp / f"rep{rep}-lat{run.latency}"
    mp = base / "mnt"
    logs = base / "logs"
    logs.mkdir(parents=True)
    workers = args.workers
    rss = run.rss_kib

    def calls_since(before: collections.Counter[str]) -> tuple[int, str]:
        return data_calls(before, emu.stats())

    # -- listing: cold, warm, remount ------------------------------------------------------------
    cache = base / "cache-listing"
    ls = ["ls", "-lR", str(mp)]
    with mounted(mp, emu.url, cache, logs / "listing.log", workers=workers) as m:
        before = emu.stats()
        seconds, _ = timed(lambda: subprocess.run(ls, stdout=subprocess.DEVNULL, check=True))
        n, detail = calls_since(before)
        run.add("ls_cold", "ls -lR, cold (empty cache)", seconds, calls=n, note=detail)
        before = emu.stats()
        seconds, _ = timed(lambda: subprocess.run(ls, stdout=subprocess.DEVNULL, check=True))
        n, detail = calls_since(before)
        run.add("ls_warm", "ls -lR, warm (same mount)", seconds, calls=n, note=detail)
        series_rel = find_series_dir(mp).relative_to(mp)
        rss["listing mount (ls -lR x2)"].append(vm_hwm_kib(m.pid) or 0)
    with mounted(mp, emu.url, cache, logs / "relisting.log", workers=workers) as m:
        before = emu.stats()
        seconds, _ = timed(lambda: subprocess.run(ls, stdout=subprocess.DEVNULL, check=True))
        n, detail = calls_since(before)
        run.add("ls_remount", "ls -lR, after remount (same cache)", seconds, calls=n, note=detail)

    # -- cold reads through the mount ------------------------------------------------------------
    def cold_read(key: str, label: str, prefetch: bool) -> Path:
        cache = base / f"cache-{key}"
        with mounted(mp, emu.url, cache, logs / f"{key}.log", workers=workers, prefetch=prefetch) as m:
            series_dir = mp / series_rel
            files = sorted(series_dir.iterdir())  # dcm2niix lists, then reads: listing not timed
            assert len(files) == SERIES_LENGTH, f"{series_dir}: {len(files)} files"
            before = emu.stats()
            seconds, got = timed(lambda: read_files(files))
            n, detail = calls_since(before)
            assert got == total, f"{label}: read {got} bytes, expected {total}"
            run.add(key, label, seconds, total, n, detail)
            rss[f"{key} mount"].append(vm_hwm_kib(m.pid) or 0)
        return cache

    prefetch_cache = cold_read("cold_prefetch", f"mount cold read, prefetch ({workers} workers)", True)
    cold_read("cold_noprefetch", "mount cold read, --no-prefetch", False)

    # -- the bulk downloaders' way ---------------------------------------------------------------
    client = NbiaClient(emu.url)
    try:
        client.tokens.get_token()  # the login is not what we measure (the mount logged in before, too)
        zip_dir = base / "zip-extracted"
        zip_dir.mkdir()

        def bulk_zip() -> int:
            got = 0
            for member, chunks in client.image_zip(series.uid, expected_count=SERIES_LENGTH):
                name = os.path.basename(member.name)
                with open(zip_dir / name, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
                        if name.endswith(".dcm"):
                            got += len(chunk)
            return got

        before = emu.stats()
        seconds, got = timed(bulk_zip)
        n, detail = calls_since(before)
        assert got == total, f"zip: {got} bytes of .dcm, expected {total}"
        run.add("zip", "getImage zip, streamed + extracted", seconds, total, n, detail)

        single_dir = base / "single-images"
        single_dir.mkdir()

        def one_by_one() -> int:
            got = 0
            sops = client.sop_instance_uids(series.uid)
            for sop in sops:
                data = client.single_image(series.uid, sop)
                (single_dir / f"{sop}.dcm").write_bytes(data)
                got += len(data)
            return got

        before = emu.stats()
        seconds, got = timed(one_by_one)
        n, detail = calls_since(before)
        assert got == total, f"getSingleImage: {got} bytes, expected {total}"
        run.add("single", "getSingleImage one by one", seconds, total, n, detail)
    finally:
        client.close()
    local_files = sorted(p for p in zip_dir.iterdir() if p.suffix == ".dcm")
    assert digests(local_files) == expected, "the zip's files differ from the archive's"

    # -- warm (remount: page cache dropped), hot (same mount again), local -------------------------
    with mounted(mp, emu.url, prefetch_cache, logs / "warm.log", workers=workers) as m:
        files = sorted((mp / series_rel).iterdir())
        before = emu.stats()
        seconds, got = timed(lambda: read_files(files))
        n, detail = calls_since(before)
        assert got == total
        run.add("warm", "mount warm read (cache, after remount)", seconds, total, n, detail)
        seconds, got = timed(lambda: read_files(files))
        assert got == total
        run.add("hot", "mount hot read (same mount again)", seconds, total)
        if digests(files) != expected:
            raise SystemExit("WRONG BYTES: the mounted series differs from the archive")
        rss["warm mount (reads x3)"].append(vm_hwm_kib(m.pid) or 0)
    read_files(local_files)  # page cache, as for the hot mount read
    seconds, got = timed(lambda: read_files(local_files))
    assert got == total
    run.add("local", "local directory (zip-extracted files)", seconds, total)

    for log_file in sorted(logs.iterdir()):
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        run.warnings += [f"{log_file.name}: {line}" for line in lines]


# ------------------------------------------------------------------------------------ report
ORDER = ("ls_cold", "ls_warm", "ls_remount", "cold_prefetch", "cold_noprefetch", "zip", "single",
         "warm", "hot", "local")


def report(run: Run, total: int, repeat: int) -> None:
    print(f"\n== emulator latency {run.latency:g} s per request; series of {SERIES_LENGTH} instances, "
          f"{total / 1e6:.1f} MB; median of {repeat} ==")
    print(f"  {'step':<42} {'seconds':>8} {'MB/s':>8} {'calls':>6}  calls by endpoint")
    for key in ORDER:
        row = run.rows.get(key)
        if row is None:
            continue
        secs, rate, calls = row.cells()
        print(f"  {row.label:<42} {secs} {rate} {calls:>6}  {row.note}")

    def ratio(a: str, b: str) -> float:
        return run.rows[a].median / run.rows[b].median

    print("  ratios (time / time):")
    print(f"    mount cold (prefetch) / zip bulk          {ratio('cold_prefetch', 'zip'):6.2f}")
    print(f"    mount cold (--no-prefetch) / zip bulk     {ratio('cold_noprefetch', 'zip'):6.2f}")
    print(f"    mount cold (prefetch) / getSingleImage    {ratio('cold_prefetch', 'single'):6.2f}")
    print(f"    --no-prefetch / prefetch                  {ratio('cold_noprefetch', 'cold_prefetch'):6.2f}")
    print(f"    mount warm / local                        {ratio('warm', 'local'):6.2f}")
    print(f"    mount hot / local                         {ratio('hot', 'local'):6.2f}")
    print("  peak RSS of the mount process (VmHWM, median):")
    for name, values in run.rss_kib.items():
        print(f"    {name:<40} {statistics.median(values) / 1024:7.1f} MiB")
    if run.warnings:
        print(f"  mount log lines (WARNING and above): {len(run.warnings)}")
        for line in run.warnings[:10]:
            print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.0],
                        help="emulator seconds per request; several values = several runs (default 0.05 0.0)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each measurement N times, print the median")
    parser.add_argument("--workers", type=int, default=8, help="mount --workers (default 8, the mount's default)")
    parser.add_argument("--data", default=None, help="emulator archive dir (default: a temporary one)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    print(f"nbiafs mount benchmark: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, workers {args.workers}")
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as tmp_name:
        tmp = Path(tmp_name)
        data = Path(args.data) if args.data else tmp / "archive"
        ensure_archive(data)
        for latency in args.latency:
            run = Run(latency)
            with Emulator(data, latency=latency) as emu:
                for rep in range(args.repeat):
                    one_repeat(emu, run, tmp, args, rep)
                series_total = sum(i.size for i in emu.archive.instances_of(
                    next(s.uid for c in emu.archive.public_collections() for st in emu.archive.studies_of(c.name)
                         for s in emu.archive.series_of_study(st.uid)
                         if len(emu.archive.instances_of(s.uid)) == SERIES_LENGTH)))
            report(run, series_total, args.repeat)


if __name__ == "__main__":
    main()
