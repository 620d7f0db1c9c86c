"""A DataCite-compatible DOI service: ``GET /dois/<doi>`` as ``https://api.datacite.org/dois/<doi>`` answers.

Every collection's DOI is the one the NBIA answers carry (``descriptionURI``, v4 ``DataDescriptionURI``,
v2 ``CollectionURI``: ``https://doi.org/<doi>``), so a client can follow a collection to its
citation. The record is derived from the collection alone, deterministically: title from the
collection's name and description, creators picked from a fixed list by a hash of the name, the
publication year of the collection's release, TCIA as publisher. DOIs match case-insensitively
(as DOIs do); the DOI may hold slashes (``10.7937/K9/TCIA.2015.PF0M9REI``) or come %-encoded.

JSON:API shapes: ``{"data": {"id", "type": "dois", "attributes": {...}}}``; an unknown DOI is 404
``{"errors": [{"status": "404", "title": ...}]}``. ``publisher`` is a string, or an object with
``?publisher=true`` (as DataCite does). Served unless ``Emulator(datacite=False)``.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .archive import Archive, CollectionEntry
from .replies import HttpError, Reply, Request

if TYPE_CHECKING:
    from .server import Emulator

DOI_LINK = "https://doi.org/"
PUBLISHER = "The Cancer Imaging Archive"
CONTENT_TYPE = "application/vnd.api+json; charset=utf-8"
_PEOPLE = (("Ada", "Okafor"), ("Bruno", "Lindqvist"), ("Chiara", "Moretti"), ("Dev", "Raman"),
           ("Elif", "Yilmaz"), ("Farah", "Haddad"), ("Goran", "Petrovic"), ("Hana", "Sato"),
           ("Ines", "Carvalho"), ("Jonas", "Weber"), ("Kwame", "Mensah"), ("Lucia", "Fernandez"))


def doi_of(collection: CollectionEntry) -> str | None:
    """The bare DOI of a collection (``10.x/...``), from its ``https://doi.org/`` link."""
    uri = collection.description_uri or ""
    return uri[len(DOI_LINK):] if uri.lower().startswith(DOI_LINK) else None


def creators(name: str) -> list[dict[str, Any]]:
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    count = 2 + seed % 3
    picked = [_PEOPLE[(seed // 7 + 5 * i) % len(_PEOPLE)] for i in range(count)]
    return [{"name": f"{family}, {given}", "nameType": "Personal", "givenName": given, "familyName": family,
             "affiliation": [], "nameIdentifiers": []} for given, family in dict.fromkeys(picked)]


def _plain(description: str) -> str:
    """HTML to one line of text."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", description)).split())


def record(collection: CollectionEntry, doi: str, publisher_object: bool = False) -> dict[str, Any]:
    prefix, _, suffix = doi.partition("/")
    year = collection.timestamp.year
    summary = _plain(collection.description).rstrip(".")
    title = f"{collection.name}: {summary}" if summary else collection.name
    stamp = collection.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    publisher: Any = {"name": PUBLISHER} if publisher_object else PUBLISHER
    return {"data": {"id": doi.lower(), "type": "dois", "attributes": {
        "doi": doi.lower(), "prefix": prefix, "suffix": suffix.lower(),
        "identifiers": [], "alternateIdentifiers": [],
        "creators": creators(collection.name),
        "titles": [{"title": title}],
        "publisher": publisher, "publicationYear": year,
        "subjects": [{"subject": "Cancer imaging"}],
        "contributors": [], "dates": [{"date": str(year), "dateType": "Issued"}],
        "language": "en",
        "types": {"ris": "DATA", "bibtex": "misc", "citeproc": "dataset", "schemaOrg": "Dataset",
                  "resourceType": "DICOM", "resourceTypeGeneral": "Dataset"},
        "relatedIdentifiers": [], "sizes": [], "formats": ["DICOM"], "version": "1",
        "rightsList": [{"rights": collection.license.long_name, "rightsUri": collection.license.url}],
        "descriptions": [{"description": _plain(collection.description), "descriptionType": "Abstract"}],
        "url": f"https://www.cancerimagingarchive.net/collection/{collection.name.lower()}/",
        "state": "findable", "isActive": True, "schemaVersion": "http://datacite.org/schema/kernel-4",
        "created": stamp, "registered": stamp, "published": str(year), "updated": stamp,
    }}}


def find(arch: Archive, doi: str) -> CollectionEntry | None:
    wanted = doi.strip().lower()
    for collection in arch.collections:
        known = doi_of(collection)
        if known is not None and known.lower() == wanted:
            return collection
    return None


def get_doi(emu: Emulator, req: Request) -> Reply:
    doi = unquote(req.path[len("/dois/"):]).strip("/")
    if doi.lower().startswith(DOI_LINK):
        doi = doi[len(DOI_LINK):]
    collection = find(emu.archive, doi) if doi else None
    if collection is None:
        missing = {"errors": [{"status": "404", "title": "The resource you are looking for doesn't exist."}]}
        raise HttpError(404, json.dumps(missing).encode(), CONTENT_TYPE, api=False)
    as_object = (req.one("publisher") or "").lower() == "true"
    body = json.dumps(record(collection, doi_of(collection) or doi, as_object), ensure_ascii=False).encode()
    return Reply(200, body, CONTENT_TYPE, api=False)
