"""Through a real mount: the failures a demanding user tries (stalls, no drill-down, tiny cache, kill -9,
two accounts on one cache, dying tokens, hostile mount point paths).

Every test that fetches uses its own emulator: the session one's request counts belong to other tests."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import first_series, ls, nbiafs_cli, series_of_count, teardown_mount, wait_until

from nbiafs import daemon
from nbiafs.emulator import TEST_PASSWORD, TEST_USER

pytestmark = pytest.mark.fuse

BIG_COLLECTION, BIG_PATIENT, BIG_COUNT = "Demo-Chest-CT", "DCC-0001", 120


def unlisted_series(root: Path, archive, collection: str, patient: str, count: int) -> Path:
    """The mounted directory of a ``count``-instance series, found without listing any series."""
    tails = {s.uid[-5:] for st in archive.studies_of(collection, patient)
             for s in archive.series_of_study(st.uid) if len(archive.instances_of(s.uid)) == count}
    patient_dir = root / collection / patient
    for study in ls(patient_dir):
        for series in ls(patient_dir / study):
            if series[-5:] in tails:
                return patient_dir / study / series
    raise AssertionError(f"no series of {count} files under {patient_dir}")


def archive_instances(archive, series_dir: Path) -> list:
    """The archive's instances of a mounted descriptive-layout series, in instance order."""
    for coll in [c.name for c in archive.public_collections() + archive.restricted_collections()]:
        for study in archive.studies_of(coll):
            for series in archive.series_of_study(study.uid):
                if series_dir.name.endswith(series.uid[-5:]):
                    return sorted(archive.instances_of(series.uid), key=lambda i: i.instance_number)
    raise AssertionError(f"no series for {series_dir}")


def file_names(count: int) -> list[str]:
    return [f"1-{n:03d}.dcm" for n in range(1, count + 1)]


def read_in_thread(path: Path) -> tuple[threading.Thread, dict]:
    """Read ``path`` in a thread; the outcome ('data' or 'error') and its duration land in the dict."""
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["data"] = path.read_bytes()
        except OSError as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# ---------------------------------------------------------------------------------- 1. stalled server
def test_a_stalled_download_is_eio_within_the_deadline_while_cached_files_still_read(
        make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--no-prefetch",),
                env={"NBIAFS_READ_TIMEOUT": "1", "NBIAFS_DEADLINE": "3", "NBIAFS_RETRIES": "2"})
    series = first_series(m.path)
    names = ls(series)
    truth = archive_instances(archive, series)
    cached = (series / names[0]).read_bytes()
    assert cached == truth[0].path.read_bytes()
    emu.reset_stats()
    emu.inject_fault("getSingleImage", delay=60, count=1000)
    try:
        thread, out = read_in_thread(series / names[1])
        assert wait_until(lambda: emu.stats()["getSingleImage"] >= 1, 10)
        # while that download stalls, a cached file and listings answer at once
        started = time.monotonic()
        assert (series / names[0]).read_bytes() == cached
        assert ls(series) == names
        assert time.monotonic() - started < 2
        thread.join(30)
        assert not thread.is_alive(), "a read of a stalled server hung"
    finally:
        emu.clear_faults()
    assert isinstance(out.get("error"), OSError) and out["error"].errno == errno.EIO, out
    assert out["seconds"] < 3 + 1 + 4  # deadline + one read timeout + slack
    # the failure was not remembered: the same file reads whole once the server answers again
    assert (series / names[1]).read_bytes() == truth[1].path.read_bytes()


