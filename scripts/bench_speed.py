#!/usr/bin/env python3
"""The speed figures of issue 7, each next to its target and a baseline measured in the same run.

Scenarios (``--only NAME ...``; all by default, in this order):

``headers``  open the first file of every series of the ``headers`` profile and read its header
             (pydicom ``stop_before_pixels``) on a mount with ``--cache-size 20M``: bytes and instances
             the mount fetches (until it goes quiet) against the bytes of the files opened (<= 1.5x).
``cold``     the 200-instance ``ct200`` series read file after file in name order (1 MiB reads) on a
             fresh cache, against tcia_utils' ``downloadSeries`` of it (one ``getImage`` zip read
             whole, then extracted: the package itself when installed, ``pip install -e '.[bench]'``,
             else those two steps replicated), and against the same zip streamed and extracted as it
             arrives by ``NbiaClient`` (stricter: neither bulk downloader overlaps the two), at
             ``--latency`` in three network shapes: (a) no cap (<= 0.9x), (b) one shared 400 Mbps
             link (<= 0.9x; all also against the link's own limit), (c) 100 Mbps per connection
             (<= 0.35x). ``--link`` and ``--per-connection`` time (b) and (c) at other caps, against
             the same targets.
``ttfb``     open + read(1) of an uncached first file of a listed series (a fresh mount per sample,
             over a copy of a cache that holds the listings only) against one bare ``getSingleImage``
             request's first byte (median of several instances; <= 1.2x).
``big``      the ~200 MB ``multiframe`` instance over a 200 Mbps link: open + read(1 MiB) against the
             whole read (< 25 %), and the mount process's RSS growth meanwhile (<= 64 MiB).
``warm``     the ct200 series once cached: (a) unmount, drop the page cache, remount, ``cp -r`` the
             series folder, against ``cp -r`` of the same files from a local folder (<= 2x); (b) the
             re-read on the same mount, page cache warm, against the local re-read (<= 1.3x); (c)
             open+close of each cached file (median <= 0.3 ms).
``readers``  8 processes reading random files of the ``headers`` profile's 20 series through one
             mount (repeats allowed): every byte checked, slowest open, bytes fetched against the
             distinct bytes read (<= 1.2x), the most ``getSingleImage`` answers one instance got (<= 1:
             one fetch per instance, counted per SOPInstanceUID by the emulator).

Every mount goes through the CLI (``python -m nbiafs mount``, background) and is lazily unmounted in a
``finally``; the emulator runs in its own process (see ``benchlib``); every byte read through a mount
is compared with the archive (sha256) and a difference stops the run. ``--mount-args "--workers 16"``
adds flags to every mount (after the scenario's own, so they win). ``--quick`` uses small profiles to
check the script itself in a minute or two; its figures say little. ``--series SPEC`` reads another
series in cold and warm (an emulator profile spec: ``ct200:instances=600,rows=256`` is 600 files of
131 KB, MR-sized), for how the figures hold with other file sizes. Archives are built once under
``--data-root`` and reused. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import io
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from benchlib import (
    CHUNK,
    BenchError,
    Digests,
    EmulatorProcess,
    Figure,
    Mount,
    RecordingFile,
    RssSampler,
    Target,
    Traffic,
    check_digest,
    check_slice,
    cpu_seconds,
    digest_chunks,
    drop_caches,
    human_bytes,
    match_series,
    median,
    mounted,
    percentile,
    proc_status,
    read_discard,
    read_keep,
    reader_worker,
    reset_peak_rss,
    sha256_file,
    slug,
    table,
    walk_series,
    write_json,
)

from nbiafs.client import NbiaClient
from nbiafs.emulator import ensure_archive

SCENARIOS = ("headers", "cold", "ttfb", "big", "warm", "readers")
#: Profile used per archive role: (full run, --quick).
PROFILES = {
    "ct200": ("ct200", "ct200:instances=20"),
    "headers": ("headers", "headers:patients=2"),
    "multiframe": ("multiframe", "multiframe:frames=40"),
}
LINK_400MBPS = 50_000_000        # bytes/s: one shared 400 Mbps link
CONN_100MBPS = 12_500_000        # bytes/s: each connection at 100 Mbps
BIG_200MBPS = 25_000_000         # bytes/s: the big instance's link


def cold_shapes(link: float = LINK_400MBPS,
                per_connection: float = CONN_100MBPS) -> tuple[tuple[str, str, dict[str, float], float], ...]:
    """Network shapes of the cold read: key, what it is, emulator caps, target (x tcia_utils). The
    targets are issue 7's, for its caps (400 Mbps shared, 100 Mbps per connection); ``--link`` and
    ``--per-connection`` time other caps against the same targets."""
    return (
        ("a", "no bandwidth cap", {}, 0.9),
        ("b", f"one shared {link * 8 / 1e6:g} Mbps link", {"link": link}, 0.9),
        ("c", f"{per_connection * 8 / 1e6:g} Mbps per connection", {"per_connection": per_connection}, 0.35),
    )


# ------------------------------------------------------------------------------- the run
@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    logs: Path
    data_root: Path
    mount_args: list[str]
    digests: Digests = field(default_factory=Digests)
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    peaks: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    _archives: dict[str, tuple[str, Path, Any]] = field(default_factory=dict)
    _dirs: int = 0

    @property
    def latency(self) -> float:
        return float(self.args.latency)

    @property
    def repeat(self) -> int:
        return int(self.args.repeat)

    def archive(self, role: str) -> tuple[str, Path, Any]:
        """(profile spec, data dir, Archive) of a role, built on first use."""
        if role not in self._archives:
            spec = PROFILES[role][1 if self.args.quick else 0]
            if role == "ct200" and self.args.series:
                spec = self.args.series  # another series for cold and warm (smaller files, more of them)
            data = self.data_root / slug(spec)
            started = time.monotonic()
            archive = ensure_archive(data, profile=spec)
            took = time.monotonic() - started
            print(f"  archive {spec}: {len(archive.series)} series, {len(archive.instances)} instances, "
                  f"{human_bytes(archive.total_size())} in {data} ({took:.1f} s)", flush=True)
            self._archives[role] = (spec, data, archive)
        return self._archives[role]

    def emulator(self, role: str) -> EmulatorProcess:
        spec, data, _ = self.archive(role)
        return EmulatorProcess(data, spec, self.latency, self.logs / f"emulator-{slug(spec)}.log")

    def fresh(self, name: str) -> Path:
        """A new empty directory in the run's work dir."""
        self._dirs += 1
        path = self.work / f"{self._dirs:03d}-{slug(name)}"
        path.mkdir()
        return path

    def mount(self, emu: EmulatorProcess, cache: Path, label: str, scenario: str,
              own_args: Sequence[str] = ()) -> AbstractContextManager[Mount]:
        return _reported(self, scenario, mounted(emu.url, cache, self.work, self.logs, label,
                                                 [*own_args, *self.mount_args]))

    def add(self, scenario: str, name: str, values: Sequence[float], unit: str, *, target: Target | None = None,
            baselines: Sequence[float] | None = None, baseline_name: str = "", percent: bool = False,
            note: str = "") -> Figure:
        fig = Figure(scenario, name, median(values), unit, target,
                     median(baselines) if baselines else None, baseline_name, percent, list(values), note)
        self.figures.append(fig)
        return fig

    def note(self, scenario: str, line: str) -> None:
        self.details[scenario].append(line)

    def report(self, scenario: str) -> None:
        peaks = self.peaks.get(scenario)
        if peaks:
            self.add(scenario, f"mount peak RSS (VmHWM), largest of {len(peaks)} mount(s)", [max(peaks)], "MiB")
        figures = [f for f in self.figures if f.scenario == scenario]
        print(f"\n== {scenario} ==")
        print(table(figures))
        notes = [f"{f.name}: {f.note}" for f in figures if f.note]
        counted = collections.Counter(notes + self.details.get(scenario, []))
        for line, times in counted.items():  # repeats of one line (a listing per repeat) printed once
            print(f"  * {line}" + (f" (x{times})" if times > 1 else ""))
        sys.stdout.flush()


