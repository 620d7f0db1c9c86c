"""The NBIA HTTP client: every endpoint nbiafs needs, returning typed records.

Search endpoints use ``services/v2`` with a bearer token (default) or ``services/v4`` anonymously
(``api="v4"``); the advanced endpoints (drill-downs, descriptions, licenses) always need a token.
Retries, backoff and deadlines live in :mod:`nbiafs.http`, JSON -> records in :mod:`nbiafs.parse`,
tokens in :mod:`nbiafs.auth`. The API's traps handled here (see /work/shared/nbia-api.md):

- an empty body from ``getSeries, getPatient, getPatientStudy, getSOPInstanceUIDs, getSeriesSize``
  may mean "expired token" rather than "nothing": unless the token was proven valid in the last
  few seconds, it is checked with ``getCollectionValues`` (which answers 401 honestly); on 401 the
  token is renewed and the call repeated once;
- ``getSingleImage`` answers 500 for an unknown instance (NotFoundError once the retries are
  spent) and its body is checked against Content-Length and the expected size;
- ``getImage`` answers 400 when not authorized (ForbiddenError) and may send a short zip
  (ProtocolError); its zip is streamed member by member, never held whole in memory;
- ``getUpdatedSeries`` answers 500 "No data found." for an empty result.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import requests
import stream_unzip

from . import parse
from .auth import TokenManager
from .config import GUEST_USER
from .errors import (
    ConfigError,
    ForbiddenError,
    IntegrityError,
    NbiaError,
    NotFoundError,
    ProtocolError,
    TokenExpiredError,
)
from .http import TRANSIENT_EXCEPTIONS, Retryable, RetryPolicy, Transport, make_session
from .records import (
    Collection,
    CollectionDescription,
    DrillDownStudy,
    Instance,
    License,
    Patient,
    Series,
    SeriesSize,
    Study,
    ZipMember,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Endpoints that answer an expired token with 200 and an empty body instead of 401.
AUTH_HIDING_ENDPOINTS = frozenset({"getSeries", "getPatient", "getPatientStudy", "getSOPInstanceUIDs",
                                   "getSeriesSize"})
#: The cheap endpoint that answers 401 honestly, used to check a token.
PROBE_ENDPOINT = "getCollectionValues"
ZIP_CHUNK = 64 * 1024


class NbiaClient:
    """One NBIA server, one account. Thread-safe; share one instance across threads."""

    def __init__(self, base_url: str, tokens: TokenManager | None = None, *, api: str = "v2",
                 session: requests.Session | None = None, timeout: tuple[float, float] = (10, 60),
                 retries: int = 4, backoff: float = 0.5, deadline: float = 120.0, pool_size: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if api not in ("v2", "v4"):
            raise ConfigError(f"unknown API version {api!r}: use v2 or v4")
        self.base_url = base_url.rstrip("/")
        self.api = api
        self._own_session = session is None
        self.session = session if session is not None else make_session(pool_size)
        self._closed = threading.Event()
        self._transport = Transport(self.session, policy=RetryPolicy(retries, backoff, deadline),
                                    timeout=timeout, clock=clock, closed=self._closed)
        self._own_tokens = tokens is None
        self._tokens_lock = threading.Lock()
        self._tokens = tokens

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def tokens(self) -> TokenManager:
        """The token manager (a guest one is made on first need when none was given)."""
        with self._tokens_lock:
            if self._tokens is None:
                self._tokens = TokenManager(self.base_url, GUEST_USER, "", session=self.session,
                                            timeout=self._transport.timeout)
            return self._tokens

    @property
    def search_uses_token(self) -> bool:
        return self.api == "v2"

    def _search_url(self, endpoint: str) -> str:
        return f"{self.base_url}/nbia-api/services/{self.api}/{endpoint}"

    def _advanced_url(self, endpoint: str) -> str:
        return f"{self.base_url}/nbia-api/services/{endpoint}"

    def _call(self, method: str, url: str, endpoint: str, what: str, handle: Callable[[requests.Response], T],
              *, authed: bool, **kwargs: Any) -> T:
        if authed:
            tokens = self.tokens
            kwargs.setdefault("token", tokens.get_token)
            kwargs.setdefault("on_unauthorized", tokens.handle_unauthorized)
        return self._transport.call(method, url, what=what, endpoint=endpoint, handle=handle, **kwargs)

    def _rows(self, endpoint: str, what: str, params: dict[str, Any] | None = None, *,
              advanced: bool = False, data: Any = None, **kwargs: Any) -> list[parse.Row]:
        """GET a search endpoint (or POST an advanced one) and decode its JSON rows."""
        def handle(response: requests.Response) -> list[parse.Row]:
            try:
                return parse.json_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        if advanced:
            return self._call("POST", self._advanced_url(endpoint), endpoint, what, handle,
                              authed=True, params=params, data=data, **kwargs)
        if not (self.search_uses_token and endpoint in AUTH_HIDING_ENDPOINTS):
            return self._call("GET", self._search_url(endpoint), endpoint, what, handle,
                              authed=self.search_uses_token, params=params, **kwargs)
        return self._rows_checked(endpoint, what, params, handle)

    def _rows_checked(self, endpoint: str, what: str, params: dict[str, Any] | None,
                      handle: Callable[[requests.Response], list[parse.Row]]) -> list[parse.Row]:
        """An auth-hiding endpoint: an empty answer counts only once the token is known to be valid."""
        tokens = self.tokens
        for renewed in (False, True):
            used: list[str] = []

            def token() -> str:
                used.append(tokens.get_token())
                return used[-1]

            rows = self._call("GET", self._search_url(endpoint), endpoint, what, handle, authed=True,
                              params=params, token=token)
            bearer = used[-1]
            if rows:
                tokens.mark_verified(bearer)  # only a valid token sees rows
                return rows
            # Every empty answer is checked: a token the server revoked a moment ago (logout
            # elsewhere, a server restart) looks exactly like a valid one until it is probed, and an
            # empty listing taken as truth would be cached. Empty answers are rare; a probe is cheap.
            tokens.mark_doubtful(bearer)
            if self._token_accepted(bearer):
                tokens.mark_verified(bearer)
                return rows
            if renewed:
                break
            log.info("%s: empty answer with a token the server no longer accepts; renewing it", endpoint)
            tokens.handle_unauthorized(bearer)
        raise TokenExpiredError(f"{what}: the server rejects the token even after a renewal")

    def _token_accepted(self, bearer: str) -> bool:
        """Ask the 401-honest probe endpoint whether ``bearer`` is valid (no renewal on 401)."""
        try:
            self._transport.call("GET", self._search_url(PROBE_ENDPOINT), what=f"{PROBE_ENDPOINT} (token check)",
                                 endpoint=PROBE_ENDPOINT, handle=lambda r: r.close(),
                                 token=lambda: bearer, on_unauthorized=None)
        except TokenExpiredError:
            return False
        return True

    # -- search API ---------------------------------------------------------------------------

    def collections(self) -> list[Collection]:
        rows = self._rows("getCollectionValues", "getCollectionValues")
        return parse.build_all(rows, parse.collection_from, "getCollectionValues")

    def patients(self, collection: str) -> list[Patient]:
        what = f"getPatient for collection {collection!r}"
        rows = self._rows("getPatient", what, {"Collection": collection})
        return parse.build_all(rows, lambda r: parse.patient_from(r, collection), what)

    def studies(self, collection: str, patient_id: str | None = None,
                study_uid: str | None = None) -> list[Study]:
        params = _params(Collection=collection, PatientID=patient_id, StudyInstanceUID=study_uid)
        what = f"getPatientStudy for {_describe(params)}"
        rows = self._rows("getPatientStudy", what, params)
        return parse.build_all(rows, lambda r: parse.study_from(r, collection, patient_id), what)

    def series(self, collection: str | None = None, patient_id: str | None = None,
               study_uid: str | None = None, series_uid: str | None = None,
               modality: str | None = None) -> list[Series]:
        params = _params(Collection=collection, PatientID=patient_id, StudyInstanceUID=study_uid,
                         SeriesInstanceUID=series_uid, Modality=modality)
        what = f"getSeries for {_describe(params)}"
        rows = self._rows("getSeries", what, params)
        return parse.build_all(rows, parse.series_from, what)

    def sop_instance_uids(self, series_uid: str) -> list[str]:
        what = f"getSOPInstanceUIDs for series {series_uid}"
        rows = self._rows("getSOPInstanceUIDs", what, {"SeriesInstanceUID": series_uid})
        return parse.build_all(rows, parse.sop_uid_from, what)

    def series_size(self, series_uid: str) -> SeriesSize | None:
        what = f"getSeriesSize for series {series_uid}"
        return parse.series_size_from(self._rows("getSeriesSize", what, {"SeriesInstanceUID": series_uid}))

    def updated_series(self, from_date: dt.date) -> list[Series]:
        """Series changed since ``from_date`` (sent as ``dd/MM/yyyy``, as the server parses it)."""
        stamp = from_date.strftime("%d/%m/%Y")
        what = f"getUpdatedSeries from {from_date.isoformat()}"

        def no_data(response: requests.Response) -> bool:
            return response.status_code == 500 and b"No data found" in response.content[:200]

        def handle(response: requests.Response) -> list[parse.Row]:
            if not response.ok:  # the "No data found." 500
                return []
            try:
                return parse.json_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        rows = self._call("GET", self._search_url("getUpdatedSeries"), "getUpdatedSeries", what, handle,
                          authed=self.search_uses_token, params={"fromDate": stamp},
                          accept=lambda r: r.ok or no_data(r))
        return parse.build_all(rows, parse.series_from, what)

    def single_image(self, series_uid: str, sop_uid: str, expected_size: int | None = None) -> bytes:
        """The instance's Part-10 bytes, checked against Content-Length and ``expected_size``."""
        what = f"getSingleImage for instance {sop_uid} of series {series_uid}"

        def handle(response: requests.Response) -> bytes:
            body = response.content
            announced = response.headers.get("Content-Length")
            if announced is not None and not response.headers.get("Content-Encoding"):
                if announced.strip().isdigit() and int(announced) != len(body):
                    raise Retryable(IntegrityError(f"{what}: got {len(body)} bytes, the server announced "
                                                   f"{announced}"))
            if expected_size is not None and len(body) != expected_size:
                raise Retryable(IntegrityError(f"{what}: got {len(body)} bytes, expected {expected_size}"))
            if not body:
                raise Retryable(ProtocolError(f"{what}: empty body"))
            return body

        return self._call("GET", self._search_url("getSingleImage"), "getSingleImage", what, handle,
                          authed=self.search_uses_token,
                          params={"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid},
                          status_errors={500: lambda r: NotFoundError(
                              f"{what}: the server has no such instance (or may not serve it): 500")})

    def image_zip(self, series_uid: str, *, new_file_names: bool = False,
                  expected_count: int | None = None) -> Iterator[tuple[ZipMember, Iterator[bytes]]]:
        """The series as a streamed zip: yields ``(member, chunks)`` as members arrive.

        The request is sent (and its errors raised) when this is called. Consume (or skip) each
        member's chunks before asking for the next member; unconsumed chunks are skipped. A member's
        ``size`` is -1 when the zip's local header did not say. Raises ProtocolError when the stream
        breaks or ends with fewer ``.dcm`` members than ``expected_count``; members already yielded
        were complete and CRC-checked.
        """
        what = f"getImage for series {series_uid}"
        params = {"SeriesInstanceUID": series_uid}
        if new_file_names:
            params["NewFileNames"] = "Yes"
        response = self._call("GET", self._search_url("getImage"), "getImage", what, lambda r: r,
                              authed=self.search_uses_token, params=params, stream=True,
                              status_errors={400: lambda r: ForbiddenError(
                                  f"{what}: not authorized for this series (400)")})
        return _ZipStream(response, what, expected_count)

    def md5_for_image(self, sop_uid: str) -> str:
        """The server's md5 (lower-case hex) of one instance."""
        what = f"getM5HashForImage for instance {sop_uid}"

        def handle(response: requests.Response) -> str | None:
            try:
                return parse.md5_from(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        digest = self._call("GET", self._search_url("getM5HashForImage"), "getM5HashForImage", what, handle,
                            authed=self.search_uses_token, params={"SOPInstanceUid": sop_uid})
        if digest is None:
            raise NotFoundError(f"{what}: the server has no md5 for this instance")
        return digest

    # -- advanced API ---------------------------------------------------------------------------

    def study_drilldown(self, series_uids: Sequence[str]) -> list[DrillDownStudy]:
        if not series_uids:
            return []
        what = f"getStudyDrillDownWithSeriesIds for {_describe_list('series', series_uids)}"
        rows = self._rows("getStudyDrillDownWithSeriesIds", what, advanced=True,
                          data=[("list", uid) for uid in series_uids])
        return parse.build_all(rows, parse.drilldown_study_from, what)

    def image_drilldown(self, series_pk_ids: Sequence[int]) -> list[Instance]:
        if not series_pk_ids:
            return []
        what = f"getImageDrillDown for {_describe_list('series pk', [str(p) for p in series_pk_ids])}"
        rows = self._rows("getImageDrillDown", what, advanced=True,
                          data=[("list", str(pk)) for pk in series_pk_ids])
        return parse.build_all(rows, parse.instance_from_drilldown, what)

    def collection_descriptions(self, collection: str | None = None) -> list[CollectionDescription]:
        params = _params(collectionName=collection)
        what = f"getCollectionDescriptions for {_describe(params) or 'all collections'}"

        def handle(response: requests.Response) -> list[parse.Row]:
            try:
                return parse.json_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        rows = self._call("GET", self._advanced_url("getCollectionDescriptions"), "getCollectionDescriptions",
                          what, handle, authed=True, params=params)
        return parse.build_all(rows, parse.collection_description_from, what)

    def licenses(self) -> list[License]:
        what = "getLicenses"

        def handle(response: requests.Response) -> list[parse.Row]:
            try:
                return parse.json_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        rows = self._call("GET", self._advanced_url("getLicenses"), "getLicenses", what, handle, authed=True)
        return parse.build_all(rows, parse.license_from, what)

    def close(self) -> None:
        """Interrupt waiting retries, log out a token manager this client made, close its session."""
        self._closed.set()
        with self._tokens_lock:
            tokens = self._tokens if self._own_tokens else None
        if tokens is not None:
            tokens.close()
        if self._own_session:
            self.session.close()


class _ZipStream(Iterator[tuple[ZipMember, Iterator[bytes]]]):
    """Members of a streamed ``getImage`` zip, with every failure turned into ProtocolError."""

    def __init__(self, response: requests.Response, what: str, expected_count: int | None) -> None:
        self._response = response
        self._what = what
        self._expected = expected_count
        self._dcm_count = 0
        self._current: _MemberChunks | None = None
        self._members = stream_unzip.stream_unzip(self._body(), chunk_size=ZIP_CHUNK)
        self._done = False

    def _body(self) -> Iterator[bytes]:
        try:
            yield from self._response.iter_content(ZIP_CHUNK)
        except TRANSIENT_EXCEPTIONS as exc:
            raise ProtocolError(f"{self._what}: the zip stream broke after {self._dcm_count} instance(s) "
                                f"({type(exc).__name__})") from None

    def __iter__(self) -> _ZipStream:
        return self

    def __next__(self) -> tuple[ZipMember, Iterator[bytes]]:
        if self._done:
            raise StopIteration
        if self._current is not None:
            self._current.drain()
            self._current = None
        try:
            name_bytes, size, chunks = next(self._members)
        except StopIteration:
            self.close()
            if self._expected is not None and self._dcm_count < self._expected:
                raise ProtocolError(f"{self._what}: short zip: {self._dcm_count} instance(s), expected "
                                    f"{self._expected}") from None
            raise
        except NbiaError:
            self.close()
            raise
        except stream_unzip.UnzipError as exc:
            self.close()
            raise ProtocolError(f"{self._what}: broken zip after {self._dcm_count} instance(s): "
                                f"{type(exc).__name__}") from None
        name = name_bytes.decode("utf-8", errors="replace")
        if name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name:
            self.close()
            raise ProtocolError(f"{self._what}: unsafe member name {name!r}")
        name = posixpath.normpath(name)
        member = ZipMember(name=name, size=size if size is not None else -1)
        self._current = _MemberChunks(chunks, self, name)
        if name.lower().endswith(".dcm"):
            self._dcm_count += 1
        return member, self._current

    def close(self) -> None:
        self._done = True
        self._response.close()

    def __del__(self) -> None:
        try:
            self._response.close()
        except Exception:  # interpreter shutdown
            pass


class _MemberChunks(Iterator[bytes]):
    """One member's bytes; stream errors become ProtocolError naming the member."""

    def __init__(self, chunks: Iterator[bytes], owner: _ZipStream, name: str) -> None:
        self._chunks = chunks
        self._owner = owner
        self._name = name
        self._finished = False

    def __iter__(self) -> _MemberChunks:
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration:
            self._finished = True
            raise
        except NbiaError:
            self._finished = True
            self._owner.close()
            raise
        except stream_unzip.UnzipError as exc:
            self._finished = True
            self._owner.close()
            raise ProtocolError(f"{self._owner._what}: member {self._name} is broken or cut short: "
                                f"{type(exc).__name__}") from None

    def drain(self) -> None:
        for _ in self:
            pass


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _describe_list(kind: str, items: Sequence[str]) -> str:
    if len(items) <= 3:
        return f"{kind} {', '.join(items)}"
    return f"{len(items)} {kind} ids ({items[0]}, ...)"
