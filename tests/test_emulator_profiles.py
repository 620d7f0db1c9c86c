"""Synthetic benchmark archives: profiles and specs, real DICOM that agrees with the index, determinism,
atomic builds, and an archive never mistaken for another profile's. Tiny versions only: the full-size
profiles are for benchmarks (their build times are in docs/architecture.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from nbiafs.emulator import Emulator, ensure_archive, synthetic
from nbiafs.emulator.profiles import PRESETS, SyntheticSpec, parse_profile
from nbiafs.errors import ConfigError

TINY = "synthetic:patients=2,studies=2,series=2,instances=3,rows=8,cols=12"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_named_profiles_have_the_promised_shapes() -> None:
    ct200 = parse_profile("ct200")
    assert isinstance(ct200, SyntheticSpec) and (ct200.series, ct200.instances, ct200.rows) == (1, 200, 512)
    headers = parse_profile("headers")
    counts = [headers.series_length(i) for i in range(headers.patients * headers.series)]
    assert len(counts) == 20 and min(counts) >= 10 and max(counts) <= 20 and len(set(counts)) > 3
    multiframe = parse_profile("multiframe")
    assert multiframe.instances == 1 and 2 * 512 * 512 * multiframe.frames > 190e6
    wide = parse_profile("wide")
    assert wide.patients * wide.series * wide.instances == 30_000 and wide.rows == 16
    assert parse_profile("sample").canonical == "sample"
    assert set(PRESETS) == {"synthetic", "ct200", "headers", "multiframe", "wide"}


def test_specs_override_a_profile_and_canonical_forms_agree() -> None:
    a = parse_profile("ct200:instances=5,rows=32")
    assert (a.instances, a.rows, a.series) == (5, 32, 1)
    assert parse_profile(" CT200 : rows=32 , instances=5 ").canonical == a.canonical
    assert parse_profile(a.canonical) == a
    assert parse_profile("ct200").canonical != a.canonical


@pytest.mark.parametrize("text", ["nope", "ct200:rows", "ct200:size=3", "ct200:rows=x", "ct200:rows=0",
                                  "sample:rows=3", "synthetic:frames=3,modality=MR", "synthetic:modality=PT"])
def test_bad_specs_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_profile(text)


def test_tiny_synthetic_archive_is_real_dicom_agreeing_with_its_index(tmp_path: Path) -> None:
    arch = ensure_archive(tmp_path / "a", profile=TINY)
    assert arch.profile == parse_profile(TINY).canonical
    assert (len(arch.patients), len(arch.studies), len(arch.series), len(arch.instances)) == (2, 4, 8, 24)
    for series in arch.series:
        study = arch.study_by_uid(series.study_uid)
        instances = arch.instances_of(series.uid)
        assert series.file_size == sum(i.size for i in instances) and series.image_count == 3
        slices = []
        for inst in instances:
            data = inst.path.read_bytes()
            assert len(data) == inst.size and hashlib.md5(data).hexdigest() == inst.md5
            ds = pydicom.dcmread(inst.path)
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == inst.sop_uid
            assert ds.SeriesInstanceUID == series.uid and ds.StudyInstanceUID == study.uid
            assert ds.PatientID == series.patient_id and int(ds.InstanceNumber) == inst.instance_number
            assert ds.StudyDate == study.date.strftime("%Y%m%d") and ds.SeriesDescription == series.description
            assert ds.pixel_array.shape == (8, 12)
            slices.append(ds)
        z = [float(ds.ImagePositionPatient[2]) for ds in slices]
        assert np.allclose(np.diff(z), float(slices[0].SpacingBetweenSlices))
        assert [float(ds.SliceLocation) for ds in slices] == z
        assert not np.array_equal(slices[0].pixel_array, slices[-1].pixel_array)
    uids = [i.sop_uid for i in arch.instances]
    assert len(set(uids)) == len(uids) and all(len(u) <= 64 for u in uids)


def test_multiframe_instance_reads_with_its_pixel_data(tmp_path: Path) -> None:
    arch = ensure_archive(tmp_path / "m", profile="multiframe:rows=16,frames=5")
    (inst,) = arch.instances
    ds = pydicom.dcmread(inst.path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == 5
    assert ds.pixel_array.shape == (5, 16, 16)
    assert len(ds.PerFrameFunctionalGroupsSequence) == 5
    assert inst.size == len(inst.path.read_bytes()) == arch.series[0].file_size
    assert inst.size > 5 * 16 * 16 * 2


def test_builds_are_deterministic_and_profiles_never_share_uids(tmp_path: Path) -> None:
    a = ensure_archive(tmp_path / "a", profile=TINY)
    b = ensure_archive(tmp_path / "b", profile=TINY)
    assert _files(a.root) == _files(b.root)
    c = ensure_archive(tmp_path / "c", profile=TINY.replace("rows=8", "rows=9"))
    assert not {i.sop_uid for i in a.instances} & {i.sop_uid for i in c.instances}


def test_another_profile_is_refused_and_none_takes_what_is_there(tmp_path: Path, monkeypatch) -> None:
    arch = ensure_archive(tmp_path / "a", profile=TINY)
    with pytest.raises(ConfigError, match="holds profile"):
        ensure_archive(tmp_path / "a", profile="ct200:instances=2,rows=8")
    with pytest.raises(ConfigError, match="holds profile"):
        ensure_archive(tmp_path / "a", profile="sample")
    monkeypatch.setattr(synthetic, "build_into", lambda root, spec: pytest.fail("rebuilt an existing archive"))
    assert ensure_archive(tmp_path / "a").profile == arch.profile
    assert ensure_archive(tmp_path / "a", profile=TINY).profile == arch.profile


def test_killed_synthetic_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    real = synthetic.build_into

    def dies(root: Path, spec: SyntheticSpec):
        real(root, spec)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "build_into", dies)
    with pytest.raises(KeyboardInterrupt):
        ensure_archive(tmp_path / "x", profile=TINY)
    assert list(tmp_path.iterdir()) == []


def test_the_sample_archive_is_still_the_default(archive) -> None:
    assert archive.profile == "sample" and {c.name for c in archive.collections} >= {"Demo-Chest-CT", "Edge-Cases"}


def test_emulator_serves_a_synthetic_archive_with_exact_sizes(tmp_path: Path) -> None:
    with Emulator(tmp_path / "s", profile="headers:rows=8,instances=2,instances_max=4") as emu:
        arch = emu.archive
        assert len(arch.series) == 20
        s = arch.series[3]
        r = requests.post(f"{emu.url}/nbia-api/services/v4/getImageDrillDown", data={"list": str(s.pk_id)},
                          timeout=10)
        assert sorted((row["sopInstanceUid"], row["size"]) for row in r.json()) == sorted(
            (i.sop_uid, i.size) for i in arch.instances_of(s.uid))
        inst = arch.instances_of(s.uid)[0]
        body = requests.get(f"{emu.url}/nbia-api/services/v4/getSingleImage", timeout=10,
                            params={"SeriesInstanceUID": s.uid, "SOPInstanceUID": inst.sop_uid}).content
        assert body == inst.path.read_bytes()


def test_an_outdated_synthetic_archive_is_rebuilt_as_the_same_profile(tmp_path: Path) -> None:
    import json

    arch = ensure_archive(tmp_path / "a", profile=TINY)
    index_path = arch.root / "index.json"
    index = json.loads(index_path.read_text())
    index["format"] = 0
    index_path.write_text(json.dumps(index))
    again = ensure_archive(tmp_path / "a")  # no profile asked: the recorded one is rebuilt, not the sample
    assert again.profile == arch.profile and len(again.instances) == len(arch.instances)
    index_path.write_text(json.dumps({**index, "format": 0}))
    with pytest.raises(ConfigError, match="older format"):
        ensure_archive(tmp_path / "a", profile="sample")
