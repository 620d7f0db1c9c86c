"""JSON answer rows of the emulator, spelled as the real server spells them.

Key names (``PatientId`` in getPatient but ``PatientID`` elsewhere), the three date formats (v2
``2003-12-12 00:00:00.0``, v1/v4 ``MM-DD-YYYY``, advanced API epoch milliseconds at midnight UTC) and
the rule that null values are left out all live here. v4 rows follow the v4 source: ``getSeries``
carries ``DataDescriptionURI`` (the collection's DOI link) where v2 has ``CollectionURI``, the
drill-downs write dates as ``MM-DD-YYYY``, and ``getCollectionDescriptions`` drops the internal
``licenseId``/``collectionDescTimestamp`` for a ``lastUpdated`` date.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any

from .archive import Archive, CollectionEntry, InstanceEntry, LicenseEntry, PatientEntry, SeriesEntry, StudyEntry


def clean(row: dict[str, Any]) -> dict[str, Any]:
    """Drop keys whose value is None, as the real server does."""
    return {k: v for k, v in row.items() if v is not None}


def fmt_date(value: dt.date | dt.datetime | None, style: str) -> str | None:
    """A date as the search API writes it: ``v2`` -> ``2003-12-12 00:00:00.0``, ``v4`` -> ``12-12-2003``."""
    if value is None:
        return None
    if style == "v4":
        return value.strftime("%m-%d-%Y")
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    return value.strftime("%Y-%m-%d %H:%M:%S") + ".0"


def epoch_ms(value: dt.date | None) -> int | None:
    if value is None:
        return None
    return calendar.timegm((value.year, value.month, value.day, 0, 0, 0)) * 1000


def patient_row(p: PatientEntry) -> dict[str, Any]:
    return clean({"PatientId": p.patient_id, "PatientName": p.name, "PatientSex": p.sex,
                  "Collection": p.collection, "Phantom": "NO", "SpeciesCode": "337915000",
                  "SpeciesDescription": "Homo sapiens"})


def study_row(arch: Archive, s: StudyEntry, style: str) -> dict[str, Any]:
    return clean({"StudyInstanceUID": s.uid, "StudyDate": fmt_date(s.date, style),
                  "StudyDescription": s.description, "StudyID": s.study_id, "PatientAge": s.patient_age,
                  "PatientID": s.patient_id, "Collection": s.collection, "SeriesCount": s.series_count})


def series_row(arch: Archive, s: SeriesEntry, style: str, v4_columns: bool = False) -> dict[str, Any]:
    coll = arch.collection(s.collection)
    assert coll is not None
    if v4_columns:
        study = arch.study_by_uid(s.study_uid)
        return clean({
            "SeriesInstanceUID": s.uid, "StudyInstanceUID": s.study_uid, "Modality": s.modality,
            "ProtocolName": s.protocol_name, "SeriesDate": fmt_date(s.date, "v4"),
            "SeriesDescription": s.description, "BodyPartExamined": s.body_part, "SeriesNumber": s.number,
            "AnnotationsFlag": "NO", "Collection": s.collection, "PatientID": s.patient_id,
            "Manufacturer": s.manufacturer, "ManufacturerModelName": s.manufacturer_model,
            "SoftwareVersions": s.software_versions, "ImageCount": s.image_count,
            "TimeStamp": fmt_date(s.timestamp, "v4"), "LicenseName": coll.license.long_name,
            "LicenseURI": coll.license.url, "DataDescriptionURI": coll.description_uri, "FileSize": s.file_size,
            "DateReleased": fmt_date(s.date_released, "v4"),
            "StudyDesc": study.description if study else None,
            "StudyDate": fmt_date(study.date, "v4") if study else None, "ThirdPartyAnalysis": "NO",
        })
    return clean({
        "SeriesInstanceUID": s.uid, "StudyInstanceUID": s.study_uid, "Modality": s.modality,
        "ProtocolName": s.protocol_name, "SeriesDate": fmt_date(s.date, style),
        "SeriesDescription": s.description, "BodyPartExamined": s.body_part, "SeriesNumber": s.number,
        "Collection": s.collection, "PatientID": s.patient_id, "Manufacturer": s.manufacturer,
        "ManufacturerModelName": s.manufacturer_model, "SoftwareVersions": s.software_versions,
        "ImageCount": s.image_count, "TimeStamp": fmt_date(s.timestamp, style),
        "LicenseName": coll.license.long_name, "LicenseURI": coll.license.url,
        "CollectionURI": coll.description_uri, "FileSize": s.file_size,
        "DateReleased": fmt_date(s.date_released, style), "ThirdPartyAnalysis": "NO",
    })


_SERIES_FILTERS = {"Collection": "collection", "PatientID": "patient_id", "StudyInstanceUID": "study_uid",
                   "Modality": "modality", "BodyPartExamined": "body_part", "Manufacturer": "manufacturer",
                   "ManufacturerModelName": "manufacturer_model", "SeriesInstanceUID": "uid"}


def series_matches(s: SeriesEntry, filters: dict[str, str | None]) -> bool:
    return all(value is None or getattr(s, _SERIES_FILTERS[key]) == value for key, value in filters.items())


def license_text(arch: Archive, s: SeriesEntry) -> str:
    coll = arch.collection(s.collection)
    assert coll is not None
    return (f"{coll.name} is licensed under the {coll.license.long_name} ({coll.license.short_name}).\n"
            f"{coll.license.url}\n")


def zip_name(position: int, new_file_names: bool) -> str:
    """Member name in a getImage zip: ``00000001.dcm`` or, with NewFileNames=Yes, ``1-001.dcm``."""
    return f"1-{position:03d}.dcm" if new_file_names else f"{position:08d}.dcm"


def drilldown_date(value: dt.date | None, style: str) -> int | str | None:
    """A drill-down date: epoch ms in the advanced API, ``MM-DD-YYYY`` on v4."""
    return fmt_date(value, "v4") if style == "v4" else epoch_ms(value)


def study_drilldown(arch: Archive, chosen: list[SeriesEntry], style: str = "advanced") -> list[dict[str, Any]]:
    """getStudyDrillDownWithSeriesIds: studies (in order of first appearance) with their seriesList."""
    studies: dict[str, list[SeriesEntry]] = {}
    for s in chosen:
        studies.setdefault(s.study_uid, []).append(s)
    rows = []
    for study_uid, members in studies.items():
        study = arch.study_by_uid(study_uid)
        assert study is not None
        patient = next(p for p in arch.patients
                       if p.collection == study.collection and p.patient_id == study.patient_id)
        coll = arch.collection(study.collection)
        assert coll is not None
        series_list = [clean({
            "seriesNumber": None if s.number is None else str(s.number), "seriesUID": s.uid,
            "seriesId": s.uid, "numberImages": s.image_count, "modality": s.modality,
            "manufacturer": s.manufacturer, "annotationsFlag": False, "annotationsSize": 0,
            "patientId": s.patient_id, "patientPkId": str(patient.pk_id), "studyId": study.uid,
            "studyPkId": study.pk_id, "totalSizeForAllImagesInSeries": s.file_size, "project": s.collection,
            "description": s.description, "manufacturerModelName": s.manufacturer_model,
            "softwareVersion": s.software_versions, "maxFrameCount": "0", "bodyPartExamined": s.body_part,
            "descriptionURI": coll.description_uri, "licenseName": coll.license.long_name,
            "licenseUrl": coll.license.url, "commercialRestrictions": coll.license.commercial_use != "YES",
            "studyDateString": (fmt_date(study.date, "v4") or "") if style == "v4" else "", "seriesPkId": s.pk_id, "exactSize": s.file_size,
        }) for s in members]
        rows.append(clean({"studyId": study.uid, "date": drilldown_date(study.date, style),
                           "description": study.description,
                           "id": study.pk_id, "study_id": study.study_id, "seriesList": series_list}))
    return rows


def image_drilldown_row(s: SeriesEntry, inst: InstanceEntry, style: str = "advanced",
                        content_date: dt.date | None = None, size: int | None = None) -> dict[str, Any]:
    return clean({
        "contentDate": fmt_date(content_date, "v4") if style == "v4" else None,
        "imagePkId": inst.pk_id, "seriesPkId": s.pk_id, "instanceNumber": inst.instance_number,
        "acquisitionNumber": inst.instance_number,  # the real server's bug, reproduced
        "sopInstanceUid": inst.sop_uid, "seriesInstanceUid": inst.series_uid,
        "studyInstanceUid": inst.study_uid, "size": inst.size if size is None else size,
        "fileURI": f"/usr/local/tomcat/storage/{inst.rel_path}", "project": s.collection, "frameNum": 0,
    })


def collection_description_row(c: CollectionEntry, style: str = "advanced") -> dict[str, Any]:
    if style == "v4":
        return clean({"collectionName": c.name, "description": c.description, "descriptionURI": c.description_uri,
                      "id": c.pk_id, "lastUpdated": fmt_date(c.timestamp, "v4")})
    return clean({"description": c.description, "id": c.pk_id,
                  "collectionDescTimestamp": calendar.timegm(c.timestamp.timetuple()) * 1000,
                  "collectionName": c.name, "licenseId": c.license.id, "descriptionURI": c.description_uri})


def license_row(x: LicenseEntry) -> dict[str, Any]:
    inner = {"id": x.id, "longName": x.long_name, "shortName": x.short_name, "url": x.url,
             "commercialUse": x.commercial_use, "licenseText": x.url}
    return {"longName": x.long_name, "id": x.id, "shortName": x.short_name, "licenseURL": x.url,
            "licenseText": x.url, "commercialUse": x.commercial_use, "license": inner}
