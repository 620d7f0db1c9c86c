"""Through a real mount: files the kernel opens itself (FUSE no_open, the default where the kernel can).

A re-read comes from the page cache without a request to the mount; a failure shows at the first read
(never as an empty or short file) and is not remembered; metadata files never change length, and
stats.json shows new counters to each read; a file of another size than its metadata said is never
served cut or padded.
``--no-kernel-opens`` asks the mount at every open, as before. Every test uses its own emulator (its
request counts are the test's)."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest
from conftest import ls, wait_until

from nbiafs import control, daemon

pytestmark = pytest.mark.fuse

UID = ("--layout", "uid", "--no-prefetch")
KERNEL_OPENS = UID


def one_series(archive) -> tuple[str, object, object, list]:
    collection = sorted(c.name for c in archive.visible_collections("nbia_guest"))[0]
    study = archive.studies_of(collection)[0]
    series = archive.series_of_study(study.uid)[0]
    return collection, study, series, archive.instances_of(series.uid)


def series_dir(m, archive) -> tuple[Path, list]:
    collection, study, series, instances = one_series(archive)
    return m.path / collection / study.patient_id / study.uid / series.uid, instances


def control_stats(m) -> dict:
    return control.request(daemon.control_socket_path(m.path), {"op": "stats"}, timeout=30)


def stats(m) -> dict:
    return control_stats(m)["stats"]


def test_a_re_read_comes_from_the_page_cache_without_asking_the_mount(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=KERNEL_OPENS)
    assert control_stats(m)["kernel_opens"] is True
    folder, instances = series_dir(m, archive)
    first = folder / f"{instances[0].sop_uid}.dcm"
    truth = instances[0].path.read_bytes()
    assert first.read_bytes() == truth
    assert wait_until(lambda: stats(m)["fetches"] == 1, 10)
    before = stats(m)
    for _ in range(3):
        assert first.read_bytes() == truth
    after = stats(m)
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]  # never asked
    assert emu.stats()["getSingleImage"] == 1


def test_without_kernel_opens_every_open_asks_the_mount(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=(*UID, "--no-kernel-opens"))
    assert control_stats(m)["kernel_opens"] is False
    folder, instances = series_dir(m, archive)
    first = folder / f"{instances[0].sop_uid}.dcm"
    assert first.read_bytes() == instances[0].path.read_bytes()
    before = stats(m)["hits"]
    assert first.read_bytes() == instances[0].path.read_bytes()
    assert stats(m)["hits"] == before + 1  # the open reached the store (and found the file cached)


def test_a_failure_shows_at_the_first_read_and_is_not_remembered(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=KERNEL_OPENS, env={"NBIAFS_RETRIES": "0"})
    folder, instances = series_dir(m, archive)
    target = folder / f"{instances[1].sop_uid}.dcm"
    emu.inject_fault("getSingleImage", status=500, count=1000)
    try:
        with target.open("rb") as f:  # the kernel opens it without asking
            with pytest.raises(OSError) as caught:
                f.read()
        assert caught.value.errno == errno.EIO
    finally:
        emu.clear_faults()
    failed = emu.stats()["getSingleImage"]
    assert failed == 1  # one try (no retries), not one more for the kernel's own retry of the read
    assert target.read_bytes() == instances[1].path.read_bytes()  # the next read tries again


def test_threads_reading_a_new_file_at_once_get_its_bytes_from_one_fetch(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=KERNEL_OPENS)
    folder, instances = series_dir(m, archive)
    target = folder / f"{instances[2].sop_uid}.dcm"
    truth = instances[2].path.read_bytes()
    start = threading.Barrier(6)
    got: list[bytes | BaseException] = []

    def reader() -> None:
        start.wait()
        try:
            with target.open("rb", buffering=0) as f:
                chunks = []
                while chunk := f.read(4096):
                    chunks.append(chunk)
            got.append(b"".join(chunks))
        except OSError as exc:
            got.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [truth] * 6
    assert emu.stats()["getSingleImage"] == 1


def test_metadata_files_never_change_length_and_stats_show_new_counters_to_each_read(
        make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=KERNEL_OPENS)
    folder, instances = series_dir(m, archive)
    stats_file = m.path / ".nbiafs" / "stats.json"
    series_file = folder / ".series.json"
    before = json.loads(stats_file.read_text())
    listed = series_file.read_bytes()
    for instance in instances[:3]:
        (folder / f"{instance.sop_uid}.dcm").read_bytes()

    def fetched() -> bool:  # every read parses: one version whole, never cut or padded with zeros
        data = stats_file.read_bytes()
        assert len(data) == stats_file.stat().st_size == 4096 and b"\0" not in data
        return json.loads(data)["fetches"] == before["fetches"] + 3

    assert wait_until(fetched, 10)
    assert series_file.read_bytes() == listed  # the same bytes (no md5s, which come as files are cached)
    assert len(json.loads(listed)["instances"]) == len(instances)


@pytest.mark.parametrize("error", [-100, 100])
def test_a_file_of_another_size_than_its_metadata_said_is_never_served_cut_or_padded(
        make_emulator, archive, mounter, error) -> None:
    emu = make_emulator()
    collection, study, series, instances = one_series(archive)
    lying = instances[0]
    truth = lying.path.read_bytes()
    emu.report_size(lying.sop_uid, lying.size + error)
    m = mounter(emu, extra=KERNEL_OPENS)
    file = m.path / collection / study.patient_id / study.uid / series.uid / f"{lying.sop_uid}.dcm"
    assert file.stat().st_size == lying.size + error
    try:  # the kernel retries a failed read-ahead page by page: often every byte at once, else an error
        assert file.read_bytes() == truth
    except OSError as exc:
        assert exc.errno == errno.EIO
    assert wait_until(lambda: file.stat().st_size == lying.size, 10)  # the true size from now on
    assert file.read_bytes() == truth
    assert emu.stats()["getSingleImage"] == 1
    assert ls(file.parent)
