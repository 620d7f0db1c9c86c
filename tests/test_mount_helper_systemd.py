"""The shipped systemd unit, docs/deploy/nbiafs@.service, as far as it can be checked without a running
systemd: its syntax (``systemd-analyze verify``), and the very command lines it runs, with its
specifiers filled in: ExecStart serves in the foreground and ends cleanly on SIGTERM (systemd's stop
signal) or on ExecStop; after a crash ExecStartPre clears the dead mount and ExecStart mounts again.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, TEST_ENV, ls, require_fuse, require_tool, teardown_mount, wait_until

from nbiafs import daemon

UNIT = REPO / "docs" / "deploy" / "nbiafs@.service"
INSTALLED = "/usr/local/bin/nbiafs"


@pytest.fixture
def emu(make_emulator: Callable[..., Any]) -> Any:
    """An emulator of the test's own: these tests download, and the session's emulator is left to tests
    that count its downloads."""
    return make_emulator()


def unit_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting of the unit, in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


class Unit:
    """The unit's settings with ``%f``/``%i`` and the install paths bound to a test mount point."""

    def __init__(self, mountpoint: Path, etc: Path) -> None:
        self.mountpoint = mountpoint
        self.instance = subprocess.run(["systemd-escape", "--path", str(mountpoint)], capture_output=True,
                                       text=True, check=True).stdout.strip()
        self.etc = etc
        self.settings = unit_lines(UNIT.read_text())

    def expand(self, value: str) -> str:
        value = value.replace("%f", str(self.mountpoint)).replace("%i", self.instance)
        value = value.replace("/etc/nbiafs/", f"{self.etc}/")
        return value.replace(INSTALLED, str(Path(sys.executable).parent / "nbiafs"))

    def values(self, key: str) -> list[str]:
        return [self.expand(v) for k, v in self.settings if k == key]

    def command(self, key: str) -> tuple[list[str], bool]:
        """The command line of ``key`` and whether its failure is ignored (a leading ``-``)."""
        (value,) = self.values(key)
        ignore = value.startswith("-")
        return shlex.split(value.lstrip("-")), ignore

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **TEST_ENV}
        for assignment in self.values("Environment"):
            name, _, value = assignment.partition("=")
            env[name] = value
        for path in self.values("EnvironmentFile"):
            file = Path(path.lstrip("-"))
            if file.exists():
                for line in file.read_text().splitlines():
                    if "=" in line and not line.startswith("#"):
                        name, _, value = line.partition("=")
                        env[name.strip()] = value.strip()
        return env


def test_the_unit_is_what_the_issue_asks_for() -> None:
    settings = dict(unit_lines(UNIT.read_text()))
    assert settings["Restart"] == "on-failure"
    assert settings["ExecStart"].endswith("nbiafs mount %f --foreground")
    assert settings["ExecStop"].endswith("nbiafs unmount %f")
    assert "network-online.target" in settings["After"] and "network-online.target" in settings["Wants"]
    assert settings["Environment"] == "NBIAFS_CONFIG=/etc/nbiafs/%i.toml"
    for key in ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateMounts"):  # would hide the mount
        assert key not in settings


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    require_tool("systemd-analyze", "systemd")
    units = tmp_path / "units"
    units.mkdir()
    text = UNIT.read_text().replace(INSTALLED, str(Path(sys.executable).parent / "nbiafs"))
    (units / UNIT.name).write_text(text)
    instance = units / "nbiafs@mnt-tcia.service"  # a template is verified through an instance
    instance.symlink_to(UNIT.name)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr
    broken = units / "nbiafs@.service"  # and it does complain when a key is wrong
    broken.write_text(text.replace("Restart=on-failure", "Restart=on-failur"))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True,
                          timeout=60)
    assert "on-failur" in done.stderr


@pytest.fixture
def unit(emu, tmp_path: Path) -> Iterator[Unit]:
    require_fuse()
    require_tool("systemd-escape", "systemd")
    mp = tmp_path / "mnt"
    mp.mkdir()
    etc = tmp_path / "etc-nbiafs"
    etc.mkdir()
    u = Unit(mp, etc)
    (etc / f"{u.instance}.toml").write_text(
        f'server = "{emu.url}"\ncache-dir = "{tmp_path / "cache"}"\nlog-level = "INFO"\n')
    (etc / f"{u.instance}.env").write_text("NBIAFS_CACHE_SIZE=2G\n")
    yield u
    teardown_mount(mp, daemon.mount_processes(mp))


def start(unit: Unit) -> subprocess.Popen[str]:
    """ExecStart as systemd runs it (Type=simple: the process is the service); back once it serves."""
    command, _ = unit.command("ExecStart")
    proc = subprocess.Popen(command, env=unit.environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ready = wait_until(lambda: proc.poll() is not None or bool(daemon.mount_processes(unit.mountpoint)), 60)
    if proc.poll() is not None or not ready:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"ExecStart did not mount: {out}")
    assert daemon.mount_processes(unit.mountpoint) == [proc.pid]  # the foreground process serves the mount
    return proc


def read_something(mp: Path) -> None:
    path = mp / "Demo-Head-MR"
    for _ in range(4):
        path = path / ls(path)[0]
    assert path.read_bytes()[128:132] == b"DICM"


def stopped(unit: Unit, proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the mount process; it must have unmounted and removed its run record. (code, output)"""
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the mount process did not stop")
    out = proc.stdout.read() if proc.stdout else ""
    assert daemon.mount_entry(unit.mountpoint) is None, out
    assert daemon.mount_processes(unit.mountpoint) == [] and not daemon._record_path(unit.mountpoint).exists()
    return code, out


def test_execstart_serves_in_the_foreground_and_sigterm_unmounts(unit: Unit) -> None:
    proc = start(unit)
    read_something(unit.mountpoint)
    assert (unit.mountpoint / "Demo-Chest-CT").is_dir()
    proc.send_signal(signal.SIGTERM)  # systemd's KillSignal, if anything is left after ExecStop
    stopped(unit, proc)


def test_a_sigterm_stop_exits_with_success(unit: Unit) -> None:
    proc = start(unit)
    proc.send_signal(signal.SIGTERM)
    code, out = stopped(unit, proc)
    assert code == 0, out


def test_execstop_unmounts_and_the_process_ends(unit: Unit) -> None:
    proc = start(unit)
    read_something(unit.mountpoint)
    command, _ = unit.command("ExecStop")
    done = subprocess.run(command, env=unit.environment(), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    code, out = stopped(unit, proc)
    assert code == 0, out


def test_after_a_crash_execstartpre_clears_the_dead_mount_and_execstart_mounts_again(unit: Unit) -> None:
    proc = start(unit)
    proc.kill()  # SIGKILL: a crash; the kernel keeps a dead mount ("Transport endpoint is not connected")
    proc.wait(timeout=30)
    assert daemon.mount_entry(unit.mountpoint) is not None
    command, ignore_failure = unit.command("ExecStartPre")
    assert ignore_failure  # on a first start there is nothing to clean up: its failure is ignored
    done = subprocess.run(command, env=unit.environment(), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert daemon.mount_entry(unit.mountpoint) is None
    proc = start(unit)  # what Restart=on-failure does next
    read_something(unit.mountpoint)
    command, _ = unit.command("ExecStop")
    assert subprocess.run(command, env=unit.environment(), capture_output=True, timeout=90).returncode == 0
    assert stopped(unit, proc)[0] == 0
    assert shutil.which("systemd-escape")
