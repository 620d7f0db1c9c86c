"""Token manager: login, refresh, fallback, 401 handling, the background refresher, secrets kept out."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import parse_qs

import pytest
import requests
import responses
from localhttp import DripServer

from nbiafs.auth import TokenManager, password_from_env_or_prompt
from nbiafs.errors import AuthError, ServerError
from nbiafs.records import Token

BASE = "http://127.0.0.1:9"
TOKEN_URL = f"{BASE}/nbia-api/oauth/token"
LOGOUT_URL = f"{BASE}/nbia-api/logout"
SECRET = "s3cr3t-Pa55word"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def form_of(call: responses.Call) -> dict[str, str]:
    body = call.request.body
    text = body.decode() if isinstance(body, bytes) else body
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


class TokenServer:
    """A responses callback issuing numbered tokens; refresh can be refused."""

    def __init__(self, expires_in: float = 7200, refuse_refresh: bool = False) -> None:
        self.expires_in = expires_in
        self.refuse_refresh = refuse_refresh
        self.grants: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request):  # responses callback
        text = request.body.decode() if isinstance(request.body, bytes) else request.body
        form = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
        with self.lock:
            self.grants.append(form["grant_type"])
            n = len(self.grants)
        if form["grant_type"] == "refresh_token" and self.refuse_refresh:
            return 400, {}, '{"error": "invalid_grant"}'
        body = (f'{{"access_token": "tok{n}", "expires_in": {self.expires_in}, '
                f'"refresh_token": "ref{n}", "refresh_expires_in": 36000, "token_type": "bearer"}}')
        return 200, {"Content-Type": "application/json"}, body


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def test_guest_login_posts_password_grant_form(rsps):
    rsps.post(TOKEN_URL, json={"access_token": "abc", "expires_in": 7200, "refresh_token": "r"})
    tm = TokenManager(BASE)
    assert tm.get_token() == "abc"
    form = form_of(rsps.calls[0])
    assert form == {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}


def test_token_is_reused_until_it_expires_then_refreshed_by_fake_clock(rsps):
    server = TokenServer(expires_in=100)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    clock = FakeClock()
    tm = TokenManager(BASE, clock=clock)
    assert tm.get_token() == "tok1"
    clock.now += 50
    assert tm.get_token() == "tok1"
    clock.now += 60  # past expiry in the middle of a run
    assert tm.get_token() == "tok2"
    assert server.grants == ["password", "refresh_token"]
    assert form_of(rsps.calls[1])["refresh_token"] == "ref1"
    assert form_of(rsps.calls[1])["client_id"] == "NBIA"


def test_get_token_never_returns_a_token_at_its_expiry(rsps):
    server = TokenServer(expires_in=100)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    clock = FakeClock()
    tm = TokenManager(BASE, clock=clock)
    tm.get_token()
    clock.now += 99.9  # within the expiry skew
    assert tm.get_token() == "tok2"


def test_refused_refresh_falls_back_to_password_grant(rsps):
    server = TokenServer(expires_in=100, refuse_refresh=True)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    clock = FakeClock()
    tm = TokenManager(BASE, "alice", SECRET, clock=clock)
    tm.get_token()
    clock.now += 200
    assert tm.get_token() == "tok3"
    assert server.grants == ["password", "refresh_token", "password"]
    assert form_of(rsps.calls[2])["password"] == SECRET


def test_expired_refresh_token_goes_straight_to_password_grant(rsps):
    rsps.post(TOKEN_URL, json={"access_token": "a", "expires_in": 100, "refresh_token": "r",
                               "refresh_expires_in": 150})
    clock = FakeClock()
    tm = TokenManager(BASE, clock=clock)
    tm.get_token()
    clock.now += 200
    tm.get_token()
    assert [form_of(c)["grant_type"] for c in rsps.calls] == ["password", "password"]


def test_wrong_password_is_a_clear_auth_error_without_the_password(rsps):
    rsps.post(TOKEN_URL, status=401, json={"error": "invalid_grant", "error_description": SECRET})
    tm = TokenManager(BASE, "alice", SECRET)
    with pytest.raises(AuthError) as info:
        tm.get_token()
    assert "alice" in str(info.value)
    assert SECRET not in str(info.value)


def test_login_retries_a_flaky_server_then_succeeds(rsps):
    rsps.post(TOKEN_URL, status=503)
    rsps.post(TOKEN_URL, json={"access_token": "ok", "expires_in": 7200})
    assert TokenManager(BASE).get_token() == "ok"


def test_login_against_a_dead_server_raises_server_error(rsps):
    rsps.post(TOKEN_URL, status=502)
    with pytest.raises(ServerError):
        TokenManager(BASE).get_token()
    assert len(rsps.calls) == 3  # bounded


def test_handle_unauthorized_renews_once_for_the_failed_token(rsps):
    server = TokenServer()
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    tm = TokenManager(BASE)
    first = tm.get_token()
    assert tm.handle_unauthorized(first) == "tok2"
    # a stale 401 from a thread that still held tok1 does not renew again
    assert tm.handle_unauthorized(first) == "tok2"
    assert server.grants == ["password", "refresh_token"]


def test_many_threads_with_401_at_once_cause_one_refresh(rsps):
    server = TokenServer()
    slow = threading.Event()
    in_refresh = threading.Event()
    release = threading.Event()

    def callback(request):
        if slow.is_set():
            in_refresh.set()
            release.wait(10)
        return server(request)

    rsps.add_callback(responses.POST, TOKEN_URL, callback=callback)
    tm = TokenManager(BASE)
    failed = tm.get_token()
    slow.set()
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        token = tm.handle_unauthorized(failed)
        with lock:
            results.append(token)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    assert in_refresh.wait(5)
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["tok2"] * 8
    assert server.grants == ["password", "refresh_token"]


def test_concurrent_first_logins_share_one_request(rsps):
    server = TokenServer()
    release = threading.Event()

    def slow_callback(request):
        release.wait(10)
        return server(request)

    rsps.add_callback(responses.POST, TOKEN_URL, callback=slow_callback)
    tm = TokenManager(BASE)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(tm.get_token())) for _ in range(6)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["tok1"] * 6
    assert server.grants == ["password"]


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_threads_waiting_on_a_failing_login_share_its_failure_instead_of_each_retrying(rsps, monkeypatch):
    # With the server down, every waiting thread used to start its own full login after the one it
    # waited for failed: N threads -> N logins in a row, the last reader waiting N times as long.
    monkeypatch.setattr("nbiafs.auth.LOGIN_ATTEMPTS", 1)
    posts: list[int] = []
    release = threading.Event()

    def down(request):
        posts.append(1)
        release.wait(10)
        return 503, {}, "down"

    rsps.add_callback(responses.POST, TOKEN_URL, callback=down)
    tm = TokenManager(BASE)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            tm.get_token()
        except Exception as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    assert _wait_until(lambda: len(posts) == 1 and len(tm._changed._waiters) == 7)
    release.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 8 and all(isinstance(e, ServerError) for e in errors)
    assert len(posts) == 1
    # and the next caller, later, tries again
    rsps.replace(responses.POST, TOKEN_URL, json={"access_token": "up", "expires_in": 7200})
    assert tm.get_token() == "up"


def test_threads_waiting_after_a_401_share_a_failed_renewal(rsps, monkeypatch):
    monkeypatch.setattr("nbiafs.auth.LOGIN_ATTEMPTS", 1)
    rsps.post(TOKEN_URL, json={"access_token": "t1", "expires_in": 7200})
    tm = TokenManager(BASE)
    failed = tm.get_token()
    posts: list[int] = []
    release = threading.Event()

    def down(request):
        posts.append(1)
        release.wait(10)
        return 503, {}, "down"

    rsps.remove(responses.POST, TOKEN_URL)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=down)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            tm.handle_unauthorized(failed)
        except Exception as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    assert _wait_until(lambda: len(posts) >= 1 and len(tm._changed._waiters) == 5)
    release.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 6 and all(isinstance(e, ServerError) for e in errors)
    assert len(posts) == 1  # one renewal (a refresh refused by 503 is not retried as a password grant)


def test_background_refresher_really_refreshes_short_lived_tokens(rsps):
    server = TokenServer(expires_in=1)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    tm = TokenManager(BASE, refresh_margin=60)
    tm.start()
    try:
        assert tm.get_token() == "tok1"
        assert tm.wait_for_renewals(3, timeout=10), "the refresher did not renew the token"
        assert server.grants[:3] == ["password", "refresh_token", "refresh_token"]
        assert tm.get_token() != "tok1"
    finally:
        started = time.monotonic()
        tm.stop()
        assert time.monotonic() - started < 2


def test_refresher_keeps_going_when_the_server_is_down(rsps):
    calls: list[int] = []
    server = TokenServer(expires_in=1)
    recovered = threading.Event()

    def flaky(request):
        calls.append(1)
        if 2 <= len(calls) <= 5:  # the login works, then the server is down for a while
            return 503, {}, "down"
        if len(calls) > 5:
            recovered.set()
        return server(request)

    rsps.add_callback(responses.POST, TOKEN_URL, callback=flaky)
    tm = TokenManager(BASE)
    tm.get_token()
    tm.start()
    try:
        assert tm.wait_for_renewals(2, timeout=15), "the refresher gave up after server errors"
        assert recovered.is_set()
    finally:
        tm.stop()


def test_stop_joins_an_idle_refresher_quickly(rsps):
    rsps.post(TOKEN_URL, json={"access_token": "a", "expires_in": 7200})
    tm = TokenManager(BASE)
    tm.start()
    tm.get_token()
    thread = tm._thread
    started = time.monotonic()
    tm.stop()
    assert time.monotonic() - started < 1
    assert thread is not None and not thread.is_alive()


def test_start_is_idempotent_and_restartable(rsps):
    tm = TokenManager(BASE)
    tm.start()
    first = tm._thread
    tm.start()
    assert tm._thread is first
    tm.stop()
    tm.start()  # as after a fork: a fresh thread
    assert tm._thread is not None and tm._thread is not first and tm._thread.is_alive()
    tm.stop()


def test_close_sends_logout_with_bearer(rsps):
    rsps.post(TOKEN_URL, json={"access_token": "abc", "expires_in": 7200})
    rsps.get(LOGOUT_URL, body="")
    tm = TokenManager(BASE)
    tm.get_token()
    tm.start()
    tm.close()
    logout = [c for c in rsps.calls if c.request.url == LOGOUT_URL]
    assert len(logout) == 1
    assert logout[0].request.headers["Authorization"] == "Bearer abc"


def test_logout_errors_are_logged_not_raised(rsps, caplog):
    rsps.post(TOKEN_URL, json={"access_token": "abc", "expires_in": 7200})
    rsps.get(LOGOUT_URL, body=requests.ConnectionError("refused"))
    tm = TokenManager(BASE)
    tm.get_token()
    with caplog.at_level(logging.WARNING, logger="nbiafs.auth"):
        tm.logout()
    assert "logout" in caplog.text
    assert "abc" not in caplog.text


def test_password_and_tokens_never_in_logs_or_reprs(rsps, caplog):
    server = TokenServer(expires_in=100, refuse_refresh=True)
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    rsps.get(LOGOUT_URL, body="")
    clock = FakeClock()
    with caplog.at_level(logging.DEBUG):
        tm = TokenManager(BASE, "alice", SECRET, clock=clock)
        token = tm.get_token()
        clock.now += 200
        tm.get_token()
        tm.handle_unauthorized("tok3")
        tm.close()
    for text in (caplog.text, repr(tm), repr(tm._token)):
        assert SECRET not in text
        assert token not in text
        assert "ref1" not in text


def test_password_from_env(monkeypatch):
    monkeypatch.setenv("NBIA_PASSWORD", SECRET)
    assert password_from_env_or_prompt("alice") == SECRET


def test_guest_needs_no_password(monkeypatch):
    monkeypatch.delenv("NBIA_PASSWORD", raising=False)
    assert password_from_env_or_prompt("nbia_guest") == ""


def test_missing_password_without_terminal_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NBIA_PASSWORD", raising=False)

    class NoTty:
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr("sys.stdin", NoTty())
    with pytest.raises(AuthError, match="NBIA_PASSWORD"):
        password_from_env_or_prompt("alice")


def test_password_prompt_used_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NBIA_PASSWORD", raising=False)

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt: SECRET if "alice" in prompt else "")
    assert password_from_env_or_prompt("alice") == SECRET


@pytest.mark.timeout(60)
def test_a_token_reply_dripping_bytes_cannot_hold_a_login_past_its_timeouts(monkeypatch):
    monkeypatch.setattr("nbiafs.auth.LOGIN_ATTEMPTS", 1)
    server = DripServer(b" ", "application/json")
    tm = TokenManager(server.url, timeout=(0.5, 0.5))
    try:
        started = time.monotonic()
        with pytest.raises(ServerError):
            tm.get_token()  # the read timeout alone would wait 500 s for this body
        assert time.monotonic() - started < 5
    finally:
        tm.close()
        server.close()


@pytest.mark.timeout(60)
def test_a_logout_reply_dripping_bytes_cannot_hold_close():
    server = DripServer(b" ", "application/json")
    tm = TokenManager(server.url, timeout=(0.5, 0.5))
    tm._token = Token(access_token="abc", expires_at=time.monotonic() + 7200)
    try:
        started = time.monotonic()
        tm.close()
        assert time.monotonic() - started < 5
    finally:
        server.close()


def test_a_login_slower_than_any_attempt_could_be_is_a_server_error_for_waiters_not_access_denied(
        rsps, monkeypatch):
    # A waiter giving up on another thread's slow login must not look like a refused password
    # (AuthError is EACCES); the server is slow, which is EIO.
    monkeypatch.setattr("nbiafs.auth.LOGIN_ATTEMPTS", 1)
    monkeypatch.setattr("nbiafs.auth.LOGIN_WAIT_SLACK", 0.2)
    entered = threading.Event()
    release = threading.Event()

    def stuck(request):
        entered.set()
        release.wait(10)
        return 503, {}, "down"

    rsps.add_callback(responses.POST, TOKEN_URL, callback=stuck)
    tm = TokenManager(BASE, timeout=(0.01, 0.01))
    first = threading.Thread(target=lambda: pytest.raises(ServerError, tm.get_token))
    first.start()
    try:
        assert entered.wait(5)
        with pytest.raises(ServerError, match="waiting for another thread"):
            tm.get_token()
    finally:
        release.set()
        first.join(10)
