"""Real DICOM readers on a real mount: pydicom, dcmdump, dcm2niix, SimpleITK, find/du/cp."""

from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ls, require_tool, visible_walk

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def mounted(tmp_path_factory, archive_dir):
    """One mount for the whole module (readers only read). Torn down like every mount."""
    from conftest import nbiafs_cli, require_fuse, teardown_mount

    from nbiafs import daemon
    from nbiafs.emulator import Emulator

    require_fuse()
    emu = Emulator(archive_dir, port=0)
    emu.start()
    base = tmp_path_factory.mktemp("readers")
    mp = base / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--server", emu.url, "--cache-dir", str(base / "cache"),
                      "--log-file", str(base / "mount.log"))
    pids: list[int] = []
    try:
        assert done.returncode == 0, done.stderr
        pids = daemon.mount_processes(mp)
        yield mp
    finally:
        teardown_mount(mp, pids)
        emu.stop()


def big_series(mp: Path) -> Path:
    patient = mp / "Demo-Chest-CT" / "DCC-0001"
    study = patient / ls(patient)[0]
    return next(study / s for s in ls(study) if len(ls(study / s)) == 120)


def test_pydicom_reads_every_file(mounted: Path) -> None:
    import pydicom

    count = 0
    for dirpath, _, files in visible_walk(mounted):
        for name in files:
            ds = pydicom.dcmread(os.path.join(dirpath, name))
            assert ds.SOPInstanceUID and ds.pixel_array.size > 0
            count += 1
    assert count > 150


def test_dcmdump_reads_a_file(mounted: Path) -> None:
    require_tool("dcmdump", "dcmtk")
    series = big_series(mounted)
    done = subprocess.run(["dcmdump", str(series / "1-001.dcm")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "SOPInstanceUID" in done.stdout and "PixelData" in done.stdout


def test_dcm2niix_converts_the_120_slice_series(mounted: Path, tmp_path: Path) -> None:
    require_tool("dcm2niix", "dcm2niix")
    import SimpleITK as sitk

    series = big_series(mounted)
    assert (series / ".series.json").is_file() and os.getxattr(series, "user.nbia.uid")  # metadata beside
    done = subprocess.run(["dcm2niix", "-z", "n", "-o", str(tmp_path), str(series)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    niftis = list(tmp_path.glob("*.nii"))
    assert len(niftis) == 1, done.stdout
    image = sitk.ReadImage(str(niftis[0]))
    assert image.GetSize()[2] == 120


def test_simpleitk_series_reader_reads_a_series(mounted: Path) -> None:
    import SimpleITK as sitk

    series = big_series(mounted)
    assert (series / ".series.json").is_file() and os.getxattr(series / "1-001.dcm", "user.nbia.json")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))
    assert len(names) == 120 and not any(Path(n).name.startswith(".") for n in names)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    assert image.GetSize()[2] == 120


def test_find_du_and_cp_of_a_patient_folder(mounted: Path, tmp_path: Path) -> None:
    patient = mounted / "Demo-Head-MR" / "DHM-0001"
    found = subprocess.run(["find", str(patient), "-name", "*.dcm"], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and len(found.stdout.split("\n")) - 1 == 20
    du = subprocess.run(["du", "-sb", str(patient)], capture_output=True, text=True, timeout=60)
    total = sum(Path(d, f).stat().st_size for d, _, fs in os.walk(patient) for f in fs)  # metadata files too
    assert du.returncode == 0 and int(du.stdout.split()[0]) == total
    target = tmp_path / "copy"
    cp = subprocess.run(["cp", "-r", str(patient), str(target)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    for dirpath, _, files in visible_walk(patient):
        rel = Path(dirpath).relative_to(patient)
        for name in files:
            assert filecmp.cmp(Path(dirpath, name), target / rel / name, shallow=False)
