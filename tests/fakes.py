"""A fake NbiaClient for tests above the client layer (catalog, store, fs).

It answers the methods of the ``NbiaClient`` contract (docs/architecture.md) from an in-memory
:class:`FakeArchive`, and lets a test

* count calls per method (``fake.calls["patients"]``, ``fake.metadata_calls()``, ``fake.call_log``);
* shuffle every answer's order (``shuffle_seed=``), as the emulator and the real server do;
* inject errors (``fake.fail("image_drilldown", ForbiddenError("no"), times=1)``);
* hold calls until released, to test concurrency without sleeps
  (``gate = fake.gate("patients")``; ``gate.wait_entered(1)``; ... ``gate.release()``). A gate that is
  never released fails the held call with ServerError after ``gate_timeout`` so no test hangs.

``build_archive()`` makes a small deterministic archive; tests add hostile records with the
``FakeArchive.add_*`` methods.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nbiafs.client import drill_down
from nbiafs.errors import ProtocolError, RemoteNotFoundError, ServerError
from nbiafs.records import (
    Collection,
    CollectionDescription,
    DrillDown,
    DrillDownSeries,
    DrillDownStudy,
    Instance,
    License,
    Patient,
    Series,
    SeriesSize,
    Study,
    ZipMember,
)

METADATA_METHODS = frozenset({
    "collections", "patients", "studies", "series", "sop_instance_uids", "series_size",
    "updated_series", "study_drilldown", "image_drilldown", "collection_descriptions", "licenses",
})
LICENSE_TEXT = b"Fake archive: Creative Commons Attribution 4.0 (test data)\n"


def fake_dicom_bytes(sop_uid: str, size: int) -> bytes:
    """Deterministic bytes of exactly ``size`` (>= 132): a Part-10 preamble, ``DICM``, filler."""
    size = max(size, 132)
    seed = hashlib.sha256(sop_uid.encode()).digest()
    body = (seed * (size // len(seed) + 1))[: size - 132]
    return b"\0" * 128 + b"DICM" + body


@dataclass
class FakeArchive:
    """The records and bytes a FakeNbiaClient serves."""

    collections: list[Collection] = field(default_factory=list)
    patients: list[Patient] = field(default_factory=list)
    studies: list[Study] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    data: dict[str, bytes] = field(default_factory=dict)  # sop_uid -> Part-10 bytes
    series_pk: dict[str, int] = field(default_factory=dict)  # series_uid -> seriesPkId

    def add_collection(self, name: str) -> Collection:
        record = Collection(name)
        self.collections.append(record)
        return record

    def add_patient(self, collection: str, patient_id: str, **kw: Any) -> Patient:
        record = Patient(patient_id=patient_id, collection=collection, **kw)
        self.patients.append(record)
        return record

    def add_study(self, collection: str, patient_id: str, study_uid: str, **kw: Any) -> Study:
        record = Study(study_uid=study_uid, patient_id=patient_id, collection=collection, **kw)
        self.studies.append(record)
        return record

    def add_series(self, study: Study, series_uid: str, **kw: Any) -> Series:
        record = Series(series_uid=series_uid, study_uid=study.study_uid, patient_id=study.patient_id,
                        collection=study.collection, **kw)
        self.series.append(record)
        self.series_pk.setdefault(series_uid, 1000 + len(self.series_pk))
        return record

    def add_instance(self, series: Series, sop_uid: str, number: int | None = None,
                     size: int = 1000, data: bytes | None = None) -> Instance:
        blob = data if data is not None else fake_dicom_bytes(sop_uid, size)
        record = Instance(sop_uid=sop_uid, series_uid=series.series_uid, number=number, size=len(blob),
                          study_uid=series.study_uid, image_pk_id=5000 + len(self.instances))
        self.instances.append(record)
        self.data[sop_uid] = blob
        return record

    def set_image_counts(self) -> None:
        """Fill every series' ImageCount from the instances it holds (as getSeries does)."""
        counts = Counter(i.series_uid for i in self.instances)
        self.series = [replace(s, image_count=counts.get(s.series_uid, 0)) for s in self.series]

    def instances_of(self, series_uid: str) -> list[Instance]:
        return [i for i in self.instances if i.series_uid == series_uid]


