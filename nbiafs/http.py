"""The retrying request loop under the NBIA client: one call = bounded attempts within one deadline.

What it owns:
- retries of 429 (honouring ``Retry-After``), 5xx, connection errors, timeouts and truncated bodies,
  at most ``retries`` times, with exponential backoff and jitter, all inside one overall ``deadline``;
- 401 handling: one token refresh (via the caller's ``on_unauthorized``) and one retry, then
  :class:`TokenExpiredError`; other 4xx are not retried;
- one :class:`~nbiafs.deadline.Deadline` per call, handed to the token callbacks too, so getting or
  renewing a token (or waiting for another thread's login) counts against the call that needed it;
- turning every failure into an :mod:`nbiafs.errors` type whose message names the endpoint and UIDs;
- a DEBUG log line per request (endpoint, params, status, ms). Headers are never logged, so the
  bearer token never reaches a log.

At most ``max_connections`` requests to the server are open at once (the TCIA data-retriever's
politeness: 8 per host); waiting for a free one counts against the call's deadline. A streamed
answer keeps its connection until the caller closes it.

Backoff waits on the ``closed`` event, so closing the client interrupts a waiting call at once; and
the session made by :func:`make_session` remembers its sockets, so :meth:`Transport.close` also cuts
the transfers in flight (a worker blocked in ``recv`` on a stalled server returns at once: unmount
does not wait out a read timeout).
"""

from __future__ import annotations

import email.utils
import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import __version__
from .deadline import Deadline
from .errors import (
    BadRequestError,
    ForbiddenError,
    NbiaError,
    ProtocolError,
    RemoteNotFoundError,
    ServerError,
    TokenExpiredError,
)
from .options import default

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = f"nbiafs/{__version__}"

#: Exceptions from requests that mean "the transfer failed, try again".
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


#: requests' own query encoder (what ``Session.request`` uses for ``params``: lists repeat the key, None drops it).
_encode_params: Callable[[Any], str] = requests.models.RequestEncodingMixin._encode_params  # type: ignore[attr-defined]

#: Endpoint URLs whose prepared form is kept (a client calls a few dozen endpoints of one or two servers).
BASES_KEPT = 1024

#: Bytes asked of the socket per read while a body arrives (the deadline is checked between reads).
BODY_CHUNK = 256 * 1024


class BodyDeadlineError(Exception):
    """The body of an answer was still arriving when the call's deadline passed."""


class ClosedError(Exception):
    """The client was closed while the body was arriving."""


