"""Through a real mount: a series read from its start comes through its zip and single images at once,
every byte exact and every instance fetched once; readers that do not walk a series never cause a zip."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ls, series_of_count

pytestmark = pytest.mark.fuse


def _archive_bytes(archive, series_dir: Path) -> dict[str, bytes]:
    """The archive's files of the series shown at ``series_dir``, by SOPInstanceUID (nothing fetched)."""
    series_uid = os.getxattr(series_dir, "user.nbia.uid").decode()
    return {i.sop_uid: i.path.read_bytes() for i in archive.instances_of(series_uid)}


def _stats(root: Path) -> dict:
    return json.loads((root / ".nbiafs" / "stats.json").read_text())


def test_cat_of_a_series_comes_through_its_zip_each_instance_once_every_byte_exact(emulator, archive, mounter):
    m = mounter(emulator)
    series = series_of_count(m.path, "Demo-Chest-CT", "DCC-0001", 120)
    names = ls(series)
    expected = _archive_bytes(archive, series)
    emulator.reset_stats()
    done = subprocess.run("cat " + " ".join(names), shell=True, cwd=series, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = b"".join((series / n).read_bytes() for n in names)
    assert done.stdout == got
    for n in names:
        sop = os.getxattr(series / n, "user.nbia.uid").decode()
        assert (series / n).read_bytes() == expected[sop], f"{n}: not the archive's bytes"
    calls = emulator.stats()
    assert calls["getImage"] == 1
    stats = _stats(m.path)
    assert stats["zip_files"] > 0
    assert stats["fetches"] + stats["zip_files"] == len(names)  # none came twice
    assert calls["getSingleImage"] == stats["fetches"]
    assert max(emulator.instance_fetches().values()) == 1


def test_a_header_scan_or_no_prefetch_causes_no_zip(emulator, mounter):
    m = mounter(emulator)
    import pydicom

    emulator.reset_stats()
    for patient in ls(m.path / "Demo-Chest-CT"):
        for study in ls(m.path / "Demo-Chest-CT" / patient):
            for s in ls(m.path / "Demo-Chest-CT" / patient / study):
                folder = m.path / "Demo-Chest-CT" / patient / study / s
                pydicom.dcmread(folder / ls(folder)[0], stop_before_pixels=True)
    assert emulator.stats()["getImage"] == 0
    quiet = mounter(emulator, extra=("--no-series-zip",))
    series = series_of_count(quiet.path, "Demo-Chest-CT", "DCC-0001", 120)
    emulator.reset_stats()
    for n in ls(series)[:40]:
        (series / n).read_bytes()
    assert emulator.stats()["getImage"] == 0


@pytest.mark.parametrize("shape, alone", [({"link": 1.5e6}, True), ({"per_connection": 0.75e6}, False)],
                         ids=["one shared link: the zip alone", "per-connection caps: zip and singles"])
def test_the_mount_measures_whether_singles_beside_the_zip_help(make_emulator, archive, mounter, shape, alone):
    # On one shared link singles take the link from the compressed zip: it is kept alone. With each
    # connection capped, singles add their connections: they run beside it. Either way every byte is exact.
    emu = make_emulator(latency=0.01)
    m = mounter(emu)
    series = series_of_count(m.path, "Demo-Chest-CT", "DCC-0001", 120)
    names = ls(series)
    expected = _archive_bytes(archive, series)
    emu.set_shaping(**shape)
    for n in names:
        sop = os.getxattr(series / n, "user.nbia.uid").decode()
        assert (series / n).read_bytes() == expected[sop], f"{n}: not the archive's bytes"
    stats = _stats(m.path)
    assert stats["zips"] == 1
    assert stats["zips_alone"] == (1 if alone else 0), stats
    assert max(emu.instance_fetches().values()) == 1
