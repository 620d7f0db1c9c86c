"""Synthetic archives for benchmarks and tests: one collection shaped by a :class:`~.profiles.SyntheticSpec`.

Patients ``<PREFIX>-0001``..., each with ``studies`` studies of ``series`` series; every series a
stack of ``instances`` slices (or multi-frame instances) written by :mod:`.dicomgen` from one
template per series. Everything derives from the canonical spec: UIDs (a 10-digit archive key from
the spec, then fixed-width counters), dates, descriptions, pixels. Same spec, same bytes; another
spec, other UIDs, so two synthetic archives never share a UID.

The metadata served agrees with the files (UIDs, patient, study and series attributes, instance
numbers, exact sizes and md5s in the index). Build times on the project's 2-core machine are in
``docs/architecture.md``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from . import dicomgen as G
from .archive import Archive, CollectionEntry, InstanceEntry, PatientEntry, SeriesEntry, StudyEntry
from .profiles import SyntheticSpec
from .samples import LICENSES

log = logging.getLogger(__name__)

_RELEASED = dt.datetime(2024, 3, 1, 9, 30, 0)
_MAKER = {"CT": ("GE MEDICAL SYSTEMS", "Revolution CT", "rev_ct_24"), "MR": ("SIEMENS", "Skyra", "syngo MR E11")}
_SPACING = {"CT": 1.25, "MR": 3.0}
_KIND = {"study": 1, "series": 2, "sop": 3, "frame": 4}


def build_into(root: Path, spec: SyntheticSpec) -> Archive:
    """Write the synthetic archive ``spec`` into the empty directory ``root`` (index not yet written)."""
    started = time.monotonic()
    key = G.archive_key(spec.canonical)
    sop_width = len(G.uid(key, _KIND["sop"], 0))
    license = LICENSES[0]
    name = spec.collection
    collection = CollectionEntry(
        name, False, f"<p>Synthetic {spec.modality} collection for nbiafs benchmarks ({spec.canonical}).</p>",
        license, f"https://doi.org/10.0000/NBIAFS.{name.upper()}", pk_id=710_000, timestamp=_RELEASED)
    prefix = name.split("-")[-1].upper()[:8]
    maker, model, software = _MAKER[spec.modality]
    phantoms: dict[tuple[int, int], G.Phantom] = {}
    patients: list[PatientEntry] = []
    studies: list[StudyEntry] = []
    series_list: list[SeriesEntry] = []
    instances: list[InstanceEntry] = []
    series_index = sop_index = 0
    for p in range(spec.patients):
        patient_id = f"{prefix}-{p + 1:04d}"
        sex = "FM"[p % 2]
        age = f"{40 + p % 40:03d}Y"
        patients.append(PatientEntry(patient_id, name, f"Synthetic^{p + 1:04d}", sex, pk_id=810_000 + p))
        for s in range(spec.studies):
            study_uid = G.uid(key, _KIND["study"], p * spec.studies + s)
            date = dt.date(2010, 1, 1) + dt.timedelta(days=97 * (p * spec.studies + s) % 5000)
            study_desc = f"{spec.modality} STUDY {s + 1}"
            studies.append(StudyEntry(study_uid, patient_id, name, date, study_desc, f"{p + 1}{s + 1:02d}", age,
                                      pk_id=910_000 + len(studies), series_count=spec.series))
            for r in range(spec.series):
                series_uid = G.uid(key, _KIND["series"], series_index)
                count = spec.series_length(series_index)
                series_index += 1
                header = G.SeriesHeader(
                    patient_id=patient_id, patient_name=f"Synthetic^{p + 1:04d}", patient_sex=sex,
                    patient_age=age, study_uid=study_uid, study_id=f"{p + 1}{s + 1:02d}",
                    study_date=date.strftime("%Y%m%d"), study_description=study_desc, series_uid=series_uid,
                    series_number=r + 1, series_description=f"Synthetic {spec.modality} {r + 1}",
                    frame_of_reference_uid=G.uid(key, _KIND["frame"], series_index), modality=spec.modality,
                    body_part="CHEST", manufacturer=maker, model=model, software=software, rows=spec.rows,
                    cols=spec.width, frames=spec.frames, spacing=_SPACING[spec.modality], sop_uid_length=sop_width)
                template = G.make_template(header)
                phantom = phantoms.setdefault((spec.rows, spec.width), G.Phantom(spec.rows, spec.width))
                folder = root / "dicom" / series_uid
                folder.mkdir(parents=True)
                members = []
                for k in range(count):
                    sop_uid = G.uid(key, _KIND["sop"], sop_index)
                    sop_index += 1
                    rel = f"dicom/{series_uid}/{k + 1:05d}.dcm"
                    frames: Iterator[bytes]
                    if spec.frames > 1:
                        frames = (phantom.slice(f, spec.frames) for f in range(spec.frames))
                    else:
                        frames = iter((phantom.slice(k, count),))
                    size, md5 = G.write_instance(root / rel, template, sop_uid=sop_uid, number=k + 1,
                                                 position=k * header.spacing, frames=frames)
                    members.append(InstanceEntry(sop_uid, series_uid, study_uid, k + 1, rel, root / rel, size, md5,
                                                 pk_id=6_000_000 + sop_index))
                instances.extend(members)
                series_list.append(SeriesEntry(
                    series_uid, study_uid, patient_id, name, r + 1, header.series_description, spec.modality,
                    1_100_000 + series_index, date, "CHEST", f"{spec.modality} PROTOCOL", maker, model, software,
                    timestamp=_RELEASED, date_released=_RELEASED, image_count=count,
                    file_size=sum(m.size for m in members)))
    log.info("built synthetic archive %s: %d instances in %.1f s", spec.canonical, len(instances),
             time.monotonic() - started)
    return Archive(root, LICENSES[:1], [collection], patients, studies, series_list, instances,
                   profile=spec.canonical)
