"""Typed records for what the NBIA API returns.

The client builds these from JSON so that nothing above it ever sees the API's key spellings
(`PatientId` vs `PatientID`), its three date formats, or its omitted keys. All records are small,
frozen and hashable; optional fields are ``None`` when the server left the key out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Collection:
    """A TCIA collection (top-level folder)."""

    name: str


@dataclass(frozen=True, slots=True)
class Patient:
    """One subject of a collection (``getPatient``)."""

    patient_id: str
    collection: str
    name: str | None = None
    sex: str | None = None
    phantom: str | None = None
    species_description: str | None = None


@dataclass(frozen=True, slots=True)
class Study:
    """One study of a patient (``getPatientStudy``)."""

    study_uid: str
    patient_id: str
    collection: str
    date: dt.date | None = None
    description: str | None = None
    study_id: str | None = None
    patient_age: str | None = None
    series_count: int | None = None
    longitudinal_event_type: str | None = None
    longitudinal_offset: str | None = None


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a study (``getSeries`` / ``getUpdatedSeries``)."""

    series_uid: str
    study_uid: str
    patient_id: str | None = None
    collection: str | None = None
    modality: str | None = None
    description: str | None = None
    number: int | None = None
    date: dt.date | None = None
    body_part: str | None = None
    protocol_name: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    software_versions: str | None = None
    image_count: int | None = None
    file_size: int | None = None
    timestamp: dt.datetime | None = None
    date_released: dt.datetime | None = None
    license_name: str | None = None
    license_uri: str | None = None
    collection_uri: str | None = None


@dataclass(frozen=True, slots=True)
class SeriesSize:
    """``getSeriesSize``: total bytes and object count of a series."""

    total_bytes: int
    object_count: int


@dataclass(frozen=True, slots=True)
class DrillDownSeries:
    """One ``seriesList`` entry of ``getStudyDrillDownWithSeriesIds``."""

    series_uid: str
    series_pk_id: int
    study_uid: str | None = None
    patient_id: str | None = None
    collection: str | None = None
    number_images: int | None = None
    exact_size: int | None = None
    modality: str | None = None
    description: str | None = None
    series_number: str | None = None


@dataclass(frozen=True, slots=True)
class DrillDownStudy:
    """One study of ``getStudyDrillDownWithSeriesIds`` with its series."""

    study_uid: str
    date: dt.date | None = None
    description: str | None = None
    series: tuple[DrillDownSeries, ...] = ()


@dataclass(frozen=True, slots=True)
class Instance:
    """One DICOM instance (file) of a series.

    ``number`` (InstanceNumber) and ``size`` (exact bytes of the Part-10 file) are known only when
    they came from ``getImageDrillDown``; ``getSOPInstanceUIDs`` gives neither.
    """

    sop_uid: str
    series_uid: str
    number: int | None = None
    size: int | None = None
    study_uid: str | None = None
    image_pk_id: int | None = None


@dataclass(frozen=True, slots=True)
class DrillDown:
    """Exact instances per series from one drill-down route (series it does not know are absent)."""

    route: str  # "v4" (anonymous) or "advanced" (token)
    instances: dict[str, list[Instance]]


@dataclass(frozen=True, slots=True)
class CollectionDescription:
    """``getCollectionDescriptions``."""

    collection: str
    description: str | None = None
    description_uri: str | None = None
    license_id: int | None = None
    timestamp: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class License:
    """``getLicenses``."""

    id: int
    short_name: str | None = None
    long_name: str | None = None
    url: str | None = None
    commercial_use: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One file of a streamed ``getImage`` zip, as delivered by the client."""

    name: str
    size: int


@dataclass
class Token:
    """An OAuth token pair with absolute expiry times on the ``time.monotonic`` clock."""

    access_token: str
    expires_at: float
    refresh_token: str | None = None
    refresh_expires_at: float | None = None
    token_type: str = "Bearer"
    #: When it was requested (same clock as ``expires_at``): its lifetime is ``expires_at - issued_at``.
    issued_at: float | None = None
    extra: dict[str, object] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return f"Token(expires_at={self.expires_at:.0f}, has_refresh={self.refresh_token is not None})"
