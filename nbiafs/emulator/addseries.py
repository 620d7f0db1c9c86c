"""Publishing a new series while the emulator runs (freshness tests): files, entries, a new Archive.

The new series is a copy of an existing one (``like``; default the smallest series of the
collection) with fresh UIDs (study, series, instances, frame of reference: random 2.25-style UIDs
from pydicom, unique across emulators), rewritten patient/study/series attributes, and
``TimeStamp``/``DateReleased`` = now, so ``getUpdatedSeries?fromDate=<today>`` reports it. It goes
to an existing study (``study_uid``), a new study of an existing patient (``patient_id``), or a new
patient (``patient_id`` unknown to the collection, or neither given). ``count`` takes that many of
the source's instances, cycling through them (renumbered) when it asks for more than there are.

Nothing here mutates: :func:`add_series` writes the files into ``scratch`` and returns a *new*
:class:`~.archive.Archive` beside the old one; the emulator swaps its reference in one assignment
(under its own lock, one addition at a time), so requests in flight keep the archive they started
with and its files stay where they were.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, generate_uid

from .archive import Archive, InstanceEntry, PatientEntry, SeriesEntry, StudyEntry


@dataclass(frozen=True, slots=True)
class AddedSeries:
    """The UIDs of a series published by :func:`add_series`."""

    collection: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    new_patient: bool
    new_study: bool

    def as_json(self) -> dict[str, Any]:
        return {"collection": self.collection, "patient_id": self.patient_id, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "sop_uids": list(self.sop_uids),
                "new_patient": self.new_patient, "new_study": self.new_study}


def add_series(arch: Archive, scratch: Path, collection: str, *, patient_id: str | None = None,
               study_uid: str | None = None, like: str | None = None, count: int | None = None,
               description: str | None = None, modality: str | None = None,
               now: dt.datetime | None = None) -> tuple[Archive, AddedSeries]:
    """A new archive holding everything of ``arch`` plus one new series; ValueError for a bad request."""
    if arch.collection(collection) is None:
        raise ValueError(f"no collection {collection!r}")
    source = _source(arch, collection, like, modality)
    pool = arch.instances_of(source.uid)
    total = len(pool) if count is None else int(count)
    if total < 1:
        raise ValueError("count must be >= 1")
    now = (now or dt.datetime.now()).replace(microsecond=0)
    patient, new_patient = _patient(arch, collection, patient_id, study_uid)
    study, new_study = _study(arch, collection, patient, study_uid, now)
    series_uid = generate_uid()
    frame_uid = generate_uid()
    folder = scratch / series_uid
    folder.mkdir(parents=True)
    number = 1 + max((s.number or 0 for s in arch.series_of_study(study.uid)), default=0)
    text = description if description is not None else f"Added {source.modality} {now:%Y-%m-%d %H:%M:%S}"
    next_pk = 1 + max((i.pk_id for i in arch.instances), default=0)
    added: list[InstanceEntry] = []
    for k in range(total):
        src = pool[k % len(pool)]
        sop_uid = generate_uid()
        path = folder / f"{k + 1:05d}.dcm"
        _rewrite(src.path, path, patient=patient, study=study, series_uid=series_uid, frame_uid=frame_uid,
                 sop_uid=sop_uid, number=k + 1, series_number=number, description=text)
        data = path.read_bytes()
        added.append(InstanceEntry(sop_uid, series_uid, study.uid, k + 1, f"added/{series_uid}/{path.name}", path,
                                   len(data), hashlib.md5(data).hexdigest(), next_pk + k))
    entry = SeriesEntry(series_uid, study.uid, patient.patient_id, collection, number, text, source.modality,
                        1 + max(s.pk_id for s in arch.series), study.date, source.body_part, source.protocol_name,
                        source.manufacturer, source.manufacturer_model, source.software_versions,
                        timestamp=now, date_released=now, image_count=total, file_size=sum(i.size for i in added))
    patients = list(arch.patients) + ([patient] if new_patient else [])
    study = replace(study, series_count=study.series_count + 1)
    studies = [study if s.uid == study.uid else s for s in arch.studies] + ([study] if new_study else [])
    new = Archive(arch.root, list(arch.licenses), list(arch.collections), patients, studies, [*arch.series, entry],
                  [*arch.instances, *added], profile=arch.profile)
    return new, AddedSeries(collection, patient.patient_id, study.uid, series_uid, tuple(i.sop_uid for i in added),
                            new_patient, new_study)


def _source(arch: Archive, collection: str, like: str | None, modality: str | None) -> SeriesEntry:
    if like is not None:
        found = arch.series_by_uid(like)
        if found is None:
            raise ValueError(f"no series {like!r} to copy")
        return found
    candidates = [s for s in arch.series if s.collection == collection and modality in (None, s.modality)]
    if not candidates:
        raise ValueError(f"collection {collection!r} has no series{' of ' + modality if modality else ''} to copy")
    return min(candidates, key=lambda s: (s.image_count, s.pk_id))


def _patient(arch: Archive, collection: str, patient_id: str | None,
             study_uid: str | None) -> tuple[PatientEntry, bool]:
    if study_uid is not None:
        study = arch.study_by_uid(study_uid)
        if study is None or study.collection != collection:
            raise ValueError(f"no study {study_uid!r} in {collection!r}")
        if patient_id is not None and patient_id != study.patient_id:
            raise ValueError(f"study {study_uid!r} belongs to patient {study.patient_id!r}, not {patient_id!r}")
        patient_id = study.patient_id
    known = {p.patient_id: p for p in arch.patients_of(collection)}
    if patient_id is not None and patient_id in known:
        return known[patient_id], False
    if patient_id is None:
        n = 1
        while f"ADDED-{n:04d}" in known:
            n += 1
        patient_id = f"ADDED-{n:04d}"
    pk = 1 + max((p.pk_id for p in arch.patients), default=0)
    return PatientEntry(patient_id, collection, f"Added^{patient_id}", None, pk), True


def _study(arch: Archive, collection: str, patient: PatientEntry, study_uid: str | None,
           now: dt.datetime) -> tuple[StudyEntry, bool]:
    if study_uid is not None:
        found = arch.study_by_uid(study_uid)
        assert found is not None  # checked in _patient
        return found, False
    pk = 1 + max((s.pk_id for s in arch.studies), default=0)
    return StudyEntry(generate_uid(), patient.patient_id, collection, now.date(), "ADDED STUDY", str(pk % 100000),
                      None, pk, 0), True


def _rewrite(src: Path, dest: Path, *, patient: PatientEntry, study: StudyEntry, series_uid: str, frame_uid: str,
             sop_uid: str, number: int, series_number: int, description: str) -> None:
    ds = pydicom.dcmread(src)
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name or ""
    ds.StudyInstanceUID = study.uid
    ds.StudyID = study.study_id or ""
    if study.description:
        ds.StudyDescription = study.description
    elif "StudyDescription" in ds:
        del ds.StudyDescription
    date = study.date.strftime("%Y%m%d") if study.date else ""
    for keyword in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        if keyword in ds or keyword in ("StudyDate", "SeriesDate"):
            setattr(ds, keyword, date)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.FrameOfReferenceUID = frame_uid
    ds.InstanceNumber = number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copied values may be over a VR's length (the sample's 300-char LO)
        ds.save_as(dest, enforce_file_format=True)
