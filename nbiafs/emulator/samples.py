"""What the sample archive contains, and how its DICOM files are made (deterministically).

Every file derives from pydicom's bundled ``CT_small.dcm`` or ``MR_small.dcm``, rewritten with new
UIDs (``generate_uid`` with fixed entropy), patient/study/series attributes that agree with the
metadata the emulator serves, and slice geometry that makes each series a consistent 3D stack:
ImagePositionPatient steps along the normal of ImageOrientationPatient by the slice spacing, all
slices share one FrameOfReferenceUID, and the pixels vary per slice. Same code, same bytes.

The content includes the hostile metadata the real archive has: ``/``, ``\\`` and ``<MPR Range[1]>``
in descriptions, non-ASCII text, a 300-character description, missing dates and descriptions, two
studies of one patient with the same date and description, two series of one study with the same
number and description, and a PatientID holding a space.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from .archive import Archive, CollectionEntry, InstanceEntry, LicenseEntry, PatientEntry, SeriesEntry, StudyEntry

_ENTROPY = "nbiafs-emulator-archive-v1"
_SOURCES = {"CT": "CT_small.dcm", "MR": "MR_small.dcm"}

LONG_DESCRIPTION = ("Very long series description " * 11)[:299] + "."
assert len(LONG_DESCRIPTION) == 300

LICENSES = [
    LicenseEntry(1, "CC BY 4.0", "Creative Commons Attribution 4.0 International License",
                 "https://creativecommons.org/licenses/by/4.0/", "YES"),
    LicenseEntry(2, "CC BY-NC 4.0", "Creative Commons Attribution-NonCommercial 4.0 International License",
                 "https://creativecommons.org/licenses/by-nc/4.0/", "NO"),
    LicenseEntry(3, "TCIA Restricted", "TCIA Restricted License Agreement",
                 "https://www.cancerimagingarchive.net/data-usage-policies-and-restrictions/", "NO"),
]


@dataclass(frozen=True)
class SeriesSpec:
    kind: str  # "CT" or "MR": the source file and the modality
    count: int
    number: int | None
    description: str | None
    released: dt.datetime
    body_part: str | None = None
    protocol: str | None = None


@dataclass(frozen=True)
class StudySpec:
    date: dt.date | None
    description: str | None
    study_id: str | None
    series: tuple[SeriesSpec, ...]


@dataclass(frozen=True)
class PatientSpec:
    patient_id: str
    name: str | None
    sex: str | None
    age: str | None
    studies: tuple[StudySpec, ...]


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    restricted: bool
    description: str
    license_id: int
    doi: str
    released: dt.datetime
    patients: tuple[PatientSpec, ...] = field(default_factory=tuple)


def _t(y: int, m: int, d: int) -> dt.datetime:
    return dt.datetime(y, m, d, 9, 30, 0)


SPEC: tuple[CollectionSpec, ...] = (
    CollectionSpec(
        "Demo-Chest-CT", False, "<p>Chest CT scans for nbiafs demos.</p>", 1,
        "https://doi.org/10.0000/NBIAFS.DEMO-CHEST-CT", _t(2019, 5, 1), (
            PatientSpec("DCC-0001", "Doe^Jane", "F", "063Y", (
                StudySpec(dt.date(2003, 12, 12), "CT CHEST W/O CONTRAST", "1001", (
                    SeriesSpec("CT", 120, 2, "Axial 5mm", _t(2019, 5, 1), "CHEST", "CHEST ROUTINE"),
                    SeriesSpec("CT", 3, 1, "Scout/Localizer", _t(2019, 5, 1), "CHEST", "SCOUT"),
                )),
            )),
            PatientSpec("DCC-0002", "Roe^Richard", "M", "071Y", (
                StudySpec(dt.date(2005, 6, 1), "CT CHEST", "2001", (
                    SeriesSpec("CT", 6, 1, "Lung 5mm", _t(2019, 5, 1), "CHEST"),
                )),
                StudySpec(dt.date(2005, 6, 1), "CT CHEST", "2002", (
                    SeriesSpec("CT", 5, 1, "Lung 5mm", _t(2019, 5, 1), "CHEST"),
                )),
            )),
            PatientSpec("DCC 0003", "Space^Patient", "O", "045Y", (
                StudySpec(dt.date(2010, 1, 15), "Follow-up", "3001", (
                    SeriesSpec("CT", 4, 4, "Thorax ünd Bäuch 胸部", _t(2021, 3, 10), "CHEST"),
                )),
            )),
        )),
    CollectionSpec(
        "Demo-Head-MR", False, "<p>Head MR scans for nbiafs demos.</p>", 1,
        "https://doi.org/10.0000/NBIAFS.DEMO-HEAD-MR", _t(2020, 2, 2), (
            PatientSpec("DHM-0001", "Smith^Ann", "F", "034Y", (
                StudySpec(dt.date(2012, 3, 4), "MRI BRAIN W/WO", "4001", (
                    SeriesSpec("MR", 12, 5, "T1 AX", _t(2020, 2, 2), "HEAD", "T1 SE"),
                    SeriesSpec("MR", 8, 6, "T2 AX", _t(2020, 2, 2), "HEAD", "T2 TSE"),
                )),
            )),
            PatientSpec("DHM-0002", "Brown^Bob", "M", "052Y", (
                StudySpec(dt.date(2013, 7, 8), "MRI HEAD", "5001", (
                    SeriesSpec("MR", 6, 1, "FLAIR", _t(2023, 2, 1), "HEAD"),
                )),
            )),
        )),
    CollectionSpec(
        "Edge-Cases", False, "<p>Hostile metadata: every quirk the real archive has.</p>", 2,
        "https://doi.org/10.0000/NBIAFS/EDGE-CASES.2021", _t(2021, 6, 30), (
            PatientSpec("EC-0001", None, None, None, (
                StudySpec(None, "<MPR Range[1]> a/b\\c", "6001", (
                    SeriesSpec("CT", 3, 7, "PET/CT fused\\recon", _t(2021, 6, 30)),
                    SeriesSpec("MR", 3, 8, "<MPR Range[1]>", _t(2021, 6, 30)),
                    SeriesSpec("MR", 3, None, None, _t(2021, 6, 30)),
                )),
            )),
            PatientSpec("EC-0002", "Édgé^Çase", "F", None, (
                StudySpec(dt.date(2001, 2, 3), None, None, (
                    SeriesSpec("CT", 3, 2, "dup", _t(2021, 6, 30)),
                    SeriesSpec("CT", 4, 2, "dup", _t(2021, 6, 30)),
                    SeriesSpec("MR", 3, 3, LONG_DESCRIPTION, _t(2024, 1, 2)),
                )),
            )),
        )),
    CollectionSpec(
        "Restricted-Demo", True, "<p>A restricted collection: only the test account sees it.</p>", 3,
        "https://doi.org/10.0000/NBIAFS.RESTRICTED-DEMO", _t(2022, 9, 9), (
            PatientSpec("RD-0001", "Secret^Sam", "M", "060Y", (
                StudySpec(dt.date(2015, 5, 5), "RESTRICTED CT", "7001", (
                    SeriesSpec("CT", 5, 1, "Axial", _t(2022, 9, 9), "CHEST"),
                )),
            )),
        )),
)

_MANUFACTURER = {"CT": ("GE MEDICAL SYSTEMS", "LightSpeed QX/i", "LightSpeedApps2.4"),
                 "MR": ("SIEMENS", "Avanto", "syngo MR B17")}


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[_ENTROPY, *(str(p) for p in parts)])


def _ds_number(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class _Template:
    """A source file stripped of private tags, identifying extras and pixels, ready to be re-parsed."""

    data: bytes
    pixels: np.ndarray
    orientation: np.ndarray
    origin: np.ndarray
    spacing: float


def _load_template(name: str) -> _Template:
    source = get_testdata_file(name)
    if not isinstance(source, str):
        raise FileNotFoundError(f"pydicom's test file {name} is missing")
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.copy()
    ds.remove_private_tags()
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "OtherPatientIDs", "PixelData",
                    "ImagesInAcquisition", "ReferencedImageSequence", "SourceImageSequence",
                    "PatientBirthDate", "AccessionNumber", "RequestAttributesSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return _Template(buffer.getvalue(), pixels,
                     np.array([float(x) for x in ds.ImageOrientationPatient]),
                     np.array([float(x) for x in ds.ImagePositionPatient]), float(ds.SliceThickness))


def _make_slice(template: _Template, *, k: int, n: int, patient: PatientSpec, study: StudySpec,
                study_uid: str, series: SeriesSpec, series_uid: str, frame_uid: str, sop_uid: str) -> Dataset:
    # re-parsing the prepared bytes is much cheaper than deep-copying a Dataset (elements stay raw)
    ds = pydicom.dcmread(io.BytesIO(template.data))
    base = template.pixels
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name or ""
    for keyword, value in (("PatientSex", patient.sex), ("PatientAge", patient.age)):
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    date = study.date.strftime("%Y%m%d") if study.date else ""
    ds.StudyDate = date
    ds.SeriesDate = date
    for keyword in ("AcquisitionDate", "ContentDate"):
        if date:
            setattr(ds, keyword, date)
        elif keyword in ds:
            delattr(ds, keyword)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyID = study.study_id or ""
    for keyword, value in (("StudyDescription", study.description), ("SeriesDescription", series.description),
                           ("BodyPartExamined", series.body_part), ("ProtocolName", series.protocol)):
        if value:  # the 300-character LO value is deliberate: skip the VR length check
            ds[keyword] = DataElement(keyword, dictionary_VR(keyword), value,
                                      validation_mode=pydicom.config.IGNORE)
        elif keyword in ds:
            delattr(ds, keyword)
    if series.number is not None:
        ds.SeriesNumber = series.number
    elif "SeriesNumber" in ds:
        del ds.SeriesNumber
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.Modality = series.kind
    maker, model, software = _MANUFACTURER[series.kind]
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = maker, model, software
    # geometry: a stack along the normal of the image plane
    normal = np.cross(template.orientation[:3], template.orientation[3:])
    spacing = template.spacing
    position = template.origin + k * spacing * normal
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.SliceThickness = _ds_number(spacing)
    ds.SpacingBetweenSlices = _ds_number(spacing)
    ds.SliceLocation = _ds_number(float(np.dot(position, normal)))
    # pixels: each slice scaled and shifted differently, kept inside the source's value range
    scale = 0.5 + 0.5 * k / max(n - 1, 1)
    pixels = np.roll(base.astype(np.int32), shift=k % 7, axis=1)
    lo, hi = int(base.min()), int(base.max())
    pixels = np.clip(lo + (pixels - lo) * scale, lo, hi).astype(base.dtype)
    ds.PixelData = pixels.tobytes()
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def build_into(root: Path) -> Archive:
    """Write the whole sample archive into the empty directory ``root`` and return it (index not yet written)."""
    templates = {kind: _load_template(name) for kind, name in _SOURCES.items()}
    collections: list[CollectionEntry] = []
    patients: list[PatientEntry] = []
    studies: list[StudyEntry] = []
    series_list: list[SeriesEntry] = []
    instances: list[InstanceEntry] = []
    pk_series, pk_image = 1_000_000, 5_000_000
    for c_index, cspec in enumerate(SPEC):
        license = next(x for x in LICENSES if x.id == cspec.license_id)
        collections.append(CollectionEntry(cspec.name, cspec.restricted, cspec.description, license, cspec.doi,
                                           pk_id=700_000 + c_index, timestamp=cspec.released))
        for p_index, pspec in enumerate(cspec.patients):
            patients.append(PatientEntry(pspec.patient_id, cspec.name, pspec.name, pspec.sex,
                                         pk_id=800_000 + 100 * c_index + p_index))
            for s_index, sspec in enumerate(pspec.studies):
                study_uid = _uid("study", cspec.name, pspec.patient_id, s_index)
                studies.append(StudyEntry(study_uid, pspec.patient_id, cspec.name, sspec.date, sspec.description,
                                          sspec.study_id, pspec.age, pk_id=900_000 + len(studies),
                                          series_count=len(sspec.series)))
                for r_index, rspec in enumerate(sspec.series):
                    series_uid = _uid("series", study_uid, r_index)
                    frame_uid = _uid("frame", series_uid)
                    template = templates[rspec.kind]
                    folder = root / "dicom" / series_uid
                    folder.mkdir(parents=True)
                    pk_series += 1
                    members = []
                    for k in range(rspec.count):
                        sop_uid = _uid("sop", series_uid, k)
                        ds = _make_slice(template, k=k, n=rspec.count, patient=pspec, study=sspec,
                                         study_uid=study_uid, series=rspec, series_uid=series_uid,
                                         frame_uid=frame_uid, sop_uid=sop_uid)
                        rel = f"dicom/{series_uid}/{k + 1:05d}.dcm"
                        ds.save_as(root / rel, enforce_file_format=True)
                        data = (root / rel).read_bytes()
                        pk_image += 1
                        members.append(InstanceEntry(sop_uid, series_uid, study_uid, k + 1, rel, root / rel,
                                                     len(data), hashlib.md5(data).hexdigest(), pk_image))
                    instances.extend(members)
                    maker, model, software = _MANUFACTURER[rspec.kind]
                    series_list.append(SeriesEntry(
                        series_uid, study_uid, pspec.patient_id, cspec.name, rspec.number, rspec.description,
                        rspec.kind, pk_series, sspec.date, rspec.body_part, rspec.protocol, maker, model, software,
                        timestamp=rspec.released, date_released=rspec.released, image_count=len(members),
                        file_size=sum(m.size for m in members)))
    return Archive(root, LICENSES, collections, patients, studies, series_list, instances)
