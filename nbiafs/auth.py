"""OAuth tokens for the NBIA API: login, refresh, logout and the background refresher thread.

:class:`TokenManager` owns the account's password (in memory only) and its current token. It logs
in lazily on the first :meth:`TokenManager.get_token`, renews the token in a daemon thread before it
expires (refresh grant first; a fresh password grant when the refresh is refused or its refresh
token has expired), and after a 401 renews it once for all the threads that saw that token fail.
It also remembers whether the current token was recently proven valid, for the endpoints that hide
auth failures behind empty answers (see :mod:`nbiafs.client`).

The thread is created by :meth:`TokenManager.start`, not in ``__init__``, because the mount forks
into the background after construction and threads do not survive a fork. Passwords and tokens
never appear in logs, reprs or exception messages.

Waits are bounded by the caller's :class:`~nbiafs.deadline.Deadline`: a login for a call, and a thread
waiting for another thread's login, give up when the call that needed the token must be over (a
hanging token endpoint costs an ``open()`` its deadline, not minutes). A password the server refuses
is not tried again: identity providers lock accounts after repeated failures, so the manager
remembers the refusal, its refresher stops, and every later call fails at once with :class:`AuthError`
(EACCES) until the mount is restarted with the right password.
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable

import requests

from .config import CLIENT_ID, GUEST_USER
from .deadline import Deadline
from .errors import AuthError, NbiaError, ProtocolError, RemoteNotFoundError, ServerError
from .http import TRANSIENT_EXCEPTIONS, USER_AGENT, BodyDeadlineError, describe_failure, read_body_before
from .options import default
from .records import Token

log = logging.getLogger(__name__)

PASSWORD_ENV = "NBIA_PASSWORD"

#: Refresh this long before expiry when the token is long-lived (the server issues 7200 s tokens).
DEFAULT_REFRESH_MARGIN = 60.0
#: A valid token is refreshed after at most this fraction of its lifetime...
REFRESH_FRACTION = 0.75
#: ...but never before this fraction, however large the margin (short tokens would spin otherwise).
MIN_REFRESH_FRACTION = 0.5
#: And never more often than this (seconds), whatever the server says.
MIN_REFRESH_INTERVAL = 0.5
#: A token this close to its expiry (fraction of lifetime, at most 5 s) counts as expired already.
EXPIRY_SKEW_FRACTION = 0.1
#: The background refresher's backoff when the server is down: 1 s doubling up to this.
MAX_REFRESHER_BACKOFF = 60.0
#: Attempts of one foreground token request when the server is flaky.
LOGIN_ATTEMPTS = 3
#: A thread waiting for another thread's login gives up after every attempt could have run, plus this.
LOGIN_WAIT_SLACK = 10.0
#: A token proven valid by a 401-honest call is trusted this long (seconds) by empty answers.
VERIFIED_WINDOW = 30.0


def password_from_env_or_prompt(user: str) -> str:
    """The password of ``user``: ``""`` for the guest, else ``$NBIA_PASSWORD``, else a prompt.

    Raises AuthError when there is neither the variable nor a terminal to prompt on.
    """
    if user == GUEST_USER:
        return ""
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        return from_env
    if not (sys.stdin is not None and sys.stdin.isatty()):
        raise AuthError(f"no password for NBIA user {user!r}: set {PASSWORD_ENV} or run from a terminal "
                        "to be prompted")
    try:
        return getpass.getpass(f"NBIA password for {user}: ")
    except (EOFError, KeyboardInterrupt):
        raise AuthError(f"no password entered for NBIA user {user!r}") from None


class TokenManager:
    """The token of one account on one server; thread-safe."""

    def __init__(self, base_url: str, username: str = GUEST_USER, password: str = "", *,
                 session: requests.Session | None = None, refresh_margin: float | None = None,
                 timeout: tuple[float, float] = (default("connect_timeout"), default("read_timeout")),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.__password = password
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
        self._session = session
        self._margin = DEFAULT_REFRESH_MARGIN if refresh_margin is None else refresh_margin
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # token replaced or login finished
        self._token: Token | None = None
        self._in_flight = False
        self._finished = 0  # renewals finished, failed or not: waiters learn whether theirs failed
        self._failure: NbiaError | None = None  # why the last finished renewal failed (None: it worked)
        self._renewals = 0  # count of tokens issued (for tests and logs)
        self._verified_token: str | None = None
        self._verified_at = 0.0
        self._refused: AuthError | None = None  # the server refused the password: never try it again
        self._stop = threading.Event()
        self._wake = threading.Event()  # the refresher recomputes its schedule
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"TokenManager(base_url={self.base_url!r}, username={self.username!r})"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/nbia-api/oauth/token"

    # -- public API -------------------------------------------------------------------------

    def get_token(self, deadline: Deadline | None = None) -> str:
        """A valid access token by this manager's clock; logs in (or renews) when needed.

        Every wait (the login itself, or another thread's) ends by ``deadline`` (ServerError after it).
        """
        with self._changed:
            failure: NbiaError | None = None
            while True:
                self._raise_if_refused()
                token = self._token
                if token is not None and self._fresh(token):
                    return token.access_token
                if failure is not None:
                    raise failure
                if not self._in_flight:
                    self._in_flight = True
                    break
                failure = self._wait_for_login(deadline)
        return self._renew_in_flight(token, reason="no valid token", deadline=deadline).access_token

    def handle_unauthorized(self, failed_token: str, deadline: Deadline | None = None) -> str:
        """After a 401 with ``failed_token``: renew once (unless someone already did); the new token."""
        with self._changed:
            self._raise_if_refused()
            failure = self._wait_for_login(deadline) if self._in_flight else None
            token = self._token
            if token is not None and token.access_token != failed_token and self._fresh(token):
                return token.access_token
            if failure is not None:
                raise failure
            self._raise_if_refused()
            self._in_flight = True
        return self._renew_in_flight(token, reason="the server answered 401", deadline=deadline).access_token

    @property
    def refused(self) -> bool:
        """True once the server refused this account's password (nothing is tried again)."""
        with self._lock:
            return self._refused is not None

    def _raise_if_refused(self) -> None:
        refused = self._refused  # lock held by the caller
        if refused is not None:
            raise AuthError(str(refused))

    def mark_doubtful(self, token: str) -> None:
        """An endpoint that hides auth failures answered empty with ``token``: its proof no longer holds."""
        with self._lock:
            if self._verified_token == token:
                self._verified_token = None
        log.debug("token marked doubtful for %s", self.username)

    def mark_verified(self, token: str) -> None:
        """A 401-honest call just accepted ``token``."""
        with self._lock:
            self._verified_token = token
            self._verified_at = self._clock()

    def is_verified(self, token: str) -> bool:
        """Was ``token`` proven valid within the last :data:`VERIFIED_WINDOW` seconds?"""
        with self._lock:
            return (self._verified_token == token
                    and self._clock() - self._verified_at < VERIFIED_WINDOW)

    @property
    def renewals(self) -> int:
        """How many tokens were issued so far (logins and refreshes)."""
        with self._lock:
            return self._renewals

    def wait_for_renewals(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` tokens were issued (True) or ``timeout`` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._renewals >= count, timeout=timeout)

    def start(self) -> None:
        """Start the background refresher (idempotent; call after the daemon fork)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._refused is not None:  # a refused password is never sent again
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._refresher, name="nbiafs-token-refresher",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the refresher and wait for it (promptly: it waits on events, never sleeps)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout[0] + self._timeout[1] + 5)
            if thread.is_alive():
                log.warning("the token refresher did not stop in time")
        self._thread = None

    def logout(self) -> None:
        """Tell the server to end the session; errors are logged, never raised."""
        with self._lock:
            token, self._token = self._token, None
            self._verified_token = None
        if token is None:
            return
        try:  # stream: the body is not needed, and a server dripping it would hold close() for hours
            response = self._session.get(f"{self.base_url}/nbia-api/logout",
                                         headers={"Authorization": f"Bearer {token.access_token}"},
                                         timeout=self._timeout, stream=True)
            log.debug("GET logout -> %d", response.status_code)
            response.close()
        except requests.RequestException as exc:
            log.warning("logout from %s failed: %s", self.base_url, type(exc).__name__)

    def close(self) -> None:
        """Stop the refresher and log out."""
        self.stop()
        self.logout()
        if self._own_session:
            self._session.close()

    # -- renewal ----------------------------------------------------------------------------

    @staticmethod
    def _lifetime(token: Token) -> float:
        issued = token.issued_at if token.issued_at is not None else token.expires_at
        return max(0.0, token.expires_at - issued)

    def _fresh(self, token: Token) -> bool:
        lifetime = self._lifetime(token)
        skew = min(5.0, EXPIRY_SKEW_FRACTION * lifetime)
        return self._clock() < token.expires_at - skew

    def _wait_for_login(self, deadline: Deadline | None) -> NbiaError | None:
        """Wait (lock held) for the renewal in flight; a copy of its error if it failed, else None.

        A waiter whose renewal failed raises that error instead of starting a renewal of its own:
        otherwise, with the server down, N waiting threads would run N full logins one after the
        other. ServerError when the caller's ``deadline`` passes first, or the renewal takes longer
        than its attempts could.
        """
        # an attempt: headers within connect + read timeouts, the reply within as long again (plus
        # its last read); then the backoffs between attempts (at most 1 + 2 + 4... s, 5 s each)
        attempt = 2 * (self._timeout[0] + self._timeout[1]) + self._timeout[1]
        limit = attempt * LOGIN_ATTEMPTS + 5.0 * max(0, LOGIN_ATTEMPTS - 1) + LOGIN_WAIT_SLACK
        if deadline is not None:
            limit = deadline.cap(limit)
        waited_for = self._finished
        if not self._changed.wait_for(lambda: not self._in_flight, timeout=limit):
            raise ServerError(f"gave up after {limit:.3g} s waiting for another thread's login "
                              f"to {self.base_url}")
        failure = self._failure
        if self._finished != waited_for and failure is not None:
            return type(failure)(str(failure))  # a copy: each thread raises its own
        return None

    def _renew_in_flight(self, old: Token | None, reason: str, deadline: Deadline | None = None) -> Token:
        """Obtain a new token; the caller has set ``_in_flight``. Clears it and wakes the waiters."""
        new: Token | None = None
        failure: NbiaError | None = None
        try:
            new = self._obtain(old, reason, deadline)
            return new
        except NbiaError as exc:
            failure = exc
            raise
        finally:
            with self._changed:
                self._in_flight = False
                self._finished += 1
                self._failure = None if new is not None else (
                    failure or ServerError("the token renewal was interrupted"))
                if new is not None:
                    self._token = new
                    self._renewals += 1
                self._changed.notify_all()
            if new is not None:
                self._wake.set()

    def _obtain(self, old: Token | None, reason: str, deadline: Deadline | None = None) -> Token:
        """Refresh grant when ``old`` has a live refresh token, else (or if refused) a password grant."""
        now = self._clock()
        if old is not None and old.refresh_token and (old.refresh_expires_at is None
                                                      or now < old.refresh_expires_at):
            try:
                token = self._request_token({"grant_type": "refresh_token",
                                             "refresh_token": old.refresh_token}, deadline)
                log.info("token for %s refreshed (%s)", self.username, reason)
                return token
            except AuthError:
                log.info("the server refused the token refresh for %s; logging in again", self.username)
        try:
            token = self._request_token({"grant_type": "password", "username": self.username,
                                         "password": self.__password}, deadline)
        except AuthError as exc:
            with self._lock:
                self._refused = exc
            self._stop.set()  # the refresher ends: a refused password is never sent again
            self._wake.set()
            # A first login's refusal is the caller's error to report; one after the account worked
            # (password changed, account locked) is only seen in the running mount's log.
            log.log(logging.ERROR if self._renewals else logging.INFO,
                    "the server refused the password of NBIA user %r (%s): not trying it again; every "
                    "call needing a login now fails with 'permission denied' until the mount is restarted "
                    "with the right password", self.username, exc)
            raise
        log.info("logged in to %s as %s (%s)", self.base_url, self.username, reason)
        return token

    def _request_token(self, form: dict[str, str], deadline: Deadline | None = None) -> Token:
        """POST the token endpoint (bounded retries for transient failures), within ``deadline``."""
        form = {**form, "client_id": CLIENT_ID}
        grant = form["grant_type"]
        last: NbiaError | None = None
        # Without a caller (the refresher), one request's own bound: connect + read, the reply within as long
        bound = deadline if deadline is not None else None
        for attempt in range(LOGIN_ATTEMPTS):
            if attempt:
                delay = min(5.0, 0.5 * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)
                if bound is not None and delay >= bound.remaining():
                    break
                if self._stop.wait(delay):
                    break
            reply_by = Deadline.after(2 * sum(self._timeout))
            if bound is not None:
                reply_by = Deadline(min(reply_by.at, time.monotonic() + bound.remaining()))
                if reply_by.expired:
                    last = last or ServerError(f"token request ({grant}) to {self.base_url}: no time left "
                                               "within the caller's deadline")
                    break
            timeout = (reply_by.cap(self._timeout[0]), reply_by.cap(self._timeout[1]))
            sent_at = self._clock()
            try:
                response = self._session.post(self.token_url, data=form, timeout=timeout, stream=True)
                # The read timeout bounds each wait for data, not the reply: a server sending a
                # byte at a time could hold a login (and every thread waiting for it) for hours.
                read_body_before(response, reply_by)
            except BodyDeadlineError:
                last = ServerError(f"token request ({grant}) to {self.base_url}: the reply was still "
                                   "arriving at the deadline")
                log.debug("POST oauth/token (%s) -> reply too slow", grant)
                continue
            except TRANSIENT_EXCEPTIONS as exc:
                last = ServerError(f"token request ({grant}) to {self.base_url} failed: {describe_failure(exc)}")
                log.debug("POST oauth/token (%s) -> %s", grant, type(exc).__name__)
                continue
            except requests.RequestException as exc:
                raise AuthError(f"token request to {self.base_url} failed: {type(exc).__name__}") from None
            status = response.status_code
            log.debug("POST oauth/token (%s) -> %d in %.0f ms", grant, status,
                      (self._clock() - sent_at) * 1000)
            if status == 429 or status >= 500:
                last = ServerError(f"token request ({grant}) to {self.base_url}: server error {status}")
                continue
            if status == 404:  # no such endpoint: a server without logins (today's public TCIA may be one)
                raise RemoteNotFoundError(f"{self.token_url} answered 404: this server has no login "
                                          "(use --api v4, or a server that has accounts)", status=404)
            if status != 200:
                raise AuthError(f"the server refused the {grant} grant for user {self.username!r} "
                                f"({status}{_oauth_error(response)})", status=status)
            return self._parse_token(response, sent_at)
        if last is None:
            last = ServerError(f"token request ({grant}) to {self.base_url}: "
                               + ("interrupted by stop()" if self._stop.is_set() else "no time left within the deadline"))
        raise last

    def _parse_token(self, response: requests.Response, sent_at: float) -> Token:
        try:
            body = response.json()
        except ValueError:
            raise ProtocolError(f"token reply from {self.base_url} is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) \
                or not body["access_token"]:
            raise ProtocolError(f"token reply from {self.base_url} has no access_token")
        expires_in = _seconds(body.get("expires_in"), default=7200.0) or 0.0
        refresh_in = _seconds(body.get("refresh_expires_in"), default=None)
        refresh = body.get("refresh_token")
        return Token(
            access_token=body["access_token"],
            expires_at=sent_at + expires_in,
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
            refresh_expires_at=sent_at + refresh_in if refresh_in else None,
            token_type=str(body.get("token_type") or "Bearer"),
            issued_at=sent_at,
            extra={k: v for k, v in body.items()
                   if k not in ("access_token", "refresh_token", "expires_in", "refresh_expires_in")},
        )

    # -- background refresher -----------------------------------------------------------------

    def _refresh_due(self, token: Token) -> float:
        """When (by the clock) the refresher should renew ``token``."""
        lifetime = self._lifetime(token)
        after = min(REFRESH_FRACTION * lifetime, lifetime - self._margin)
        after = max(after, MIN_REFRESH_FRACTION * lifetime, MIN_REFRESH_INTERVAL)
        issued = token.issued_at if token.issued_at is not None else token.expires_at - lifetime
        return issued + after

    def _refresher(self) -> None:
        log.debug("token refresher started for %s", self.username)
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                token = self._token
                due = self._refresh_due(token) if token is not None else None
            if due is None:  # not logged in yet: lazily, on the first get_token
                self._wake.wait()
                self._wake.clear()
                continue
            delay = due - self._clock()
            if delay > 0:
                self._wake.wait(delay)
                self._wake.clear()
                continue
            assert token is not None  # due is None without a token
            try:
                self._scheduled_renewal(token)
                failures = 0
            except NbiaError as exc:
                failures += 1
                backoff = min(MAX_REFRESHER_BACKOFF, 2.0 ** (failures - 1))
                backoff *= self._rng.uniform(0.5, 1.0)
                log.warning("token refresh for %s failed (%s); retrying in %.1f s", self.username, exc,
                            backoff)
                self._stop.wait(backoff)
            except Exception:  # never die silently
                log.exception("token refresher: unexpected error; retrying in %d s", MAX_REFRESHER_BACKOFF)
                self._stop.wait(MAX_REFRESHER_BACKOFF)
        log.debug("token refresher stopped for %s", self.username)

    def _scheduled_renewal(self, seen: Token) -> None:
        with self._changed:
            if self._in_flight or self._token is not seen:
                return  # someone else is renewing or just did
            self._in_flight = True
        self._renew_in_flight(seen, reason="scheduled refresh")


def _seconds(value: object, default: float | None) -> float | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return max(0.0, float(value))
    if isinstance(value, str):
        try:
            return max(0.0, float(value))
        except ValueError:
            return default
    return default


def _oauth_error(response: requests.Response) -> str:
    """The OAuth ``error`` code of a refusal, if any (descriptions may echo input, so only the code)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f": {body['error'][:60]}"
    return ""
