"""Metadata beside the images: extended attributes of every node, the dot-files, and their handles.

What it owns: what ``getfattr`` shows (``user.nbia.uid``, ``user.nbia.json``, ``user.nbia.md5``) and the
content of the metadata files the catalog lists (``meta`` nodes):

* ``Collection/.collection.json``: the collection's description as text, DOI, license name and URL,
  counts (patients, studies, series, images, bytes) and how to cite it (title, creators, year,
  publisher from the DataCite record of the DOI; left out when DataCite cannot be asked). Built from
  ``getCollectionDescriptions`` and one ``getSeries?Collection=`` (which carries the counts, the license
  and the DOI), then kept in the metadata cache like a listing;
* ``Series/.series.json``: the series record and its instances (file name, SOPInstanceUID, number,
  size, md5 when known), from the listings already made: no call;
* ``.nbiafs/stats.json``: the store's counters (hits, fetches, bytes, errors...) now.

Why dot-files and xattrs: DICOM readers that skip hidden files (dcm2niix, GDCM) must still see exactly
the DICOM files, and scripts get the metadata without another API client. The files' content is made
when first stat'ed or opened (their st_size must be exact), so listing a folder costs nothing more.
A failure to build one (the server down) is an I/O error on that file, never an empty file.

Handles of open metadata files live here, numbered from :data:`HANDLE_BASE` so they can never be
mistaken for the store's; a metadata file is opened with ``direct_io`` (``stats.json`` changes). Where
the kernel opens files itself (FUSE ``no_open``, :mod:`nbiafs.kernelopens`) there are no handles and no
``direct_io``: the kernel keeps what it read, so no file's length changes there (``.series.json``
without md5s, ``stats.json`` padded to a page) and a read of ``stats.json`` to its end has the kernel
forget it (:mod:`nbiafs.keptfiles`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .citation import doi_from, fetch_citation, html_to_text
from .errors import NbiaError, RemoteNotFoundError
from .keptfiles import Forgetter, padded

log = logging.getLogger(__name__)

HANDLE_BASE = 1 << 48
XATTR_UID, XATTR_JSON, XATTR_MD5 = "user.nbia.uid", "user.nbia.json", "user.nbia.md5"
_UID_FIELD = {"collection": "collection", "patient": "patient_id", "study": "study_uid", "series": "series_uid",
              "instance": "sop_uid"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("record",)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """What the JSON encoder cannot write itself: dates as ISO text, records as their fields."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name not in ("record",)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: json's C encoder (no indent: with one, json encodes in Python, 14 us per instance of a .series.json,
#: which ``find -ls`` makes for every series it passes).
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=_plain)


