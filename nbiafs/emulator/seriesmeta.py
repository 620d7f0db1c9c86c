"""v4 ``POST getSeriesMetadata``: the series rows behind the NBIA Data Retriever's ``metadata.csv``, as CSV.

Form ``list``: series UIDs, repeatable and/or comma-separated. The answer is CSV only (the v4 source
formats it as ``CSV-DOWNLOAD``, with no ``format`` parameter): a header row and one row per visible
series, every value a quoted string, ``Content-Disposition: attachment; filename="SeriesMetaData.csv"``.
No series found: 200 with an empty body.

The columns are the server's (the v4 source's list), not the Data Retriever's own names. The
retriever's ``metadata.csv`` maps them: Subject ID = ``Patient ID``, Study UID = ``Study Instance
UID``, Series UID = ``Series Instance UID``, Collection = ``Project``, Number of Images = ``Image
Count``, Data Description URI = ``Collection URI`` (the DOI link), 3rd Party Analysis = ``Third
Party Analysis``. SOP Class UID/Name, File Location and Download Timestamp are the retriever's
(read from the downloaded files and its clock), not the server's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import responses as R
from .archive import Archive, SeriesEntry
from .replies import Call, Reply, Request, bad_request
from .tables import csv_text

if TYPE_CHECKING:
    from .server import Emulator

COLUMNS = (
    "Patient ID", "Patient Name", "Patient Sex", "Ethnic Group", "Phantom", "Species Code", "Species Description",
    "Study Instance UID", "Study Date", "Study Description", "Admitting Diagnosis Description", "Study ID",
    "Patient Age", "Longitudinal Temporal Event Type", "Longitudinal Temporal Offset From Event",
    "Series Instance UID", "Project", "Modality", "Protocol Name", "Series Date", "Series Description",
    "Body Part Examined", "Series Number", "Annotations Flag", "Manufacturer", "Manufacturer Model Name",
    "Software Versions", "Image Count", "Max Submission Timestamp", "License Name", "License URI",
    "Collection URI", "File Size", "Date Released", "Third Party Analysis",
)


def metadata_row(arch: Archive, s: SeriesEntry) -> list[str]:
    coll = arch.collection(s.collection)
    study = arch.study_by_uid(s.study_uid)
    patient = next((p for p in arch.patients if p.collection == s.collection and p.patient_id == s.patient_id), None)
    assert coll is not None and study is not None
    values: dict[str, object] = {
        "Patient ID": s.patient_id, "Patient Name": patient.name if patient else None,
        "Patient Sex": patient.sex if patient else None, "Phantom": "NO", "Species Code": "337915000",
        "Species Description": "Homo sapiens", "Study Instance UID": study.uid,
        "Study Date": R.fmt_date(study.date, "v4"), "Study Description": study.description,
        "Study ID": study.study_id, "Patient Age": study.patient_age, "Series Instance UID": s.uid,
        "Project": s.collection, "Modality": s.modality, "Protocol Name": s.protocol_name,
        "Series Date": R.fmt_date(s.date, "v4"), "Series Description": s.description,
        "Body Part Examined": s.body_part, "Series Number": s.number, "Annotations Flag": "NO",
        "Manufacturer": s.manufacturer, "Manufacturer Model Name": s.manufacturer_model,
        "Software Versions": s.software_versions, "Image Count": s.image_count,
        "Max Submission Timestamp": R.fmt_date(s.timestamp, "v4"), "License Name": coll.license.long_name,
        "License URI": coll.license.url, "Collection URI": coll.description_uri, "File Size": s.file_size,
        "Date Released": R.fmt_date(s.date_released, "v4"), "Third Party Analysis": "NO",
    }
    return ["" if values.get(c) is None else str(values[c]) for c in COLUMNS]


def get_series_metadata(emu: Emulator, req: Request, call: Call) -> Reply:
    uids = req.many("list")
    if not uids:
        raise bad_request("A form parameter, list, containing at least one SeriesInstanceUID is required.")
    arch = emu.archive
    chosen = [s for s in (arch.series_by_uid(u) for u in dict.fromkeys(uids))
              if s is not None and arch.is_visible(s.collection, call.user)]
    if not chosen:
        return Reply(200, b"", "text/csv")
    body = csv_text(COLUMNS, (metadata_row(arch, s) for s in chosen)).encode("utf-8")
    return Reply(200, body, "text/csv",
                 headers=(("Content-Disposition", 'attachment; filename="SeriesMetaData.csv"'),))
