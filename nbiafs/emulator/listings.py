"""The search API's listing endpoints (v1, v2, v4): collections, patients, studies, series, UIDs, sizes.

Every handler answers rows visible to the caller (``call.user``); the API version only changes how
rows are spelled (:mod:`.responses`). Order is the archive's, except ``getSOPInstanceUIDs``, which
comes in a deterministic shuffle (the real server promises no order).
"""

from __future__ import annotations

import datetime as dt
import random
from typing import TYPE_CHECKING

from . import responses as R
from .archive import Archive, SeriesEntry
from .replies import Call, Reply, Request, bad_request, rows

if TYPE_CHECKING:
    from .server import Emulator

SERIES_FILTERS = ("Collection", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined", "Manufacturer",
                  "ManufacturerModelName", "SeriesInstanceUID")


def parse_from_date(text: str) -> dt.date:
    """``fromDate`` as the server parses it: ``dd/MM/yyyy`` (what clients send) or ``yyyy-MM-dd``."""
    for fmt in ("%d/%m/%Y", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise bad_request(f"bad fromDate {text!r}: use dd/MM/yyyy or yyyy-MM-dd")


def visible_series(arch: Archive, uid: str, user: str | None) -> SeriesEntry | None:
    entry = arch.series_by_uid(uid)
    return entry if entry is not None and arch.is_visible(entry.collection, user) else None


def _fmt(req: Request) -> str | None:
    return req.one("format")


def get_collection_values(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    return rows([{"Collection": c.name} for c in arch.visible_collections(call.user)], _fmt(req))


def get_patient(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    coll, pid = req.one("Collection"), req.one("PatientID")
    found = [R.patient_row(p) for p in arch.patients if arch.is_visible(p.collection, call.user)
             and coll in (None, p.collection) and pid in (None, p.patient_id)]
    return rows(found, _fmt(req))


def get_patient_study(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    coll, pid, suid = req.one("Collection"), req.one("PatientID"), req.one("StudyInstanceUID")
    if coll is None and pid is None and suid is None:
        raise bad_request("one of Collection, PatientID, StudyInstanceUID is required")
    found = [R.study_row(arch, s, call.style) for s in arch.studies
             if arch.is_visible(s.collection, call.user) and coll in (None, s.collection)
             and pid in (None, s.patient_id) and suid in (None, s.uid)]
    return rows(found, _fmt(req))


def get_series(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    filters = {key: req.one(key) for key in SERIES_FILTERS}
    found = [R.series_row(arch, s, call.style, v4_columns=call.api == "v4") for s in arch.series
             if arch.is_visible(s.collection, call.user) and R.series_matches(s, filters)]
    return rows(found, _fmt(req))


def get_updated_series(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    since = parse_from_date(req.one("fromDate", required=True) or "")
    found = [R.series_row(arch, s, call.style, v4_columns=call.api == "v4") for s in arch.series
             if arch.is_visible(s.collection, call.user) and s.timestamp.date() >= since]
    return rows(found, _fmt(req))


def get_sop_instance_uids(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    entry = visible_series(arch, req.one("SeriesInstanceUID", required=True) or "", call.user)
    instances = arch.instances_of(entry.uid) if entry else []
    random.Random(entry.uid if entry else 0).shuffle(instances)  # deterministic, not instance order
    return rows([{"SOPInstanceUID": i.sop_uid} for i in instances], _fmt(req))


def get_series_size(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    entry = visible_series(arch, req.one("SeriesInstanceUID", required=True) or "", call.user)
    found = [{"TotalSizeInBytes": entry.file_size, "ObjectCount": entry.image_count}] if entry else []
    return rows(found, _fmt(req))