# ---------------------------------------------------------------------------------- 2. no drill-down
@pytest.mark.parametrize("status", [400, 403, 404])
def test_without_the_drill_down_every_file_has_its_exact_size_order_and_bytes(
        make_emulator, archive, mounter, status) -> None:
    emu = make_emulator()
    emu.inject_fault("getStudyDrillDownWithSeriesIds", status=status, count=100000)
    m = mounter(emu, extra=("--no-prefetch",))
    series = unlisted_series(m.path, archive, "Demo-Head-MR", "DHM-0001", 12)
    emu.reset_stats()
    names = ls(series)
    truth = archive_instances(archive, series)
    assert sorted(names) == file_names(len(truth))
    assert [os.stat(series / n).st_size for n in sorted(names)] == [i.path.stat().st_size for i in truth]
    listed = emu.stats()
    assert listed["getStudyDrillDownWithSeriesIds"] >= 1 and listed["getImageDrillDown"] == 0
    assert listed["getSingleImage"] == len(truth)  # one fetch per instance taught its size
    for name, inst in zip(sorted(names), truth):
        assert (series / name).read_bytes() == inst.path.read_bytes(), name
    assert emu.stats()["getSingleImage"] == len(truth)  # opening them cost nothing more


# ---------------------------------------------------------------------------------- 3. tiny cache
def _du(path: Path) -> int:
    """Bytes of the files under ``path``, part files included (files the mount deletes
    meanwhile count as gone). ``path`` must exist: a cache somewhere else must not pass as small."""
    assert path.is_dir(), f"no cache folder {path}"
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def test_a_one_megabyte_cache_reads_a_four_megabyte_series_right_and_stays_near_its_bound(
        make_emulator, archive, mounter) -> None:
    m = mounter(make_emulator(), extra=("--cache-size", "1M"))
    series = series_of_count(m.path, BIG_COLLECTION, BIG_PATIENT, BIG_COUNT)
    names = ls(series)
    truth = archive_instances(archive, series)
    assert sum(i.path.stat().st_size for i in truth) > 4_000_000
    peak = 0
    for name, inst in zip(names, truth, strict=True):
        assert (series / name).read_bytes() == inst.path.read_bytes(), name
        peak = max(peak, _du(m.cache_dir / "objects"))
    # the cache is cut back to 1 MiB as each file is added: allow one file in flight per prefetch
    # worker and reader, never the series
    assert peak < 1_048_576 + 9 * 40_000, peak
    assert wait_until(lambda: _du(m.cache_dir / "objects") <= 1_048_576 + 40_000, 10)


# ---------------------------------------------------------------------------------- 4. kill -9
def test_a_mount_killed_mid_fetch_is_stale_then_unmounts_and_remounts_with_right_bytes(
        make_emulator, archive, mounter, tmp_path) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--no-prefetch",))
    series = first_series(m.path)
    names = ls(series)
    truth = archive_instances(archive, series)
    assert (series / names[0]).read_bytes() == truth[0].path.read_bytes()
    emu.reset_stats()
    emu.inject_fault("getSingleImage", delay=60, count=1)
    thread, out = read_in_thread(series / names[1])
    assert wait_until(lambda: emu.stats()["getSingleImage"] >= 1, 10)
    for pid in m.pids:
        os.kill(pid, signal.SIGKILL)
        assert daemon.wait_for_exit(pid, 10)
    thread.join(10)
    assert not thread.is_alive() and "error" in out  # the reader was let go, with an error
    emu.clear_faults()
    with pytest.raises(OSError) as e:
        ls(m.path)
    assert e.value.errno == errno.ENOTCONN  # stale: still in the mount table, nobody serving it
    assert daemon.mount_entry(m.path) is not None

    again = nbiafs_cli(*m.args, env=m.env)
    assert again.returncode == 1
    assert "stale" in again.stderr and "nbiafs unmount" in again.stderr, again.stderr

    done = nbiafs_cli("unmount", str(m.path))
    assert done.returncode == 0, done.stderr
    assert "stale" in done.stderr and str(m.path) in done.stderr, done.stderr
    assert daemon.mount_entry(m.path) is None

    remount = mounter(emu, cache_dir=m.cache_dir, extra=("--no-prefetch",))
    rel = series.relative_to(m.path)
    for name, inst in zip(names, truth, strict=True):
        assert (remount.path / rel / name).read_bytes() == inst.path.read_bytes(), name