def read_body_before(response: requests.Response, deadline: Deadline,
                     closed: threading.Event | None = None) -> None:
    """Read ``response``'s whole body into it, giving up once ``deadline`` has passed.

    requests' own timeout bounds each wait for data, not the whole transfer: a server that sends a few
    bytes just under every read timeout could hold a reader for hours. ``read1`` returns as soon as
    some data is there, so the deadline is checked at least once per read timeout.
    """
    raw = response.raw
    chunks: list[bytes] = []
    try:
        while True:
            if closed is not None and closed.is_set():
                response.close()
                raise ClosedError()
            if deadline.expired:
                response.close()
                raise BodyDeadlineError()
            chunk = raw.read1(BODY_CHUNK, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
    except urllib3.exceptions.ReadTimeoutError as exc:
        response.close()
        raise requests.exceptions.ReadTimeout(str(exc)) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # cut short, undecodable, TLS failure mid-body
        response.close()
        if closed is not None and closed.is_set():
            raise ClosedError() from None
        raise requests.exceptions.ChunkedEncodingError(str(exc)) from None
    response._content = b"".join(chunks)  # what requests itself stores once a body is read
    response._content_consumed = True  # type: ignore[attr-defined]


class Retryable(Exception):
    """Raised by a response handler: this answer was bad in a way another attempt may fix."""

    def __init__(self, error: NbiaError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries. Defaults come from the options table (:mod:`nbiafs.options`)."""

    retries: int = default("retries")
    backoff: float = default("backoff")
    deadline: float = default("deadline")
    #: No single wait is longer than this (before jitter).
    max_backoff: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry number ``attempt`` (1-based): exponential, with 50-100 % jitter."""
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return base * rng.uniform(0.5, 1.0)


class _Sockets:
    """The live connections of one session, so that closing the client can cut transfers in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()
        self._shut = False

    def add(self, conn: HTTPConnection) -> None:
        """A connection just made; one made while (or after) the client closed is cut at once, or a
        request that started connecting before the close would wait out its read timeout."""
        with self._lock:
            self._conns.add(conn)
            shut = self._shut
        if shut:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shutdown(self) -> int:
        """Shut down every socket (both directions); a thread blocked on one returns at once."""
        with self._lock:
            self._shut = True
            conns = list(self._conns)
        cut = 0
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                cut += 1
            except OSError:  # closed already
                pass
        return cut


def _tracked(connection_cls: type[HTTPConnection], sockets: _Sockets) -> type[HTTPConnection]:
    class Tracked(connection_cls):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            sockets.add(self)

    return Tracked


class _TrackingAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose connections register with a :class:`_Sockets`."""

    def __init__(self, sockets: _Sockets, **kwargs: Any) -> None:
        self.sockets = sockets
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("TrackedHTTPPool", (HTTPConnectionPool,),
                         {"ConnectionCls": _tracked(HTTPConnection, self.sockets)}),
            "https": type("TrackedHTTPSPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": _tracked(HTTPSConnection, self.sockets)}),
        }


