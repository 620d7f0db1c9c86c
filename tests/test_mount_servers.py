"""Through a real mount: the server shapes of today (anonymous v4, v2-only, both), and failures that are
errors, never absences (a dead server, a proxy's 404, 5xx, a probe that cannot fetch, sizes that lie)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ls, visible_walk, wait_until

from nbiafs.emulator import Emulator

pytestmark = pytest.mark.fuse

#: uid layout: Collection/PatientID/StudyUID/SeriesUID/SOPUID.dcm, so files map to the archive directly.
UID = ("--layout", "uid")


def tree(root: Path) -> dict[str, int]:
    """Relative path -> size (0 for folders), by lstat only: nothing is opened."""
    out = {}
    for dirpath, dirnames, filenames in visible_walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = 0 if name in dirnames else st.st_size
    return out


def truth(archive, path: Path) -> bytes:
    inst = archive.instance_by_uid(path.name[: -len(".dcm")])
    assert inst is not None, path
    return inst.path.read_bytes()


def errno_of(action) -> int:
    with pytest.raises(OSError) as info:
        action()
    return info.value.errno


@pytest.fixture
def restartable(archive_dir: Path) -> Iterator[list[Emulator]]:
    """Emulators a test stops and starts again on the same port (all stopped at the end)."""
    made: list[Emulator] = []
    yield made
    for emu in made:
        emu.stop()


# ---------------------------------------------------------------------------------- server shapes
@pytest.mark.parametrize("shape", [{}, {"oauth": False}, {"v4": False}], ids=["v2+v4", "v4 only, no logins", "v2 only"])
def test_every_server_shape_mounts_with_default_options_to_the_same_tree_sizes_and_bytes(
        make_emulator, archive, mounter, shape) -> None:
    emu = make_emulator(**shape)
    m = mounter(emu, extra=(*UID, "--no-prefetch"))
    seen = tree(m.path)
    # the same tree and exact sizes as the archive, before anything was opened
    assert emu.stats()["getSingleImage"] == 0
    expected = {}
    for coll in archive.visible_collections("nbia_guest"):
        for study in archive.studies_of(coll.name):
            for series in archive.series_of_study(study.uid):
                for inst in archive.instances_of(series.uid):
                    expected[f"{coll.name}/{study.patient_id}/{study.uid}/{series.uid}/{inst.sop_uid}.dcm"] = inst.size
    assert {p: s for p, s in seen.items() if p.endswith(".dcm")} == expected
    # the same bytes
    one_series = next(p for p in seen if p.count("/") == 3)
    for name in ls(m.path / one_series):
        assert (m.path / one_series / name).read_bytes() == truth(archive, m.path / one_series / name)
    versions = emu.versioned_stats()
    if shape.get("v4", True):  # anonymous v4 is there: no login at all
        assert emu.stats()["token"] == 0
        assert not any(k.startswith("v2/") for k in versions) and versions["v4/getSingleImage"] > 0
    else:  # an old server: v2 with the guest token
        assert emu.stats()["token"] >= 1 and versions["v2/getSingleImage"] > 0


def test_an_explicit_api_choice_is_kept(make_emulator, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=(*UID, "--api", "v2"))
    assert ls(m.path)
    assert emu.stats()["token"] >= 1 and not any(k.startswith("v4/") for k in emu.versioned_stats())


# ---------------------------------------------------------------------------------- failures
def test_a_dead_server_is_eio_on_stat_ls_and_open_and_nothing_of_it_is_remembered(
        archive_dir, archive, mounter, restartable) -> None:
    emu = Emulator(archive_dir, port=0).start()
    restartable.append(emu)
    m = mounter(emu, extra=UID)
    collection = ls(m.path)[0]
    study = archive.studies_of(collection)[0]
    series = archive.series_of_study(study.uid)[0]
    inst = archive.instances_of(series.uid)[0]
    patient_dir = m.path / collection / study.patient_id
    file = patient_dir / study.uid / series.uid / f"{inst.sop_uid}.dcm"
    port = emu.port
    emu.stop()
    # a listing that cannot be fetched is an I/O error, never "no such file"
    assert errno_of(lambda: ls(m.path / collection)) == errno.EIO
    assert errno_of(lambda: os.stat(patient_dir)) == errno.EIO
    assert errno_of(lambda: open(file, "rb")) == errno.EIO
    back = Emulator(archive_dir, port=port).start()
    restartable.append(back)
    # the same paths list at once: neither nbiafs nor the kernel remembered the failure as an absence
    assert study.patient_id in ls(m.path / collection)
    assert os.stat(patient_dir).st_mode
    assert file.read_bytes() == inst.path.read_bytes()


@pytest.mark.parametrize("status", [404, 503])
def test_a_proxys_404_or_a_5xx_on_a_listing_is_eio_and_lists_once_the_server_answers(
        make_emulator, archive, mounter, status) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=UID)
    collection = ls(m.path)[0]
    patient = archive.patients_of(collection)[0].patient_id
    emu.inject_fault("getPatient", status=status, count=1000)  # beyond every retry
    assert errno_of(lambda: ls(m.path / collection)) == errno.EIO
    assert errno_of(lambda: os.stat(m.path / collection / patient)) == errno.EIO
    emu.clear_faults()
    assert patient in ls(m.path / collection)


def test_sizes_learned_by_a_probe_that_cannot_fetch_are_eio_then_list(make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=(*UID, "--no-drilldown"))
    collection = ls(m.path)[0]
    study = archive.studies_of(collection)[0]
    series = archive.series_of_study(study.uid)[0]
    series_dir = m.path / collection / study.patient_id / study.uid / series.uid
    emu.inject_fault("getSingleImage", status=500, count=1000)  # what an undeliverable instance answers
    assert errno_of(lambda: ls(series_dir)) == errno.EIO
    emu.clear_faults()
    assert ls(series_dir) == sorted(f"{i.sop_uid}.dcm" for i in archive.instances_of(series.uid))


def _one_series(archive, collection_index: int = 0):
    collection = sorted(c.name for c in archive.visible_collections("nbia_guest"))[collection_index]
    study = archive.studies_of(collection)[0]
    series = archive.series_of_study(study.uid)[0]
    return collection, study, series, archive.instances_of(series.uid)


@pytest.mark.parametrize("claimed", [0, -1])
def test_a_drilldown_size_of_zero_or_less_is_learned_by_fetching_never_an_empty_file(
        make_emulator, archive, mounter, claimed) -> None:
    emu = make_emulator()
    collection, study, series, instances = _one_series(archive)
    lying = instances[1]
    emu.report_size(lying.sop_uid, claimed)
    m = mounter(emu, extra=(*UID, "--no-prefetch"))
    series_dir = m.path / collection / study.patient_id / study.uid / series.uid
    sizes = {name: (series_dir / name).stat().st_size for name in ls(series_dir)}
    assert sizes[f"{lying.sop_uid}.dcm"] == lying.size  # learned by fetching it, once
    assert emu.stats()["getSingleImage"] == 1
    assert (series_dir / f"{lying.sop_uid}.dcm").read_bytes() == lying.path.read_bytes()
    assert emu.stats()["getSingleImage"] == 1  # the probe's bytes were kept


def test_a_complete_body_of_another_size_than_the_metadata_is_served_whole_with_its_true_size_once(
        make_emulator, archive, mounter) -> None:
    emu = make_emulator()
    collection, study, series, instances = _one_series(archive)
    lying = instances[0]
    emu.report_size(lying.sop_uid, lying.size - 100)  # the database is wrong; the file (and its length) is right
    # the mount opens files (direct_io; where the kernel opens them: tests/test_mount_kernelopens.py)
    m = mounter(emu, extra=(*UID, "--no-prefetch", "--no-kernel-opens"))
    file = m.path / collection / study.patient_id / study.uid / series.uid / f"{lying.sop_uid}.dcm"
    assert file.stat().st_size == lying.size - 100
    assert file.read_bytes() == lying.path.read_bytes()  # every true byte, past the stale size
    assert wait_until(lambda: file.stat().st_size == lying.size, 10)  # and the true size from now on
    assert file.read_bytes() == lying.path.read_bytes()
    assert emu.stats()["getSingleImage"] == 1  # not downloaded again and again
    log = Path(str(m.args[m.args.index("--log-file") + 1])).read_text()
    assert log.count("showing the true size") == 1