def build_archive(collections: int = 2, patients: int = 2, studies: int = 2, series: int = 2,
                  instances: int = 3, *, base_size: int = 600) -> FakeArchive:
    """A deterministic archive: every collection has ``patients`` patients with ``studies`` studies
    of ``series`` series of ``instances`` instances (sizes differ per instance)."""
    archive = FakeArchive()
    root = "1.2.826.0.1.3680043.9.7"
    for c in range(1, collections + 1):
        coll = archive.add_collection(f"Coll-{c}").name
        for p in range(1, patients + 1):
            pid = f"{coll}-P{p:03d}"
            archive.add_patient(coll, pid, sex="O")
            for s in range(1, studies + 1):
                study = archive.add_study(coll, pid, f"{root}.{c}.{p}.{s}", date=dt.date(2001, s, 10 + p),
                                          description=f"Study {s}", study_id=str(s))
                for r in range(1, series + 1):
                    ser = archive.add_series(study, f"{root}.{c}.{p}.{s}.{r}", number=r, modality="CT",
                                             description=f"Series {r}", date=dt.date(2001, s, 10 + p))
                    for i in range(1, instances + 1):
                        archive.add_instance(ser, f"{ser.series_uid}.{i}", number=i, size=base_size + 7 * i + r)
    archive.set_image_counts()
    return archive


class Gate:
    """Holds calls of one method until released; counts the calls that entered."""

    def __init__(self, match: Callable[..., bool] | None, timeout: float) -> None:
        self.match = match
        self.timeout = timeout
        self._released = threading.Event()
        self._cond = threading.Condition()
        self.entered = 0

    def wait_entered(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``count`` calls are held (True) or ``timeout`` passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.entered >= count, timeout)

    def release(self) -> None:
        self._released.set()

    def _hold(self) -> None:
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
        if not self._released.wait(self.timeout):
            raise ServerError("fake gate was never released")


@dataclass
class _Failure:
    error: BaseException | type[BaseException] | Callable[[], BaseException]
    times: int | None
    match: Callable[..., bool] | None


@dataclass
class BodyPlan:
    """How a streamed body misbehaves (see FakeNbiaClient.hold_body)."""

    after: int
    release: threading.Event
    fail: BaseException | None = None
    announce: int | None = None
    reached: threading.Event = field(default_factory=threading.Event)


class FakeStream:
    """A streamed getSingleImage answer: ``length`` and ``chunks()``, like nbiafs.client.ImageStream."""

    def __init__(self, data: bytes, plan: BodyPlan | None = None, chunk: int = 16 * 1024) -> None:
        self._data = data
        self._plan = plan
        self._chunk = chunk
        self.length: int | None = len(data) if plan is None or plan.announce is None else plan.announce
        self.closed = False

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        held = False
        while sent < len(self._data):
            if self._plan is not None and sent >= self._plan.after and not held:
                held = True
                self._plan.reached.set()
                if not self._plan.release.wait(10.0):
                    raise ServerError("fake body held too long")
                if self._plan.fail is not None:
                    raise self._plan.fail
            step = self._chunk
            if self._plan is not None and sent < self._plan.after:
                step = min(step, self._plan.after - sent)
            piece = self._data[sent:sent + step]
            sent += len(piece)
            yield piece
        if self.length is not None and sent != self.length:
            raise ProtocolError(f"fake body: {sent} bytes, {self.length} announced")

    def close(self) -> None:
        self.closed = True


