"""The SOPInstanceUID read from a file's first bytes (nbiafs.dicomhead): as pydicom reads it, or None."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from nbiafs.dicomhead import sop_instance_uid

UID = "1.2.826.0.1.3680043.9.7.1.2.3"


def explicit(group: int, number: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, number, vr, 0, size) + value
    return struct.pack("<HH2sH", group, number, vr, size) + value


def implicit(group: int, number: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, number, len(value)) + value


def part10(transfer_syntax: str, dataset: bytes) -> bytes:
    ts = transfer_syntax.encode() + (b"\x00" if len(transfer_syntax) % 2 else b"")
    meta = explicit(2, 1, b"OB", b"\x00\x01") + explicit(2, 0x10, b"UI", ts)
    return b"\x00" * 128 + b"DICM" + explicit(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + dataset


def uid_bytes(uid: str = UID) -> bytes:
    return uid.encode() + (b"\x00" if len(uid) % 2 else b"")


def pydicom_file(transfer_syntax: str, *, little: bool = True) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = UID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"  # differs on purpose: (0008,0018) is what counts
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=little, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    return buf.getvalue()


def test_every_instance_of_the_emulator_archive_reads_as_pydicom_reads_it(archive_dir: Path) -> None:
    files = sorted(archive_dir.rglob("*.dcm"))
    assert len(files) >= 20
    for path in files:
        head = path.read_bytes()[:65536]
        expected = str(pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True).SOPInstanceUID)
        assert sop_instance_uid(head) == expected, path


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_both_little_endian_syntaxes_give_the_datasets_own_uid_not_the_file_metas(transfer_syntax: str) -> None:
    assert sop_instance_uid(pydicom_file(transfer_syntax)) == UID


def test_what_the_walk_cannot_read_for_certain_is_none_for_pydicom_to_read() -> None:
    good = part10(ExplicitVRLittleEndian, explicit(8, 0x16, b"UI", uid_bytes("1.2.3")) + explicit(8, 0x18, b"UI", uid_bytes()))
    assert sop_instance_uid(good) == UID
    assert sop_instance_uid(good[:-4]) is None  # cut inside the value
    assert sop_instance_uid(b"\x00" * 128 + b"NOPE" + good[132:]) is None  # no Part-10 preamble
    assert sop_instance_uid(pydicom_file(ExplicitVRBigEndian, little=False)) is None
    undefined = explicit(8, 0x06, b"SQ", b"", length=0xFFFFFFFF) + explicit(8, 0x18, b"UI", uid_bytes())
    assert sop_instance_uid(part10(ExplicitVRLittleEndian, undefined)) is None  # a sequence of undefined length
    later = explicit(8, 0x20, b"DA", b"20200101")  # past (0008,0018) without it: it is not there
    assert sop_instance_uid(part10(ExplicitVRLittleEndian, later)) is None
    assert sop_instance_uid(part10(ExplicitVRLittleEndian, explicit(8, 0x18, b"UI", b"1.2.x4"))) is None
    assert sop_instance_uid(part10(ImplicitVRLittleEndian, implicit(8, 0x18, uid_bytes()))) == UID
    assert sop_instance_uid(part10(ExplicitVRLittleEndian, implicit(8, 0x18, uid_bytes()))) is None  # no VR
