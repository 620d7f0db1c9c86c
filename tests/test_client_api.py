"""Which API the client speaks (auto: anonymous v4, else v2 with the guest token), drill-down routes,
and deadlines that cover tokens and closing (a mocked server, and real sockets where timing matters)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
import responses
from localhttp import LocalServer

from nbiafs.auth import TokenManager
from nbiafs.client import NbiaClient
from nbiafs.deadline import Deadline
from nbiafs.errors import AuthError, RemoteNotFoundError, ServerError

BASE = "http://127.0.0.1:9"
V2 = f"{BASE}/nbia-api/services/v2"
V4 = f"{BASE}/nbia-api/services/v4"
ADV = f"{BASE}/nbia-api/services"
TOKEN_URL = f"{BASE}/nbia-api/oauth/token"
NO_TOKEN = b"Server was not able to process your request\nnull"
TOKEN_REPLY = '{"access_token": "tok", "expires_in": 7200, "refresh_token": "r"}'


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def client_for(tokens: TokenManager | None = None, **kw) -> NbiaClient:
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.001)
    kw.setdefault("deadline", 10.0)
    return NbiaClient(BASE, tokens, **kw)


def hits(rsps, fragment: str) -> int:
    return sum(1 for c in rsps.calls if fragment in c.request.url)


def test_auto_uses_anonymous_v4_and_never_logs_in(rsps):
    rsps.get(f"{V4}/getCollectionValues", json=[{"Collection": "A"}])
    rsps.get(f"{V4}/getPatient", json=[{"PatientId": "P1", "Collection": "A"}])
    client = client_for(TokenManager(BASE))
    assert client.resolve_api() == "v4"
    assert [p.patient_id for p in client.patients("A")] == ["P1"]
    assert hits(rsps, "oauth/token") == 0
    assert all("Authorization" not in c.request.headers for c in rsps.calls)


@pytest.mark.parametrize("status,body", [(404, b"Not Found"), (401, b""), (403, b""), (500, NO_TOKEN)])
def test_auto_falls_back_to_v2_with_the_guest_token_when_v4_is_refused(rsps, status, body):
    rsps.get(f"{V4}/getCollectionValues", status=status, body=body)
    rsps.post(TOKEN_URL, body=TOKEN_REPLY)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "A"}])
    client = client_for(TokenManager(BASE))
    assert [c.name for c in client.collections()] == ["A"]
    assert client.search_version == "v2"
    assert hits(rsps, "v4/getCollectionValues") == 1  # decided once
    client.collections()
    assert hits(rsps, "v4/") == 1
    assert rsps.calls[-1].request.headers["Authorization"] == "Bearer tok"


def test_auto_with_a_named_account_is_v2_without_a_probe(rsps):
    rsps.post(TOKEN_URL, body=TOKEN_REPLY)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "Restricted"}])
    client = client_for(TokenManager(BASE, "alice", "pw"))
    assert client.search_version == "v2"
    assert [c.name for c in client.collections()] == ["Restricted"]
    assert hits(rsps, "v4/") == 0


def test_a_server_down_is_an_error_not_a_fallback(rsps):
    rsps.get(f"{V4}/getCollectionValues", status=503)
    with pytest.raises(ServerError):
        client_for(TokenManager(BASE)).resolve_api()
    assert hits(rsps, "v2/") == 0


def test_a_404_on_a_listing_is_an_io_error_not_an_absence(rsps):
    rsps.get(f"{V4}/getPatient", status=404, body=b"<html>nginx</html>")
    with pytest.raises(RemoteNotFoundError):
        client_for(api="v4").patients("A")


def _study(series_uid: str, pk: int) -> dict:
    return {"studyId": "1.1", "seriesList": [{"seriesUID": series_uid, "seriesPkId": pk,
                                               "totalSizeForAllImagesInSeries": 10}]}


def _image(series_uid: str, sop: str, size: int) -> dict:
    return {"sopInstanceUid": sop, "seriesInstanceUid": series_uid, "instanceNumber": 1, "size": size}


def test_drilldown_takes_the_anonymous_v4_route_first(rsps):
    rsps.post(f"{V4}/getStudyDrillDownWithSeriesIds", json=[_study("S1", 5)])
    rsps.post(f"{V4}/getImageDrillDown", json=[_image("S1", "I1", 123)])
    result = client_for(api="v4").drilldown(["S1"])
    assert result is not None and result.route == "v4"
    assert [(i.sop_uid, i.size) for i in result.instances["S1"]] == [("I1", 123)]
    assert hits(rsps, "oauth/token") == 0


def test_a_failing_anonymous_drilldown_gives_way_to_the_token_one(rsps):
    rsps.post(f"{V4}/getStudyDrillDownWithSeriesIds", status=500)  # its study query fails
    rsps.post(TOKEN_URL, body=TOKEN_REPLY)
    rsps.post(f"{ADV}/getStudyDrillDownWithSeriesIds", json=[_study("S1", 5)])
    rsps.post(f"{ADV}/getImageDrillDown", json=[_image("S1", "I1", 123)])
    client = client_for(TokenManager(BASE), api="v4")
    result = client.drilldown(["S1"])
    assert result is not None and result.route == "advanced"
    assert result.instances["S1"][0].size == 123
    assert client.drilldown_routes() == ["v4", "advanced"]  # a 500 is not "absent": tried again next time


def test_routes_a_server_does_not_have_are_not_tried_again(rsps):
    rsps.post(f"{V4}/getStudyDrillDownWithSeriesIds", status=404)
    rsps.post(TOKEN_URL, status=404)  # a server without logins
    client = client_for(TokenManager(BASE), api="v4")
    assert client.drilldown(["S1"]) is None  # sizes will be learned by fetching
    assert client.drilldown_routes() == []
    assert client.drilldown(["S2"]) is None
    assert hits(rsps, "getStudyDrillDown") == 1 and hits(rsps, "oauth/token") == 1


def test_sizes_of_zero_or_less_are_unknown_not_empty_files(rsps):
    rsps.post(f"{V4}/getStudyDrillDownWithSeriesIds", json=[_study("S1", 5)])
    rsps.post(f"{V4}/getImageDrillDown", json=[_image("S1", "I0", 0), _image("S1", "I-", -1),
                                               _image("S1", "I2", 2)])
    result = client_for(api="v4").drilldown(["S1"])
    assert result is not None
    assert {i.sop_uid: i.size for i in result.instances["S1"]} == {"I0": None, "I-": None, "I2": 2}


def test_a_complete_body_of_another_size_than_announced_is_returned_once(rsps):
    rsps.get(f"{V4}/getSingleImage", body=b"DICM" * 3, headers={"Content-Length": "12"})
    assert client_for(api="v4").single_image("S", "I", expected_size=10) == b"DICM" * 3
    assert hits(rsps, "getSingleImage") == 1  # not downloaded again and again


def test_v4_md5_and_zip_with_md5_use_the_v4_names(rsps):
    rsps.get(f"{V4}/getMD5HashForImage", body="0123456789abcdef0123456789abcdef")
    client = client_for(api="v4")
    assert client.md5_for_image("I1") == "0123456789abcdef0123456789abcdef"
    assert "SOPInstanceUID=I1" in rsps.calls[-1].request.url


# -- deadlines: a token, a wait for another thread's login and closing all end by the call's deadline --
class _HangingTokenServer(LocalServer):
    """The token endpoint accepts the request and never answers (until closed)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.token_requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                owner.token_requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.release.wait(60)

            def do_GET(self) -> None:
                owner.release.wait(60)

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)

    def close(self) -> None:
        self.release.set()
        super().close()


