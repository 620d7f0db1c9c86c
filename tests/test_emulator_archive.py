"""The emulator's sample archive: deterministic, atomic, hostile metadata, DICOM headers that agree with the
index, and series that real readers (dcm2niix, SimpleITK) turn into 3D volumes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_tool

from nbiafs.emulator import Archive, ensure_archive, samples
from nbiafs.errors import ConfigError


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _raw_text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A text attribute as stored: a backslash in a description reads back as a multi-value."""
    value = ds.get(keyword)
    if value is None:
        return None
    return "\\".join(value) if isinstance(value, pydicom.multival.MultiValue) else str(value)


def test_two_builds_in_different_folders_give_identical_bytes(tmp_path: Path) -> None:
    a = ensure_archive(tmp_path / "a")
    b = ensure_archive(tmp_path / "b")
    tree_a, tree_b = _tree_bytes(a.root), _tree_bytes(b.root)
    assert tree_a.keys() == tree_b.keys()
    assert len(tree_a) == len(a.instances) + 1  # every instance plus index.json
    for name in tree_a:
        assert tree_a[name] == tree_b[name], name


def test_second_call_loads_the_existing_archive_without_rebuilding(archive_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(samples, "build_into", lambda root: pytest.fail("rebuilt an existing archive"))
    again = ensure_archive(archive_dir)
    assert len(again.instances) > 0


def test_killed_build_leaves_neither_archive_nor_temp_folder(tmp_path: Path, monkeypatch) -> None:
    real = samples.build_into

    def dies_halfway(root: Path) -> Archive:
        real(root)
        raise KeyboardInterrupt  # as if the process were interrupted before the rename

    monkeypatch.setattr(samples, "build_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_archive(tmp_path / "arch")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_folder_that_is_not_an_archive_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not an emulator archive"):
        ensure_archive(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_damaged_archive_is_reported_not_served(archive_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(archive_dir, copy)
    arch = ensure_archive(copy)
    victim = arch.instances[0].path
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ConfigError, match="damaged"):
        ensure_archive(copy)


def test_content_has_public_and_restricted_collections_and_sizes(archive: Archive) -> None:
    names = {c.name for c in archive.public_collections()}
    assert {"Demo-Chest-CT", "Demo-Head-MR", "Edge-Cases"} <= names
    assert [c.name for c in archive.restricted_collections()] == ["Restricted-Demo"]
    assert "Restricted-Demo" not in {c.name for c in archive.visible_collections("nbia_guest")}
    assert "Restricted-Demo" in {c.name for c in archive.visible_collections("nbiafs_test")}
    counts = sorted(s.image_count for s in archive.series)
    assert counts[-1] == 120 and counts[-2] <= 12 and counts[0] >= 3
    assert archive.total_size() < 20 * 1024 * 1024


def test_hostile_metadata_is_present(archive: Archive) -> None:
    descriptions = [s.description for s in archive.series] + [s.description for s in archive.studies]
    assert any(d and "/" in d for d in descriptions)
    assert any(d and "\\" in d for d in descriptions)
    assert any(d and "<MPR Range[1]>" in d for d in descriptions)
    assert any(d and "胸部" in d and "ü" in d for d in descriptions)
    assert any(d and len(d) == 300 for d in descriptions)
    assert any(s.date is None for s in archive.studies)
    assert any(s.description is None for s in archive.studies)
    assert any(s.description is None for s in archive.series)
    assert any(" " in p.patient_id for p in archive.patients)
    by_patient: dict[str, list] = {}
    for st in archive.studies:
        by_patient.setdefault(st.patient_id, []).append((st.date, st.description))
    assert any(len(v) != len(set(v)) for v in by_patient.values()), "no two studies share date and description"
    by_study: dict[str, list] = {}
    for se in archive.series:
        by_study.setdefault(se.study_uid, []).append((se.number, se.description))
    assert any(len(v) != len(set(v)) for v in by_study.values()), "no two series share number and description"


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # the deliberate 300-char LO
def test_dicom_headers_agree_with_the_index(archive: Archive) -> None:
    for series in archive.series:
        study = archive.study_by_uid(series.study_uid)
        instances = archive.instances_of(series.uid)
        assert [i.instance_number for i in instances] == list(range(1, len(instances) + 1))
        assert series.file_size == sum(i.size for i in instances)
        frames = set()
        for inst in instances:
            data = inst.path.read_bytes()
            assert len(data) == inst.size and hashlib.md5(data).hexdigest() == inst.md5
            ds = pydicom.dcmread(inst.path)
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == inst.sop_uid
            assert ds.SeriesInstanceUID == series.uid and ds.StudyInstanceUID == study.uid
            assert ds.PatientID == series.patient_id and int(ds.InstanceNumber) == inst.instance_number
            assert ds.Modality == series.modality
            assert _raw_text(ds, "SeriesDescription") == series.description
            assert _raw_text(ds, "StudyDescription") == study.description
            assert (int(ds.SeriesNumber) if "SeriesNumber" in ds else None) == series.number
            assert (ds.StudyDate or None) == (study.date.strftime("%Y%m%d") if study.date else None)
            frames.add(ds.FrameOfReferenceUID)
        assert len(frames) == 1


def test_slices_step_along_the_normal_and_differ_in_pixels(archive: Archive) -> None:
    big = max(archive.series, key=lambda s: s.image_count)
    slices = [pydicom.dcmread(i.path) for i in archive.instances_of(big.uid)]
    orient = np.array([float(x) for x in slices[0].ImageOrientationPatient])
    normal = np.cross(orient[:3], orient[3:])
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in slices])
    steps = np.diff(positions @ normal)
    assert np.allclose(steps, float(slices[0].SpacingBetweenSlices), atol=1e-3)
    assert np.allclose([float(ds.SliceLocation) for ds in slices], positions @ normal, atol=1e-3)
    assert not np.array_equal(slices[0].pixel_array, slices[-1].pixel_array)


