"""Which parameters each v4 endpoint accepts; anything else is refused as the v4 source refuses it.

The v4 resources check every query parameter name (``Invalid query parameter: 'x'. Allowed parameters
are: [...]``, 400) and the POST ones every form field name (``Invalid form parameter: ...``). A
parameter that is allowed but empty is no error. The table is the v4 source's ``allowedParams``,
plus ``format`` on the listings that take one.
"""

from __future__ import annotations

from .replies import HttpError, Request

_LISTING = frozenset({"format"})

ALLOWED: dict[str, frozenset[str]] = {
    "getCollectionValues": _LISTING,
    "getPatient": _LISTING | {"Collection", "PatientID"},
    "getPatientStudy": _LISTING | {"Collection", "PatientID", "StudyInstanceUID"},
    "getSeries": _LISTING | {"Collection", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined",
                             "ManufacturerModelName", "Manufacturer", "SeriesInstanceUID"},
    "getUpdatedSeries": _LISTING | {"fromDate"},
    "getSOPInstanceUIDs": _LISTING | {"SeriesInstanceUID"},
    "getSeriesSize": _LISTING | {"SeriesInstanceUID"},
    "getSingleImage": frozenset({"SeriesInstanceUID", "SOPInstanceUID"}),
    "getImage": frozenset({"SeriesInstanceUID", "NewFileNames", "IncludeMD5"}),
    "getImageWithMD5Hash": frozenset({"SeriesInstanceUID"}),
    "getM5HashForImage": frozenset({"SOPInstanceUid"}),
    "getMD5HashForImage": frozenset({"SOPInstanceUID"}),
    "getCollectionDescriptions": frozenset({"collectionName"}),
    "getStudyDrillDownWithSeriesIds": frozenset({"list"}),
    "getImageDrillDown": frozenset({"list"}),
    "getMD5Hierarchy": frozenset({"SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection"}),
    "getSeriesMetadata": frozenset({"list"}),
}

#: v4 endpoints that are POST forms (the others are GET with a query string).
POST_ONLY = frozenset({"getStudyDrillDownWithSeriesIds", "getImageDrillDown", "getMD5Hierarchy",
                       "getSeriesMetadata"})


def check(name: str, req: Request) -> None:
    """Raise the v4 400 for the first parameter ``name`` does not accept."""
    allowed = ALLOWED.get(name, frozenset())
    shown = "[" + ", ".join(sorted(allowed)) + "]"
    for kind, names in (("query", req.query), ("form", req.form)):
        for param in names:
            if param not in allowed:
                message = f"Invalid {kind} parameter: '{param}'. Allowed parameters are: {shown}"
                raise HttpError(400, message.encode("utf-8"))
