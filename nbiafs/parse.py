"""JSON from the NBIA API -> typed records (records.py), and the API's value formats.

This is the only place that knows the API's key spellings (``PatientId`` vs ``PatientID``), its
three date formats (v2 ``2003-12-12 00:00:00.0``, v4 ``MM-DD-YYYY``, advanced epoch milliseconds),
that null values are omitted, that an empty result is an empty body, and that ``SeriesNumber`` may be
an int or a string like ``"3000566.000000"``. Values it cannot read become ``None`` with a DEBUG log,
never a crash; a row missing its identifying UID is dropped with a WARNING (it could not be named).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .errors import ProtocolError
from .records import (
    Collection,
    CollectionDescription,
    DrillDownSeries,
    DrillDownStudy,
    Instance,
    License,
    Patient,
    Series,
    SeriesSize,
    Study,
)

log = logging.getLogger(__name__)

Row = Mapping[str, Any]
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# bodies


def json_rows(body: bytes | str, endpoint: str) -> list[Row]:
    """Decode a JSON array of objects. An empty (or blank) body is the API's empty result: ``[]``.

    Raises ProtocolError for anything that is not JSON or not an array of objects (a single object
    is accepted as a one-row array).
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{endpoint}: the server sent malformed JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # e.g. an unpaired surrogate escape
        raise ProtocolError(f"{endpoint}: the server sent malformed JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise ProtocolError(f"{endpoint}: expected a JSON array of objects, got {type(value).__name__}")
    return value


def csv_rows(body: bytes | str, endpoint: str) -> list[dict[str, str]]:
    """Decode a CSV answer (a header row, then rows) into dicts; an empty body is ``[]``.

    ProtocolError for a body that is not CSV text (HTML error pages, binary data) or whose rows do not
    match the header.
    """
    try:
        text = body.decode("utf-8-sig") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise ProtocolError(f"{endpoint}: the CSV is not UTF-8 text") from None
    if not text.strip():
        return []
    if text.lstrip().startswith("<"):
        raise ProtocolError(f"{endpoint}: expected CSV, got what looks like HTML")
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ProtocolError(f"{endpoint}: the server sent malformed CSV ({exc})") from None
    header, rows = table[0], [r for r in table[1:] if r]
    if any(len(r) != len(header) for r in rows):
        raise ProtocolError(f"{endpoint}: CSV rows of another width than its header")
    return [dict(zip(header, r)) for r in rows]


def build_all(rows: Iterable[Row], build: Callable[[Row], T | None], endpoint: str) -> list[T]:
    """Apply ``build`` to every row, dropping (with a warning) rows it cannot identify."""
    out: list[T] = []
    for row in rows:
        record = build(row)
        if record is None:
            log.warning("%s: dropped a row without its identifying key (keys: %s)", endpoint, sorted(row))
        else:
            out.append(record)
    return out


# ---------------------------------------------------------------------------------------------
# scalar values


def text_or_none(value: Any) -> str | None:
    """A string value; omitted, null and empty become ``None``; numbers become their text."""
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if text != "" else None


def int_or_none(value: Any) -> int | None:
    """An integer from an int, a whole float, or a string like ``"3000566.000000"``; else ``None``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value) if not isinstance(value, str) else float(value.strip())
    except (TypeError, ValueError):
        log.debug("not an integer: %r", value)
        return None
    if not math.isfinite(number) or number != int(number):
        log.debug("not a whole number: %r", value)
        return None
    return int(number)


_DATE_FORMATS = (
    ("%Y-%m-%d %H:%M:%S.%f", True),  # v2: 2003-12-12 00:00:00.0
    ("%Y-%m-%d %H:%M:%S", True),
    ("%Y-%m-%dT%H:%M:%S.%f", True),
    ("%Y-%m-%dT%H:%M:%S", True),
    ("%Y-%m-%d", False),  # tolerated
    ("%m-%d-%Y", False),  # v4: 12-31-2003
    ("%m/%d/%Y", False),
    ("%Y%m%d", False),  # DICOM DA
)
_EPOCH_RE = re.compile(r"^-?\d{10,}$")


def datetime_or_none(value: Any) -> dt.datetime | None:
    """A naive UTC datetime from any of the API's date formats (epoch ms included); garbage -> None."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and _EPOCH_RE.match(value.strip())):
        try:
            millis = float(value)
            return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=millis)
        except (ValueError, OverflowError):
            log.debug("bad epoch date %r", value)
            return None
    if not isinstance(value, str):
        log.debug("bad date %r", value)
        return None
    return _text_date(value.strip())


