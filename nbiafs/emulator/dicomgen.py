"""Fast, deterministic synthetic DICOM files: pydicom writes one header per series, bytes are patched per instance.

A full pydicom write per file costs milliseconds, which is minutes for a 30,000-file benchmark
archive. So a series is written once, by pydicom, as a *template*: every attribute set, the
per-instance values (SOPInstanceUID in the meta group and the data set, InstanceNumber, the slice
position) holding placeholders of the exact width the real values will have, and no pixel data.
An instance is then the template's bytes with the placeholders overwritten (same widths, so no
length field changes), followed by a Pixel Data element (explicit VR little endian ``OW``, always
the last element) and the pixels, written frame by frame. A file is never held whole in memory,
so a 200 MB multi-frame instance costs one frame of memory.

Fixed widths: UIDs come from :func:`uid`, all of one length per kind; InstanceNumber is an IS
right-aligned in 6 characters; positions are DS written ``%+011.3f``. Pixels are a phantom: an
elliptic body, two low-density "lungs" and a bright sphere whose radius follows the slice, plus a
per-slice offset, so every slice differs and a stack looks like one; and seeded noise of a few
HU, as a scanner's images have, so a zip of a series compresses like real CT (about 2:1), not
100:1 as flat synthetic pixels would, and benchmarks move realistic byte counts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's UID root, as the sample archive's UIDs use
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

_NUMBER_WIDTH = 6
_NOISE_FRAMES = 8
_POS_FORMAT = "{:+011.3f}"
_POS_PLACEHOLDER = _POS_FORMAT.format(99999.999)
_NUMBER_PLACEHOLDER = "+77777"  # no other value holds a "+" followed by digits like these


def uid(archive_key: int, kind: int, index: int) -> str:
    """A UID of fixed length per ``kind``: ``<root>.<archive key>.<kind>.1<index, 9 digits>``."""
    return f"{UID_ROOT}.{archive_key}.{kind}.1{index:09d}"


def archive_key(text: str) -> int:
    """A 10-digit number (no leading zero) naming an archive in its UIDs."""
    return 1_000_000_000 + int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 9_000_000_000


@dataclass(frozen=True, slots=True)
class SeriesHeader:
    """Series-level attributes of a synthetic series."""

    patient_id: str
    patient_name: str
    patient_sex: str
    patient_age: str
    study_uid: str
    study_id: str
    study_date: str  # YYYYMMDD
    study_description: str
    series_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    modality: str
    body_part: str
    manufacturer: str
    model: str
    software: str
    rows: int
    cols: int
    frames: int
    spacing: float  # slice spacing and thickness, mm
    sop_uid_length: int


@dataclass(frozen=True, slots=True)
class Template:
    """A series' header bytes and where each per-instance value sits in them."""

    data: bytes
    sop_offsets: tuple[int, ...]
    number_offset: int
    position_offsets: tuple[int, ...]
    sop_uid_length: int
    pixel_bytes: int


def _origin(h: SeriesHeader) -> tuple[float, float]:
    return (-0.5 * h.cols, -0.5 * h.rows)