class _reported(AbstractContextManager[Mount]):
    """A mount whose peak RSS, store counters and log lines are noted for its scenario when it goes."""

    def __init__(self, run: Run, scenario: str, inner: AbstractContextManager[Mount]) -> None:
        self.run, self.scenario, self.inner = run, scenario, inner
        self.mount: Mount | None = None

    def __enter__(self) -> Mount:
        self.mount = self.inner.__enter__()
        return self.mount

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            return self.inner.__exit__(*exc)
        finally:
            m = self.mount
            if m is not None:
                peak = f"{m.peak_kib / 1024:.1f} MiB" if m.peak_kib else "?"
                if m.peak_kib:
                    self.run.peaks[self.scenario].append(m.peak_kib / 1024)
                store = ", ".join(f"{k}={v}" for k, v in sorted(m.store.items()) if v) or "-"
                self.run.note(self.scenario, f"mount '{m.label}': peak RSS (VmHWM) {peak}; store counters: {store}")
                try:
                    lines = [x for x in m.log_file.read_text(errors="replace").splitlines() if x.strip()]
                except OSError:
                    lines = []
                if lines:
                    self.run.note(self.scenario, f"mount '{m.label}' logged {len(lines)} line(s), first: {lines[0][:200]}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def one_series(m: Mount, archive: Any) -> tuple[Path, Any, list[tuple[Path, Any]]]:
    found = match_series(walk_series(m.path), archive)
    if len(found) != 1:
        raise BenchError(f"expected one series under {m.path}, found {len(found)}")
    return found[0]


def check_files(run: Run, pairs: Sequence[tuple[Path, Any]], data: Sequence[list[bytes]], what: str) -> None:
    for (path, inst), chunks in zip(pairs, data):
        check_digest(digest_chunks(chunks), run.digests.of(inst), f"{what}: {path.name}")


def check_paths(run: Run, pairs: Sequence[tuple[Path, Any]], what: str) -> None:
    for path, inst in pairs:
        check_digest(sha256_file(path), run.digests.of(inst), f"{what}: {path.name}")


def image_url(base: str, inst: Any) -> str:
    return (f"{base}/nbia-api/services/v4/getSingleImage?SeriesInstanceUID={inst.series_uid}"
            f"&SOPInstanceUID={inst.sop_uid}")


def bare_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def fetch_whole(session: requests.Session, base: str, inst: Any) -> tuple[float, float, float, bytes]:
    """One bare getSingleImage: (seconds to the first byte, to the first MiB, to the end, the body)."""
    chunks = []
    got = 0
    first = first_mib = None
    started = time.perf_counter()
    with session.get(image_url(base, inst), stream=True, timeout=300) as reply:
        reply.raise_for_status()
        for chunk in reply.iter_content(64 * 1024):
            if first is None:
                first = time.perf_counter() - started
            chunks.append(chunk)
            got += len(chunk)
            if first_mib is None and got >= min(CHUNK, inst.size):
                first_mib = time.perf_counter() - started
    end = time.perf_counter() - started
    return first or end, first_mib or end, end, b"".join(chunks)


# ------------------------------------------------------------------------------- 1. header scan
def scenario_headers(run: Run) -> None:
    name = "headers"
    spec, _, archive = run.archive("headers")
    fetched, fetched_during, calls, opened, header_bytes, scan, direct, tails, zips = ([] for _ in range(9))
    with run.emulator("headers") as emu:
        emu.shape(latency=run.latency)
        for rep in range(run.repeat):
            with run.mount(emu, run.fresh("headers-cache"), f"headers scan {rep + 1}", name,
                           ["--cache-size", "20M"]) as m:
                before = emu.traffic()
                series = match_series(walk_series(m.path), archive)
                run.note(name, f"listing the tree (untimed): {(emu.traffic() - before).describe()}")
                firsts = [pairs[0] for _, _, pairs in series]
                start = emu.traffic()
                t0 = time.perf_counter()
                records = []
                for path, inst in firsts:
                    raw = RecordingFile(path)
                    try:
                        ds = pydicom.dcmread(io.BufferedReader(raw, io.DEFAULT_BUFFER_SIZE), stop_before_pixels=True)
                    finally:
                        raw.close()
                    records.append((path, inst, raw, str(ds.get("SOPInstanceUID", ""))))
                scan.append(time.perf_counter() - t0)
                during = emu.traffic() - start
                settled, tail, quiet = emu.wait_quiet()
                after = settled - start
            for path, inst, raw, sop in records:
                if sop != inst.sop_uid:
                    raise BenchError(f"WRONG BYTES: {path} has SOPInstanceUID {sop}, the archive {inst.sop_uid}")
                for offset, data in raw.ranges:
                    check_slice(data, offset, inst, f"header of {path}")
            fetched.append(after.image_bytes())
            fetched_during.append(during.image_bytes())
            calls.append(after.calls["getSingleImage"])
            zips.append(after.calls["getImage"] + after.calls["getImageWithMD5Hash"])
            opened.append(sum(inst.size for _, inst in firsts))
            header_bytes.append(sum(raw.distinct_bytes() for _, _, raw, _ in records))
            tails.append(tail)
            run.note(name, f"scan {rep + 1}: {after.describe()}" + ("" if quiet else " (the mount never went quiet)"))
            session = bare_session()  # the baseline: the same files fetched whole, one after another
            try:
                t0 = time.perf_counter()
                for _, inst in firsts:
                    body = fetch_whole(session, emu.url, inst)[3]
                    if len(body) != inst.size:
                        raise BenchError(f"direct getSingleImage of {inst.sop_uid}: {len(body)} bytes")
                direct.append(time.perf_counter() - t0)
            finally:
                session.close()
    n = len(firsts)
    run.add(name, "image bytes fetched (until the mount went quiet)", fetched, "B",
            target=Target("<=", 1.5, "ratio", "<= 1.5x opened"), baselines=opened, baseline_name="opened",
            note=f"{n} files opened (first of each series), {spec}, --cache-size 20M")
    run.add(name, "image bytes fetched by the end of the scan", fetched_during, "B", baselines=opened,
            baseline_name="opened")
    run.add(name, "instances fetched (getSingleImage calls)", calls, "n", baselines=[n] * len(calls),
            baseline_name="opened", note=f"plus {median(zips):g} zip request(s)")
    run.add(name, "header bytes read by pydicom", header_bytes, "B", baselines=opened, baseline_name="opened",
            percent=True)
    run.add(name, "scan time", scan, "s", baselines=direct, baseline_name="bare fetch, 1 by 1")
    run.add(name, "mount kept fetching after the scan", tails, "s")
    run.report(name)


# ------------------------------------------------------------------------------- 2. cold sequential read
def zip_download(emu: EmulatorProcess, series: Any, count: int,
                 dest: Path) -> tuple[float, list[Path], Traffic, tuple[float, float]]:
    """The stricter baseline: one getImage zip streamed by ``NbiaClient``, each member written to ``dest``
    as it arrives (extraction overlaps the transfer, which neither bulk downloader does); seconds, the
    files, the traffic, and the CPU seconds of this process (the client) and of the emulator meanwhile."""
    client = NbiaClient(emu.url)
    try:
        client.resolve_api()  # the mount decided its API before it was ready, too: neither timed nor counted
        before = emu.traffic()
        cpu = cpu_seconds(os.getpid()), cpu_seconds(emu.pid)
        started = time.perf_counter()
        written = []
        for member, chunks in client.image_zip(series.uid, new_file_names=True, include_md5=True,
                                               expected_count=count):
            target = dest / os.path.basename(member.name)
            with open(target, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            written.append(target)
        seconds = time.perf_counter() - started
        used = cpu_seconds(os.getpid()) - cpu[0], cpu_seconds(emu.pid) - cpu[1]
        return seconds, written, emu.traffic() - before, used
    finally:
        client.close()


def tcia_utils_kind() -> str:
    """Which tcia_utils baseline this run times: the installed package itself, or its replica (the
    same test as ``tcia_utils_download``: whether it imports)."""
    if import_tcia_utils() is None:  # pip install tcia_utils, or the [bench] extra
        return "tcia_utils' downloadSeries, replicated (tcia_utils not installed)"
    try:
        version = importlib.metadata.version("tcia_utils")
    except importlib.metadata.PackageNotFoundError:  # importable from a source tree, not installed
        version = "(source tree)"
    return f"tcia_utils {version} downloadSeries"


def import_tcia_utils() -> Any:
    """``tcia_utils.nbia``, or None when it is not installed. Its import (pandas, plotly: seconds) runs
    before any clock, and undoes the ``logging.basicConfig(level=INFO)`` it runs: its own lines and
    urllib3's would otherwise be printed (and paid for) in the middle of the figures."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        import tcia_utils.nbia as tu
    except ImportError:
        return None
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    logging.getLogger("tcia_utils").setLevel(logging.WARNING)
    return tu


def tcia_utils_download(emu: EmulatorProcess, series: Any,
                        dest: Path) -> tuple[float, list[Path], Traffic, tuple[float, float]]:
    """tcia_utils' ``downloadSeries`` of one series, the issue's baseline: one ``getImage?NewFileNames=Yes``
    request read whole into memory, then ``zipfile.ZipFile(io.BytesIO(body)).extractall`` into
    ``dest/<uid>``. With tcia_utils installed its own function runs (``setApiUrl`` pointed at the
    emulator's v4, as the package only knows TCIA's hosts); without it, those two steps of its
    ``_download_and_unzip_series`` (3.3.5) replicated. Same return as ``zip_download``."""
    base = f"{emu.url}/nbia-api/services/v4/"
    tu = import_tcia_utils()
    before = emu.traffic()
    cpu = cpu_seconds(os.getpid()), cpu_seconds(emu.pid)
    started = time.perf_counter()
    if tu is not None:
        saved = tu.setApiUrl
        tu.setApiUrl = lambda endpoint, api_url="": base
        try:
            tu.downloadSeries([series.uid], input_type="list", path=str(dest))
        finally:
            tu.setApiUrl = saved
    else:
        reply = requests.get(f"{base}getImage?NewFileNames=Yes&SeriesInstanceUID={series.uid}", timeout=600)
        if reply.status_code != 200:
            raise BenchError(f"getImage answered {reply.status_code}")
        with zipfile.ZipFile(io.BytesIO(reply.content)) as body:
            body.extractall(path=dest / series.uid)
    seconds = time.perf_counter() - started
    used = cpu_seconds(os.getpid()) - cpu[0], cpu_seconds(emu.pid) - cpu[1]
    written = sorted((dest / series.uid).glob("*")) if (dest / series.uid).is_dir() else []
    if not written:
        raise BenchError(f"{tcia_utils_kind()} wrote nothing into {dest} (see its log)")
    return seconds, written, emu.traffic() - before, used


def cold_zip(run: Run, emu: EmulatorProcess, series: Any, instances: Sequence[Any], key: str,
             rep: int, how: str = "zip") -> tuple[float, int]:
    """A baseline of one cold read (``how``: "zip" streamed, or "tcia_utils"): its seconds and bytes on
    the wire; the files it wrote are checked against the archive."""
    dest = run.fresh(f"{how}-{key}-{rep}")
    if how == "zip":
        seconds, written, traffic, (cpu_client, cpu_server) = zip_download(emu, series, len(instances), dest)
    else:
        seconds, written, traffic, (cpu_client, cpu_server) = tcia_utils_download(emu, series, dest)
    dcm = sorted(p for p in written if p.suffix == ".dcm")
    if len(dcm) != len(instances):
        raise BenchError(f"the {how} download held {len(dcm)} images, not {len(instances)}")
    check_paths(run, list(zip(dcm, instances)), how)
    shutil.rmtree(dest)
    run.note("cold", f"({key}) {how} {rep + 1}: {seconds:.3f} s; CPU s: client {cpu_client:.2f}, emulator "
                     f"{cpu_server:.2f}; {traffic.describe()}")
    return seconds, traffic.image_bytes()


def cold_mount(run: Run, emu: EmulatorProcess, archive: Any, total: int, key: str, rep: int) -> tuple[float, Traffic]:
    """One cold read through a fresh mount: every file in name order, 1 MiB reads; its seconds and traffic."""
    with run.mount(emu, run.fresh(f"cold-cache-{key}-{rep}"), f"cold {key} {rep + 1}", "cold") as m:
        _, _, pairs = one_series(m, archive)  # listing: untimed, as dcm2niix lists first
        before = emu.traffic()
        cpu = cpu_seconds(m.pid), cpu_seconds(emu.pid)
        seconds, data = timed(lambda: [read_keep(p) for p, _ in pairs])
        cpu_mount, cpu_server = cpu_seconds(m.pid) - cpu[0], cpu_seconds(emu.pid) - cpu[1]
        traffic = emu.traffic() - before
    check_files(run, pairs, data, f"cold read ({key})")
    run.note("cold", f"({key}) mount {rep + 1}: {seconds:.3f} s, {total / seconds / 1e6:.1f} MB/s; CPU s: mount "
                     f"{cpu_mount:.2f}, emulator {cpu_server:.2f}; {traffic.describe()}")
    return seconds, traffic


def scenario_cold(run: Run) -> None:
    name = "cold"
    spec, _, archive = run.archive("ct200")
    series = archive.series[0]
    instances = archive.instances_of(series.uid)
    total = sum(i.size for i in instances)
    shapes = [s for s in cold_shapes(run.args.link * 1e6 / 8, run.args.per_connection * 1e6 / 8)
              if s[0] in run.args.shapes]
    with run.emulator("ct200") as emu:
        for key, label, caps, limit in shapes:
            applied = emu.shape(latency=run.latency, **caps)
            mount_s: list[float] = []
            zip_s: list[float] = []
            tcia_s: list[float] = []
            zip_wire: list[int] = []
            fetches: list[int] = []
            most: list[int] = []
            steps = ("tcia_utils", "zip", "mount")
            for rep in range(run.repeat):
                for step in steps[rep % 3:] + steps[:rep % 3]:  # each goes first once in three repeats
                    if step == "mount":
                        seconds, traffic = cold_mount(run, emu, archive, total, key, rep)
                        mount_s.append(seconds)
                        fetches.append(traffic.calls["getSingleImage"])
                        most.append(traffic.most_fetches_of_one_instance())
                    else:
                        seconds, wire = cold_zip(run, emu, series, instances, key, rep, step)
                        (zip_s if step == "zip" else tcia_s).append(seconds)
                        if step == "zip":
                            zip_wire.append(wire)
            run.add(name, f"({key}) mount cold read, {label}", mount_s, "s",
                    target=Target("<=", limit, "ratio", f"<= {limit:g}x tcia_utils"), baselines=tcia_s,
                    baseline_name="tcia_utils", note=f"emulator shaping {applied}")
            run.add(name, f"({key}) the same, against a streamed zip (stricter)", mount_s, "s",
                    target=Target("<=", limit, "ratio", f"<= {limit:g}x zip"), baselines=zip_s,
                    baseline_name="streamed zip")
            run.add(name, f"({key}) streamed zip against tcia_utils", zip_s, "s", baselines=tcia_s,
                    baseline_name="tcia_utils")
            run.add(name, f"({key}) mount throughput", [total / s for s in mount_s], "B/s",
                    baselines=[total / s for s in zip_s], baseline_name="zip")
            run.add(name, f"({key}) getSingleImage calls", fetches, "n", baselines=[len(instances)],
                    baseline_name="instances",
                    note=f"most fetches of one instance: {max(most)}"
                    + (" (some instance was fetched twice)" if max(most) > 1 else "")
                    + ("; the other instances came through the series zip" if min(fetches) < len(instances) else ""))
            if "link" in caps:
                link_s = total / caps["link"]
                run.add(name, f"({key}) mount against the link limit", mount_s, "s", baselines=[link_s],
                        baseline_name=f"{human_bytes(total)} at {caps['link'] / 1e6:g} MB/s")
                run.add(name, f"({key}) zip against the link limit", zip_s, "s", baselines=[link_s],
                        baseline_name="link limit")
                run.add(name, f"({key}) tcia_utils against the link limit", tcia_s, "s", baselines=[link_s],
                        baseline_name="link limit")
            if "per_connection" in caps:
                one = total / caps["per_connection"]
                run.add(name, f"({key}) zip against one connection's limit", zip_s, "s", baselines=[one],
                        baseline_name=f"{human_bytes(total)} at {caps['per_connection'] / 1e6:g} MB/s",
                        note=f"the zip is deflated: {human_bytes(median(zip_wire))} on the wire for "
                             f"{human_bytes(total)} of files")
            run.note(name, f"({key}) zip wire bytes {human_bytes(median(zip_wire))} for {human_bytes(total)} of "
                           f"files ({total / max(median(zip_wire), 1):.2f}x deflated)")
    run.note(name, f"series of {len(instances)} instances, {human_bytes(total)} ({spec}); latency {run.latency:g} s; "
                   f"baseline: {tcia_utils_kind()}")
    run.report(name)


# ------------------------------------------------------------------------------- 3. time to first byte
def scenario_ttfb(run: Run) -> None:
    name = "ttfb"
    spec, _, archive = run.archive("headers")
    with run.emulator("headers") as emu:
        emu.shape(latency=run.latency)
        template = run.fresh("ttfb-listed-cache")
        with run.mount(emu, template, "ttfb listing", name) as m:
            before = emu.traffic()
            series = match_series(walk_series(m.path), archive)
            run.note(name, f"listing into the template cache: {(emu.traffic() - before).describe()}")
            firsts = [(pairs[0][0].relative_to(m.path), pairs[0][1]) for _, _, pairs in series]
        samples = firsts[: run.args.ttfb_samples]
        warm_up = series[0][2][1][1] if len(series[0][2]) > 1 else firsts[-1][1]
        mount_t, bare_t = [], []
        session = bare_session()
        try:
            fetch_whole(session, emu.url, warm_up)  # one connection open, as the mount's pool may have
            for rep in range(run.repeat):
                for k, (rel, inst) in enumerate(samples):
                    cache = run.fresh(f"ttfb-cache-{rep}-{k}")
                    shutil.rmtree(cache)
                    shutil.copytree(template, cache)
                    with run.mount(emu, cache, f"ttfb {rep + 1}.{k + 1}", name) as m:
                        path = m.path / rel
                        os.listdir(path.parent)
                        os.stat(path)
                        before = emu.traffic()
                        t0 = time.perf_counter()
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            first = os.read(fd, 1)
                            mount_t.append(time.perf_counter() - t0)
                        finally:
                            os.close(fd)
                        calls = emu.traffic() - before
                    check_slice(first, 0, inst, f"first byte of {rel}")
                    t_first, _, _, body = fetch_whole(session, emu.url, inst)
                    check_slice(body, 0, inst, f"bare getSingleImage of {inst.sop_uid}")
                    bare_t.append(t_first)
                    run.note(name, f"sample {rep + 1}.{k + 1} ({rel.parent.name}): mount {mount_t[-1] * 1000:.1f} ms, "
                                   f"bare {t_first * 1000:.1f} ms; calls while the mount was timed: {calls.describe()}")
        finally:
            session.close()
    ms = [t * 1000 for t in mount_t]
    bare_ms = [t * 1000 for t in bare_t]
    run.add(name, "time to first byte, uncached first file", ms, "ms", target=Target("<=", 1.2, "ratio", "<= 1.2x bare"),
            baselines=bare_ms, baseline_name="bare getSingleImage",
            note=f"median of {len(ms)} instances ({spec}), a fresh mount over listed metadata for each")
    run.add(name, "slowest sample", [max(ms)], "ms", baselines=[max(bare_ms)], baseline_name="bare, slowest")
    run.report(name)


# ------------------------------------------------------------------------------- 4. big instance
def scenario_big(run: Run) -> None:
    name = "big"
    spec, _, archive = run.archive("multiframe")
    inst = archive.instances[0]
    first_s, end_s, direct_first, direct_end, rss_growth, hwm_growth = ([] for _ in range(6))
    with run.emulator("multiframe") as emu:
        applied = emu.shape(latency=run.latency, link=BIG_200MBPS)
        for rep in range(run.repeat):
            session = bare_session()
            try:
                _, t_mib, t_end, body = fetch_whole(session, emu.url, inst)
            finally:
                session.close()
            if len(body) != inst.size:
                raise BenchError(f"direct getSingleImage: {len(body)} bytes, not {inst.size}")
            del body
            direct_first.append(t_mib)
            direct_end.append(t_end)
            with run.mount(emu, run.fresh(f"big-cache-{rep}"), f"big {rep + 1}", name) as m:
                path, inst = one_series(m, archive)[2][0]
                before_kib = proc_status(m.pid).get("VmRSS", 0)
                reset = reset_peak_rss(m.pid)
                before = emu.traffic()
                chunks: list[bytes] = []
                with RssSampler(m.pid) as sampler:
                    t0 = time.perf_counter()
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        got = 0
                        while got < min(CHUNK, inst.size):
                            chunk = os.read(fd, CHUNK - got)
                            if not chunk:
                                break
                            chunks.append(chunk)
                            got += len(chunk)
                        t_first = time.perf_counter() - t0
                        while True:
                            chunk = os.read(fd, CHUNK)
                            if not chunk:
                                break
                            chunks.append(chunk)
                        t_end = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                hwm_kib = proc_status(m.pid).get("VmHWM", 0)
                traffic = emu.traffic() - before
            check_digest(digest_chunks(chunks), run.digests.of(inst), f"big instance {path.name}")
            del chunks
            first_s.append(t_first)
            end_s.append(t_end)
            rss_growth.append((sampler.peak_kib - before_kib) / 1024)
            hwm_growth.append((hwm_kib - before_kib) / 1024)
            run.note(name, f"read {rep + 1}: first MiB {t_first:.3f} s, whole {t_end:.3f} s; RSS before "
                           f"{before_kib / 1024:.1f} MiB, sampled peak {sampler.peak_kib / 1024:.1f} MiB "
                           f"({sampler.samples} samples), VmHWM after {hwm_kib / 1024:.1f} MiB"
                           f"{'' if reset else ' (VmHWM could not be reset: it counts since the mount started)'}; "
                           f"{traffic.describe()}")
    limit_s = inst.size / BIG_200MBPS
    run.add(name, "open + first MiB through the mount", first_s, "s",
            target=Target("<", 0.25, "ratio", "< 25 % of the whole"), baselines=end_s,
            baseline_name="whole read", percent=True,
            note=f"one instance of {human_bytes(inst.size)} ({spec}); shaping {applied}")
    run.add(name, "first MiB: mount against a bare request", first_s, "s", baselines=direct_first,
            baseline_name="bare getSingleImage")
    run.add(name, "whole read: mount against a bare request", end_s, "s", baselines=direct_end,
            baseline_name="bare getSingleImage")
    run.add(name, "whole read against the link limit", end_s, "s", baselines=[limit_s],
            baseline_name=f"at {BIG_200MBPS / 1e6:g} MB/s")
    run.add(name, "mount RSS growth (sampled VmRSS peak - before)", rss_growth, "MiB",
            target=Target("<=", 64, "value", "<= 64 MiB"))
    run.add(name, "mount RSS growth (VmHWM after - before)", hwm_growth, "MiB",
            target=Target("<=", 64, "value", "<= 64 MiB"))
    run.report(name)


# ------------------------------------------------------------------------------- 5. warm reads
def open_close_ms(paths: Sequence[Path]) -> list[float]:
    out = []
    for path in paths:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.close(fd)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def cp_r(src: Path, dest: Path) -> float:
    seconds, done = timed(lambda: subprocess.run(["cp", "-r", str(src), str(dest)], capture_output=True, text=True))
    if done.returncode != 0:
        raise BenchError(f"cp -r {src} failed: {done.stderr.strip()}")
    return seconds


def scenario_warm(run: Run) -> None:
    name = "warm"
    spec, _, archive = run.archive("ct200")
    buf = bytearray(CHUNK)
    cp_m, cp_n, hot_m, hot_n, open_m, open_n, cp_calls = ([] for _ in range(7))
    problems: set[str] = set()
    with run.emulator("ct200") as emu:
        emu.shape(latency=run.latency)
        cache = run.fresh("warm-cache")
        native_root = run.fresh("warm-native")
        with run.mount(emu, cache, "warm fill", name) as m:
            folder, _, pairs = one_series(m, archive)
            data = [read_keep(p) for p, _ in pairs]
            extras = {n: (folder / n).read_bytes() for n in os.listdir(folder)
                      if n.startswith(".") and (folder / n).is_file()}
            rel = folder.relative_to(m.path)
        check_files(run, pairs, data, "warm fill")
        del data
        native = native_root / folder.name  # the same names and bytes, on the local disk
        native.mkdir()
        for path, inst in pairs:
            shutil.copyfile(inst.path, native / path.name)
        for n, content in extras.items():
            (native / n).write_bytes(content)
        native_files = [native / p.name for p, _ in pairs]
        for rep in range(run.repeat):
            problem = drop_caches()  # unmounted: drop, remount, copy
            with run.mount(emu, cache, f"warm remount {rep + 1}", name) as m:
                src = m.path / rel
                files = [src / p.name for p, _ in pairs]
                dest = run.fresh(f"warm-cp-{rep}")
                before = emu.traffic()
                cp_m.append(cp_r(src, dest / "copy"))
                cp_calls.append((emu.traffic() - before).api_calls())
                check_paths(run, [(dest / "copy" / p.name, inst) for p, inst in pairs], "cp -r from the mount")
                for n, content in extras.items():
                    if (dest / "copy" / n).read_bytes() != content:
                        raise BenchError(f"WRONG BYTES: {n} copied from the mount differs from what was read before")
                shutil.rmtree(dest)
                read_discard(files, buf)  # every page in the kernel's cache (cp read them too)
                seconds, got = timed(lambda: read_discard(files, buf))  # noqa: B023 - called at once
                hot_m.append(seconds)
                check_paths(run, list(zip(files, (i for _, i in pairs))), "re-read on the same mount")
                open_m.extend(open_close_ms(files))
            problem = problem or drop_caches()
            dest = run.fresh(f"warm-native-cp-{rep}")
            cp_n.append(cp_r(native, dest / "copy"))
            shutil.rmtree(dest)
            read_discard(native_files, buf)
            seconds, got_native = timed(lambda: read_discard(native_files, buf))
            hot_n.append(seconds)
            if got != got_native:
                raise BenchError(f"re-read: {got} bytes through the mount, {got_native} locally")
            open_n.extend(open_close_ms(native_files))
            if problem:
                problems.add(problem)
    total = sum(i.size for _, i in pairs)
    dropped = "; ".join(sorted(problems)) or "page cache dropped before each copy"
    run.add(name, "(a) cp -r after a remount", cp_m, "s", target=Target("<=", 2.0, "ratio", "<= 2x local"),
            baselines=cp_n, baseline_name="local cp -r", note=f"{len(pairs)} files, {human_bytes(total)} ({spec}); {dropped}")
    run.add(name, "(a) API calls during the cp", cp_calls, "n")
    run.add(name, "(b) re-read on the same mount, page cache warm", hot_m, "s",
            target=Target("<=", 1.3, "ratio", "<= 1.3x local"), baselines=hot_n, baseline_name="local re-read")
    run.add(name, "(c) open+close of a cached file, median", open_m, "ms",
            target=Target("<=", 0.3, "value", "<= 0.3 ms"), baselines=open_n, baseline_name="local")
    run.add(name, "(c) open+close of a cached file, p90", [percentile(open_m, 90)], "ms",
            baselines=[percentile(open_n, 90)], baseline_name="local",
            note="the target (0.3 ms) is checked on the median; p90 shown beside it")
    run.report(name)


# ------------------------------------------------------------------------------- 6. many readers
def scenario_readers(run: Run) -> None:
    name = "readers"
    spec, _, archive = run.archive("headers")
    n_readers, picks = run.args.readers, run.args.picks
    fetched, fetched_during, distinct_b, calls, distinct_n, slowest, median_open, wall, read_b, zips, most = (
        [] for _ in range(11))
    bare: list[float] = []
    with run.emulator("headers") as emu:
        emu.shape(latency=run.latency)
        session = bare_session()
        try:
            for inst in archive.instances[:5]:
                bare.append(fetch_whole(session, emu.url, inst)[2])
        finally:
            session.close()
        for rep in range(run.repeat):
            with run.mount(emu, run.fresh(f"readers-cache-{rep}"), f"readers {rep + 1}", name) as m:
                series = match_series(walk_series(m.path), archive)
                pairs = [pair for _, _, ps in series for pair in ps]
                paths = [str(p) for p, _ in pairs]
                before = emu.traffic()
                results, seconds = run_readers(paths, n_readers, picks, run.args.seed + rep)
                during = emu.traffic() - before
                settled, tail, quiet = emu.wait_quiet()
                after = settled - before
            seen: dict[int, int] = {}
            opens = []
            total_read = 0
            for index, digest, nbytes, t_open, _ in results:
                path, inst = pairs[index]
                check_digest(digest, run.digests.of(inst), f"reader's {path.name}")
                seen[index] = nbytes
                opens.append(t_open)
                total_read += nbytes
            touched = {pairs[i][1].series_uid for i in seen}
            in_touched = sum(len(archive.instances_of(s)) for s in touched)
            fetched.append(after.image_bytes())
            fetched_during.append(during.image_bytes())
            distinct_b.append(sum(seen.values()))
            calls.append(after.calls["getSingleImage"])
            most.append(after.most_fetches_of_one_instance())
            zips.append(after.calls["getImage"] + after.calls["getImageWithMD5Hash"])
            distinct_n.append(len(seen))
            slowest.append(max(opens))
            median_open.append(median(opens))
            wall.append(seconds)
            read_b.append(total_read)
            run.note(name, f"run {rep + 1}: {len(results)} reads of {len(seen)} distinct files in {len(touched)} series "
                           f"({in_touched} instances there), {seconds:.2f} s; mount quiet {tail:.1f} s after the "
                           f"readers{'' if quiet else ' (never went quiet)'}; {after.describe()}")
    run.add(name, "image bytes fetched (until the mount went quiet)", fetched, "B",
            target=Target("<=", 1.2, "ratio", "<= 1.2x distinct read"), baselines=distinct_b,
            baseline_name="distinct read",
            note=f"{n_readers} processes x {picks} random picks over {len(archive.instances)} files in "
                 f"{len(archive.series)} series ({spec})")
    run.add(name, "image bytes fetched when the readers finished", fetched_during, "B", baselines=distinct_b,
            baseline_name="distinct read")
    run.add(name, "fetches of one instance, most (getSingleImage answers)", [max(most)], "n",
            target=Target("<=", 1.0, "value", "<= 1: one fetch per instance"),
            note="counted per SOPInstanceUID by the emulator, the largest of every run")
    run.add(name, "getSingleImage calls", calls, "n", baselines=distinct_n, baseline_name="distinct instances read",
            note=f"zip requests besides: {median(zips):g}; calls beyond the instances read are read-ahead, "
                 "counted in the bytes fetched")
    run.add(name, "slowest open", slowest, "s", baselines=bare, baseline_name="bare getSingleImage (median)")
    run.add(name, "median open", median_open, "s", baselines=bare, baseline_name="bare getSingleImage (median)")
    run.add(name, "bytes read (repeats included)", read_b, "B", baselines=distinct_b, baseline_name="distinct")
    run.add(name, "aggregate read rate", [b / s for b, s in zip(read_b, wall)], "B/s")
    run.report(name)


def run_readers(paths: Sequence[str], n: int, picks: int, seed: int) -> tuple[list[tuple[Any, ...]], float]:
    """``n`` reader processes started together; every read they made, and the seconds until the last ended."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=reader_worker, args=(i, list(paths), picks, seed, ready, start, results),
                         name=f"bench-reader-{i}") for i in range(n)]
    out: list[tuple[Any, ...]] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        t0 = time.perf_counter()
        start.set()
        errors = []
        for _ in procs:
            _, reads, error = results.get(timeout=1800)
            out.extend(reads)
            if error:
                errors.append(error)
        seconds = time.perf_counter() - t0
        if errors:
            raise BenchError(f"a reader failed: {errors[0]}")
        return out, seconds
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)