@functools.lru_cache(maxsize=4096)
def _text_date(text: str) -> dt.datetime | None:
    """A date string of one of the API's formats (a listing repeats the same few dates in every
    record: strptime was a tenth of the mount's Python time in a cold walk). datetimes are immutable."""
    for fmt, _has_time in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
    log.debug("unreadable date %r", text)
    return None


def date_or_none(value: Any) -> dt.date | None:
    """The calendar date of :func:`datetime_or_none`."""
    moment = datetime_or_none(value)
    return moment.date() if moment is not None else None


def _first(row: Row, *keys: str) -> Any:
    """The first present, non-null value among ``keys`` (the API spells some keys two ways)."""
    for key in keys:
        value = row.get(key)
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# records


def collection_from(row: Row) -> Collection | None:
    name = text_or_none(_first(row, "Collection", "collection", "Collection Name"))
    return Collection(name) if name else None


def patient_from(row: Row, collection: str | None = None) -> Patient | None:
    patient_id = text_or_none(_first(row, "PatientId", "PatientID", "patientId"))
    coll = text_or_none(_first(row, "Collection", "Project")) or collection
    if not patient_id or not coll:
        return None
    return Patient(
        patient_id=patient_id,
        collection=coll,
        name=text_or_none(row.get("PatientName")),
        sex=text_or_none(row.get("PatientSex")),
        phantom=text_or_none(row.get("Phantom")),
        species_description=text_or_none(row.get("SpeciesDescription")),
    )


def study_from(row: Row, collection: str | None = None, patient_id: str | None = None) -> Study | None:
    study_uid = text_or_none(row.get("StudyInstanceUID"))
    pid = text_or_none(_first(row, "PatientID", "PatientId")) or patient_id
    coll = text_or_none(row.get("Collection")) or collection
    if not study_uid or not pid or not coll:
        return None
    return Study(
        study_uid=study_uid,
        patient_id=pid,
        collection=coll,
        date=date_or_none(row.get("StudyDate")),
        description=text_or_none(row.get("StudyDescription")),
        study_id=text_or_none(row.get("StudyID")),
        patient_age=text_or_none(row.get("PatientAge")),
        series_count=int_or_none(row.get("SeriesCount")),
        longitudinal_event_type=text_or_none(row.get("LongitudinalTemporalEventType")),
        longitudinal_offset=text_or_none(row.get("LongitudinalTemporalOffsetFromEvent")),
    )


def series_from(row: Row) -> Series | None:
    series_uid = text_or_none(row.get("SeriesInstanceUID"))
    study_uid = text_or_none(row.get("StudyInstanceUID"))
    if not series_uid or not study_uid:
        return None
    return Series(
        series_uid=series_uid,
        study_uid=study_uid,
        patient_id=text_or_none(_first(row, "PatientID", "PatientId")),
        collection=text_or_none(row.get("Collection")),
        modality=text_or_none(row.get("Modality")),
        description=text_or_none(row.get("SeriesDescription")),
        number=int_or_none(row.get("SeriesNumber")),
        date=date_or_none(row.get("SeriesDate")),
        body_part=text_or_none(row.get("BodyPartExamined")),
        protocol_name=text_or_none(row.get("ProtocolName")),
        manufacturer=text_or_none(row.get("Manufacturer")),
        manufacturer_model=text_or_none(row.get("ManufacturerModelName")),
        software_versions=text_or_none(row.get("SoftwareVersions")),
        image_count=int_or_none(row.get("ImageCount")),
        file_size=int_or_none(row.get("FileSize")),
        timestamp=datetime_or_none(row.get("TimeStamp")),
        date_released=datetime_or_none(row.get("DateReleased")),
        license_name=text_or_none(row.get("LicenseName")),
        license_uri=text_or_none(row.get("LicenseURI")),
        collection_uri=text_or_none(_first(row, "CollectionURI", "DataDescriptionURI")),
    )


def sop_uid_from(row: Row) -> str | None:
    return text_or_none(_first(row, "SOPInstanceUID", "SOPInstanceUid", "sopInstanceUid"))