def make_session(pool_size: int) -> requests.Session:
    """A Session with a connection pool of ``pool_size`` per host and our User-Agent.

    urllib3's own retries are off: this module decides what is retried. The session's connections are
    tracked (``session.nbiafs_sockets``) so that :meth:`Transport.close` can cut them.
    """
    session = requests.Session()
    sockets = _Sockets()
    adapter = _TrackingAdapter(sockets, pool_connections=max(1, pool_size), pool_maxsize=max(1, pool_size),
                               max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    session.nbiafs_sockets = sockets  # type: ignore[attr-defined]
    return session


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); ``None`` if unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of an absolute URL (what the environment's settings depend on)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.lower()}{sep}{rest.split('/', 1)[0].split('?', 1)[0].lower()}"


def _summarise(data: Any) -> Any:
    """What to log of a POST form: keys and counts, never the values of long lists."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        keys: dict[str, int] = {}
        for item in data:
            if isinstance(item, tuple) and item:
                keys[str(item[0])] = keys.get(str(item[0]), 0) + 1
        return {k: f"{n} value(s)" for k, n in keys.items()}
    return data


class Transport:
    """Sends requests for one client with the bounded-retry policy. Thread-safe."""

    def __init__(self, session: requests.Session, *, policy: RetryPolicy,
                 timeout: tuple[float, float] = (10.0, 60.0),
                 clock: Callable[[], float] = time.monotonic,
                 closed: threading.Event | None = None,
                 rng: random.Random | None = None,
                 max_connections: int | None = None) -> None:
        self.session = session
        # What requests reads from the environment at every request when trust_env (the proxy variables,
        # REQUESTS_CA_BUNDLE, ~/.netrc) is read once per server instead (:meth:`_environment`): a scan of
        # os.environ and a look for ~/.netrc cost more per getSingleImage than its own headers. ~/.netrc is
        # no longer asked: its Basic credentials would replace the bearer token of a call that has one.
        self._from_environment = session.trust_env
        session.trust_env = False
        self._environments: dict[str, dict[str, Any]] = {}
        self._bases: dict[str, str] = {}  # endpoint URL -> as requests prepares it (see _prepare)
        self._environments_lock = threading.Lock()
        self.max_connections = max_connections
        self._gate = threading.BoundedSemaphore(max_connections) if max_connections else None
        self.policy = policy
        self.timeout = timeout
        self.clock = clock
        self.closed = closed if closed is not None else threading.Event()
        self._rng = rng if rng is not None else random.Random()
        self._rng_lock = threading.Lock()

    def _environment(self, url: str) -> dict[str, Any]:
        """``proxies``, ``verify`` and ``cert`` for requests to ``url``'s server, as ``Session.request``
        would pass them on: the environment (NO_PROXY included) read as requests itself reads it, merged
        with the session's own settings; once per scheme and host."""
        origin = _origin(url)
        known = self._environments.get(origin)
        if known is not None:
            return known
        proxies: dict[str, str] = {}
        verify: Any = None
        cert: Any = None
        if self._from_environment:
            self.session.trust_env = True  # only merge_environment_settings reads it; no request is sent here
            try:
                found = self.session.merge_environment_settings(url, {}, None, None, None)
            finally:
                self.session.trust_env = False
            proxies, verify, cert = dict(found.get("proxies") or {}), found.get("verify"), found.get("cert")
        # with trust_env off this is a pure merge with the session's proxies, verify (True) and cert
        merged = self.session.merge_environment_settings(url, proxies, None, verify, cert)
        settings = {"proxies": dict(merged.get("proxies") or {}), "verify": merged.get("verify"),
                    "cert": merged.get("cert")}
        with self._environments_lock:
            return self._environments.setdefault(origin, settings)

    def _prepare(self, method: str, url: str, params: Mapping[str, Any] | None, data: Any,
                 headers: Mapping[str, str]) -> requests.PreparedRequest:
        """The request ``Session.request`` would send, built without its per-call merging.

        ``Session.request`` costs about 0.25 ms of CPU per call on its way to the adapter (prepare_request
        merges settings, hooks and cookie jars, and runs typing-Protocol checks), a third of a
        ``getSingleImage`` of a 131 KB file on this project's machine. Here the URL is prepared by
        requests once per base URL (IDNA, quoting) and the query appended with requests' own encoder;
        headers are the session's with the call's over them; cookies, body and hooks are prepared as
        requests prepares them. ``Session.send`` then does the rest as before (cookies kept,
        redirects followed, hooks run)."""
        session = self.session
        base = self._bases.get(url)
        if base is None:
            probe = requests.PreparedRequest()
            probe.prepare_url(url, None)
            base = str(probe.url)
            if len(self._bases) >= BASES_KEPT:
                self._bases.clear()
            self._bases[url] = base
        prep = requests.PreparedRequest()
        prep.method = method.upper()
        query = _encode_params(params) if params else ""
        prep.url = f"{base}{'&' if '?' in base else '?'}{query}" if query else base
        merged: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for key, value in session.headers.items():
            if value is not None:  # (None removes a header, as merge_setting does)
                merged[key] = value if isinstance(value, str) else value.decode("latin-1")  # the same bytes sent
        for item in headers.items():
            requests.utils.check_header_validity(item)  # InvalidHeader (a RequestException), as requests says
        merged.update(headers)
        prep.headers = merged
        prep.prepare_cookies(session.cookies)
        prep.prepare_body(data, None)
        prep.hooks = {"response": list(session.hooks.get("response", ()))}
        return prep

    def _jittered(self, attempt: int) -> float:
        with self._rng_lock:
            return self.policy.delay(attempt, self._rng)

    def call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        endpoint: str,
        handle: Callable[[requests.Response], T],
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        token: Callable[[Deadline], str] | None = None,
        on_unauthorized: Callable[[str, Deadline], str] | None = None,
        status_errors: Mapping[int, Callable[[requests.Response], NbiaError]] | None = None,
        accept: Callable[[requests.Response], bool] | None = None,
        stream: bool = False,
        deadline: Deadline | None = None,
    ) -> T:
        """Send until ``handle`` accepts an answer, the retries are spent or the deadline passes.

        ``what`` names the call in error messages ("getSingleImage for instance X of series Y").
        ``token(deadline)`` supplies the bearer token (None: anonymous) within the call's deadline, as
        ``on_unauthorized(failed_token, deadline)`` renews it after a 401. ``status_errors`` picks the error type
        for a status (retried anyway if the status is 429/5xx). ``accept`` decides which answers go to
        ``handle`` (default: 2xx). ``handle`` may raise :class:`Retryable` to try again. ``deadline``
        shares a caller's deadline (several calls that make one answer); the policy's own still holds.
        """
        policy = self.policy
        own = Deadline.after(policy.deadline, self.clock)
        deadline = own if deadline is None else Deadline(min(own.at, deadline.at), self.clock)
        attempt = 0
        refreshed = False
        status_errors = status_errors or {}
        while True:
            if self.closed.is_set():
                raise ServerError(f"{what}: the client was closed")
            if deadline.expired:
                raise ServerError(f"{what}: no answer within the {policy.deadline:g} s deadline")
            headers: dict[str, str] = {}
            bearer: str | None = None
            if token is not None:
                bearer = token(deadline)
                headers["Authorization"] = f"Bearer {bearer}"
                if deadline.expired:
                    raise ServerError(f"{what}: no answer within the {policy.deadline:g} s deadline "
                                      "(getting a token took it all)")
            if self._gate is not None and not self._gate.acquire(timeout=deadline.remaining()):
                raise ServerError(f"{what}: no free connection to the server within the {policy.deadline:g} s "
                                  f"deadline (at most {self.max_connections} at once)")
            gated = self._gate is not None
            remaining = deadline.remaining()
            timeout = (min(self.timeout[0], remaining), min(self.timeout[1], remaining))
            started = self.clock()
            wait_hint: float | None = None
            failure: NbiaError
            try:
                prepared = self._prepare(method, url, params, data, headers)
                response = self.session.send(prepared, timeout=timeout, stream=True, allow_redirects=True,
                                             **self._environment(url))
                if not stream:
                    read_body_before(response, deadline, self.closed)
                    gated = self._ungate(gated)
            except ClosedError:
                raise ServerError(f"{what}: the client was closed") from None
            except BodyDeadlineError:
                raise ServerError(f"{what}: the answer was still arriving at the {policy.deadline:g} s "
                                  "deadline (a server sending too slowly)") from None
            except TRANSIENT_EXCEPTIONS as exc:
                if self.closed.is_set():  # close() cut the connection under us
                    raise ServerError(f"{what}: the client was closed") from None
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s params=%s data=%s -> %s after %.0f ms", method, endpoint, params,
                              _summarise(data), type(exc).__name__, (self.clock() - started) * 1000)
                failure = _transport_failure(what, exc)
            except requests.RequestException as exc:  # invalid URL and the like: not transient
                raise BadRequestError(f"{what}: request failed: {type(exc).__name__}: {exc}") from None
            else:
                status = response.status_code
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s params=%s data=%s -> %d in %.0f ms", method, endpoint, params,
                              _summarise(data), status, (self.clock() - started) * 1000)
                ok = accept(response) if accept is not None else 200 <= status < 300
                if ok:
                    try:
                        if stream and gated:  # the connection is the caller's until it closes the answer
                            self._ungate_on_close(response)
                            gated = False
                        return handle(response)
                    except Retryable as exc:
                        response.close()
                        failure = exc.error
                        log.debug("%s: retryable bad answer: %s", endpoint, failure)
                    except TRANSIENT_EXCEPTIONS as exc:
                        response.close()
                        failure = _transport_failure(what, exc)
                    except BaseException:
                        response.close()
                        raise
                elif status == 401 and bearer is not None:
                    response.close()
                    if on_unauthorized is not None and not refreshed:
                        refreshed = True
                        log.debug("%s: 401, refreshing the token once and retrying", endpoint)
                        on_unauthorized(bearer, deadline)
                        continue
                    raise TokenExpiredError(f"{what}: the server still answers 401 Unauthorized "
                                            "after a token refresh")
                else:
                    failure = self._status_error(response, what, status_errors)
                    response.close()
                    if status == 429:
                        wait_hint = retry_after_seconds(response.headers.get("Retry-After"))
                    elif status < 500:
                        raise failure
            finally:
                gated = self._ungate(gated)
            attempt += 1
            if attempt > policy.retries:
                raise failure
            delay = self._jittered(attempt)
            if wait_hint is not None:
                delay = max(delay, wait_hint)
            if delay > deadline.remaining():
                raise type(failure)(f"{failure} (gave up: retrying would pass the "
                                    f"{policy.deadline:g} s deadline)")
            log.debug("%s: attempt %d failed (%s); retrying in %.2f s", endpoint, attempt, failure, delay)
            if self.closed.wait(delay):
                raise ServerError(f"{what}: the client was closed")

    def _ungate(self, gated: bool) -> bool:
        if gated and self._gate is not None:
            self._gate.release()
        return False

    def _ungate_on_close(self, response: requests.Response) -> None:
        """Give the connection back when ``response`` is closed (or, at the latest, garbage collected)."""
        gate = self._gate
        if gate is None:
            return
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                gate.release()

        original = response.close

        def close() -> None:
            try:
                original()
            finally:
                release()

        response.close = close  # type: ignore[method-assign]
        weakref.finalize(response, release)

    def close(self) -> None:
        """Stop every call: waiting ones at once, transfers in flight by cutting their sockets."""
        self.closed.set()
        sockets = getattr(self.session, "nbiafs_sockets", None)
        if sockets is not None:
            cut = sockets.shutdown()
            if cut:
                log.debug("closed the client: cut %d connection(s) in flight", cut)

    @staticmethod
    def _status_error(response: requests.Response, what: str,
                      status_errors: Mapping[int, Callable[[requests.Response], NbiaError]]) -> NbiaError:
        status = response.status_code
        special = status_errors.get(status)
        error: NbiaError
        if special is not None:
            error = special(response)
        elif status == 429:
            error = ServerError(f"{what}: the server is busy (429 Too Many Requests)")
        elif status >= 500:
            error = ServerError(f"{what}: server error {status}")
        elif status == 403:
            error = ForbiddenError(f"{what}: access denied (403)")
        elif status == 404:
            error = RemoteNotFoundError(f"{what}: the server answered 404 Not Found")
        elif status == 401:
            error = TokenExpiredError(f"{what}: 401 Unauthorized")
        elif 300 <= status < 400:
            error = ProtocolError(f"{what}: unexpected redirect {status} to {response.headers.get('Location')!r}")
        else:
            error = BadRequestError(f"{what}: the server rejected the request ({status})")
        error.status = status
        return error


def _transport_failure(what: str, exc: BaseException) -> NbiaError:
    """A failed transfer: a body cut short is a ProtocolError, no answer at all a ServerError."""
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return ProtocolError(f"{what}: the answer was cut short or corrupt")
    if isinstance(exc, requests.Timeout):
        return ServerError(f"{what}: the request timed out")
    return ServerError(f"{what}: {describe_failure(exc)}")


def describe_failure(exc: BaseException) -> str:
    """A short human reason for a failed transfer (no URL parameters, no headers: no secrets)."""
    if isinstance(exc, requests.Timeout):
        return "the request timed out"
    text = repr(exc)
    if any(s in text for s in ("NameResolution", "Name or service not known", "name resolution",
                               "nodename nor servname")):
        return "cannot resolve the server's host name (no network, or a wrong --server?)"
    if "Connection refused" in text or "ConnectionRefused" in text:
        return "connection refused (is the server running on that port?)"
    if "SSLError" in text or isinstance(exc, requests.exceptions.SSLError):
        return "TLS/SSL handshake failed"
    if "reset" in text.lower():
        return "the connection was reset"
    return "could not connect to the server (connection failed or reset)"
