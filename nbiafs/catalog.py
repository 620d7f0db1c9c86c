"""The lazy tree: Collection / Patient / Study / Series directories and instance files as nodes.

Owns: turning paths into :class:`Node` objects, listing a directory the first time it is needed
(one metadata call per level, two per study for the exact sizes of all its series), naming (via
:mod:`nbiafs.naming`) and keeping listings (via :mod:`nbiafs.metacache`). Costs, which tests count:

* listing ``/``, a collection, a patient or a study: one client call; the first series of a study:
  one drill-down pair (``study_drilldown`` + ``image_drilldown``) for every series of the study not
  listed yet, the others then none; without a drill-down, ``sop_instance_uids`` plus one probe per
  instance;
* ``lookup`` of anything whose parent was listed, or of an unknown name in a listed parent: zero;
* a deep ``lookup`` of a never-listed path lists each missing ancestor once;
* concurrent listings of one directory: one call (single-flight per key in the metadata cache).

Exact sizes: from ``getImageDrillDown`` by the client's first working route (anonymous v4, then the
token one: :meth:`nbiafs.client.NbiaClient.drilldown`); where no route works (``use_drilldown=False``,
refused, missing, or it does not know the series) sizes are learned by fetching each instance
through ``probe(series_uid, sop_uid) -> (size, instance_number)`` (the store does this and keeps the
bytes). Without a probe that is a :class:`ProtocolError`: sizes are never guessed. A size of 0 or
less is unknown (the client drops it) and learned the same way, never shown as an empty file.

Failures are errors, never absences: a listing that fails raises (EIO above), caches nothing, and
the next lookup asks again; :class:`NotFoundError` (ENOENT) means only "not in a successful listing".

A :class:`~nbiafs.manifest.Scope` (a manifest mount) hides every collection, patient, study and
series outside it; names are given over the full listings first, so a folder has the same name with
and without the manifest.

Node identity: ``ino`` is a 63-bit blake2b hash of (namespace, kind, identifiers), stable across
remounts and never 0 or 1 (1 is the root); an instance file's has its position in its series' name
order in its low bits (:func:`series_file_inos`: ``cp -r`` reads a folder in inode order); ``mtime``
comes from metadata dates, never from now().
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import cachetools

from . import naming
from .errors import (
    NbiaError,
    NotFoundError,
    OfflineError,
    ProtocolError,
    ServerError,
)
from .lrumap import ExpiringLRU
from .manifest import Scope
from .metacache import MetadataCache
from .records import Collection, DrillDown, Instance, Patient, Series, Study
from .singleflight import Flight

log = logging.getLogger(__name__)

#: mtime of nodes without a date (root, collections, patients, undated studies): 2000-01-01 UTC.
#: Fixed so that pydicom's "file changed" check never fires; any constant would do.
DEFAULT_MTIME = 946684800.0
ROOT_INO = 1
#: Built listings (name -> Node) kept per catalog; the records behind them live in the MetadataCache.
LISTINGS_MAXSIZE = 1024
#: Nodes (~0.5 KB each) kept in those listings in all: a walk over series of thousands of instances
#: would otherwise keep LISTINGS_MAXSIZE big listings (gigabytes). A bigger listing is rebuilt from
#: the metadata cache when needed.
LISTINGS_MAX_NODES = 250_000
#: How long a built series listing (its instances never change) is kept, memory allowing.
STABLE_TTL = 10 * 365 * 86400.0
#: getUpdatedSeries is asked from this long before the oldest listing it checks (clock skew, time zones).
UPDATED_MARGIN = dt.timedelta(days=1)
#: Parallel probes when sizes must be learned by fetching (without the drill-down).
PROBE_WORKERS = 8
#: Series per drill-down pair: all the series of a study at once, in batches of this many.
DRILLDOWN_BATCH = 200
#: Drilled-down instances waiting for their series' listing (records, all series together) and for how long.
DRILLED_MAX_RECORDS = 200_000
DRILLED_TTL = 600.0
#: A thread waiting for another thread's drill-down of the same study gives up after this long.
DRILL_WAIT = 600.0
#: Metadata beside the images (with ``meta_files``): dot-names, so DICOM readers that skip hidden files
#: (dcm2niix, GDCM) still see exactly the DICOM files. Folder kind -> (name, node kind).
META_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "root": ((".nbiafs", "metadir"),),
    "collection": ((".collection.json", "meta"),),
    "series": ((".series.json", "meta"),),
}
METADIR_FILES = ("stats.json",)

Probe = Callable[[str, str], "tuple[int, int | None]"]


class _Client(Protocol):  # the part of NbiaClient the catalog uses
    def collections(self) -> list[Collection]: ...
    def patients(self, collection: str) -> list[Patient]: ...
    def studies(self, collection: str, patient_id: str | None = None,
                study_uid: str | None = None) -> list[Study]: ...
    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_uid: str | None = None, series_uid: str | None = None,
               modality: str | None = None) -> list[Series]: ...
    def sop_instance_uids(self, series_uid: str) -> list[str]: ...
    def drilldown(self, series_uids: Sequence[str]) -> DrillDown | None: ...
    def updated_series(self, from_date: dt.date) -> list[Series]: ...


@dataclass(frozen=True, slots=True)
class Node:
    """One entry of the tree: a directory (root/collection/patient/study/series), an instance, or a
    metadata file beside them (``meta``: ``.collection.json``, ``.series.json``, the ``.nbiafs`` folder
    (``metadir``) and its files)."""

    kind: str  # "root" | "collection" | "patient" | "study" | "series" | "instance" | "meta" | "metadir"
    path: str  # "/Coll/Patient/Study/Series/1-001.dcm"
    ino: int
    mtime: float
    size: int = 0  # exact bytes for instances, 0 for directories
    collection: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    image_count: int | None = None  # series: ImageCount announced by getSeries, when known
    instance_number: int | None = None  # instance: InstanceNumber, when known
    #: the record the node was made from (Collection, Patient, Study, Series, Instance), for metadata
    record: object = field(default=None, compare=False, repr=False)

    @property
    def is_dir(self) -> bool:
        return self.kind not in ("instance", "meta")

    @property
    def nlink(self) -> int:
        return 2 if self.is_dir else 1


@dataclass(frozen=True, slots=True)
class RefreshReport:
    """What ``Catalog.refresh`` did."""

    path: str
    added: list[str]
    removed: list[str]
    forgotten: int  # listings forgotten (to be listed again when next needed)
    changed_series: int | None  # what getUpdatedSeries reported (None: not asked)
    note: str


#: The low bits of an instance file's inode number: its position in its series' name (reading) order.
POSITION_BITS = 24


def series_file_inos(namespace: str, ids: tuple[object, ...], sop_uids: Sequence[str]) -> list[int]:
    """The inode numbers of a series' files (``ids`` name the series), given in name order.

    Programs that copy a folder read its files in inode order (``cp -r`` sorts them so, for the disk's
    sake): numbered in name order, they read a series in its reading order, which the read-ahead
    follows, instead of at random. Each is the series' own hash with the file's position in its low
    bits; stable across remounts (a series never changes); past 2**24 - 2 files, hashes alone."""
    base = stable_ino(namespace, "series files", *ids) & ~((1 << POSITION_BITS) - 1)
    limit = (1 << POSITION_BITS) - 2
    return [base | (position + 2) if position < limit else stable_ino(namespace, "instance", *ids, sop_uid)
            for position, sop_uid in enumerate(sop_uids)]


def stable_ino(namespace: str, kind: str, *ids: object) -> int:
    """A 63-bit inode number from (namespace, kind, ids); never 0 or 1."""
    blob = json.dumps([namespace, kind, *[None if i is None else str(i) for i in ids]],
                      ensure_ascii=False).encode("utf-8")
    value = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") & (2**63 - 1)
    return value if value > ROOT_INO else value + 2


def _epoch(value: dt.date | dt.datetime | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        when = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    else:
        when = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def _split(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise NotFoundError(f"not an absolute path: {path!r}")
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise NotFoundError(f"no such path: {path!r}")
    return parts


def _is_list_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(x, kind) for x in value)


class Catalog:
    """The tree of one mount, listed lazily from the client through the metadata cache."""

    def __init__(self, client: _Client, meta: MetadataCache, *, layout: str = "descriptive",
                 offline: bool = False, use_drilldown: bool = True,
                 on_series_listed: Callable[[Node, list[Node]], None] | None = None,
                 probe: Probe | None = None, probe_workers: int = PROBE_WORKERS,
                 scope: Scope | None = None, meta_files: bool = False) -> None:
        if layout not in naming.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        self.client = client
        self.meta = meta
        self.layout = layout
        self.offline = offline
        self.use_drilldown = use_drilldown
        self.on_series_listed = on_series_listed
        self.probe = probe
        self.probe_workers = max(1, probe_workers)
        #: a manifest's part of the tree: only its series and the folders above them are shown
        self.scope = scope
        self.meta_files = meta_files
        self.namespace = meta.namespace
        self.root = Node("root", "/", ROOT_INO, DEFAULT_MTIME)
        least = max(1, LISTINGS_MAX_NODES // LISTINGS_MAXSIZE)  # so at most LISTINGS_MAXSIZE listings fit
        # built listings live as long as the records behind them: a series' for good, the others the ttl
        self._listings: ExpiringLRU[str, dict[str, Node]] = ExpiringLRU(
            LISTINGS_MAX_NODES, lambda path, built, now: now + (STABLE_TTL if path.count("/") == 4 else meta.ttl),
            getsizeof=lambda built: max(least, len(built) + 1))
        self._drilled: cachetools.TTLCache[str, list[Instance]] = cachetools.TTLCache(
            DRILLED_MAX_RECORDS, DRILLED_TTL, getsizeof=lambda found: len(found) + 1)
        self._drill_flights: dict[str, Flight[None]] = {}
        self._series_files: cachetools.LRUCache[str, tuple[dict[str, Node], tuple[Node, ...]]] = \
            cachetools.LRUCache(1024)
        self._wait_timeout = DRILL_WAIT
        #: a drill-down answered with instances lately (listing a series is cheap); None: none tried yet
        self._drill_works: bool | None = None
        self._lock = threading.Lock()  # guards _listings, _drilled and _drill_flights

    # -- public -------------------------------------------------------------------------------
    def lookup(self, path: str) -> Node:
        """The node at ``path``; lists missing ancestors once each. NotFoundError, ForbiddenError."""
        node = self.root
        for name in _split(path):
            if not node.is_dir:
                raise NotFoundError(f"not a directory: {node.path}")
            child = self._listing(node).get(name)
            if child is None:
                raise NotFoundError(f"no such file or directory: {_join(node.path, name)}")
            node = child
        return node

    def children(self, path: str) -> list[Node]:
        """The entries of the directory at ``path``, sorted by name."""
        return self.children_of(self.lookup(path))

    def series_files(self, node: Node) -> tuple[Node, ...]:
        """The instance files of ``node``'s series, in name (reading) order: the same tuple for as long as
        the listing is kept, so the store computes positions in it once, not on every open."""
        parent_path = (node.path.rsplit("/", 1)[0] or "/") if node.kind == "instance" else node.path
        with self._lock:  # the open of a file just looked up: its series' listing is built
            known = self._series_files.get(parent_path)
            if known is not None and known[0] is self._listings.get(parent_path):
                return known[1]
        parent = self.lookup(parent_path) if node.kind == "instance" else node
        listing = self._listing(parent)
        with self._lock:
            known = self._series_files.get(parent.path)
            if known is not None and known[0] is listing:
                return known[1]
        files = tuple(n for n in listing.values() if n.kind == "instance")
        with self._lock:
            self._series_files[parent.path] = (listing, files)
        return files

    @property
    def series_listing_is_cheap(self) -> bool | None:
        """True when listing a series costs metadata calls only (the drill-down answered lately), not
        fetching its files to learn their sizes: what a walk-ahead may do unasked. None while no
        drill-down was tried yet (the next series listing tells)."""
        return self._drill_works if self.use_drilldown else False

    def children_of(self, node: Node) -> list[Node]:
        """The entries of the directory ``node`` (from a listing: no lookup from the root)."""
        if not node.is_dir:
            raise NotFoundError(f"not a directory: {node.path}")
        return list(self._listing(node).values())

    def instance(self, path: str) -> Node:
        """The instance node at ``path`` (NotFoundError for a directory or an unknown name)."""
        node = self.lookup(path)
        if node.kind != "instance":
            raise NotFoundError(f"not a DICOM instance file: {path}")
        return node

    def correct_size(self, node: Node, true_size: int) -> Node:
        """The server delivered ``node`` complete (by its own Content-Length) but of another size than
        the metadata said: remember the true size, so stat shows it and the file is not fetched again
        and again for a length it will never have. Logged once. Returns the corrected node."""
        series_uid = node.series_uid
        if node.kind != "instance" or series_uid is None or true_size == node.size:
            return node
        records = self.meta.get("instances", series_uid)
        if isinstance(records, list):
            fixed = [dataclasses.replace(i, size=true_size) if isinstance(i, Instance) and i.sop_uid == node.sop_uid
                     else i for i in records]
            self.meta.put("instances", series_uid, value=fixed)
        with self._lock:
            self._listings.pop(node.path.rsplit("/", 1)[0] or "/", None)
        log.warning("%s: the server sends %d bytes, its metadata said %d; showing the true size from now on",
                    node.path, true_size, node.size)
        return dataclasses.replace(node, size=true_size)

    # -- freshness ----------------------------------------------------------------------------
    def refresh(self, path: str) -> RefreshReport:
        """List ``path`` again now, and forget what may have changed below it (``nbiafs refresh``).

        Series never change, so a series (or a file) is never listed again. For a folder above, the
        listings cached below it that can change are checked with one ``getUpdatedSeries`` since the
        oldest of them was fetched: only the collections, patients and studies holding a changed or
        new series are listed again later, the rest stays. Without that answer (the server has no
        such endpoint, or nothing below was cached), every such listing below is forgotten. The
        folder's own listing is always made again at once, to tell what appeared and what went.
        """
        node = self.lookup(path)
        if node.kind not in ("root", "collection", "patient", "study"):
            return RefreshReport(node.path, [], [], 0, None, "a series never changes once published")
        before = set(self._listing(node))
        cached = self._cached_changing(node)
        own = self._listing_key(node)
        dropped: set[tuple[str, ...]] = set(cached) | {own}
        changed: int | None = None
        fetched = [t for t in (self.meta.fetched_at(key[0], *key[1:]) for key in cached) if t is not None]
        if fetched and len(cached) > 1 and not self.offline:
            since = dt.datetime.fromtimestamp(min(fetched), dt.timezone.utc).date() - UPDATED_MARGIN
            try:
                updated = self.client.updated_series(since)
            except NbiaError as exc:
                log.info("getUpdatedSeries failed (%s): forgetting every listing below %s", exc, node.path)
            else:
                changed = len(updated)
                touched = {own}
                for s in updated:
                    if s.collection and s.patient_id:
                        touched |= {("patients", s.collection), ("studies", s.collection, s.patient_id),
                                    ("series", s.collection, s.patient_id, s.study_uid)}
                touched.add(("collections",))
                dropped = {key for key in touched if key in cached or key == own}
        for key in dropped:
            self.meta.drop(key[0], *key[1:])
        prefix = node.path.rstrip("/") + "/"
        with self._lock:
            for built_path in [p for p in self._listings if p == node.path or p.startswith(prefix)]:
                if built_path.count("/") < 4:  # a series' listing stays: its instances do not change
                    self._listings.pop(built_path, None)
        after = set(self._listing(node))
        return RefreshReport(node.path, sorted(after - before), sorted(before - after), len(dropped), changed,
                             "listed again")

    @staticmethod
    def _listing_key(node: Node) -> tuple[str, ...]:
        """The metadata-cache key (what, *ids) of the listing of ``node``."""
        ids = [i for i in (node.collection, node.patient_id, node.study_uid) if i is not None]
        what = {"root": "collections", "collection": "patients", "patient": "studies", "study": "series"}[node.kind]
        return (what, *ids)

    def _cached_changing(self, node: Node) -> list[tuple[str, ...]]:
        """Keys of the listings that can change, cached at ``node`` and below (nothing is loaded)."""
        keys: list[tuple[str, ...]] = []

        def visit(key: tuple[str, ...]) -> list[Any]:
            records = self.meta.get(key[0], *key[1:])
            if records is None:
                return []
            keys.append(key)
            return list(records)

        collections = [str(node.collection)] if node.kind != "root" else [
            c.name for c in visit(("collections",)) if isinstance(c, Collection)]
        for coll in collections:
            patients = [str(node.patient_id)] if node.kind in ("patient", "study") else [
                p.patient_id for p in visit(("patients", coll)) if isinstance(p, Patient)]
            for pid in patients:
                studies = [str(node.study_uid)] if node.kind == "study" else [
                    s.study_uid for s in visit(("studies", coll, pid)) if isinstance(s, Study)]
                for study in studies:
                    visit(("series", coll, pid, study))
        return keys

    # -- listings -----------------------------------------------------------------------------
    def _listing(self, node: Node) -> dict[str, Node]:
        with self._lock:
            built = self._listings.get(node.path)
        if built is not None:
            return built
        builder = {
            "root": self._list_root,
            "collection": self._list_collection,
            "patient": self._list_patient,
            "study": self._list_study,
            "series": self._list_series,
            "metadir": self._list_metadir,
        }[node.kind]
        built = builder(node)
        if self.meta_files and node.kind in META_FILES:
            # dot-names sort first: the listing stays in name order
            built = {**{name: self._meta_node(node, name, kind) for name, kind in META_FILES[node.kind]}, **built}
        with self._lock:
            try:
                self._listings[node.path] = built
            except ValueError:  # bigger than the whole bound: rebuilt from the metadata cache
                log.debug("listing of %s (%d entries) too big to keep built", node.path, len(built))
        if node.kind == "series" and self.on_series_listed is not None:
            try:
                self.on_series_listed(node, list(built.values()))
            except Exception:
                log.warning("on_series_listed hook failed for %s", node.path, exc_info=True)
        return built

    def _load(self, what: str, ids: tuple[object, ...], loader: Callable[[], list[Any]],
              kind: type) -> list[Any]:
        def guarded() -> list[Any]:
            if self.offline:
                raise OfflineError(f"offline and not cached: the {what} listing of {'/'.join(map(str, ids)) or '/'}")
            result = list(loader())
            if not _is_list_of(kind)(result):
                raise ProtocolError(f"the client returned something other than {kind.__name__} records")
            return result

        return self.meta.get_or_load(what, ids, guarded, validate=_is_list_of(kind))

    def _list_root(self, node: Node) -> dict[str, Node]:
        records = self._load("collections", (), self.client.collections, Collection)
        records = [c for c in records if c.name]
        named = naming.assign_unique(records, lambda c: naming.collection_dirname(c.name, self.layout),
                                     lambda c: c.name)
        if self.scope is not None:
            named = {n: c for n, c in named.items() if self.scope.has_collection(c.name)}
        return {name: Node("collection", _join(node.path, name),
                           stable_ino(self.namespace, "collection", c.name), DEFAULT_MTIME,
                           collection=c.name, record=c)
                for name, c in named.items()}

    def _list_collection(self, node: Node) -> dict[str, Node]:
        coll = node.collection
        assert coll is not None
        records = self._load("patients", (coll,), lambda: self.client.patients(coll), Patient)
        kept = self._drop_unnamed(records, "patient_id", node)
        named = naming.assign_unique(kept, lambda p: naming.patient_dirname(p.patient_id, self.layout),
                                     lambda p: p.patient_id)
        if self.scope is not None:
            named = {n: p for n, p in named.items() if self.scope.has_patient(coll, p.patient_id)}
        return {name: Node("patient", _join(node.path, name),
                           stable_ino(self.namespace, "patient", coll, p.patient_id), DEFAULT_MTIME,
                           collection=coll, patient_id=p.patient_id, record=p)
                for name, p in named.items()}

    def _list_patient(self, node: Node) -> dict[str, Node]:
        coll, pid = node.collection, node.patient_id
        assert coll is not None and pid is not None
        records = self._load("studies", (coll, pid), lambda: self.client.studies(coll, pid), Study)
        kept = self._drop_unnamed(records, "study_uid", node)
        named = naming.assign_unique(kept, lambda s: naming.study_dirname(s, self.layout),
                                     lambda s: s.study_uid)
        if self.scope is not None:
            named = {n: s for n, s in named.items() if self.scope.has_study(s.study_uid)}
        return {name: Node("study", _join(node.path, name),
                           stable_ino(self.namespace, "study", coll, pid, s.study_uid),
                           _epoch(s.date) or DEFAULT_MTIME,
                           collection=coll, patient_id=pid, study_uid=s.study_uid, record=s)
                for name, s in named.items()}

    def _list_study(self, node: Node) -> dict[str, Node]:
        coll, pid, study = node.collection, node.patient_id, node.study_uid
        assert coll is not None and pid is not None and study is not None
        records = self._load("series", (coll, pid, study),
                             lambda: self.client.series(collection=coll, patient_id=pid, study_uid=study),
                             Series)
        kept = [s for s in self._drop_unnamed(records, "series_uid", node)
                if not s.study_uid or s.study_uid == study]
        if len(kept) != len([s for s in records if s.series_uid]):
            log.warning("ignored series of other studies in the listing of %s", node.path)
        named = naming.assign_unique(kept, lambda s: naming.series_dirname(s, self.layout),
                                     lambda s: s.series_uid)
        if self.scope is not None:
            named = {n: s for n, s in named.items() if self.scope.has_series(s.series_uid)}
        return {name: Node("series", _join(node.path, name),
                           stable_ino(self.namespace, "series", coll, pid, study, s.series_uid),
                           _epoch(s.date) or _epoch(s.timestamp) or node.mtime,
                           collection=coll, patient_id=pid, study_uid=study, series_uid=s.series_uid,
                           image_count=s.image_count, record=s)
                for name, s in named.items()}

    def _list_series(self, node: Node) -> dict[str, Node]:
        series_uid = node.series_uid
        assert series_uid is not None
        records = self._load("instances", (series_uid,), lambda: self._fetch_instances(node), Instance)
        named = sorted(naming.instance_filenames(records, self.layout).items())
        inos = series_file_inos(self.namespace, (node.collection, node.patient_id, node.study_uid, series_uid),
                                [i.sop_uid for _, i in named])
        return {name: Node("instance", _join(node.path, name), ino,
                           node.mtime, size=int(i.size or 0),
                           collection=node.collection, patient_id=node.patient_id,
                           study_uid=node.study_uid, series_uid=series_uid, sop_uid=i.sop_uid,
                           instance_number=i.number, record=i)
                for (name, i), ino in zip(named, inos)}

    def _meta_node(self, parent: Node, name: str, kind: str) -> Node:
        """A metadata file (or the ``.nbiafs`` folder) beside the images of ``parent``."""
        return Node(kind, _join(parent.path, name), stable_ino(self.namespace, kind, parent.path, name),
                    parent.mtime if parent.kind != "root" else DEFAULT_MTIME,
                    collection=parent.collection, patient_id=parent.patient_id, study_uid=parent.study_uid,
                    series_uid=parent.series_uid, record=parent)

    def _list_metadir(self, node: Node) -> dict[str, Node]:
        return {name: self._meta_node(node, name, "meta") for name in METADIR_FILES}

    @staticmethod
    def _drop_unnamed(records: list[Any], field: str, node: Node) -> list[Any]:
        # An empty identifier would widen the next query (no filter = everything): never list it.
        kept = [r for r in records if getattr(r, field)]
        if len(kept) != len(records):
            log.warning("ignored %d entries without %s in %s", len(records) - len(kept), field, node.path)
        return kept

    # -- instances of a series ----------------------------------------------------------------
    def _fetch_instances(self, node: Node) -> list[Instance]:
        series_uid = node.series_uid
        assert series_uid is not None
        instances = self._drilled_instances(node) if self.use_drilldown else None
        if instances is None:
            return self._probe_all(series_uid, self.client.sop_instance_uids(series_uid))
        if any(i.size is None for i in instances):
            sized = [i for i in instances if i.size is not None]
            unsized = [i for i in instances if i.size is None]
            log.info("drill-down gave no size for %d instances of %s; fetching them", len(unsized), series_uid)
            learned = {i.sop_uid: i for i in self._probe_all(series_uid, [i.sop_uid for i in unsized])}
            instances = sized + [Instance(i.sop_uid, series_uid, i.number if i.number is not None
                                          else learned[i.sop_uid].number, learned[i.sop_uid].size,
                                          i.study_uid, i.image_pk_id) for i in unsized]
        expected = node.image_count
        if expected is not None and len({i.sop_uid for i in instances}) < expected:
            # The drill-down listed fewer instances than getSeries announced: ask the search API for
            # the full list and learn the missing ones by fetching, rather than hide files.
            known = {i.sop_uid for i in instances}
            missing = [u for u in self.client.sop_instance_uids(series_uid) if u and u not in known]
            if missing:
                log.warning("series %s: the drill-down lists %d of %d images; fetching the %d missing",
                            series_uid, len(known), expected, len(missing))
                instances = instances + self._probe_all(series_uid, missing)
        if expected is not None and expected != len({i.sop_uid for i in instances}):
            log.warning("series %s: the server announced %d images but lists %d",
                        series_uid, expected, len(instances))
        return instances

    def _drilled_instances(self, node: Node) -> list[Instance] | None:
        """The drill-down's instances of ``node``'s series, or None when the drill-down cannot tell.

        One pair of calls covers every series of the study not listed yet (the drill-downs take lists),
        so a walk of a study costs two calls, not two per series; the siblings' answers wait in
        ``_drilled`` (bounded, short-lived) until their own listing takes them.
        """
        series_uid = node.series_uid
        assert series_uid is not None
        with self._lock:
            ready = self._drilled.pop(series_uid, None)
        if ready is not None:
            return ready
        study = node.study_uid or ""
        with self._lock:
            flight = self._drill_flights.get(study)
            leader = flight is None
            if leader:
                flight = self._drill_flights[study] = Flight()
        assert flight is not None
        if not leader:
            flight.wait(self._wait_timeout, lambda: ServerError(
                f"gave up waiting for the drill-down of study {study}"))
            with self._lock:
                ready = self._drilled.pop(series_uid, None)
            if ready is not None:
                return ready
            return self._drill([series_uid]).get(series_uid)  # not in that batch (listed meanwhile)
        try:
            batch = [series_uid] + [u for u in self._unlisted_siblings(node) if u != series_uid]
            found = self._drill(batch[:DRILLDOWN_BATCH])
            with self._lock:
                for uid, instances in found.items():
                    if uid != series_uid:
                        try:
                            self._drilled[uid] = instances
                        except ValueError:  # bigger than the whole bound: drilled again when listed
                            pass
            flight.succeed(None)
            return found.get(series_uid) if found else None
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            with self._lock:
                self._drill_flights.pop(study, None)
            flight.done.set()

    def _drill(self, series_uids: list[str]) -> dict[str, list[Instance]]:
        """Drill down ``series_uids``: {series: instances} for the series a route knows ({} for none)."""
        result = self.client.drilldown(series_uids)
        self._drill_works = result is not None and any(result.instances.values())
        if result is None:
            log.info("no drill-down route answered for %d series; sizes will be learned by fetching",
                     len(series_uids))
            return {}
        missing = [u for u in series_uids if u not in result.instances]
        if missing:
            log.info("the %s drill-down does not know %d of %d series; fetching those to learn sizes",
                     result.route, len(missing), len(series_uids))
        return result.instances

    def _unlisted_siblings(self, node: Node) -> list[str]:
        """Series UIDs of ``node``'s study whose instance listing is not cached yet."""
        parent = node.path.rsplit("/", 1)[0] or "/"
        try:
            siblings = self.children(parent)
        except NbiaError:  # the study listing itself failed: drill this series alone
            return []
        uids = [n.series_uid for n in siblings if n.kind == "series" and n.series_uid]
        return [u for u in uids if self.meta.get("instances", u) is None]

    def _probe_all(self, series_uid: str, sop_uids: list[str]) -> list[Instance]:
        sop_uids = sorted({u for u in sop_uids if u})
        if not sop_uids:
            return []
        probe = self.probe
        if probe is None:
            raise ProtocolError(f"cannot learn the exact file sizes of series {series_uid}: the drill-down "
                                "API is unavailable and no fetching probe was given")

        def one(sop_uid: str) -> Instance:
            size, number = probe(series_uid, sop_uid)
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"probe gave an invalid size for {sop_uid}: {size!r}")
            return Instance(sop_uid, series_uid, number=number, size=size)

        if len(sop_uids) == 1 or self.probe_workers == 1:
            return [one(u) for u in sop_uids]
        pool = ThreadPoolExecutor(max_workers=min(self.probe_workers, len(sop_uids)),
                                  thread_name_prefix="nbiafs-probe")
        try:
            return list(pool.map(one, sop_uids))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