def test_a_hanging_token_endpoint_costs_a_call_its_deadline_not_minutes():
    server = _HangingTokenServer()
    try:
        tokens = TokenManager(server.url, timeout=(5, 60))  # its own timeouts alone would wait minutes
        client = NbiaClient(server.url, tokens, api="v2", retries=0, deadline=1.0, timeout=(5, 60))
        started = time.monotonic()
        with pytest.raises(ServerError):
            client.collections()
        assert time.monotonic() - started < 4
        client.close()
        tokens.close()
    finally:
        server.close()


def test_threads_waiting_for_another_threads_login_give_up_with_their_own_deadline():
    server = _HangingTokenServer()
    try:
        tokens = TokenManager(server.url, timeout=(5, 60))
        outcome: list[BaseException] = []

        def lead() -> None:
            try:
                tokens.get_token(Deadline.after(2.5))
            except BaseException as exc:
                outcome.append(exc)

        leader = threading.Thread(target=lead, daemon=True)
        leader.start()
        assert _wait_for(lambda: server.token_requests == 1, 5)
        started = time.monotonic()
        with pytest.raises(ServerError, match="waiting for another thread's login"):
            tokens.get_token(Deadline.after(0.5))
        assert time.monotonic() - started < 3
        leader.join(10)
        assert outcome and isinstance(outcome[0], ServerError)  # the leader too, by its own deadline
    finally:
        server.close()


def _wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > end:
            return False
        tick.wait(0.01)
    return True


def test_close_cuts_a_transfer_in_flight_at_once():
    server = _HangingTokenServer()  # its GET never answers either
    try:
        client = NbiaClient(server.url, api="v4", retries=3, deadline=120, timeout=(5, 60))
        failed: list[BaseException] = []

        def read() -> None:
            try:
                client.collections()
            except BaseException as exc:
                failed.append(exc)

        worker = threading.Thread(target=read, daemon=True)
        worker.start()
        assert _wait_for(lambda: len(client.session.nbiafs_sockets._conns) == 1, 5)  # connected, waiting
        started = time.monotonic()
        client.close()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 3
        assert failed and isinstance(failed[0], ServerError) and "closed" in str(failed[0])
    finally:
        server.close()


def test_a_refused_password_is_never_sent_again(rsps):
    rsps.post(TOKEN_URL, status=401, json={"error": "invalid_grant"})
    tokens = TokenManager(BASE, "alice", "wrong")
    with pytest.raises(AuthError):
        tokens.get_token()
    with pytest.raises(AuthError):
        tokens.get_token()
    assert hits(rsps, "oauth/token") == 1 and tokens.refused
    tokens.start()  # the refresher does not start for a refused password
    assert tokens._thread is None


def test_a_connection_made_while_the_client_closes_is_cut_too():
    """A request that was connecting when close() swept the sockets must not wait out its timeout."""
    import socket as socketlib

    from nbiafs.http import _Sockets

    class Conn:  # what _Sockets uses of an HTTPConnection
        def __init__(self, sock: socketlib.socket) -> None:
            self.sock = sock

    ours, theirs = socketlib.socketpair()
    try:
        sockets = _Sockets()
        assert sockets.shutdown() == 0  # the close: nothing connected yet
        conn = Conn(ours)
        sockets.add(conn)  # type: ignore[arg-type]  # then the connect finishes
        ours.settimeout(2)
        assert ours.recv(1) == b""  # shut down: a reader returns at once
    finally:
        ours.close()
        theirs.close()