def to_json(value: Any) -> bytes:
    """Stable, human-readable JSON (sorted keys, UTF-8), ending in a newline: an object shows one line per
    key, and a list under a key one line per element, each line written by the C encoder."""
    if not isinstance(value, dict):
        try:
            value = _plain(value)
        except TypeError:
            return (_ENCODER.encode(value) + "\n").encode("utf-8")
    if not value:
        return b"{}\n"
    lines = []
    for key in sorted(value, key=str):
        item = value[key]
        if isinstance(item, (list, tuple)) and item:
            body = "[\n  " + ",\n  ".join(map(_ENCODER.encode, item)) + "\n ]"
        else:
            body = _ENCODER.encode(item)
        lines.append(f" {_ENCODER.encode(str(key))}: {body}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


class MetaFiles:
    """xattrs and metadata files of one mount (see the module docstring). Thread-safe."""

    def __init__(self, catalog: Any, client: Any, meta: Any, *, stats: Callable[[], dict[str, Any]],
                 md5_of: Callable[[Any], str | None] | None = None,
                 md5s_of: Callable[[Sequence[Any]], list[str | None]] | None = None,
                 datacite_url: str | None = None) -> None:
        self._catalog = catalog
        self._client = client
        self._meta = meta
        self._stats = stats
        self._md5_of = md5_of
        # the same for a series' files at once (cheaper where none of them is cached)
        self._md5s_of = md5s_of or (lambda nodes: [md5_of(n) if md5_of is not None else None for n in nodes])
        self._datacite_url = datacite_url
        self._lock = threading.Lock()
        self._handles: dict[int, bytes] = {}
        self._numbers = itertools.count(HANDLE_BASE)
        self._forgetter: Forgetter | None = None  # where the kernel opens files itself (keep_for_kernel)

    # ------------------------------------------------------------------ extended attributes
    def xattrs(self, node: Any) -> dict[str, bytes]:
        """The extended attributes of ``node`` (only those with a known value)."""
        out: dict[str, bytes] = {}
        field = _UID_FIELD.get(node.kind)
        uid = getattr(node, field) if field else None
        if uid:
            out[XATTR_UID] = str(uid).encode("utf-8")
        if node.kind in _UID_FIELD and node.record is not None:  # one line: getfattr shows it whole
            out[XATTR_JSON] = json.dumps(_jsonable(node.record), sort_keys=True, ensure_ascii=False,
                                         separators=(",", ":")).encode("utf-8")
        if node.kind == "instance" and self._md5_of is not None:
            digest = self._md5_of(node)
            if digest:
                out[XATTR_MD5] = digest.encode("ascii")
        return out

    # ------------------------------------------------------------------ file contents
    def content(self, node: Any) -> bytes:
        """The bytes of metadata file ``node``; raises (EIO above) when they cannot be made."""
        name = node.path.rsplit("/", 1)[-1]
        if name == ".collection.json":
            return self._collection_json(node.collection)
        if name == ".series.json":
            return self._series_json(node.record, md5s=self._forgetter is None)
        if name == "stats.json":
            data = to_json(self._stats())
            return padded(data) if self._forgetter is not None else data
        raise RemoteNotFoundError(f"{node.path}: no such metadata file")

    def size(self, node: Any) -> int:
        return len(self.content(node))

    def keep_for_kernel(self, invalidate: Callable[[str], None]) -> None:
        """The kernel opens files itself and keeps their pages: from now on no file's length changes
        (:mod:`nbiafs.keptfiles`), and ``invalidate(path)`` makes the kernel forget a file."""
        self._forgetter = Forgetter(invalidate)

    def read_unopened(self, node: Any, size: int, offset: int) -> bytes:
        """A read of a metadata file the kernel opened itself (no handle)."""
        if self._forgetter is None:
            raise NbiaError(f"{node.path}: read without a handle, but the kernel does not open files itself")
        data = self.content(node)
        if offset + size >= len(data) and node.path.endswith("/stats.json"):
            self._forgetter.forget(node.path)  # the next reader gets the counters as they are then
        return data[offset:offset + size]

    def close(self) -> None:
        if self._forgetter is not None:
            self._forgetter.close()

    def open(self, node: Any) -> int:
        data = self.content(node)
        with self._lock:
            number = next(self._numbers)
            self._handles[number] = data
        return number

    @staticmethod
    def owns(handle: int) -> bool:
        return handle >= HANDLE_BASE

    def read(self, handle: int, size: int, offset: int) -> bytes:
        with self._lock:
            data = self._handles.get(handle)
        if data is None:
            raise OSError(9, f"unknown metadata file handle {handle}")
        return data[offset:offset + size]

    def release(self, handle: int) -> None:
        with self._lock:
            self._handles.pop(handle, None)

    # ------------------------------------------------------------------ the files
    def _collection_json(self, collection: str) -> bytes:
        def build() -> bytes:
            return to_json(self.collection_facts(collection))

        return bytes(self._meta.get_or_load("collection-json", (collection,), build,
                                            validate=lambda v: isinstance(v, bytes)))

    def collection_facts(self, collection: str) -> dict[str, Any]:
        """What ``.collection.json`` says of ``collection`` (asks the server and DataCite)."""
        descriptions = [d for d in self._client.collection_descriptions(collection) if d.collection == collection]
        series = self._client.series(collection=collection)
        description = descriptions[0] if descriptions else None
        doi = doi_from(description.description_uri if description else None)
        if doi is None:
            doi = next((d for d in (doi_from(s.collection_uri) for s in series) if d), None)
        licensed = next((s for s in series if s.license_name or s.license_uri), None)
        facts: dict[str, Any] = {
            "collection": collection,
            "description": html_to_text(description.description if description else None),
            "doi": doi,
            "doi_url": f"https://doi.org/{doi}" if doi else None,
            "license": {"name": licensed.license_name if licensed else None,
                        "url": licensed.license_uri if licensed else None},
            "counts": {"patients": len({s.patient_id for s in series if s.patient_id}),
                       "studies": len({s.study_uid for s in series}),
                       "series": len(series),
                       "images": sum(s.image_count or 0 for s in series),
                       "bytes": sum(s.file_size or 0 for s in series)},
            "updated": description.timestamp if description else None,
        }
        if doi and self._datacite_url:
            citation = fetch_citation(self._client.transport, self._datacite_url, doi)
            if citation is not None:
                facts["citation"] = citation.as_dict()
        return facts

    def _series_json(self, series_node: Any, md5s: bool = True) -> bytes:
        """The series and its files; with ``md5s``, each cached file's md5 too (they come as files are
        cached: not where the kernel keeps the file's pages, see :mod:`nbiafs.keptfiles`)."""
        if series_node is None or series_node.kind != "series":
            raise NbiaError("a .series.json without its series")
        files = [n for n in self._catalog.children_of(series_node) if n.kind == "instance"]
        instances = []
        for n, digest in zip(files, self._md5s_of(files) if md5s else [None] * len(files)):
            entry = {"file": n.path.rsplit("/", 1)[-1], "sop_instance_uid": n.sop_uid,
                     "instance_number": n.instance_number, "size": n.size}
            if digest:
                entry["md5"] = digest
            instances.append(entry)
        return to_json({"series": series_node.record, "instances": instances})