def _dataset(h: SeriesHeader, placeholder_uid: str) -> Dataset:
    ds = Dataset()
    multi = h.frames > 1
    sop_class = ENHANCED_CT_IMAGE if multi else (MR_IMAGE if h.modality == "MR" else CT_IMAGE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(placeholder_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if not multi else ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = placeholder_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = h.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = ""
    ds.Modality = h.modality
    ds.Manufacturer = h.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = h.study_description
    ds.SeriesDescription = h.series_description
    ds.ManufacturerModelName = h.model
    ds.PatientName = h.patient_name
    ds.PatientID = h.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = h.patient_sex
    ds.PatientAge = h.patient_age
    ds.BodyPartExamined = h.body_part
    ds.SoftwareVersions = h.software
    ds.StudyInstanceUID = h.study_uid
    ds.SeriesInstanceUID = h.series_uid
    ds.StudyID = h.study_id
    ds.SeriesNumber = h.series_number
    ds.InstanceNumber = _NUMBER_PLACEHOLDER
    ds.FrameOfReferenceUID = h.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = h.rows
    ds.Columns = h.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    x0, y0 = _origin(h)
    orientation = ["1", "0", "0", "0", "1", "0"]
    spacing = [f"{1.0:.1f}", f"{1.0:.1f}"]
    if not multi:
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [f"{x0:.3f}", f"{y0:.3f}", _POS_PLACEHOLDER]
        ds.ImageOrientationPatient = orientation
        ds.SliceThickness = f"{h.spacing:.3f}"
        ds.SpacingBetweenSlices = f"{h.spacing:.3f}"
        ds.SliceLocation = _POS_PLACEHOLDER
        ds.PixelSpacing = spacing
        if h.modality == "CT":
            ds.KVP = "120"
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
        else:
            ds.MagneticFieldStrength = "1.5"
            ds.EchoTime = "10"
            ds.RepetitionTime = "500"
        return ds
    # Enhanced CT: one stack, frames along the normal, functional groups as the IOD lays them out
    ds.NumberOfFrames = h.frames
    ds.AcquisitionDateTime = h.study_date + "093000"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.KVP = "120"
    dim_uid = h.frame_of_reference_uid + ".1"
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = Sequence([index])
    measures = Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = f"{h.spacing:.3f}"
    measures.SpacingBetweenSlices = f"{h.spacing:.3f}"
    plane = Dataset()
    plane.ImageOrientationPatient = orientation
    transform = Dataset()
    transform.RescaleIntercept = "-1024"
    transform.RescaleSlope = "1"
    transform.RescaleType = "HU"
    window = Dataset()
    window.WindowCenter = "40"
    window.WindowWidth = "400"
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.FrameVOILUTSequence = Sequence([window])
    shared.CTImageFrameTypeSequence = Sequence([frame_type])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for f in range(h.frames):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = f + 1
        content.DimensionIndexValues = f + 1
        position = Dataset()
        position.ImagePositionPatient = [f"{x0:.3f}", f"{y0:.3f}", f"{f * h.spacing:.3f}"]
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def make_template(h: SeriesHeader) -> Template:
    """Write the series' header once with pydicom and find its placeholders."""
    import io

    placeholder = "9" * h.sop_uid_length  # not a valid UID, but unique: overwritten in every instance
    ds = _dataset(h, placeholder)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    sop = _all(data, placeholder.encode())
    number = _all(data, _NUMBER_PLACEHOLDER.encode())
    positions = _all(data, _POS_PLACEHOLDER.encode()) if h.frames == 1 else ()
    if len(sop) != 2 or len(number) != 1:
        raise AssertionError(f"template placeholders not found once each: {len(sop)} {len(number)}")
    return Template(data, sop, number[0], positions, h.sop_uid_length, 2 * h.rows * h.cols * h.frames)


def _all(data: bytes, needle: bytes) -> tuple[int, ...]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + len(needle))
    return tuple(found)


class Phantom:
    """Deterministic 16-bit CT-like slices of one size (grids computed once)."""

    def __init__(self, rows: int, cols: int) -> None:
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
        self._u = (x - cols / 2) / max(cols / 2, 1)
        self._v = (y - rows / 2) / max(rows / 2, 1)
        body = (self._u / 0.9) ** 2 + (self._v / 0.7) ** 2 <= 1
        lungs = (((np.abs(self._u) - 0.4) / 0.25) ** 2 + (self._v / 0.45) ** 2) <= 1
        base = np.zeros((rows, cols), np.float32)
        base[body] = 1024 + 40
        base[lungs & body] = 1024 - 800
        self._base = base
        self._r2 = self._u ** 2 + (self._v + 0.1) ** 2
        # a small bank of noise frames, reused shifted: cheap, deterministic, incompressible enough
        rng = np.random.default_rng(rows * 100_003 + cols)
        self._noise = rng.integers(-24, 25, size=(_NOISE_FRAMES, rows, cols)).astype(np.float32)

    def slice(self, k: int, n: int) -> bytes:
        """Slice ``k`` of ``n``: the sphere's radius follows the slice, the body shifts a little."""
        t = (k + 0.5) / max(n, 1)
        radius = 0.25 * max(0.0, 1 - (2 * t - 1) ** 2) ** 0.5
        img = self._base + (k % 17)
        img = np.where(self._r2 <= radius ** 2, 1024 + 300, img)
        img = img + np.roll(self._noise[k % _NOISE_FRAMES], k // _NOISE_FRAMES, axis=0)
        return np.clip(img, 0, 65535).astype("<u2").tobytes()


def pixel_element_header(nbytes: int) -> bytes:
    """(7FE0,0010) OW, explicit VR little endian, 4-byte length."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes)


def write_instance(path: Path, template: Template, *, sop_uid: str, number: int, position: float,
                   frames: Iterator[bytes]) -> tuple[int, str]:
    """Write one instance; returns its size and md5."""
    if len(sop_uid) != template.sop_uid_length:
        raise ValueError("SOP UID of the wrong width for this template")
    head = bytearray(template.data)
    raw = sop_uid.encode("ascii")
    for offset in template.sop_offsets:
        head[offset:offset + len(raw)] = raw
    head[template.number_offset:template.number_offset + _NUMBER_WIDTH] = f"{number:>{_NUMBER_WIDTH}d}".encode()
    pos = _POS_FORMAT.format(position).encode()
    for offset in template.position_offsets:
        head[offset:offset + len(pos)] = pos
    head += pixel_element_header(template.pixel_bytes)
    digest = hashlib.md5(head)
    size = len(head)
    with open(path, "wb") as fh:
        _write(fh, head)
        for frame in frames:
            digest.update(frame)
            size += len(frame)
            _write(fh, frame)
    expected = len(head) + template.pixel_bytes
    if size != expected:
        raise AssertionError(f"{path}: wrote {size} bytes, expected {expected}")
    return size, digest.hexdigest()


def _write(fh: BinaryIO, data: bytes | bytearray) -> None:
    fh.write(data)