class FakeNbiaClient:
    """Answers the NbiaClient contract from a FakeArchive; counts calls; injects errors and holds."""

    def __init__(self, archive: FakeArchive | None = None, *, shuffle_seed: int | None = None,
                 gate_timeout: float = 10.0) -> None:
        self.archive = archive if archive is not None else build_archive()
        self.calls: Counter[str] = Counter()
        self.call_log: list[tuple[str, tuple[Any, ...]]] = []
        self.gate_timeout = gate_timeout
        self.closed = False
        self._rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self._lock = threading.Lock()
        self._failures: dict[str, list[_Failure]] = {}
        self._gates: dict[str, list[Gate]] = {}
        self.absent_routes: set[str] = set()
        self._bodies: dict[str, BodyPlan] = {}
        self.zip_break_at: int | None = None  # the series zip breaks off in this member (position)
        self.zip_md5s: dict[str, str] = {}  # md5hashes.csv says these (by SOP UID) instead of the true ones
        self.zip_members_sent = 0
        self.zip_hold_at: int | None = None  # the series zip waits before this member (position) ...
        self.zip_go_on = threading.Event()  # ... until this is set (or gate_timeout passed)

    # -- test controls ------------------------------------------------------------------------
    def fail(self, method: str, error: BaseException | type[BaseException] | Callable[[], BaseException],
             *, times: int | None = None, match: Callable[..., bool] | None = None) -> None:
        """Make ``method`` raise ``error`` (``times`` times, or always) when ``match(*args)`` holds."""
        with self._lock:
            self._failures.setdefault(method, []).append(_Failure(error, times, match))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def gate(self, method: str, match: Callable[..., bool] | None = None) -> Gate:
        """Hold calls of ``method`` (matching ``match(*args)``) until the returned gate is released."""
        gate = Gate(match, self.gate_timeout)
        with self._lock:
            self._gates.setdefault(method, []).append(gate)
        return gate

    def metadata_calls(self) -> int:
        with self._lock:
            return sum(n for m, n in self.calls.items() if m in METADATA_METHODS)

    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()
            self.call_log.clear()

    def _enter(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls[method] += 1
            self.call_log.append((method, args))
            error: Any = None
            for rule in self._failures.get(method, []):
                if rule.times == 0 or (rule.match is not None and not rule.match(*args)):
                    continue
                if rule.times is not None:
                    rule.times -= 1
                error = rule.error
                break
            gates = [g for g in self._gates.get(method, []) if g.match is None or g.match(*args)]
        for gate in gates:
            gate._hold()
        if error is not None:
            if isinstance(error, BaseException):
                raise error
            raise error() if isinstance(error, type) else error()

    def _answer(self, items: list[Any]) -> list[Any]:
        items = list(items)
        if self._rng is not None:
            with self._lock:
                self._rng.shuffle(items)
        return items

    # -- search API ---------------------------------------------------------------------------
    def collections(self) -> list[Collection]:
        self._enter("collections")
        return self._answer(self.archive.collections)

    def patients(self, collection: str) -> list[Patient]:
        self._enter("patients", collection)
        return self._answer([p for p in self.archive.patients if p.collection == collection])

    def studies(self, collection: str, patient_id: str | None = None,
                study_uid: str | None = None) -> list[Study]:
        self._enter("studies", collection, patient_id, study_uid)
        return self._answer([s for s in self.archive.studies if s.collection == collection
                             and (patient_id is None or s.patient_id == patient_id)
                             and (study_uid is None or s.study_uid == study_uid)])

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_uid: str | None = None, series_uid: str | None = None,
               modality: str | None = None) -> list[Series]:
        self._enter("series", collection, patient_id, study_uid, series_uid, modality)
        return self._answer([s for s in self.archive.series
                             if (collection is None or s.collection == collection)
                             and (patient_id is None or s.patient_id == patient_id)
                             and (study_uid is None or s.study_uid == study_uid)
                             and (series_uid is None or s.series_uid == series_uid)
                             and (modality is None or s.modality == modality)])

    def sop_instance_uids(self, series_uid: str) -> list[str]:
        self._enter("sop_instance_uids", series_uid)
        return self._answer([i.sop_uid for i in self.archive.instances_of(series_uid)])

    def series_size(self, series_uid: str) -> SeriesSize | None:
        self._enter("series_size", series_uid)
        found = self.archive.instances_of(series_uid)
        if not found:
            return None
        return SeriesSize(total_bytes=sum(len(self.archive.data[i.sop_uid]) for i in found),
                          object_count=len(found))

    def updated_series(self, from_date: dt.date) -> list[Series]:
        self._enter("updated_series", from_date)
        return self._answer([s for s in self.archive.series if s.date is None or s.date >= from_date])

    def open_single_image(self, series_uid: str, sop_uid: str) -> FakeStream:
        """The streamed getSingleImage (counted, failed and gated as ``single_image``)."""
        self._enter("single_image", series_uid, sop_uid, None)
        if sop_uid not in self.archive.data or all(i.sop_uid != sop_uid for i in
                                                   self.archive.instances_of(series_uid)):
            raise RemoteNotFoundError(f"no instance {sop_uid} in series {series_uid}")
        with self._lock:
            plan = self._bodies.get(sop_uid)
        return FakeStream(self.archive.data[sop_uid], plan)

    def hold_body(self, sop_uid: str, after: int, *, fail: BaseException | None = None,
                  announce: int | None = None) -> threading.Event:
        """The next bodies of ``sop_uid`` stop after ``after`` bytes until the returned event is set (then
        go on, or raise ``fail``); ``announce`` overrides the Content-Length they claim."""
        release = threading.Event()
        with self._lock:
            self._bodies[sop_uid] = BodyPlan(after, release, fail, announce)
        return release

    def single_image(self, series_uid: str, sop_uid: str, expected_size: int | None = None) -> bytes:
        self._enter("single_image", series_uid, sop_uid, expected_size)
        if sop_uid not in self.archive.data or all(i.sop_uid != sop_uid for i in
                                                   self.archive.instances_of(series_uid)):
            raise RemoteNotFoundError(f"no instance {sop_uid} in series {series_uid}")
        return self.archive.data[sop_uid]

    def image_zip(self, series_uid: str, *, new_file_names: bool = False, include_md5: bool = False,
                  expected_count: int | None = None) -> Iterator[tuple[ZipMember | str, Iterator[bytes]]]:
        """The series zip: LICENSE, the members in InstanceNumber order, md5hashes.csv with
        ``include_md5`` (``zip_md5s`` overrides hashes; ``zip_break_at`` breaks the stream in the middle of
        that member with a ProtocolError)."""
        self._enter("image_zip", series_uid, new_file_names, expected_count)
        ordered = sorted(self.archive.instances_of(series_uid),
                         key=lambda i: (i.number is None, i.number or 0, i.sop_uid))
        break_at = self.zip_break_at

        def members() -> Iterator[tuple[ZipMember | str, Iterator[bytes]]]:
            yield ZipMember("LICENSE", len(LICENSE_TEXT)), iter([LICENSE_TEXT])
            names = []
            for pos, inst in enumerate(ordered, start=1):
                blob = self.archive.data[inst.sop_uid]
                name = f"1-{pos:03d}.dcm" if new_file_names else f"{pos:08d}.dcm"
                names.append((name, inst.sop_uid))
                if self.zip_hold_at is not None and pos - 1 == self.zip_hold_at:
                    self.zip_go_on.wait(self.gate_timeout)
                self.zip_members_sent += 1
                if break_at is not None and pos - 1 == break_at:
                    def broken(blob: bytes = blob) -> Iterator[bytes]:
                        yield blob[: len(blob) // 2]
                        raise ProtocolError(f"getImage for series {series_uid}: the zip broke off")
                    yield ZipMember(name, len(blob)), broken()
                    return
                yield ZipMember(name, len(blob)), iter([blob[:3000], blob[3000:]])
            if include_md5:
                rows = ["Filename,MD5Hash"] + [
                    f"{name},{self.zip_md5s.get(sop, hashlib.md5(self.archive.data[sop]).hexdigest())}"
                    for name, sop in names]
                yield ZipMember("md5hashes.csv", -1), iter([("\n".join(rows) + "\n").encode()])

        return members()

    def md5_for_image(self, sop_uid: str) -> str:
        self._enter("md5_for_image", sop_uid)
        if sop_uid not in self.archive.data:
            raise RemoteNotFoundError(f"no instance {sop_uid}")
        return hashlib.md5(self.archive.data[sop_uid]).hexdigest()

    # -- advanced API -------------------------------------------------------------------------
    # -- drill-downs: the client's route logic (nbiafs.client.drill_down) over the fake's answers --
    routes: tuple[str, ...] = ("advanced",)

    def drilldown_routes(self) -> list[str]:
        return [r for r in self.routes if r not in self.absent_routes]

    def mark_route_absent(self, route: str) -> None:
        self.absent_routes.add(route)

    def drilldown(self, series_uids: Sequence[str]) -> DrillDown | None:
        return drill_down(self, series_uids)

    def study_drilldown(self, series_uids: Sequence[str], route: str = "advanced") -> list[DrillDownStudy]:
        self._enter("study_drilldown", tuple(series_uids))
        by_study: dict[str, list[DrillDownSeries]] = {}
        for s in self.archive.series:
            if s.series_uid in series_uids:
                found = self.archive.instances_of(s.series_uid)
                by_study.setdefault(s.study_uid, []).append(DrillDownSeries(
                    series_uid=s.series_uid, series_pk_id=self.archive.series_pk[s.series_uid],
                    study_uid=s.study_uid, patient_id=s.patient_id, collection=s.collection,
                    number_images=len(found), exact_size=sum(i.size or 0 for i in found),
                    modality=s.modality, description=s.description,
                    series_number=None if s.number is None else str(s.number)))
        studies = {st.study_uid: st for st in self.archive.studies}
        return self._answer([DrillDownStudy(study_uid=uid, date=getattr(studies.get(uid), "date", None),
                                            description=getattr(studies.get(uid), "description", None),
                                            series=tuple(entries))
                             for uid, entries in by_study.items()])

    def image_drilldown(self, series_pk_ids: Sequence[int], route: str = "advanced") -> list[Instance]:
        self._enter("image_drilldown", tuple(series_pk_ids))
        wanted = {uid for uid, pk in self.archive.series_pk.items() if pk in series_pk_ids}
        return self._answer([i for i in self.archive.instances if i.series_uid in wanted])

    def collection_descriptions(self, collection: str | None = None) -> list[CollectionDescription]:
        self._enter("collection_descriptions", collection)
        return []

    def licenses(self) -> list[License]:
        self._enter("licenses")
        return []

    def close(self) -> None:
        self.closed = True
