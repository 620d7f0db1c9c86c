"""The NBIA HTTP client: every endpoint nbiafs needs, returning typed records.

Which API (see /work/shared/nbia-api.md, "The public server today"): ``api="auto"`` (the default)
uses the anonymous v4 search API, as TCIA's own client does today, and falls back to v2 with the
guest token when the server refuses anonymous v4 (404, 401/403, or the 500 a v2-style server gives a
call without a token): one probe (``getCollectionValues``) decides, once per client. A named account
(``tokens`` for a user other than the guest) uses v2 with its token: restricted collections of NBIA
servers that still have them. ``api="v2"`` / ``"v4"`` force one path.

Exact sizes come from the drill-downs, by the first route that works (:meth:`NbiaClient.drilldown`):
the anonymous v4 ones, then the token (advanced API) ones; a route the server does not have (404, no
login) is not tried again. Retries, backoff and deadlines live in :mod:`nbiafs.http`, JSON -> records
in :mod:`nbiafs.parse`, tokens in :mod:`nbiafs.auth`. The API's traps handled here:

- an empty body from ``getSeries, getPatient, getPatientStudy, getSOPInstanceUIDs, getSeriesSize``
  under v2 may mean "expired token" rather than "nothing": unless the token was proven valid in the
  last few seconds, it is checked with ``getCollectionValues`` (which answers 401 honestly); on 401
  the token is renewed and the call repeated once;
- ``getSingleImage`` answers 500 for an unknown instance (RemoteNotFoundError once the retries are
  spent: an I/O error, never a missing file); a body that matches its own Content-Length is
  complete even when the metadata announced another size (the caller decides what that means);
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
import urllib3

from . import parse
from .auth import TokenManager
from .config import GUEST_USER
from .deadline import Deadline
from .errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    ForbiddenError,
    IntegrityError,
    NbiaError,
    ProtocolError,
    RemoteNotFoundError,
    ServerError,
    TokenExpiredError,
)
from .http import TRANSIENT_EXCEPTIONS, Retryable, RetryPolicy, Transport, make_session
from .options import default
from .records import (
    Collection,
    CollectionDescription,
    DrillDown,
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

API_MODES = ("auto", "v2", "v4")
#: Endpoints that answer an expired token with 200 and an empty body instead of 401.
AUTH_HIDING_ENDPOINTS = frozenset({"getSeries", "getPatient", "getPatientStudy", "getSOPInstanceUIDs",
                                   "getSeriesSize"})
#: The cheap endpoint that answers 401 honestly, used to check a token and to probe for v4.
PROBE_ENDPOINT = "getCollectionValues"
#: What a v2-style server answers (with status 500) to a call without a token.
NO_TOKEN_BODY = b"not able to process your request"
ZIP_CHUNK = 64 * 1024
#: Drill-down routes: the anonymous v4 endpoints, and the advanced API's (token).
V4, ADVANCED = "v4", "advanced"
#: Statuses by which a server says "no anonymous v4 here".
V4_REFUSED = frozenset({401, 403, 404})


def _no_token_500(response: requests.Response) -> bool:
    return response.status_code == 500 and NO_TOKEN_BODY in response.content[:200]


def _route_failed(exc: NbiaError) -> bool:
    """An error by which a drill-down route says "not here": the server answered, but not with data."""
    if isinstance(exc, (RemoteNotFoundError, ForbiddenError, BadRequestError, AuthError, ProtocolError)):
        return True
    return isinstance(exc, ServerError) and exc.status is not None  # it answered 5xx: a broken query


class NbiaClient:
    """One NBIA server, one account. Thread-safe; share one instance across threads."""

    def __init__(self, base_url: str, tokens: TokenManager | None = None, *, api: str = default("api"),
                 session: requests.Session | None = None,
                 timeout: tuple[float, float] = (default("connect_timeout"), default("read_timeout")),
                 retries: int = default("retries"), backoff: float = default("backoff"),
                 deadline: float = default("deadline"), pool_size: int = default("workers"),
                 connections: int | None = default("connections"),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if api not in API_MODES:
            raise ConfigError(f"unknown API {api!r}: use auto, v2 or v4")
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.deadline = deadline
        self._own_session = session is None
        self.session = session if session is not None else make_session(max(pool_size, connections or 0) + 2)
        self._closed = threading.Event()
        self._transport = Transport(self.session, policy=RetryPolicy(retries, backoff, deadline),
                                    timeout=timeout, clock=clock, closed=self._closed,
                                    max_connections=connections)
        self._own_tokens = tokens is None
        self._tokens_lock = threading.Lock()
        self._tokens = tokens
        named = tokens is not None and tokens.username != GUEST_USER
        #: The search API in use ("v2" or "v4"); None until the auto probe has decided.
        self._version: str | None = {"v2": "v2", "v4": "v4"}.get(api, "v2" if named else None)
        self._version_lock = threading.Lock()
        self._absent_routes: set[str] = set()  # drill-down routes this server does not have

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
    def transport(self) -> Transport:
        """The bounded-retry transport (for calls to other services, e.g. DataCite, on the same session)."""
        return self._transport

    @property
    def search_version(self) -> str:
        """``"v2"`` or ``"v4"``: the search API this client uses (the auto probe runs on first need)."""
        version = self._version
        return version if version is not None else self.resolve_api()

    @property
    def search_uses_token(self) -> bool:
        return self.search_version == "v2"

    def resolve_api(self) -> str:
        """Decide the search API now (``api="auto"``: one anonymous v4 probe); returns ``"v2"`` or ``"v4"``.

        Raises the probe's error when the server cannot be reached at all.
        """
        with self._version_lock:
            if self._version is not None:
                return self._version

            def handle(response: requests.Response) -> int:
                response.close()
                return response.status_code

            status = self._transport.call(
                "GET", self._url("v4", PROBE_ENDPOINT), what=f"{PROBE_ENDPOINT} (is there an anonymous v4 API?)",
                endpoint=PROBE_ENDPOINT, handle=handle,
                accept=lambda r: r.status_code == 200 or r.status_code in V4_REFUSED or _no_token_500(r))
            self._version = "v4" if status == 200 else "v2"
            if self._version == "v2":
                log.info("%s refuses anonymous v4 calls (%d): using v2 with the guest token", self.base_url, status)
            else:
                log.info("%s serves anonymous v4: no login needed", self.base_url)
            return self._version

    def _url(self, version: str, endpoint: str) -> str:
        if version == ADVANCED:
            return f"{self.base_url}/nbia-api/services/{endpoint}"
        return f"{self.base_url}/nbia-api/services/{version}/{endpoint}"

    def _search_url(self, endpoint: str) -> str:
        return self._url(self.search_version, endpoint)

    def _advanced_url(self, endpoint: str) -> str:
        return self._url(ADVANCED, endpoint)

    def _call(self, method: str, url: str, endpoint: str, what: str, handle: Callable[[requests.Response], T],
              *, authed: bool, **kwargs: Any) -> T:
        if authed:
            tokens = self.tokens
            kwargs.setdefault("token", tokens.get_token)
            kwargs.setdefault("on_unauthorized", tokens.handle_unauthorized)
        return self._transport.call(method, url, what=what, endpoint=endpoint, handle=handle, **kwargs)

    @staticmethod
    def _json_handler(what: str) -> Callable[[requests.Response], list[parse.Row]]:
        def handle(response: requests.Response) -> list[parse.Row]:
            try:
                return parse.json_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None
        return handle

    def _rows(self, endpoint: str, what: str, params: dict[str, Any] | None = None, *,
              route: str | None = None, data: Any = None, **kwargs: Any) -> list[parse.Row]:
        """JSON rows of a search endpoint (GET), or of a drill-down ``route`` (POST ``data``)."""
        handle = self._json_handler(what)
        if route is not None:
            return self._call("POST", self._url(route, endpoint), endpoint, what, handle,
                              authed=route == ADVANCED, params=params, data=data, **kwargs)
        if not (self.search_uses_token and endpoint in AUTH_HIDING_ENDPOINTS):
            return self._call("GET", self._search_url(endpoint), endpoint, what, handle,
                              authed=self.search_uses_token, params=params, **kwargs)
        return self._rows_checked(endpoint, what, params, handle)

    def _rows_checked(self, endpoint: str, what: str, params: dict[str, Any] | None,
                      handle: Callable[[requests.Response], list[parse.Row]]) -> list[parse.Row]:
        """An auth-hiding endpoint: an empty answer counts only once the token is known to be valid."""
        tokens = self.tokens
        deadline = Deadline.after(self.deadline)  # one deadline for the call, its check and its renewal
        for renewed in (False, True):
            used: list[str] = []

            def token(call_deadline: Deadline, used: list[str] = used) -> str:
                used.append(tokens.get_token(call_deadline))
                return used[-1]

            rows = self._call("GET", self._search_url(endpoint), endpoint, what, handle, authed=True,
                              params=params, token=token, deadline=deadline)
            bearer = used[-1]
            if rows:
                tokens.mark_verified(bearer)  # only a valid token sees rows
                return rows
            # Every empty answer is checked: a token the server revoked a moment ago (logout
            # elsewhere, a server restart) looks exactly like a valid one until it is probed, and an
            # empty listing taken as truth would be cached. Empty answers are rare; a probe is cheap.
            tokens.mark_doubtful(bearer)
            if self._token_accepted(bearer, deadline):
                tokens.mark_verified(bearer)
                return rows
            if renewed:
                break
            log.info("%s: empty answer with a token the server no longer accepts; renewing it", endpoint)
            tokens.handle_unauthorized(bearer, deadline)
        raise TokenExpiredError(f"{what}: the server rejects the token even after a renewal")

    def _token_accepted(self, bearer: str, deadline: Deadline) -> bool:
        """Ask the 401-honest probe endpoint whether ``bearer`` is valid (no renewal on 401)."""
        try:
            self._transport.call("GET", self._search_url(PROBE_ENDPOINT), what=f"{PROBE_ENDPOINT} (token check)",
                                 endpoint=PROBE_ENDPOINT, handle=lambda r: r.close(),
                                 token=lambda _deadline: bearer, on_unauthorized=None, deadline=deadline)
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
        """The instance's Part-10 bytes, complete by HTTP's framing.

        A body that matches its own Content-Length (or ends its chunked encoding) is complete and is
        returned even when it differs from ``expected_size`` (the metadata was wrong, not the transfer:
        the caller compares). Without either framing, a length other than ``expected_size`` may be a
        cut-short transfer, and is retried.
        """
        what = f"getSingleImage for instance {sop_uid} of series {series_uid}"

        def handle(response: requests.Response) -> bytes:
            body = response.content
            announced = response.headers.get("Content-Length")
            chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
            framed = chunked
            if announced is not None and not response.headers.get("Content-Encoding"):
                if announced.strip().isdigit() and int(announced) != len(body):
                    raise Retryable(IntegrityError(f"{what}: got {len(body)} bytes, the server announced "
                                                   f"{announced}"))
                framed = True
            if not body:
                raise Retryable(ProtocolError(f"{what}: empty body"))
            if not framed and expected_size is not None and len(body) != expected_size:
                raise Retryable(IntegrityError(f"{what}: got {len(body)} bytes, expected {expected_size}"))
            return body

        return self._call("GET", self._search_url("getSingleImage"), "getSingleImage", what, handle,
                          authed=self.search_uses_token,
                          params={"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid},
                          status_errors={500: lambda r: RemoteNotFoundError(
                              f"{what}: the server did not deliver this instance (500)")})

    def open_single_image(self, series_uid: str, sop_uid: str) -> ImageStream:
        """``getSingleImage`` as a stream: the answer's length (when it says) and its body, chunk by chunk.

        Errors before the body (refused, 5xx after retries, the 500 of an undelivered instance) are
        raised here, within the call's deadline. The body then arrives at its own pace: each read waits
        at most the read timeout for bytes (a stall is an error, however long the whole transfer
        takes). Close it (or use it as a context manager): it holds one of the server's connections.
        """
        what = f"getSingleImage for instance {sop_uid} of series {series_uid}"

        def handle(response: requests.Response) -> ImageStream:
            return ImageStream(response, what, self._transport.timeout[1])

        return self._call("GET", self._search_url("getSingleImage"), "getSingleImage", what, handle,
                          authed=self.search_uses_token, stream=True,
                          params={"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid},
                          status_errors={500: lambda r: RemoteNotFoundError(
                              f"{what}: the server did not deliver this instance (500)")})

    def image_zip(self, series_uid: str, *, new_file_names: bool = False, include_md5: bool = False,
                  expected_count: int | None = None) -> Iterator[tuple[ZipMember, Iterator[bytes]]]:
        """The series as a streamed zip: yields ``(member, chunks)`` as members arrive.

        ``include_md5`` asks for ``md5hashes.csv`` (``Filename,MD5Hash``) after the images: v4
        ``getImage ... IncludeMD5=Yes``, or v2 ``getImageWithMD5Hash``. The request is sent (and its
        errors raised) when this is called. Consume (or skip) each member's chunks before asking for the
        next member; unconsumed chunks are skipped. A member's ``size`` is -1 when the zip's local header
        did not say. Raises ProtocolError when the stream breaks or ends with fewer ``.dcm`` members
        than ``expected_count``; members already yielded were complete and CRC-checked.
        """
        endpoint = "getImage"
        params = {"SeriesInstanceUID": series_uid}
        if include_md5 and self.search_version == "v2":
            endpoint = "getImageWithMD5Hash"  # names are always 00000001.dcm... there
        else:
            if new_file_names:
                params["NewFileNames"] = "Yes"
            if include_md5:
                params["IncludeMD5"] = "Yes"
        what = f"{endpoint} for series {series_uid}"
        response = self._call("GET", self._search_url(endpoint), endpoint, what, lambda r: r,
                              authed=self.search_uses_token, params=params, stream=True,
                              status_errors={400: lambda r: ForbiddenError(
                                  f"{what}: not authorized for this series (400)")})
        return _ZipStream(response, what, expected_count)

    def md5_for_image(self, sop_uid: str) -> str:
        """The server's md5 (lower-case hex) of one instance (v4 ``getMD5HashForImage``, v2 ``getM5HashForImage``)."""
        if self.search_version == "v4":
            endpoint, params = "getMD5HashForImage", {"SOPInstanceUID": sop_uid}
        else:
            endpoint, params = "getM5HashForImage", {"SOPInstanceUid": sop_uid}  # sic: the v2 names
        what = f"{endpoint} for instance {sop_uid}"

        def handle(response: requests.Response) -> str | None:
            try:
                return parse.md5_from(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        digest = self._call("GET", self._search_url(endpoint), endpoint, what, handle,
                            authed=self.search_uses_token, params=params,
                            status_errors={500: lambda r: RemoteNotFoundError(
                                f"{what}: the server has no md5 for this instance (500)")})
        if digest is None:
            raise RemoteNotFoundError(f"{what}: the server has no md5 for this instance")
        return digest

    # -- drill-downs: exact sizes before any download ----------------------------------------------

    def drilldown_routes(self) -> list[str]:
        """The drill-down routes to try, in order: anonymous v4 first when the search API is v4."""
        routes = [V4, ADVANCED] if self.search_version == "v4" else [ADVANCED]
        return [r for r in routes if r not in self._absent_routes]

    def study_drilldown(self, series_uids: Sequence[str], *, route: str = ADVANCED) -> list[DrillDownStudy]:
        if not series_uids:
            return []
        what = f"{'' if route == ADVANCED else route + ' '}getStudyDrillDownWithSeriesIds for " \
               f"{_describe_list('series', series_uids)}"
        rows = self._rows("getStudyDrillDownWithSeriesIds", what, route=route,
                          data=[("list", uid) for uid in series_uids])
        return parse.build_all(rows, parse.drilldown_study_from, what)

    def image_drilldown(self, series_pk_ids: Sequence[int], *, route: str = ADVANCED) -> list[Instance]:
        if not series_pk_ids:
            return []
        what = f"{'' if route == ADVANCED else route + ' '}getImageDrillDown for " \
               f"{_describe_list('series pk', [str(p) for p in series_pk_ids])}"
        rows = self._rows("getImageDrillDown", what, route=route, data=[("list", str(pk)) for pk in series_pk_ids])
        return parse.build_all(rows, parse.instance_from_drilldown, what)

    def drilldown(self, series_uids: Sequence[str]) -> DrillDown | None:
        """Exact instances of ``series_uids`` by the first drill-down route that works (:func:`drill_down`)."""
        return drill_down(self, series_uids)

    def mark_route_absent(self, route: str) -> None:
        """This server does not have drill-down ``route``: do not try it again."""
        self._absent_routes.add(route)

    def series_metadata(self, series_uids: Sequence[str]) -> list[dict[str, str]]:
        """v4 ``getSeriesMetadata``: one row per known series, the server's CSV columns as keys (``Project``,
        ``Patient ID``, ``Study Instance UID``, ``Series Instance UID``, ...); the Data Retriever's
        metadata.csv is built from these. Needs the v4 API (RemoteNotFoundError without it)."""
        uids = [u for u in dict.fromkeys(series_uids) if u]
        if not uids:
            return []
        what = f"getSeriesMetadata for {_describe_list('series', uids)}"

        def handle(response: requests.Response) -> list[dict[str, str]]:
            try:
                return parse.csv_rows(response.content, what)
            except ProtocolError as exc:
                raise Retryable(exc) from None

        return self._call("POST", self._url(V4, "getSeriesMetadata"), "getSeriesMetadata", what, handle,
                          authed=False, data=[("list", ",".join(uids))])

    # -- descriptions and licenses ----------------------------------------------------------------

    def collection_descriptions(self, collection: str | None = None) -> list[CollectionDescription]:
        """v4 (anonymous) when the search API is v4, else the advanced API with a token."""
        params = _params(collectionName=collection)
        what = f"getCollectionDescriptions for {_describe(params) or 'all collections'}"
        v4 = self.search_version == "v4"
        url = self._url(V4 if v4 else ADVANCED, "getCollectionDescriptions")
        rows = self._call("GET", url, "getCollectionDescriptions", what, self._json_handler(what),
                          authed=not v4, params=params)
        return parse.build_all(rows, parse.collection_description_from, what)

    def licenses(self) -> list[License]:
        what = "getLicenses"
        rows = self._call("GET", self._advanced_url("getLicenses"), "getLicenses", what, self._json_handler(what),
                          authed=True)
        return parse.build_all(rows, parse.license_from, what)

    def close(self) -> None:
        """Stop every call (waiting retries at once, transfers in flight by cutting their connections), log
        out a token manager this client made, close its session."""
        self._transport.close()
        with self._tokens_lock:
            tokens = self._tokens if self._own_tokens else None
        if tokens is not None:
            tokens.close()
        if self._own_session:
            self.session.close()


def drill_down(client: Any, series_uids: Sequence[str]) -> DrillDown | None:
    """Exact instances of ``series_uids`` (one pair of calls for all of them) by the first of
    ``client.drilldown_routes()`` that works; None when no route does (then sizes must be learned by
    fetching). ``client`` has the NbiaClient drill-down methods (tests pass fakes).

    A route that fails because the server answered without data (404, refused, no login, a 5xx from a
    broken query, malformed JSON) gives way to the next; a 404 or a missing login marks it absent for
    the client. A failure to reach the server at all is raised: it is not "no drill-down", and learning
    sizes by fetching would fail the same way.
    """
    uids = list(dict.fromkeys(u for u in series_uids if u))
    routes = client.drilldown_routes()
    if not uids:
        return DrillDown(routes[0] if routes else ADVANCED, {})
    for route in routes:
        try:
            studies = client.study_drilldown(uids, route=route)
            pks = {s.series_pk_id: s.series_uid for st in studies for s in st.series if s.series_uid in uids}
            found = client.image_drilldown(sorted(pks), route=route) if pks else []
        except NbiaError as exc:
            if not _route_failed(exc):
                raise
            if isinstance(exc, (RemoteNotFoundError, AuthError)) and not isinstance(exc, TokenExpiredError):
                client.mark_route_absent(route)
            log.info("%s drill-down unavailable for %s (%s)", route, _describe_list("series", uids), exc)
            continue
        by_series: dict[str, list[Instance]] = {uid: [] for uid in pks.values()}
        strays = 0
        for inst in found:
            if inst.series_uid in by_series and inst.sop_uid:
                by_series[inst.series_uid].append(inst)
            else:
                strays += 1
        if strays:
            log.warning("%s drill-down returned %d instances of series not asked for; ignored", route, strays)
        return DrillDown(route, by_series)
    return None


class ImageStream:
    """The body of one streamed answer (see :meth:`NbiaClient.open_single_image`)."""

    def __init__(self, response: requests.Response, what: str, stall_timeout: float) -> None:
        self._response = response
        self.what = what
        announced = response.headers.get("Content-Length")
        encoded = bool(response.headers.get("Content-Encoding"))
        self.length: int | None = int(announced) if announced and announced.strip().isdigit() and not encoded else None
        # The socket's timeout was capped by the call's deadline for the headers; from here on it is the
        # stall timeout alone: a big body may take long, as long as bytes keep coming.
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.settimeout(stall_timeout)
            except OSError:
                pass
        self.stall_timeout = stall_timeout

    def chunks(self, size: int = 256 * 1024) -> Iterator[bytes]:
        """The body, as it arrives. ProtocolError when it breaks off or ends short of its Content-Length
        (worth another attempt); ServerError when no byte came for the read timeout (a stall)."""
        raw = self._response.raw
        received = 0
        try:
            while True:
                chunk = raw.read1(size, decode_content=True)
                if not chunk:
                    break
                received += len(chunk)
                yield chunk
        except urllib3.exceptions.ReadTimeoutError:
            raise ServerError(f"{self.what}: no byte for {self.stall_timeout:g} s after {received} bytes "
                              "(the transfer stalled)") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ProtocolError(f"{self.what}: the answer broke off after {received} bytes "
                                f"({type(exc).__name__})") from None
        if self.length is not None and received != self.length:
            raise ProtocolError(f"{self.what}: {received} bytes, the server announced {self.length}")
        if received == 0:
            raise ProtocolError(f"{self.what}: empty body")

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> ImageStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        except Exception:  # noqa: BLE001 - interpreter shutdown
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
