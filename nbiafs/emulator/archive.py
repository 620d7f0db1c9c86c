"""The emulator's archive on disk: typed entries, the JSON index, lookups, and ``ensure_archive``.

An archive directory holds ``index.json`` (every collection, patient, study, series and instance with
its metadata, exact size and md5, and the profile it was built from) and ``dicom/<series>/<nnnnn>.dcm``
files. It is the ground truth that tests compare the mount against. ``ensure_archive`` builds it
once, from a profile (:mod:`.profiles`: the sample archive of :mod:`.samples` by default, or a
synthetic one of :mod:`.synthetic`), in a temporary directory renamed into place, so a killed build
never leaves half an archive behind. An archive records its profile's canonical spec, and asking a
folder for another profile than the one it holds is refused: a benchmark never runs on the wrong data.

An :class:`Archive` never changes once built. The emulator publishes new series
(:mod:`.addseries`) by building a new ``Archive`` from an old one plus the additions and swapping
the reference.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .accounts import sees_restricted

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
#: Bump when the archive's content or layout changes: older archives are rebuilt.
ARCHIVE_FORMAT = 5
#: The profile of the sample archive (what an index without a profile was built from).
SAMPLE_PROFILE = "sample"


@dataclass(frozen=True)
class LicenseEntry:
    id: int
    short_name: str
    long_name: str
    url: str
    commercial_use: str


@dataclass(frozen=True)
class CollectionEntry:
    name: str
    restricted: bool
    description: str
    license: LicenseEntry
    description_uri: str
    pk_id: int
    timestamp: dt.datetime


@dataclass(frozen=True)
class PatientEntry:
    patient_id: str
    collection: str
    name: str | None
    sex: str | None
    pk_id: int


@dataclass(frozen=True)
class StudyEntry:
    uid: str
    patient_id: str
    collection: str
    date: dt.date | None
    description: str | None
    study_id: str | None
    patient_age: str | None
    pk_id: int
    series_count: int


@dataclass(frozen=True)
class SeriesEntry:
    uid: str
    study_uid: str
    patient_id: str
    collection: str
    number: int | None
    description: str | None
    modality: str
    pk_id: int
    date: dt.date | None
    body_part: str | None
    protocol_name: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    software_versions: str | None
    timestamp: dt.datetime
    date_released: dt.datetime
    image_count: int
    file_size: int


@dataclass(frozen=True)
class InstanceEntry:
    sop_uid: str
    series_uid: str
    study_uid: str
    instance_number: int
    rel_path: str
    path: Path
    size: int
    md5: str
    pk_id: int


def _date(text: str | None) -> dt.date | None:
    return dt.date.fromisoformat(text) if text else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, Path):
        return None
    if isinstance(value, LicenseEntry):
        return value.id
    return value


def _row(entry: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in vars(entry).items() if k not in skip}


class Archive:
    """The archive's tree as typed entries, with lookup helpers. Immutable once loaded."""

    def __init__(self, root: Path, licenses: list[LicenseEntry], collections: list[CollectionEntry],
                 patients: list[PatientEntry], studies: list[StudyEntry], series: list[SeriesEntry],
                 instances: list[InstanceEntry], profile: str = SAMPLE_PROFILE) -> None:
        self.root = root
        self.profile = profile
        self.licenses = tuple(licenses)
        self.collections = tuple(collections)
        self.patients = tuple(patients)
        self.studies = tuple(studies)
        self.series = tuple(series)
        self.instances = tuple(instances)
        self._collection = {c.name: c for c in collections}
        self._study = {s.uid: s for s in studies}
        self._series = {s.uid: s for s in series}
        self._series_pk = {s.pk_id: s for s in series}
        self._instance = {i.sop_uid: i for i in instances}
        self._by_series: dict[str, list[InstanceEntry]] = {}
        for inst in instances:
            self._by_series.setdefault(inst.series_uid, []).append(inst)
        for lst in self._by_series.values():
            lst.sort(key=lambda i: i.instance_number)

    # ---- lookups -------------------------------------------------------------------------------
    def collection(self, name: str) -> CollectionEntry | None:
        return self._collection.get(name)

    def public_collections(self) -> list[CollectionEntry]:
        return [c for c in self.collections if not c.restricted]

    def restricted_collections(self) -> list[CollectionEntry]:
        return [c for c in self.collections if c.restricted]

    def visible_collections(self, user: str | None) -> list[CollectionEntry]:
        """Collections ``user`` may see (``None``, an unauthenticated caller, sees nothing)."""
        if user is None:
            return []
        return [c for c in self.collections if not c.restricted or sees_restricted(user)]

    def is_visible(self, collection: str, user: str | None) -> bool:
        entry = self._collection.get(collection)
        if entry is None or user is None:
            return False
        return not entry.restricted or sees_restricted(user)

    def patients_of(self, collection: str) -> list[PatientEntry]:
        return [p for p in self.patients if p.collection == collection]

    def studies_of(self, collection: str, patient_id: str | None = None) -> list[StudyEntry]:
        return [s for s in self.studies
                if s.collection == collection and (patient_id is None or s.patient_id == patient_id)]

    def study_by_uid(self, uid: str) -> StudyEntry | None:
        return self._study.get(uid)

    def series_of_study(self, study_uid: str) -> list[SeriesEntry]:
        return [s for s in self.series if s.study_uid == study_uid]

    def series_by_uid(self, uid: str) -> SeriesEntry | None:
        return self._series.get(uid)

    def series_by_pk(self, pk_id: int) -> SeriesEntry | None:
        return self._series_pk.get(pk_id)

    def instances_of(self, series_uid: str) -> list[InstanceEntry]:
        """The series' instances sorted by instance number (empty for an unknown series)."""
        return list(self._by_series.get(series_uid, ()))

    def instance_by_uid(self, sop_uid: str) -> InstanceEntry | None:
        return self._instance.get(sop_uid)

    def total_size(self) -> int:
        return sum(i.size for i in self.instances)

    # ---- index (de)serialisation ---------------------------------------------------------------
    def to_index(self) -> dict[str, Any]:
        return {
            "format": ARCHIVE_FORMAT,
            "profile": self.profile,
            "licenses": [_row(x) for x in self.licenses],
            "collections": [_row(x) for x in self.collections],
            "patients": [_row(x) for x in self.patients],
            "studies": [_row(x) for x in self.studies],
            "series": [_row(x) for x in self.series],
            "instances": [_row(x, skip=("path",)) for x in self.instances],
        }

    @classmethod
    def from_index(cls, root: Path, index: dict[str, Any]) -> Archive:
        licenses = [LicenseEntry(**x) for x in index["licenses"]]
        by_id = {x.id: x for x in licenses}
        collections = [
            CollectionEntry(**{**x, "license": by_id[x["license"]],
                               "timestamp": dt.datetime.fromisoformat(x["timestamp"])})
            for x in index["collections"]]
        patients = [PatientEntry(**x) for x in index["patients"]]
        studies = [StudyEntry(**{**x, "date": _date(x["date"])}) for x in index["studies"]]
        series = [SeriesEntry(**{**x, "date": _date(x["date"]),
                                 "timestamp": dt.datetime.fromisoformat(x["timestamp"]),
                                 "date_released": dt.datetime.fromisoformat(x["date_released"])})
                  for x in index["series"]]
        instances = [InstanceEntry(**{**x, "path": root / x["rel_path"]}) for x in index["instances"]]
        return cls(root, licenses, collections, patients, studies, series, instances,
                   profile=index.get("profile", SAMPLE_PROFILE))

    def write_index(self) -> None:
        text = json.dumps(self.to_index(), indent=1, ensure_ascii=False, sort_keys=True)
        (self.root / INDEX_NAME).write_text(text + "\n", encoding="utf-8")


