"""Shared fixtures: the sample archive, emulators, and real nbiafs mounts started with the CLI.

Mounts go through ``python -m nbiafs mount`` in background mode (the daemon path) and are always torn
down with a lazy unmount plus a bounded wait for the mount process to exit (killed if it does not),
even when the test failed. Without /dev/fuse or fusermount3 the FUSE tests are skipped, except on CI
(``CI=true``) where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nbiafs import daemon

REPO = Path(__file__).resolve().parents[1]
#: Short client timeouts for the mounts under test: errors must surface within seconds.
TEST_ENV = {
    "NBIAFS_DEADLINE": "20",
    "NBIAFS_RETRIES": "3",
    "NBIAFS_BACKOFF": "0.05",
    "NBIAFS_CONNECT_TIMEOUT": "3",
    "NBIAFS_READ_TIMEOUT": "15",
    "NBIAFS_READY_TIMEOUT": "60",
}
CLI_TIMEOUT = 90


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (for state only visible by asking)."""
    import threading
    import time

    end = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() >= end:
            return condition()
        tick.wait(interval)
    return True


def ls(path: str | os.PathLike[str]) -> list[str]:
    """The visible entries of a folder, sorted: what DICOM readers see (dot-files are nbiafs's metadata)."""
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def visible_walk(root: str | os.PathLike[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk without the dot-files and dot-folders (nbiafs's metadata beside the images)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))


def first_series(root: Path, collection: str = "Demo-Chest-CT") -> Path:
    """The first series folder (by name) of the first patient and study of ``collection``."""
    path = root / collection
    for _ in range(3):
        path = path / ls(path)[0]
    return path


def series_of_count(root: Path, collection: str, patient: str, count: int) -> Path:
    """The first series folder of ``patient`` that holds exactly ``count`` files."""
    patient_dir = root / collection / patient
    for study in ls(patient_dir):
        for series in ls(patient_dir / study):
            if len(ls(patient_dir / study / series)) == count:
                return patient_dir / study / series
    raise AssertionError(f"no series of {count} files under {patient_dir}")


def on_ci() -> bool:
    """True under CI (CI=true), where a missing prerequisite is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(message: str) -> None:
    if on_ci():
        pytest.fail(message + " (CI=true: a missing prerequisite is a failure, not a skip)")
    pytest.skip(message)


def require_fuse() -> None:
    missing = [what for what, ok in (("/dev/fuse", os.path.exists("/dev/fuse")),
                                     ("fusermount3", shutil.which("fusermount3") is not None)) if not ok]
    if missing:
        _missing(f"FUSE is not usable here: missing {', '.join(missing)}")


def require_tool(tool: str, package: str) -> None:
    """Skip (fail on CI) when the program ``tool`` (from apt package ``package``) is not installed."""
    if shutil.which(tool) is None:
        _missing(f"{tool} is not installed (apt install {package})")


def nbiafs_cli(*args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nbiafs ARGS`` and return the finished process (text output)."""
    full_env = {**os.environ, **TEST_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL if input is None else None, input=input)


@dataclass
class Mount:
    """A live mount made by the ``mounter`` fixture."""

    path: Path
    cache_dir: Path
    server: str
    args: list[str]
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)

    def unmount(self) -> None:
        done = nbiafs_cli("unmount", str(self.path))
        assert done.returncode == 0, done.stderr
        for pid in self.pids:
            assert daemon.wait_for_exit(pid, 30), f"mount process {pid} did not exit"

    @property
    def mounted(self) -> bool:
        return daemon.mount_entry(self.path) is not None


def teardown_mount(path: Path, pids: list[int]) -> None:
    """Lazy unmount and wait for the processes; kill them if they linger. Never raises."""
    if daemon.mount_entry(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)
    for pid in pids + daemon.mount_processes(path):
        if not daemon.wait_for_exit(pid, 20):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            daemon.wait_for_exit(pid, 10)


@pytest.fixture(scope="session")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nbiafs.emulator import ensure_archive

    path = tmp_path_factory.mktemp("archive")
    ensure_archive(path)
    return path


@pytest.fixture(scope="session")
def archive(archive_dir: Path):
    from nbiafs.emulator import ensure_archive

    return ensure_archive(archive_dir)


@pytest.fixture(scope="session")
def emulator(archive_dir: Path) -> Iterator[object]:
    """One emulator for the session (tests reset its stats and faults as they need)."""
    from nbiafs.emulator import Emulator

    emu = Emulator(archive_dir, port=0)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def make_emulator(archive_dir: Path) -> Iterator[Callable[..., object]]:
    """A factory of dedicated emulators (token lifetime, latency...), stopped after the test."""
    from nbiafs.emulator import Emulator

    started: list[object] = []

    def make(**kwargs: object) -> object:
        emu = Emulator(archive_dir, port=0, **kwargs)
        emu.start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """A factory of real mounts: ``mounter(emu, user=..., layout=..., offline=..., cache_dir=...)``."""
    require_fuse()
    made: list[Mount] = []
    counter = iter(range(1000))

    def mount(emu: object | None = None, *, server: str | None = None, user: str | None = None,
              password: str | None = None, layout: str | None = None, offline: bool = False,
              cache_dir: Path | None = None, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Mount:
        n = next(counter)
        path = tmp_path / f"mnt{n}"
        path.mkdir()
        cache = cache_dir or tmp_path / f"cache{n}"
        url = server or str(emu.url)  # type: ignore[union-attr]
        log_file = tmp_path / f"mnt{n}.log"
        args = ["mount", str(path), "--server", url, "--cache-dir", str(cache),
                "--log-file", str(log_file), "--log-level", "INFO", *extra]
        if user:
            args += ["--user", user]
        if layout:
            args += ["--layout", layout]
        if offline:
            args.append("--offline")
        run_env = dict(env or {})
        if password is not None:
            run_env["NBIA_PASSWORD"] = password
        done = nbiafs_cli(*args, env=run_env)
        assert done.returncode == 0, f"mount failed: {done.stderr}"
        assert daemon.mount_entry(path) is not None, "mount returned before the mount was there"
        m = Mount(path, cache, url, args, run_env, pids=daemon.mount_processes(path))
        assert m.pids, "no mount process found"
        made.append(m)
        return m

    yield mount
    for m in made:
        teardown_mount(m.path, m.pids)
