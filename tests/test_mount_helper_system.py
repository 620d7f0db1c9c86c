"""mount(8) and umount(8) with the nbiafs helper: an fstab-style line mounted with ``mount -T FSTAB MP``,
``mount -t fuse.nbiafs -o ...`` and ``mount -t nbiafs``, files listed and read, ``umount`` ending the
mount process and its run record.

mount(8) finds helpers only in /sbin (and /sbin/fs.d, /sbin/fs), so these tests link the venv's
console scripts there for their duration (as root) and always remove the links; a helper already
installed there is never touched. Without root or a writable /sbin they skip, and on CI they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV, _missing, ls, require_fuse, require_tool, teardown_mount

from nbiafs import daemon

SBIN = Path("/sbin")
HELPERS = ("mount.fuse.nbiafs", "mount.nbiafs")


@pytest.fixture
def emu(make_emulator: Callable[..., Any]) -> Any:
    """An emulator of the test's own: these tests download, and the session's emulator is left to tests
    that count its downloads."""
    return make_emulator()


def _script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing: reinstall nbiafs (pip install -e .) to create its console scripts")
    return path


@pytest.fixture
def helpers_in_sbin() -> Iterator[None]:
    """/sbin/mount.fuse.nbiafs and /sbin/mount.nbiafs -> this venv's scripts, removed afterwards."""
    require_fuse()
    require_tool("mount", "mount")
    require_tool("umount", "mount")
    if os.geteuid() != 0:
        _missing("mount(8) runs helpers from /sbin: linking them there needs root")
    taken = [name for name in HELPERS if os.path.lexists(SBIN / name)]
    if taken:
        _missing(f"{SBIN / taken[0]} exists already (an installed nbiafs?): not replacing it for a test")
    made: list[Path] = []
    try:
        for name in HELPERS:
            link = SBIN / name
            try:
                link.symlink_to(_script(name))
            except OSError as exc:
                _missing(f"cannot create {link} ({exc.strerror}): mount(8) finds helpers only in /sbin")
            made.append(link)
        yield
    finally:
        for link in made:
            link.unlink(missing_ok=True)
    assert not any(os.path.lexists(SBIN / name) for name in HELPERS)


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment mount(8) passes on to the helper: test timeouts, no user config file."""
    return {**os.environ, **TEST_ENV, "NBIAFS_CONFIG": str(tmp_path / "no-config.toml")}


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield mp
    teardown_mount(mp, daemon.mount_processes(mp))


def umount_and_check(mp: Path, env: dict[str, str]) -> None:
    """``umount MP`` ends the mount process, which removes its run record."""
    pids = daemon.mount_processes(mp)
    assert pids, "no run record for the mount"
    record = daemon._record_path(mp)
    assert record.exists()
    done = run(["umount", str(mp)], env)
    assert done.returncode == 0, done.stderr
    assert daemon.mount_entry(mp) is None
    assert all(daemon.wait_for_exit(pid, 30) for pid in pids), "the mount process outlived umount"
    assert not record.exists() and daemon.mount_processes(mp) == []


def test_an_fstab_line_mounts_with_mount_and_unmounts_with_umount(helpers_in_sbin, emu, archive, env,
                                                                   mountpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# an fstab of its own: mount -T reads it instead of /etc/fstab\n"
        f"{emu.url}  {mountpoint}  fuse.nbiafs  "
        f"nofail,_netdev,noauto,x-systemd.automount,cache_dir={cache},cache_size=1G,"
        f"log_file={tmp_path / 'mount.log'},log_level=INFO  0  0\n")
    done = run(["mount", "-T", str(fstab), str(mountpoint)], env)
    assert done.returncode == 0, done.stderr
    entry = daemon.mount_entry(mountpoint)
    assert entry is not None and daemon.is_nbiafs_mount(entry)  # mounted when mount(8) returned
    assert ls(mountpoint) == sorted(c.name for c in archive.public_collections())
    series = mountpoint / "Demo-Head-MR"
    for _ in range(3):
        series = series / ls(series)[0]
    files = ls(series)
    sizes = sorted(i.size for i in archive.instances if i.series_uid.endswith(series.name[-5:]))
    assert sorted((series / f).stat().st_size for f in files) == sizes
    data = (series / files[0]).read_bytes()
    assert len(data) == (series / files[0]).stat().st_size and data[128:132] == b"DICM"
    assert (cache / "objects").is_dir()  # the option reached the mount process
    umount_and_check(mountpoint, env)


def test_mount_t_fuse_nbiafs_with_options(helpers_in_sbin, emu, archive, env, mountpoint: Path,
                                           tmp_path: Path) -> None:
    done = run(["mount", "-t", "fuse.nbiafs", "-o", f"ro,nosuid,nodev,allow_other,layout=uid,umask=077,"
                f"cache_dir={tmp_path / 'cache'}", emu.url, str(mountpoint)], env)
    assert done.returncode == 0, done.stderr
    coll = archive.public_collections()[0]
    study = archive.studies_of(coll.name)[0]
    assert study.uid in os.listdir(mountpoint / coll.name / study.patient_id)
    assert (mountpoint / coll.name).stat().st_mode & 0o777 == 0o500  # umask=077 reached the mount
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        line = next(x for x in fh if f" {mountpoint} " in x)
    assert "allow_other" in line and " fuse.nbiafs " in line
    umount_and_check(mountpoint, env)


def test_mount_t_nbiafs_with_the_configured_server(helpers_in_sbin, emu, env, mountpoint: Path,
                                                    tmp_path: Path) -> None:
    config = tmp_path / "tcia.toml"
    config.write_text(f'server = "{emu.url}"\ncache-dir = "{tmp_path / "cache"}"\n')
    done = run(["mount", "-t", "nbiafs", "-o", f"config={config}", "nbiafs", str(mountpoint)], env)
    assert done.returncode == 0, done.stderr
    assert "Demo-Chest-CT" in os.listdir(mountpoint)  # the server came from the config file
    umount_and_check(mountpoint, env)


def test_a_bad_option_mounts_nothing_and_says_why(helpers_in_sbin, env, mountpoint: Path) -> None:
    done = run(["mount", "-t", "fuse.nbiafs", "-o", "cache_sise=1G", "public", str(mountpoint)], env)
    assert done.returncode != 0
    assert "unknown mount option cache_sise=1G" in done.stderr
    assert daemon.mount_entry(mountpoint) is None


def test_a_dead_server_mounts_nothing(helpers_in_sbin, env, mountpoint: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run(["mount", "-t", "fuse.nbiafs", "-o", "retries=0,deadline=5", f"http://127.0.0.1:{port}",
                str(mountpoint)], env)
    assert done.returncode != 0 and "cannot use http://127.0.0.1" in done.stderr
    assert daemon.mount_entry(mountpoint) is None and shutil.which("mount")
