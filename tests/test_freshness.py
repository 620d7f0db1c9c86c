"""Freshness through a real mount: a series added to the server appears after `nbiafs refresh` and after
the metadata TTL, while everything cached (a series' files, unchanged listings) is kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ls, nbiafs_cli, wait_until

from nbiafs.emulator import Emulator

pytestmark = pytest.mark.fuse

COLLECTION = "Demo-Head-MR"


@pytest.fixture
def emu(tmp_path: Path, archive_dir: Path):
    import shutil

    data = tmp_path / "archive"  # its own copy: this test adds series to it
    shutil.copytree(archive_dir, data)
    server = Emulator(data).start()
    yield server
    server.stop()


def walk_collection(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root / COLLECTION):
        for name in dirnames + filenames:
            out[str(Path(dirpath, name).relative_to(root))] = 0
    return out


def test_refresh_shows_a_new_series_at_once_and_keeps_what_did_not_change(emu, mounter) -> None:
    m = mounter(emu, extra=("--layout", "uid"))
    before = walk_collection(m.path)
    old_series = next(p for p in before if p.count("/") == 3 and ".nbiafs" not in p and not p.endswith(".json"))
    added = emu.add_series(COLLECTION)  # a new patient with one study and one series
    assert added.patient_id not in ls(m.path / COLLECTION)  # the listing is cached: not asked again yet
    emu.reset_stats()
    done = nbiafs_cli("refresh", str(m.path / COLLECTION))
    assert done.returncode == 0, done.stderr
    assert f"+ {added.patient_id}" in done.stdout and "1 new" in done.stdout
    calls = emu.stats()
    assert calls["getUpdatedSeries"] == 1 and calls["getPatient"] == 1  # one check, one listing
    assert added.patient_id in ls(m.path / COLLECTION)
    series_dir = m.path / COLLECTION / added.patient_id / added.study_uid / added.series_uid
    assert sorted(ls(series_dir)) == sorted(f"{uid}.dcm" for uid in added.sop_uids)
    emu.reset_stats()
    assert ls(m.path / old_series)  # an unchanged series: still cached
    unchanged_patient = next(p for p in ls(m.path / COLLECTION) if p != added.patient_id)
    assert ls(m.path / COLLECTION / unchanged_patient)  # an unchanged patient: not forgotten
    assert emu.stats()["getPatientStudy"] == 0 and emu.stats()["getImageDrillDown"] == 0


def test_a_new_series_appears_after_the_metadata_ttl(emu, mounter) -> None:
    m = mounter(emu, extra=("--layout", "uid", "--metadata-ttl", "2"))
    walk_collection(m.path)
    old_series = next(p for p in walk_collection(m.path) if p.count("/") == 3 and not p.endswith(".json"))
    added = emu.add_series(COLLECTION)
    assert wait_until(lambda: added.patient_id in ls(m.path / COLLECTION), 15)
    emu.reset_stats()
    ls(m.path / old_series)  # a series' files are kept for good, whatever the ttl
    assert emu.stats()["getImageDrillDown"] == 0 and emu.stats()["getStudyDrillDownWithSeriesIds"] == 0


def test_refresh_of_a_series_or_outside_a_mount_says_so(emu, mounter, tmp_path) -> None:
    m = mounter(emu, extra=("--layout", "uid"))
    series = next(p for p in walk_collection(m.path) if p.count("/") == 3 and not p.endswith(".json"))
    done = nbiafs_cli("refresh", str(m.path / series))
    assert done.returncode == 0 and "never changes" in done.stdout
    done = nbiafs_cli("refresh", str(tmp_path))
    assert done.returncode == 1 and "not inside an nbiafs mount" in done.stderr
