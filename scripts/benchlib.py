"""Pieces of ``scripts/bench_speed.py``: the emulator in its own process, mounts that always go away,
the mount process's memory, the figures table, and reading files with every byte checked.

Kept apart so the scenarios in ``bench_speed.py`` read as what they measure. Nothing here knows a
target of issue 7; it only knows how to start, stop, count, read and print.

Why the emulator runs in its own process (``python -m nbiafs emulator``, steered through its
``/emulator/...`` control endpoints): this process
also plays the baselines (the ``getImage`` zip extracted by ``NbiaClient``, bare ``getSingleImage``
requests) and reads through the mount. Sharing one interpreter lock with a busy server would slow
the baselines and the readers by an amount that depends on the server's load, not on the mount.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import math
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from nbiafs import daemon

CHUNK = 1 << 20                      # what the readers ask per read(), as `cat` and dcm2niix do
MOUNT_TIMEOUT = 150.0                # the CLI waits 60 s for a ready mount by default; this covers it
EXIT_WAIT = 30.0                     # after a lazy unmount, how long the mount process may take to exit
#: Endpoints whose bodies are instance bytes (anything else is metadata).
IMAGE_ENDPOINTS = ("getSingleImage", "getImage", "getImageWithMD5Hash")
#: Login traffic, reported apart from the API calls.
AUTH_ENDPOINTS = ("token", "logout")


class BenchError(SystemExit):
    """The benchmark cannot go on (wrong bytes, a mount that failed): stops the run with a message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench_speed: {message}")


