"""How to cite a collection: its DOI's record from the DataCite REST API, as text and as fields.

TCIA's data usage policy asks users to cite every collection they use by its DOI. DataCite, which
registered those DOIs, answers ``GET https://api.datacite.org/dois/<doi>`` with the record (JSON:API):
titles, creators, publication year, publisher. This module fetches that record through the same
bounded-retry transport as the NBIA client (one deadline, no endless waits) and renders the citation
the way DataCite's own "cite as" does (``Creators (Year). Title [Data set]. Publisher. https://doi.org/DOI``).

A citation is a nicety: any failure (no network to DataCite, an unknown DOI, a malformed record) is
logged and gives None; the caller then leaves the citation out. So it is asked for with a short policy
of its own (one retry, a few seconds in all), not the NBIA calls' retries: ``find -ls`` stats every
``.collection.json``, and on a cluster without internet each stat waited out the full backoff (~7 s)
before the file could be shown without its citation.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from .errors import NbiaError, ProtocolError
from .http import Retryable, RetryPolicy, Transport

log = logging.getLogger(__name__)

DOI_LINK = "https://doi.org/"
#: One retry, at most CITATION_DEADLINE seconds in all; connecting gives up after 3 s.
CITATION_DEADLINE = 8.0
CITATION_POLICY = RetryPolicy(retries=1, backoff=0.5, deadline=CITATION_DEADLINE)
CITATION_TIMEOUT = (3.0, CITATION_DEADLINE)
_DOI_RE = re.compile(r"(10\.\d{4,9}/\S+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Citation:
    doi: str
    title: str
    creators: tuple[str, ...]
    year: int | None
    publisher: str | None

    @property
    def text(self) -> str:
        names = "; ".join(self.creators) if self.creators else (self.publisher or "")
        year = f" ({self.year})" if self.year else ""
        publisher = f" {self.publisher}." if self.publisher else ""
        return f"{names}{year}. {self.title} [Data set].{publisher} {DOI_LINK}{self.doi}"

    def as_dict(self) -> dict[str, Any]:
        return {"doi": self.doi, "title": self.title, "creators": list(self.creators), "year": self.year,
                "publisher": self.publisher, "text": self.text}


def doi_from(uri: str | None) -> str | None:
    """The bare DOI (``10.7937/...``) in a DOI link or text, or None."""
    if not uri:
        return None
    match = _DOI_RE.search(uri.strip())
    return match.group(1).rstrip(".,;") if match else None


def html_to_text(text: str | None) -> str:
    """A collection description (HTML) as plain text: tags dropped, entities decoded, paragraphs kept."""
    if not text:
        return ""
    spaced = re.sub(r"(?i)<\s*(br|/p|/div|/li|/h\d)\s*/?>", "\n", text)
    plain = html.unescape(re.sub(r"<[^>]+>", " ", spaced))
    lines = (" ".join(line.split()) for line in plain.splitlines())
    return "\n".join(line for line in lines if line)


def citation_from(record: Any, doi: str) -> Citation | None:
    """A Citation from a DataCite JSON:API record; None if it has no title."""
    attributes = record.get("data", {}).get("attributes", {}) if isinstance(record, dict) else {}
    if not isinstance(attributes, dict):
        return None
    titles = [t.get("title") for t in attributes.get("titles") or [] if isinstance(t, dict) and t.get("title")]
    if not titles:
        return None
    creators = tuple(str(c["name"]) for c in attributes.get("creators") or []
                     if isinstance(c, dict) and c.get("name"))
    publisher = attributes.get("publisher")
    if isinstance(publisher, dict):
        publisher = publisher.get("name")
    year = attributes.get("publicationYear")
    try:
        year = int(year) if year is not None else None
    except (TypeError, ValueError):
        year = None
    return Citation(str(attributes.get("doi") or doi), str(titles[0]), creators, year,
                    str(publisher) if publisher else None)


def fetch_citation(transport: Transport, datacite_url: str, doi: str) -> Citation | None:
    """The citation of ``doi`` from the DataCite API at ``datacite_url``; None on any failure.

    Sent on ``transport``'s session (its connections, and its close cuts this call too) with the short
    :data:`CITATION_POLICY`.
    """
    transport = Transport(transport.session, policy=CITATION_POLICY, timeout=CITATION_TIMEOUT,
                          clock=transport.clock, closed=transport.closed)
    url = f"{datacite_url.rstrip('/')}/dois/{quote(doi, safe='/')}"
    what = f"DataCite record of {doi}"

    def handle(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise Retryable(ProtocolError(f"{what}: not JSON")) from None

    try:
        record = transport.call("GET", url, what=what, endpoint="datacite/dois", handle=handle,
                                params={"publisher": "true"})
    except NbiaError as exc:
        log.info("no citation for %s: %s", doi, exc)
        return None
    citation = citation_from(record, doi)
    if citation is None:
        log.info("no citation for %s: the DataCite record has no title", doi)
    return citation
