"""TCIA manifests (``.tcia`` files, what the TCIA portal's cart exports) and the part of the tree they name.

What it owns: reading a manifest (:func:`read_manifest`) and turning its series into a :class:`Scope`,
the set of collections, patients, studies and series a manifest mount shows, a download fetches and a
prefetch fills (:func:`resolve_scope`).

The format, as the NBIA Data Retriever reads it: ``key=value`` header lines (``downloadServerUrl=``,
``includeAnnotation=``, ``noOfrRetry=``, ``databasketId=``, ``manifestVersion=``), then a line
``ListOfSeriesToDownload=`` and one SeriesInstanceUID per line. Blank lines and surrounding spaces are
ignored; a Windows line end or a byte-order mark is fine; anything that is not a UID after the list
starts is an error naming the line (a truncated download of the manifest must not silently become a
smaller cart). A file with no ``ListOfSeriesToDownload=`` line but only UIDs is accepted too.

Resolving asks the server where each series lives: one v4 ``getSeriesMetadata`` per 200 series
(``Project``, ``Patient ID``, ``Study Instance UID``), or ``getSeries?SeriesInstanceUID=`` per series on
a server without v4. A series the server does not know (or the account may not see) is reported, not
silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, NbiaError, OfflineError

log = logging.getLogger(__name__)

LIST_KEY = "ListOfSeriesToDownload"
#: A DICOM UID: digits and dots, no leading zeros required to be checked here, at most 64 characters.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Series per getSeriesMetadata call.
METADATA_BATCH = 200
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed ``.tcia`` manifest: its header values and its series, in file order, each once."""

    path: str
    header: dict[str, str]
    series: tuple[str, ...]

    @property
    def server_hint(self) -> str | None:
        """The NBIA server the manifest came from (the part of ``downloadServerUrl`` before
        ``/nbia-download`` or ``/nbia-api``), or None."""
        url = self.header.get("downloadServerUrl", "").strip()
        for marker in ("/nbia-download", "/nbia-api"):
            if marker in url:
                return url.split(marker, 1)[0] or None
        return None


def is_uid(text: str) -> bool:
    return len(text) <= 64 and bool(_UID_RE.match(text))


def parse_manifest(text: str, path: str = "<manifest>") -> Manifest:
    """Parse the text of a manifest; ConfigError naming the line for anything that is not one."""
    header: dict[str, str] = {}
    series: list[str] = []
    in_list = False
    saw_list = False
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_list and "=" in line:
            key, _, value = line.partition("=")
            key = key.strip()
            if key == LIST_KEY:
                in_list = saw_list = True
                if value.strip():  # a UID on the same line
                    line = value.strip()
                else:
                    continue
            else:
                header[key] = value.strip()
                continue
        if not is_uid(line):
            raise ConfigError(f"{path}, line {number}: {line[:80]!r} is not a SeriesInstanceUID")
        in_list = True
        series.append(line)
    if not series:
        hint = "" if saw_list else f" (no {LIST_KEY}= line: is this a TCIA manifest?)"
        raise ConfigError(f"{path}: the manifest lists no series{hint}")
    unique = tuple(dict.fromkeys(series))
    if len(unique) != len(series):
        log.info("%s lists %d series more than once", path, len(series) - len(unique))
    return Manifest(path, header, unique)


def read_manifest(path: str | Path) -> Manifest:
    """Read and parse the manifest file at ``path``."""
    file = Path(path).expanduser()
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            raise ConfigError(f"{file}: larger than {MAX_MANIFEST_BYTES // 1024**2} MiB: not a manifest")
        text = file.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise ConfigError(f"manifest {file} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"manifest {file} is not a text file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {file}: {exc.strerror or exc}") from None
    return parse_manifest(text, str(file))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one series lives."""

    collection: str
    patient_id: str
    study_uid: str


@dataclass(slots=True)
class Scope:
    """The part of the tree a manifest names: its series and every folder above them."""

    series: dict[str, Placement] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # series the server did not place
    collections: set[str] = field(init=False, default_factory=set)
    patients: set[tuple[str, str]] = field(init=False, default_factory=set)
    studies: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        for place in self.series.values():
            self.collections.add(place.collection)
            self.patients.add((place.collection, place.patient_id))
            self.studies.add(place.study_uid)

    def has_collection(self, name: str) -> bool:
        return name in self.collections

    def has_patient(self, collection: str, patient_id: str) -> bool:
        return (collection, patient_id) in self.patients

    def has_study(self, study_uid: str) -> bool:
        return study_uid in self.studies

    def has_series(self, series_uid: str) -> bool:
        return series_uid in self.series


def _placement(row: dict[str, Any]) -> tuple[str, Placement] | None:
    series = str(row.get("Series Instance UID") or row.get("SeriesInstanceUID") or "").strip()
    coll = str(row.get("Project") or row.get("Collection") or "").strip()
    patient = str(row.get("Patient ID") or row.get("PatientID") or "").strip()
    study = str(row.get("Study Instance UID") or row.get("StudyInstanceUID") or "").strip()
    if not (series and coll and patient and study):
        return None
    return series, Placement(coll, patient, study)


def resolve_scope(client: Any, series_uids: Sequence[str]) -> Scope:
    """Where each series lives, asked of the server (see the module docstring)."""
    found: dict[str, Placement] = {}
    wanted = list(dict.fromkeys(series_uids))
    if client.search_version == "v4":
        for start in range(0, len(wanted), METADATA_BATCH):
            for row in client.series_metadata(wanted[start:start + METADATA_BATCH]):
                placed = _placement(row)
                if placed is not None and placed[0] in wanted:
                    found[placed[0]] = placed[1]
    else:
        for uid in wanted:
            for series in client.series(series_uid=uid):
                if series.series_uid == uid and series.collection and series.patient_id:
                    found[uid] = Placement(series.collection, series.patient_id, series.study_uid)
    missing = [u for u in wanted if u not in found]
    if missing:
        log.warning("the server does not know %d of the manifest's %d series (or this account may not see "
                    "them): %s%s", len(missing), len(wanted), ", ".join(missing[:3]), "..." if len(missing) > 3 else "")
    return Scope(found, missing)


def scope_of(client: Any, manifests: Iterable[Manifest], meta: Any = None, offline: bool = False) -> Scope:
    """The scope of several manifests together; NbiaError when none of their series can be placed.

    With ``meta`` (a MetadataCache) the placements are kept there, so a remount (or an ``--offline``
    one) of the same manifest asks the server nothing.
    """
    series = list(dict.fromkeys(uid for m in manifests for uid in m.series))

    def load() -> tuple[dict[str, Placement], list[str]]:
        if offline:
            raise OfflineError("offline, and this manifest was never resolved while online")
        resolved = resolve_scope(client, series)
        return resolved.series, resolved.missing

    if meta is None:
        placed, missing = load()
    else:
        key = hashlib.sha256("\n".join(series).encode()).hexdigest()
        placed, missing = meta.get_or_load("manifest", (key,), load)
    scope = Scope(dict(placed), list(missing))
    if not scope.series:
        raise NbiaError(f"the server knows none of the manifest's {len(series)} series")
    return scope