# ------------------------------------------------------------------------------- emulator traffic
@dataclass(frozen=True)
class Traffic:
    """Calls and body bytes per endpoint, as the emulator counted them (a snapshot, or a difference)."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: getSingleImage answers per SOPInstanceUID
    instances: collections.Counter[str] = field(default_factory=collections.Counter)

    def __sub__(self, other: Traffic) -> Traffic:
        calls = collections.Counter(self.calls)
        calls.subtract(other.calls)
        sent = collections.Counter(self.bytes)
        sent.subtract(other.bytes)
        served = collections.Counter(self.instances)
        served.subtract(other.instances)
        return Traffic(+calls, +sent, +served)

    def most_fetches_of_one_instance(self) -> int:
        """The most getSingleImage answers any one instance got (1 when nothing was fetched twice)."""
        return max(self.instances.values(), default=0)

    def image_bytes(self) -> int:
        return sum(self.bytes[name] for name in IMAGE_ENDPOINTS)

    def api_calls(self) -> int:
        return sum(n for name, n in self.calls.items() if name not in AUTH_ENDPOINTS)

    def describe(self) -> str:
        """``getSingleImage=200 (105.1 MB), getSeries=1 (2 kB)``, logins last."""
        parts = []
        for name in sorted(self.calls, key=lambda k: (k in AUTH_ENDPOINTS, -self.bytes[k], k)):
            parts.append(f"{name}={self.calls[name]} ({human_bytes(self.bytes[name])})")
        return ", ".join(parts) or "no calls"


class EmulatorProcess:
    """``python -m nbiafs emulator`` on 127.0.0.1 (a free port) over an archive already built."""

    def __init__(self, data_dir: Path, profile: str, latency: float, log_file: Path) -> None:
        self.data_dir, self.profile, self.latency, self.log_file = data_dir, profile, latency, log_file
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # never a proxy between us and 127.0.0.1

    def __enter__(self) -> EmulatorProcess:
        argv = [sys.executable, "-m", "nbiafs", "emulator", "--data", str(self.data_dir), "--profile",
                self.profile, "--host", "127.0.0.1", "--port", "0", "--latency", str(self.latency),
                "--log-level", "WARNING"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            line = _read_line(self._proc, 120.0)
            prefix = "NBIA emulator serving "
            if not line.startswith(prefix):
                raise BenchError(f"the emulator did not start (said {line!r}; see {self.log_file})")
            self.url = line[len(prefix):].strip()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        self._session.close()
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def traffic(self) -> Traffic:
        reply = self._session.get(f"{self.url}/emulator/stats", params={"detail": "1"}, timeout=30)
        reply.raise_for_status()
        data = reply.json()
        return Traffic(collections.Counter(data.get("calls", {})), collections.Counter(data.get("bytes", {})),
                       collections.Counter(data.get("instances", {})))

    def shape(self, *, latency: float | None = None, per_connection: float | None = None,
              link: float | None = None) -> dict[str, Any]:
        """Set the shaping (rates in bytes/s, None = unlimited); returns what the emulator now applies."""
        body = {"latency": self.latency if latency is None else latency, "per_connection": per_connection,
                "link": link}
        reply = self._session.post(f"{self.url}/emulator/shaping", json=body, timeout=30)
        reply.raise_for_status()
        return dict(reply.json())

    def wait_quiet(self, quiet: float = 1.5, limit: float = 180.0, poll: float = 0.1) -> tuple[Traffic, float, bool]:
        """Wait until the emulator has served nothing for ``quiet`` seconds: the mount has stopped fetching.

        Time passing is what is measured here: the mount's own fetching after its reader stopped (it
        says nothing when its prefetch is done). Returns the traffic then, how many seconds after the
        call the last byte went out, and False when ``limit`` seconds passed without a quiet spell.
        """
        started = time.monotonic()
        last = self.traffic()
        changed = started
        while True:
            now = time.monotonic()
            if now - changed >= quiet:
                return last, changed - started, True
            if now - started >= limit:
                return last, changed - started, False
            time.sleep(poll)
            current = self.traffic()
            if current != last:
                last, changed = current, time.monotonic()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data.decode(errors="replace")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


# ------------------------------------------------------------------------------- mounts
@dataclass
class Mount:
    path: Path
    pid: int
    label: str
    log_file: Path
    peak_kib: int | None = None      # VmHWM just before the unmount
    store: dict[str, Any] = field(default_factory=dict)  # the mount's own counters, when it tells them

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)


@contextlib.contextmanager
def mounted(url: str, cache: Path, workdir: Path, log_dir: Path, label: str, args: Sequence[str]) -> Iterator[Mount]:
    """A background nbiafs mount through the CLI; always unmounted (lazily) and its process always gone."""
    mp = Path(tempfile.mkdtemp(prefix="mnt-", dir=workdir))
    log_file = log_dir / f"{slug(label)}.log"
    argv = [sys.executable, "-m", "nbiafs", "mount", str(mp), "--server", url, "--cache-dir", str(cache),
            "--log-file", str(log_file), "--log-level", "WARNING", *args]
    pids: list[int] = []
    mount: Mount | None = None
    try:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        finally:
            pids = daemon.mount_processes(mp)
        if done.returncode != 0:
            raise BenchError(f"mount failed ({done.returncode}): {done.stderr.strip()} ({' '.join(argv)})")
        if not pids:
            raise BenchError(f"mounted {mp} but found no mount process")
        mount = Mount(mp, pids[0], label, log_file)
        yield mount
    finally:
        if mount is not None:
            mount.peak_kib = proc_status(mount.pid).get("VmHWM")
            mount.store = mount_counters(mp)
        _unmount(mp, pids)
        try:
            mp.rmdir()
        except OSError as exc:
            print(f"  ! could not remove the mount point {mp}: {exc}", file=sys.stderr)


def _unmount(mp: Path, pids: Sequence[int]) -> None:
    if daemon.mount_entry(mp) is not None:
        for cmd in (["fusermount3", "-u", "-z", str(mp)], ["umount", "-l", str(mp)]):
            if shutil.which(cmd[0]) is None:
                continue
            subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
            if daemon.mount_entry(mp) is None:
                break
        else:
            print(f"  ! {mp} is still mounted", file=sys.stderr)
    for pid in pids:  # only the processes this run started
        if daemon.wait_for_exit(pid, EXIT_WAIT):
            continue
        print(f"  ! mount process {pid} still running {EXIT_WAIT:.0f} s after the unmount: SIGTERM", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not daemon.wait_for_exit(pid, 10.0):
            print(f"  ! mount process {pid} ignored SIGTERM: SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            daemon.wait_for_exit(pid, 10.0)


def mount_counters(mp: Path) -> dict[str, Any]:
    """The mount's own store counters (its control socket's ``stats``), or {} when it cannot say."""
    try:
        from nbiafs import control

        reply = control.request(daemon.control_socket_path(mp), {"op": "stats"}, timeout=10)
    except Exception:  # an optional extra: older or newer mounts may not answer
        return {}
    stats = reply.get("stats") if reply.get("ok") else None
    return dict(stats) if isinstance(stats, dict) else {}


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/status (VmRSS, VmHWM...), in KiB; {} once the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (NaN once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (``echo 5 > /proc/PID/clear_refs``); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS of a process every ``interval`` seconds in a thread, keeping the largest value."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
                self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def drop_caches() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; the reason when that is refused, else None."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"cannot drop the page cache: {exc.strerror or exc}"
    return None


# ------------------------------------------------------------------------------- the tree and the archive
def walk_series(root: Path) -> dict[Path, list[Path]]:
    """Every folder under ``root`` holding files (not dot-files): folder -> its files by name. Lists the tree."""
    found: dict[Path, list[Path]] = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(f for f in files if not f.startswith("."))
        if names:
            found[Path(top)] = [Path(top) / n for n in names]
    return found


def match_series(found: dict[Path, list[Path]], archive: Any) -> list[tuple[Path, Any, list[tuple[Path, Any]]]]:
    """Pair each mounted series folder with its archive series, and each file with its instance.

    A folder is the series whose UID it is named by or ends with (the Data Retriever's descriptive
    names end with the last five characters of the UID). Files are paired by SOP UID when named by it,
    else in name order with the instances in instance-number order (``1-001.dcm``...). The bytes
    checks then catch any pairing that is wrong, so a changed naming scheme stops the run loudly.
    """
    out = []
    for folder, files in sorted(found.items()):
        name = folder.name
        hits = [s for s in archive.series if name == s.uid or name.endswith("-" + s.uid[-5:]) or name == s.uid[-5:]]
        if len(hits) != 1:
            raise BenchError(f"cannot tell which series {folder} is ({len(hits)} candidates)")
        series = hits[0]
        instances = archive.instances_of(series.uid)
        by_uid = {i.sop_uid: i for i in instances}
        stems = [f.name.rsplit(".", 1)[0] for f in files]
        if all(s in by_uid for s in stems):
            pairs = [(f, by_uid[s]) for f, s in zip(files, stems)]
        elif len(files) == len(instances):
            pairs = list(zip(files, instances))
        else:
            raise BenchError(f"{folder}: {len(files)} files for {len(instances)} instances")
        out.append((folder, series, pairs))
    return out


class Digests:
    """sha256 of archive files, computed once per run."""

    def __init__(self) -> None:
        self._known: dict[Path, str] = {}

    def of(self, inst: Any) -> str:
        path = Path(inst.path)
        if path not in self._known:
            self._known[path] = sha256_file(path)
        return self._known[path]


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def check_digest(got: str, expected: str, what: str) -> None:
    if got != expected:
        raise BenchError(f"WRONG BYTES: {what} (sha256 {got[:16]}..., the archive's {expected[:16]}...)")


def check_slice(data: bytes, offset: int, inst: Any, what: str) -> None:
    """``data`` read at ``offset`` of a mounted file must equal the archive file's bytes there."""
    with open(inst.path, "rb") as fh:
        fh.seek(offset)
        want = fh.read(len(data))
    if hashlib.sha256(data).digest() != hashlib.sha256(want).digest():
        raise BenchError(f"WRONG BYTES: {what}, {len(data)} bytes at offset {offset} differ from the archive")