def load_archive(root: Path) -> Archive:
    """Load an archive built earlier; ConfigError when it is damaged (missing or resized files)."""
    try:
        index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"emulator archive {root}: unreadable index ({exc}); delete the folder to rebuild") from exc
    if index.get("format") != ARCHIVE_FORMAT:
        raise _OutdatedArchive(root)
    archive = Archive.from_index(root, index)
    for inst in archive.instances:
        try:
            size = inst.path.stat().st_size
        except OSError:
            size = -1
        if size != inst.size:
            raise ConfigError(f"emulator archive {root} is damaged ({inst.rel_path}); delete the folder to rebuild")
    return archive


class _OutdatedArchive(ConfigError):
    def __init__(self, root: Path) -> None:
        super().__init__(f"emulator archive {root} has an older format")
        self.root = root


def ensure_archive(data_dir: str | os.PathLike[str], profile: str | None = None) -> Archive:
    """Return the archive in ``data_dir``, building it first if it does not exist yet.

    ``profile``: a profile name or spec (``"sample"``, ``"ct200"``, ``"wide:patients=3"``,
    ``"synthetic:patients=2,series=3,instances=5,rows=32"``; see :mod:`.profiles`). ``None`` takes
    whatever archive ``data_dir`` holds and builds the sample archive in an empty one. A folder
    holding another profile's archive is refused (ConfigError), never rebuilt.

    Idempotent and deterministic (every build of a profile writes the same bytes). The build happens
    in a temporary sibling directory that is renamed into place, so a killed build leaves no half
    archive. An existing non-empty directory that is not an archive is refused (nothing of the
    user's is deleted).
    """
    from .profiles import parse_profile

    wanted = parse_profile(profile) if profile is not None else None
    root = Path(data_dir).expanduser().absolute()
    if (root / INDEX_NAME).exists():
        try:
            archive = load_archive(root)
        except _OutdatedArchive:
            recorded = _recorded_profile(root)
            if wanted is not None and wanted.canonical != recorded:
                raise ConfigError(f"emulator archive {root} holds profile {recorded!r} (in an older format), not "
                                  f"{wanted.canonical!r}; choose another --data folder (or delete this one)") from None
            log.info("rebuilding outdated emulator archive in %s (profile %s)", root, recorded)
            return _build(root, _builder(parse_profile(recorded)), replace=True)
        if wanted is not None and archive.profile != wanted.canonical:
            raise ConfigError(f"emulator archive {root} holds profile {archive.profile!r}, not "
                              f"{wanted.canonical!r}; choose another --data folder (or delete this one)")
        return archive
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} exists and is not an emulator archive; choose another --data folder")
    return _build(root, _builder(wanted), replace=False)