# ---------------------------------------------------------------------------------- 5. two accounts
def test_a_guest_mount_never_sees_or_serves_what_a_named_account_fetched_on_the_same_cache(
        make_emulator, archive, mounter, tmp_path) -> None:
    emu = make_emulator()
    cache = tmp_path / "shared-cache"
    member = mounter(emu, user=TEST_USER, password=TEST_PASSWORD, cache_dir=cache, extra=("--no-prefetch",))
    restricted = first_series(member.path, "Restricted-Demo")
    secret = restricted / ls(restricted)[0]
    assert secret.read_bytes() == archive_instances(archive, restricted)[0].path.read_bytes()
    public = first_series(member.path)
    public_name = ls(public)[0]
    public_bytes = (public / public_name).read_bytes()
    rel_secret, rel_public = secret.relative_to(member.path), public.relative_to(member.path)
    member.unmount()

    guest = mounter(emu, cache_dir=cache, extra=("--no-prefetch",))
    emu.reset_stats()
    assert "Restricted-Demo" not in ls(guest.path)
    for path in (guest.path / "Restricted-Demo", guest.path / rel_secret):
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    assert (guest.path / rel_public / public_name).read_bytes() == public_bytes
    assert emu.stats()["getSingleImage"] == 1  # fetched again for the guest: no cache hit across accounts
    assert emu.stats()["getCollectionValues"] >= 1  # the guest's listing was its own


# ---------------------------------------------------------------------------------- 6. tokens
def test_a_token_expired_right_after_the_mount_started_keeps_the_mount_working(
        make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--no-prefetch", "--api", "v2"))
    emu.expire_tokens()  # whatever token the mount process holds, it is dead before its first call
    series = first_series(m.path)
    names = ls(series)
    assert (series / names[0]).read_bytes() == archive_instances(archive, series)[0].path.read_bytes()


def test_refused_refreshes_fall_back_to_password_logins_during_a_long_read(
        make_emulator, archive, mounter) -> None:
    emu = make_emulator(token_ttl=2, refuse_refresh=True)
    m = mounter(emu, user=TEST_USER, password=TEST_PASSWORD, extra=("--no-prefetch",))
    emu.expire_tokens()  # dead before the mount process's first call
    series = series_of_count(m.path, BIG_COLLECTION, BIG_PATIENT, BIG_COUNT)
    names = ls(series)
    truth = archive_instances(archive, series)
    before = emu.stats()["token"]
    for n, (name, inst) in enumerate(zip(names, truth, strict=True)):
        if n % 10 == 0:
            emu.expire_tokens()  # a lifetime ends: only a fresh password grant can bring a working token
        assert (series / name).read_bytes() == inst.path.read_bytes(), name
    assert emu.stats()["token"] >= before + 12  # at least one renewal per expiry (refreshes refused)
    assert emu.stats()["getSingleImage"] >= len(names)


# ---------------------------------------------------------------------------------- 7. hostile path
def test_a_mount_point_with_spaces_backslash_and_non_ascii_mounts_and_unmounts(
        make_emulator, archive, tmp_path) -> None:
    from conftest import require_fuse

    require_fuse()
    emulator = make_emulator()
    mp = tmp_path / "my scans \\ ÄÖ 日本 é"
    mp.mkdir()
    pids: list[int] = []
    try:
        done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"),
                          "--no-prefetch")
        assert done.returncode == 0, done.stderr
        assert daemon.is_nbiafs_mount(daemon.mount_entry(mp))
        pids = daemon.mount_processes(mp)
        assert pids
        series = first_series(mp)
        name = ls(series)[0]
        assert (series / name).read_bytes() == archive_instances(archive, series)[0].path.read_bytes()
        again = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"))
        assert again.returncode == 1 and "already" in again.stderr and str(mp) in again.stderr
        gone = nbiafs_cli("unmount", str(mp))
        assert gone.returncode == 0, gone.stderr
        assert daemon.mount_entry(mp) is None
        assert all(daemon.wait_for_exit(pid, 10) for pid in pids)
        assert ls(mp) == []
    finally:
        teardown_mount(mp, pids)