# ------------------------------------------------------------------------------- reading
def read_keep(path: Path | str) -> list[bytes]:
    """Read a file to its end in CHUNK reads, keeping the bytes (hashed later, outside the timing)."""
    chunks: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return chunks
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_discard(paths: Iterable[Path | str], buf: bytearray) -> int:
    """Read files to their ends in CHUNK reads into one reused buffer (no allocation, no hashing); bytes read."""
    total = 0
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return total


def digest_chunks(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


class RecordingFile(io.RawIOBase):
    """An unbuffered file that remembers every range it read (to check a partial read, e.g. a header)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with this object
        self.ranges: list[tuple[int, bytes]] = []
        self.name = str(path)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        offset = self._fh.tell()
        n = self._fh.readinto(b)
        if n:
            self.ranges.append((offset, bytes(memoryview(b)[:n])))
        return n or 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()

    def distinct_bytes(self) -> int:
        """How many distinct bytes of the file were read (ranges may overlap)."""
        spans = sorted((o, o + len(d)) for o, d in self.ranges)
        total, end = 0, -1
        for start, stop in spans:
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total


def reader_worker(index: int, paths: Sequence[str], picks: int, seed: int, ready: Any, start: Any,
                  results: Any) -> None:
    """One of the many-readers processes: ``picks`` random files (repeats allowed), each read whole.

    Reports per file: its index in ``paths``, sha256, length, open seconds, open-to-last-byte seconds.
    """
    try:
        rng = random.Random(seed * 7919 + index)
        order = [rng.randrange(len(paths)) for _ in range(picks)]
        ready.put(index)
        start.wait()
        out = []
        for i in order:
            t0 = time.perf_counter()
            fd = os.open(paths[i], os.O_RDONLY)
            t1 = time.perf_counter()
            h = hashlib.sha256()
            n = 0
            try:
                while True:
                    chunk = os.read(fd, CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
            finally:
                os.close(fd)
            out.append((i, h.hexdigest(), n, t1 - t0, time.perf_counter() - t0))
        results.put((index, out, None))
    except BaseException as exc:  # reported to the parent, which stops the run
        results.put((index, [], f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Target:
    """A target of issue 7: ``value`` (or ``value / baseline`` when ``on == "ratio"``) ``op`` ``limit``."""

    op: str        # "<=" or "<"
    limit: float
    on: str        # "ratio" or "value"
    text: str      # as printed: "<= 0.9x zip"

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x <= self.limit if self.op == "<=" else x < self.limit


@dataclass
class Figure:
    scenario: str
    name: str
    value: float
    unit: str                      # s, ms, B, MiB, B/s (shown as MB/s), n, %
    target: Target | None = None
    baseline: float | None = None
    baseline_name: str = ""
    percent: bool = False          # show the ratio as a percentage
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None:
            return None
        if self.baseline == 0:
            return math.inf if self.value else math.nan
        return self.value / self.baseline

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        met = self.target.met(self.value, self.ratio)
        return "?" if met is None else ("meets" if met else "misses")

    def cells(self) -> list[str]:
        ratio = self.ratio
        if ratio is None:
            ratio_text = "-"
        elif self.percent:
            ratio_text = f"{ratio * 100:.1f} %"
        else:
            ratio_text = f"{ratio:.2f}x"
        base = "-" if self.baseline is None else f"{fmt(self.baseline, self.unit)} {self.baseline_name}".strip()
        return [self.name, fmt(self.value, self.unit), self.target.text if self.target else "-", base, ratio_text,
                self.verdict]

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = asdict(self.target) if self.target else None
        out["ratio"] = self.ratio
        out["verdict"] = self.verdict
        return out


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "B":
        return human_bytes(value)
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "B/s":
        return f"{value / 1e6:.1f} MB/s"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "n":
        return f"{value:g}"
    return f"{value:g} {unit}"


def human_bytes(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} B"


HEADER = ["figure", "measured", "target", "baseline (same run)", "ratio", "verdict"]


def table(figures: Sequence[Figure]) -> str:
    rows = [HEADER] + [f.cells() for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  " + " | ".join(cell.ljust(w) if i in (0, 2, 5) else cell.rjust(w)
                                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "x"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