def _recorded_profile(root: Path) -> str:
    """The profile an archive's index names (indexes from before profiles existed hold the sample)."""
    try:
        index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
        return str(index.get("profile", SAMPLE_PROFILE))
    except (OSError, ValueError, AttributeError):
        return SAMPLE_PROFILE


def _builder(wanted: Any) -> Any:
    """``root -> Archive`` for a parsed profile (``None``: the sample archive)."""
    if wanted is None or wanted.canonical == SAMPLE_PROFILE:
        from . import samples  # deferred: building needs pydicom and numpy; looked up late so tests can patch it

        return lambda root: samples.build_into(root)
    from . import synthetic

    return lambda root: synthetic.build_into(root, wanted)


def _build(root: Path, build_into: Any, *, replace: bool) -> Archive:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        archive = build_into(tmp)
        archive.write_index()
        if replace:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "a")
            shutil.rmtree(old, ignore_errors=True)
        elif root.exists():
            try:
                root.rmdir()  # the empty directory checked by the caller
            except OSError:
                pass  # filled (or removed) meanwhile by a concurrent build: the rename below decides
        try:
            os.rename(tmp, root)
        except OSError:
            if (root / INDEX_NAME).exists():  # a concurrent build won the race: use its result
                shutil.rmtree(tmp, ignore_errors=True)
                return load_archive(root)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built emulator archive in %s (%d instances)", root, len(archive.instances))
    return load_archive(root)
