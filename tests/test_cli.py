"""The mount / unmount / demo commands as a user runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ls, nbiafs_cli, require_fuse, teardown_mount

from nbiafs import daemon


def test_mount_returns_when_ready_and_unmount_stops_the_process(emulator, tmp_path: Path) -> None:
    require_fuse()
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"))
    pids = daemon.mount_processes(mp)
    try:
        assert done.returncode == 0, done.stderr
        # ready means usable right now: no waiting, no retry
        assert "Demo-Chest-CT" in ls(mp)
        assert len(pids) == 1
        again = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"))
        assert again.returncode == 1 and "already" in again.stderr
        off = nbiafs_cli("unmount", str(mp))
        assert off.returncode == 0, off.stderr
        assert daemon.mount_entry(mp) is None
        assert daemon.wait_for_exit(pids[0], 0)  # unmount returned after the process exited
        not_mounted = nbiafs_cli("unmount", str(mp))
        assert not_mounted.returncode == 1 and "not mounted" in not_mounted.stderr
    finally:
        teardown_mount(mp, pids)


def test_lazy_unmount_of_a_busy_mount(emulator, tmp_path: Path) -> None:
    require_fuse()
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"))
    pids = daemon.mount_processes(mp)
    try:
        assert done.returncode == 0, done.stderr
        fd = os.open(mp / "Demo-Chest-CT", os.O_RDONLY)  # keeps the mount busy
        try:
            busy = nbiafs_cli("unmount", str(mp))
            assert busy.returncode == 1 and "busy" in busy.stderr
            lazy = nbiafs_cli("unmount", "--lazy", str(mp))
            assert lazy.returncode == 0, lazy.stderr
            assert daemon.mount_entry(mp) is None
        finally:
            os.close(fd)
        assert all(daemon.wait_for_exit(pid, 30) for pid in pids)
    finally:
        teardown_mount(mp, pids)


@pytest.mark.parametrize(("args", "message"), [
    (["--server", "ftp://nowhere"], "unknown server"),
    (["--cache-size", "lots"], "bad size"),
    (["--server", "http://127.0.0.1:9"], "127.0.0.1:9"),
])
def test_bad_settings_fail_with_one_clear_line_and_mount_nothing(tmp_path: Path, args, message) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--cache-dir", str(tmp_path / "c"), *args,
                      env={"NBIAFS_DEADLINE": "3", "NBIAFS_CONNECT_TIMEOUT": "1"})
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert daemon.mount_entry(mp) is None and daemon.mount_processes(mp) == []


def test_missing_or_file_mountpoint_is_a_clear_error(tmp_path: Path, emulator) -> None:
    (tmp_path / "file").write_text("x")
    for target, message in ((tmp_path / "absent", "does not exist"), (tmp_path / "file", "not a directory")):
        done = nbiafs_cli("mount", str(target), "--server", emulator.url)
        assert done.returncode == 1 and message in done.stderr, done.stderr


def test_demo_mounts_the_sample_archive_and_prints_its_guide(tmp_path: Path) -> None:
    require_fuse()
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache")}
    mp = tmp_path / "demo"
    mp.mkdir()
    done = nbiafs_cli("demo", str(mp), env=env, timeout=180)
    pids = daemon.mount_processes(mp)
    try:
        assert done.returncode == 0, done.stderr
        assert "Demo-Chest-CT" in done.stdout and "pydicom" in done.stdout and "nbiafs unmount" in done.stdout
        assert "ls -l" in done.stdout and "1-001.dcm" in done.stdout
        assert (home / "data" / "nbiafs" / "demo-archive").is_dir()
        assert (home / "cache" / "nbiafs" / "demo").is_dir()
        import pydicom

        series = mp / "Demo-Head-MR" / "DHM-0002"
        series = series / ls(series)[0]
        series = series / ls(series)[0]
        assert pydicom.dcmread(series / "1-001.dcm").Modality == "MR"
        off = nbiafs_cli("unmount", str(mp), env=env)
        assert off.returncode == 0, off.stderr
        assert all(daemon.wait_for_exit(pid, 0) for pid in pids)  # the emulator went with it
    finally:
        teardown_mount(mp, pids)