# ------------------------------------------------------------------------------- main
RUNNERS: dict[str, Callable[[Run], None]] = {
    "headers": scenario_headers, "cold": scenario_cold, "ttfb": scenario_ttfb, "big": scenario_big,
    "warm": scenario_warm, "readers": scenario_readers,
}


def summary(figures: Sequence[Figure]) -> None:
    judged = [(f, f.target) for f in figures if f.target is not None]
    print("\n== summary: the targets of issue 7 ==")
    width = max((len(f"{f.scenario}: {f.name}") for f, _ in judged), default=10)
    for f, target in judged:
        shown = f.cells()[1] if target.on == "value" else f.cells()[4]
        print(f"  {f.verdict:<7} {f'{f.scenario}: {f.name}':<{width}}  {shown:>10}  (target {target.text})")
    met = sum(f.verdict == "meets" for f, _ in judged)
    print(f"  {met} of {len(judged)} targets met")


def git_facts() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": "yes" if git("status", "--porcelain", "--untracked-files=no") else "no"}


def _glue_mount_args(argv: list[str]) -> list[str]:
    """``--mount-args "--no-prefetch"`` as ``--mount-args=--no-prefetch``: argparse takes a value that starts
    with a dash for another option otherwise."""
    out = []
    items = iter(argv)
    for item in items:
        if item == "--mount-args":
            out.append(f"--mount-args={next(items, '')}")
        else:
            out.append(item)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=None, metavar="NAME",
                        help=f"scenarios to run, of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--latency", type=float, default=0.04, help="emulator seconds per request (default 0.04)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each figure N times, print the median")
    parser.add_argument("--data-root", default=None,
                        help="where the archives are built once and reused (default: <tmp>/nbiafs-bench-speed)")
    parser.add_argument("--mount-args", default="", help='extra flags for every mount, e.g. "--workers 16"')
    parser.add_argument("--quick", action="store_true", help="small profiles: checks the script, not the mount")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--series", default=None, metavar="SPEC",
                        help="the series cold and warm read, as an emulator profile spec (default ct200: 200 x "
                             "525 KB), e.g. ct200:instances=600,rows=256 for 600 files of 131 KB")
    parser.add_argument("--shapes", default="abc", help="network shapes of the cold read (default abc)")
    parser.add_argument("--link", type=float, default=LINK_400MBPS * 8 / 1e6, metavar="MBPS",
                        help="the shared link of cold (b), in Mbit/s (default 400, the issue's)")
    parser.add_argument("--per-connection", type=float, default=CONN_100MBPS * 8 / 1e6, metavar="MBPS",
                        help="each connection's cap in cold (c), in Mbit/s (default 100, the issue's)")
    parser.add_argument("--ttfb-samples", type=int, default=None, help="instances timed by ttfb (default 7, quick 3)")
    parser.add_argument("--readers", type=int, default=8, help="reader processes of the readers scenario (default 8)")
    parser.add_argument("--picks", type=int, default=None, help="files each reader reads (default 40, quick 10)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the readers' picks")
    parser.add_argument("--keep", action="store_true", help="keep the run's work dir (caches, logs)")
    args = parser.parse_args(_glue_mount_args(list(sys.argv[1:] if argv is None else argv)))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not set(args.shapes) <= {"a", "b", "c"}:
        parser.error("--shapes takes letters of abc")
    args.ttfb_samples = args.ttfb_samples or (3 if args.quick else 7)
    args.picks = args.picks or (10 if args.quick else 40)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in SCENARIOS if args.only is None or s in args.only]
    data_root = Path(args.data_root) if args.data_root else Path(tempfile.gettempdir()) / "nbiafs-bench-speed"
    data_root.mkdir(parents=True, exist_ok=True)
    facts = git_facts()
    load = os.getloadavg()
    print(f"nbiafs speed benchmark (issue 7): {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
          f"{load[0]:.2f}, python {platform.python_version()}, code {facts['commit']} ({facts['branch']}"
          f"{', uncommitted changes' if facts['dirty'] == 'yes' else ''}); latency {args.latency:g} s, "
          f"repeat {args.repeat}{', QUICK profiles' if args.quick else ''}; mount args: {args.mount_args or '-'}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="nbiafs-bench-speed-run-"))
    logs = work / "logs"
    logs.mkdir()
    run = Run(args, work, logs, data_root, shlex.split(args.mount_args))
    started = time.monotonic()
    try:
        for scenario in chosen:
            print(f"\n-- {scenario} ...", flush=True)
            t0 = time.monotonic()
            RUNNERS[scenario](run)
            print(f"  ({scenario} took {time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"\nwork dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary(run.figures)
    print(f"  whole run: {time.monotonic() - started:.0f} s")
    if args.json:
        write_json(Path(args.json), {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": facts, "cpus": os.cpu_count(), "load": load,
            "python": platform.python_version(), "args": vars(args), "figures": [f.as_json() for f in run.figures],
            "details": dict(run.details)})
        print(f"  figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
