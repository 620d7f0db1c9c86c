"""Through a real mount: read-only errors, accounts, server faults, a dead server, token lifetimes."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import first_series, ls, nbiafs_cli, visible_walk

from nbiafs import daemon
from nbiafs.emulator import TEST_PASSWORD, TEST_USER

pytestmark = pytest.mark.fuse


def truth(archive, path: Path, mount_root: Path) -> bytes:
    """The archive's bytes for a mounted descriptive-layout file (by series UID tail and position)."""
    series_dir, name = path.parent.name, path.name
    coll = path.relative_to(mount_root).parts[0]
    for study in archive.studies_of(coll):
        for series in archive.series_of_study(study.uid):
            if series_dir.endswith(series.uid[-5:]):
                inst = sorted(archive.instances_of(series.uid), key=lambda i: i.instance_number)
                return inst[int(name.split("-")[1].split(".")[0]) - 1].path.read_bytes()
    raise AssertionError(f"no series for {path}")


def test_every_kind_of_write_is_erofs_and_changes_nothing(emulator, mounter) -> None:
    m = mounter(emulator)
    series = first_series(m.path)
    file = series / ls(series)[0]
    actions = {
        "create": lambda: open(series / "new.dcm", "wb"),
        "mkdir": lambda: os.mkdir(m.path / "new"),
        "unlink": lambda: os.unlink(file),
        "rmdir": lambda: os.rmdir(series),
        "rename": lambda: os.rename(file, series / "renamed.dcm"),
        "truncate": lambda: os.truncate(file, 0),
        "write": lambda: open(file, "r+b"),
    }
    size = file.stat().st_size
    for operation, action in actions.items():
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS, operation
    assert file.stat().st_size == size and not (series / "new.dcm").exists()


def test_restricted_collection_only_for_the_account_that_may_see_it(emulator, archive, mounter) -> None:
    guest = mounter(emulator)
    assert "Restricted-Demo" not in ls(guest.path)
    with pytest.raises(FileNotFoundError):
        os.stat(guest.path / "Restricted-Demo")
    member = mounter(emulator, user=TEST_USER, password=TEST_PASSWORD)
    assert "Restricted-Demo" in ls(member.path)
    series = first_series(member.path, "Restricted-Demo")
    file = series / ls(series)[0]
    assert file.read_bytes() == truth(archive, file, member.path)


def test_a_collection_the_account_may_not_read_is_eacces(emulator, mounter) -> None:
    m = mounter(emulator)
    ls(m.path)
    emulator.inject_fault("getPatient", status=403, count=50)
    try:
        with pytest.raises(PermissionError):
            ls(m.path / "Demo-Head-MR")
    finally:
        emulator.clear_faults()


def test_server_500s_on_download_are_eio_after_bounded_retries_never_short_data(emulator, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch",), env={"NBIAFS_DEADLINE": "6", "NBIAFS_RETRIES": "2"})
    series = first_series(m.path)
    file = series / ls(series)[0]
    emulator.reset_stats()
    emulator.inject_fault("getSingleImage", status=500, count=100)
    started = time.monotonic()
    try:
        with pytest.raises(OSError) as e:
            file.read_bytes()
    finally:
        emulator.clear_faults()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - started < 15
    assert 2 <= emulator.stats()["getSingleImage"] <= 3  # first try + bounded retries
    # the error was not cached: the file reads whole once the server is healthy again
    assert len(file.read_bytes()) == file.stat().st_size


def test_transient_500s_and_truncated_bodies_are_retried_to_the_right_bytes(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch",))
    series = first_series(m.path)
    names = ls(series)
    emulator.inject_fault("getSingleImage", status=500, count=1)
    assert (series / names[0]).read_bytes() == truth(archive, series / names[0], m.path)
    emulator.inject_fault("getSingleImage", truncate=True, count=1)
    try:
        data = (series / names[1]).read_bytes()
    except OSError as exc:  # acceptable: an error, never short bytes
        assert exc.errno == errno.EIO
    else:
        assert data == truth(archive, series / names[1], m.path)
    emulator.inject_fault("getSingleImage", truncate=True, count=100)
    try:
        with pytest.raises(OSError) as e:
            (series / names[2]).read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        emulator.clear_faults()


def test_dead_server_gives_eio_quickly_and_cached_files_still_read(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--no-prefetch",), env={"NBIAFS_DEADLINE": "4", "NBIAFS_CONNECT_TIMEOUT": "1"})
    series = first_series(m.path)
    names = ls(series)
    cached = (series / names[0]).read_bytes()
    emu.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as e:
        (series / names[1]).read_bytes()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - started < 12
    assert (series / names[0]).read_bytes() == cached
    assert os.stat(series / names[1]).st_size > 0  # listed metadata stays available


def test_reads_keep_working_across_several_token_lifetimes(make_emulator, archive, mounter) -> None:
    emu = make_emulator(token_ttl=3)
    m = mounter(emu, extra=("--no-prefetch", "--api", "v2"))
    series = first_series(m.path)
    names = ls(series)
    pause = threading.Event()
    started = time.monotonic()
    read = 0
    for name in names:  # spread the reads over about three token lifetimes
        assert (series / name).read_bytes() == truth(archive, series / name, m.path)
        read += 1
        if time.monotonic() - started > 9:
            break
        pause.wait(9 / len(names))
    assert time.monotonic() - started > 6 and read >= 2
    assert emu.stats()["token"] >= 3  # the refresher renewed the token along the way


def test_tokens_expired_mid_walk_keep_the_walk_working(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--no-prefetch", "--api", "v2"))
    colls = ls(m.path)
    ls(m.path / colls[0])
    emu.expire_tokens()
    count = 0
    for dirpath, _, files in visible_walk(m.path / colls[1]):
        for name in files:
            p = Path(dirpath, name)
            assert p.read_bytes() == truth(archive, p, m.path)
            count += 1
    assert count > 0
    emu.expire_tokens()
    assert len(ls(m.path / colls[2])) > 0


def test_wrong_password_fails_clearly_and_mounts_nothing(emulator, tmp_path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--user", TEST_USER,
                      "--cache-dir", str(tmp_path / "c"), env={"NBIA_PASSWORD": "wrong"})
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nbiafs:") and TEST_USER in lines[0], done.stderr
    assert "wrong" not in done.stderr  # the password itself is never shown
    assert daemon.mount_entry(mp) is None and daemon.mount_processes(mp) == []


def test_offline_mount_serves_the_cache_and_eio_for_the_rest(emulator, mounter, tmp_path) -> None:
    cache = tmp_path / "offline-cache"
    online = mounter(emulator, cache_dir=cache, extra=("--no-prefetch",))
    series = first_series(online.path)
    names = ls(series)
    data = (series / names[0]).read_bytes()
    online.unmount()
    offline = mounter(emulator, cache_dir=cache, offline=True)
    emulator.reset_stats()
    rel = series.relative_to(online.path)
    assert (offline.path / rel / names[0]).read_bytes() == data
    with pytest.raises(OSError) as e:
        (offline.path / rel / names[1]).read_bytes()
    assert e.value.errno == errno.EIO
    assert sum(emulator.stats().values()) == 0