def test_simpleitk_reads_the_120_slice_series_as_one_volume(archive: Archive) -> None:
    import SimpleITK as sitk  # a test dependency: missing is an error, not a skip
    big = max(archive.series, key=lambda s: s.image_count)
    folder = str(archive.instances_of(big.uid)[0].path.parent)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(folder, big.uid)
    assert len(files) == 120
    reader.SetFileNames(files)
    image = reader.Execute()
    assert image.GetSize()[2] == 120
    assert image.GetSpacing()[2] == pytest.approx(5.0, abs=1e-3)


def test_dcm2niix_turns_each_stack_into_a_volume_with_the_right_slice_count(archive: Archive,
                                                                          tmp_path: Path) -> None:
    require_tool("dcm2niix", "dcm2niix")
    for series in (max(archive.series, key=lambda s: s.image_count),
                   next(s for s in archive.series if s.modality == "MR" and s.image_count == 12)):
        out = tmp_path / series.uid
        out.mkdir()
        folder = archive.instances_of(series.uid)[0].path.parent
        done = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "vol", "-o", str(out), str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        niftis = list(out.glob("*.nii"))
        assert len(niftis) == 1, done.stdout
        header = niftis[0].read_bytes()[:348]
        dims = np.frombuffer(header[40:56], dtype="<i2")
        assert dims[0] == 3 and int(dims[3]) == series.image_count


def test_archive_of_an_older_format_is_rebuilt_in_place(tmp_path: Path) -> None:
    import json

    arch = ensure_archive(tmp_path / "arch")
    index = json.loads((arch.root / "index.json").read_text())
    index["format"] = 0
    (arch.root / "index.json").write_text(json.dumps(index))
    (arch.root / "stale.txt").write_text("left by the old format")
    again = ensure_archive(tmp_path / "arch")
    assert not (again.root / "stale.txt").exists()
    assert json.loads((again.root / "index.json").read_text())["format"] != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch"]  # no temp or old folder left behind