def series_size_from(rows: list[Row]) -> SeriesSize | None:
    """``getSeriesSize``: ``None`` when the server had nothing for the series."""
    if not rows:
        return None
    total = int_or_none(rows[0].get("TotalSizeInBytes"))
    count = int_or_none(rows[0].get("ObjectCount"))
    if total is None or count is None:
        return None
    return SeriesSize(total_bytes=total, object_count=count)


def size_or_none(value: Any) -> int | None:
    """A byte size; 0 or less (or unreadable) is unknown: never shown as an empty file."""
    size = int_or_none(value)
    return size if size is not None and size > 0 else None


def drilldown_series_from(row: Row) -> DrillDownSeries | None:
    series_uid = text_or_none(_first(row, "seriesUID", "seriesId"))
    pk = int_or_none(row.get("seriesPkId"))
    if not series_uid or pk is None:
        return None
    return DrillDownSeries(
        series_uid=series_uid,
        series_pk_id=pk,
        study_uid=text_or_none(row.get("studyId")),
        patient_id=text_or_none(row.get("patientId")),
        collection=text_or_none(row.get("project")),
        number_images=int_or_none(row.get("numberImages")),
        exact_size=size_or_none(_first(row, "exactSize", "totalSizeForAllImagesInSeries")),
        modality=text_or_none(row.get("modality")),
        description=text_or_none(row.get("description")),
        series_number=text_or_none(row.get("seriesNumber")),
    )


def drilldown_study_from(row: Row) -> DrillDownStudy | None:
    study_uid = text_or_none(_first(row, "studyId", "studyInstanceUid", "studyInstanceUID", "StudyInstanceUID"))
    if not study_uid:
        return None
    raw_series = row.get("seriesList")
    series_rows = [r for r in raw_series if isinstance(r, dict)] if isinstance(raw_series, list) else []
    return DrillDownStudy(
        study_uid=study_uid,
        date=date_or_none(row.get("date")),
        description=text_or_none(row.get("description")),
        series=tuple(build_all(series_rows, drilldown_series_from, "getStudyDrillDownWithSeriesIds")),
    )


def instance_from_drilldown(row: Row) -> Instance | None:
    """One ``getImageDrillDown`` object (its ``acquisitionNumber`` is buggy and ignored)."""
    sop_uid = text_or_none(_first(row, "sopInstanceUid", "sopInstanceUID", "SOPInstanceUID"))
    series_uid = text_or_none(_first(row, "seriesInstanceUid", "seriesInstanceUID", "SeriesInstanceUID"))
    if not sop_uid or not series_uid:
        return None
    return Instance(
        sop_uid=sop_uid,
        series_uid=series_uid,
        number=int_or_none(row.get("instanceNumber")),
        size=size_or_none(row.get("size")),
        study_uid=text_or_none(row.get("studyInstanceUid")),
        image_pk_id=int_or_none(row.get("imagePkId")),
    )


def collection_description_from(row: Row) -> CollectionDescription | None:
    name = text_or_none(row.get("collectionName"))
    if not name:
        return None
    return CollectionDescription(
        collection=name,
        description=text_or_none(row.get("description")),
        description_uri=text_or_none(row.get("descriptionURI")),
        license_id=int_or_none(row.get("licenseId")),
        timestamp=datetime_or_none(_first(row, "collectionDescTimestamp", "lastUpdated")),
    )


def license_from(row: Row) -> License | None:
    raw_nested = row.get("license")
    nested: Row = raw_nested if isinstance(raw_nested, dict) else {}
    license_id = int_or_none(_first(row, "id")) if row.get("id") is not None else int_or_none(nested.get("id"))
    if license_id is None:
        return None
    return License(
        id=license_id,
        short_name=text_or_none(_first(row, "shortName") or nested.get("shortName")),
        long_name=text_or_none(_first(row, "longName") or nested.get("longName")),
        url=text_or_none(_first(row, "licenseURL", "url") or nested.get("url")),
        commercial_use=text_or_none(_first(row, "commercialUse") or nested.get("commercialUse")),
        text=text_or_none(_first(row, "licenseText") or nested.get("licenseText")),
    )


_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def md5_from(body: bytes, endpoint: str) -> str | None:
    """A plain-text md5 (lower-case hex); ``None`` for an empty body; ProtocolError for anything else."""
    text = body.decode("ascii", errors="replace").strip().strip('"')
    if not text:
        return None
    if not _MD5_RE.match(text):
        raise ProtocolError(f"{endpoint}: expected a 32-digit hex md5, got {text[:40]!r}")
    return text.lower()
