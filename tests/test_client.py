"""NBIA client against a mocked server (responses): every trap of the API and the retry policy."""

from __future__ import annotations

import errno
import io
import logging
import threading
import time
import zipfile
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from localhttp import DripServer, LocalServer

from nbiafs.auth import TokenManager
from nbiafs.client import NbiaClient
from nbiafs.errors import (
    BadRequestError,
    ForbiddenError,
    IntegrityError,
    ProtocolError,
    RemoteNotFoundError,
    ServerError,
    TokenExpiredError,
    errno_for,
)

BASE = "http://127.0.0.1:9"
V2 = f"{BASE}/nbia-api/services/v2"
V4 = f"{BASE}/nbia-api/services/v4"
ADV = f"{BASE}/nbia-api/services"
TOKEN_URL = f"{BASE}/nbia-api/oauth/token"
SECRET = "pw-Very-S3cret"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenServer:
    """Issues tok1, tok2, ... on every token request."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.count += 1
            n = self.count
        return 200, {}, f'{{"access_token": "tok{n}", "expires_in": 7200, "refresh_token": "r{n}"}}'


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def tokens(rsps):
    server = TokenServer()
    rsps.add_callback(responses.POST, TOKEN_URL, callback=server)
    manager = TokenManager(BASE)
    manager.server = server  # type: ignore[attr-defined]
    yield manager
    manager.stop()


def make_client(tokens=None, **kw) -> NbiaClient:
    kw.setdefault("api", "v2")  # the v2 traps; the auto choice is tested on its own
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", 0.001)
    kw.setdefault("deadline", 10.0)
    return NbiaClient(BASE, tokens, **kw)


def calls_to(rsps, endpoint: str) -> list[responses.Call]:
    return [c for c in rsps.calls if urlsplit(c.request.url).path.endswith("/" + endpoint)]


def auth_of(call: responses.Call) -> str | None:
    return call.request.headers.get("Authorization")


def zip_bytes(names: list[str], size: int = 1000, streamed: bool = False) -> bytes:
    buf = io.BytesIO()
    target = buf
    if streamed:  # a non-seekable target makes zipfile write data descriptors, like the server
        class NoSeek(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b) -> int:
                return buf.write(b)
        target = NoSeek()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, name in enumerate(names):
            zf.writestr(name, bytes([i % 256]) * size)
    return buf.getvalue()


# -- typed records and API shapes -------------------------------------------------------------

def test_collections_sends_bearer_and_returns_records(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "4D-Lung"}, {"Collection": "LIDC-IDRI"}])
    client = make_client(tokens)
    assert [c.name for c in client.collections()] == ["4D-Lung", "LIDC-IDRI"]
    assert auth_of(calls_to(rsps, "getCollectionValues")[0]) == "Bearer tok1"
    assert calls_to(rsps, "getCollectionValues")[0].request.headers["User-Agent"].startswith("nbiafs/")


def test_patients_read_patientid_with_lowercase_d(rsps, tokens):
    rsps.get(f"{V2}/getPatient", json=[{"PatientId": "P-1", "Collection": "C", "PatientSex": "F"},
                                       {"PatientId": "P-2", "Collection": "C"}])
    patients = make_client(tokens).patients("C")
    assert [(p.patient_id, p.sex) for p in patients] == [("P-1", "F"), ("P-2", None)]
    assert parse_qs(urlsplit(calls_to(rsps, "getPatient")[0].request.url).query) == {"Collection": ["C"]}


def test_studies_and_series_with_v2_dates_and_string_series_number(rsps, tokens):
    rsps.get(f"{V2}/getPatientStudy", json=[{"StudyInstanceUID": "1.1", "StudyDate": "2003-12-12 00:00:00.0",
                                             "PatientID": "P-1", "SeriesCount": 2}])
    rsps.get(f"{V2}/getSeries", json=[{"SeriesInstanceUID": "1.1.1", "StudyInstanceUID": "1.1",
                                       "SeriesNumber": "3000566.000000", "FileSize": 1234}])
    client = make_client(tokens)
    study = client.studies("C", "P-1")[0]
    assert (study.collection, study.date.isoformat(), study.series_count) == ("C", "2003-12-12", 2)
    series = client.series(study_uid="1.1")[0]
    assert (series.number, series.file_size, series.description) == (3000566, 1234, None)


def test_v4_search_sends_no_authorization_and_reads_mm_dd_yyyy(rsps):
    rsps.get(f"{V4}/getPatientStudy", json=[{"StudyInstanceUID": "1.1", "StudyDate": "12-31-2003",
                                             "PatientID": "P", "Collection": "C"}])
    rsps.get(f"{V4}/getSeries", body="")
    client = make_client(api="v4")
    assert client.studies("C")[0].date.isoformat() == "2003-12-31"
    assert client.series(collection="C") == []  # v4 is anonymous: an empty body is simply empty
    assert all(auth_of(c) is None for c in rsps.calls)
    assert not calls_to(rsps, "oauth/token")


def test_v4_client_still_uses_a_token_for_advanced_calls(rsps):
    rsps.add_callback(responses.POST, TOKEN_URL, callback=TokenServer())
    rsps.get(f"{ADV}/getLicenses", json=[{"id": 1, "shortName": "CC BY 3.0"}])
    client = make_client(api="v4")
    assert client.licenses()[0].short_name == "CC BY 3.0"
    assert auth_of(calls_to(rsps, "getLicenses")[0]) == "Bearer tok1"
    client.close()


def test_sop_uids_series_size_and_md5(rsps, tokens):
    rsps.get(f"{V2}/getSOPInstanceUIDs", json=[{"SOPInstanceUID": "9.1"}, {"SOPInstanceUID": "9.2"}])
    rsps.get(f"{V2}/getSeriesSize", json=[{"TotalSizeInBytes": "2048.0", "ObjectCount": 2}])
    rsps.get(f"{V2}/getM5HashForImage", body="0123456789abcdef0123456789ABCDEF")
    client = make_client(tokens)
    assert client.sop_instance_uids("1.2") == ["9.1", "9.2"]
    size = client.series_size("1.2")
    assert size is not None and (size.total_bytes, size.object_count) == (2048, 2)
    assert client.md5_for_image("9.1") == "0123456789abcdef0123456789abcdef"
    assert "SOPInstanceUid=9.1" in calls_to(rsps, "getM5HashForImage")[0].request.url


def test_drilldowns_post_repeated_list_fields(rsps, tokens):
    rsps.post(f"{ADV}/getStudyDrillDownWithSeriesIds", json=[{"studyId": "1.1", "date": 874299600000,
              "seriesList": [{"seriesUID": "1.2", "seriesPkId": 77, "exactSize": 100, "numberImages": 2}]}])
    rsps.post(f"{ADV}/getImageDrillDown", json=[
        {"sopInstanceUid": "9.1", "seriesInstanceUid": "1.2", "instanceNumber": 1, "size": 60},
        {"sopInstanceUid": "9.2", "seriesInstanceUid": "1.2", "instanceNumber": 2, "size": 40}])
    client = make_client(tokens)
    studies = client.study_drilldown(["1.2", "1.3"])
    assert studies[0].series[0].series_pk_id == 77
    sent = parse_qs(calls_to(rsps, "getStudyDrillDownWithSeriesIds")[0].request.body)
    assert sent == {"list": ["1.2", "1.3"]}
    instances = client.image_drilldown([77, 78])
    assert [(i.sop_uid, i.number, i.size) for i in instances] == [("9.1", 1, 60), ("9.2", 2, 40)]
    assert parse_qs(calls_to(rsps, "getImageDrillDown")[0].request.body) == {"list": ["77", "78"]}
    assert auth_of(calls_to(rsps, "getImageDrillDown")[0]) == "Bearer tok1"


def test_collection_descriptions(rsps, tokens):
    rsps.get(f"{ADV}/getCollectionDescriptions", json=[{"collectionName": "4D-Lung", "description": "<p>x</p>",
                                                         "licenseId": None}])
    descs = make_client(tokens).collection_descriptions("4D-Lung")
    assert descs[0].collection == "4D-Lung" and descs[0].license_id is None
    assert "collectionName=4D-Lung" in calls_to(rsps, "getCollectionDescriptions")[0].request.url


def test_updated_series_sends_dd_mm_yyyy_and_no_data_500_is_empty(rsps, tokens):
    import datetime as dt
    rsps.get(f"{V2}/getUpdatedSeries", status=500, body="No data found.")
    assert make_client(tokens).updated_series(dt.date(2020, 1, 31)) == []
    assert "fromDate=31%2F01%2F2020" in calls_to(rsps, "getUpdatedSeries")[0].request.url
    assert len(calls_to(rsps, "getUpdatedSeries")) == 1


# -- empty bodies and hidden auth failures ------------------------------------------------------

def test_empty_body_with_a_valid_token_is_an_empty_list_after_one_probe_each(rsps, tokens):
    rsps.get(f"{V2}/getSeries", body="")
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    client = make_client(tokens)
    assert client.series(collection="C") == []
    assert client.series(collection="D") == []  # a token may be revoked at any moment: probe again
    assert len(calls_to(rsps, "getCollectionValues")) == 2
    assert auth_of(calls_to(rsps, "getCollectionValues")[0]) == "Bearer tok1"


def test_empty_body_with_a_dead_token_renews_and_retries(rsps, tokens):
    def series(request):
        if auth_of_request(request) == "Bearer tok1":
            return 200, {}, ""  # the server hides the expired token behind an empty answer
        return 200, {}, '[{"SeriesInstanceUID": "1.2", "StudyInstanceUID": "1.1"}]'

    def probe(request):
        return (401, {}, "") if auth_of_request(request) == "Bearer tok1" else (200, {}, "[]")

    rsps.add_callback(responses.GET, f"{V2}/getSeries", callback=series)
    rsps.add_callback(responses.GET, f"{V2}/getCollectionValues", callback=probe)
    client = make_client(tokens)
    assert [s.series_uid for s in client.series(collection="C")] == ["1.2"]
    assert tokens.server.count == 2


def test_empty_body_with_a_token_rejected_even_after_renewal_is_token_expired(rsps, tokens):
    rsps.get(f"{V2}/getPatient", body="")
    rsps.get(f"{V2}/getCollectionValues", status=401)
    with pytest.raises(TokenExpiredError, match="getPatient"):
        make_client(tokens).patients("C")


def auth_of_request(request) -> str | None:
    return request.headers.get("Authorization")


# -- 401 ---------------------------------------------------------------------------------------

def test_401_then_success_refreshes_once(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=401)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    client = make_client(tokens)
    assert [c.name for c in client.collections()] == ["C"]
    assert [auth_of(c) for c in calls_to(rsps, "getCollectionValues")] == ["Bearer tok1", "Bearer tok2"]


def test_401_twice_is_token_expired(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", status=401)
    with pytest.raises(TokenExpiredError, match="getSingleImage"):
        make_client(tokens).single_image("1.2", "9.1")
    assert len(calls_to(rsps, "getSingleImage")) == 2


def test_many_threads_hitting_401_share_one_refresh(rsps, tokens):
    def image(request):
        return (401, {}, "") if auth_of_request(request) == "Bearer tok1" else (200, {}, b"DICM")

    rsps.add_callback(responses.GET, f"{V2}/getSingleImage", callback=image)
    client = make_client(tokens)
    tokens.get_token()
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(client.single_image("1", "2"))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [b"DICM"] * 10
    assert tokens.server.count == 2


# -- retries -----------------------------------------------------------------------------------

def test_500s_then_success(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=500)
    rsps.get(f"{V2}/getCollectionValues", status=503)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    assert len(make_client(tokens).collections()) == 1
    assert len(calls_to(rsps, "getCollectionValues")) == 3


def test_500_forever_is_server_error_within_the_deadline(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=500)
    client = make_client(tokens, retries=100, backoff=0.05, deadline=0.6)
    started = time.monotonic()
    with pytest.raises(ServerError, match="getCollectionValues"):
        client.collections()
    assert time.monotonic() - started < 1.5
    assert 2 <= len(calls_to(rsps, "getCollectionValues")) < 100


def test_retry_count_is_bounded(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=502)
    with pytest.raises(ServerError):
        make_client(tokens, retries=2).collections()
    assert len(calls_to(rsps, "getCollectionValues")) == 3


def test_connection_errors_are_retried_and_become_server_error(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", body=requests.ConnectionError("reset"))
    with pytest.raises(ServerError, match="connection was reset"):
        make_client(tokens, retries=2).collections()
    assert len(calls_to(rsps, "getCollectionValues")) == 3


def test_429_honours_retry_after(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=429, headers={"Retry-After": "0.3"})
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    started = time.monotonic()
    assert len(make_client(tokens).collections()) == 1
    assert time.monotonic() - started >= 0.3


def test_429_with_retry_after_beyond_the_deadline_gives_up_at_once(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", status=429, headers={"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(ServerError, match="busy"):
        make_client(tokens, deadline=5).collections()
    assert time.monotonic() - started < 1


def test_other_4xx_are_not_retried(rsps, tokens):
    rsps.get(f"{V2}/getPatient", status=400)
    with pytest.raises(BadRequestError, match="getPatient"):
        make_client(tokens).patients("C")
    assert len(calls_to(rsps, "getPatient")) == 1


def test_malformed_json_is_retried_then_protocol_error(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", body='[{"Collection": "C"')
    with pytest.raises(ProtocolError, match="malformed JSON"):
        make_client(tokens, retries=1).collections()
    assert len(calls_to(rsps, "getCollectionValues")) == 2


def test_malformed_json_once_then_good_answer(rsps, tokens):
    rsps.get(f"{V2}/getCollectionValues", body="<html>oops")
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    assert len(make_client(tokens).collections()) == 1


def test_close_interrupts_a_backoff_wait(rsps, tokens):
    client = make_client(tokens, retries=5, backoff=30, deadline=120)
    errors: list[BaseException] = []
    first_try = threading.Event()

    def run() -> None:
        try:
            client.collections()
        except ServerError as exc:
            errors.append(exc)

    rsps.add_callback(responses.GET, f"{V2}/getCollectionValues",
                      callback=lambda r: (first_try.set(), (503, {}, ""))[1])
    thread = threading.Thread(target=run)
    thread.start()
    assert first_try.wait(5)
    started = time.monotonic()
    client.close()
    thread.join(5)
    assert not thread.is_alive() and errors
    assert time.monotonic() - started < 2


# -- getSingleImage ----------------------------------------------------------------------------

def test_single_image_returns_bytes(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", body=b"DICMxxxx", content_type="application/dicom")
    client = make_client(tokens)
    assert client.single_image("1.2", "9.1", expected_size=8) == b"DICMxxxx"
    query = parse_qs(urlsplit(calls_to(rsps, "getSingleImage")[0].request.url).query)
    assert query == {"SeriesInstanceUID": ["1.2"], "SOPInstanceUID": ["9.1"]}


def test_single_image_500_is_an_io_error_not_a_missing_file_after_retries(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", status=500)
    with pytest.raises(RemoteNotFoundError, match="9.1") as excinfo:
        make_client(tokens, retries=2).single_image("1.2", "9.1")
    assert len(calls_to(rsps, "getSingleImage")) == 3
    assert errno_for(excinfo.value) == errno.EIO  # the listing announced it: never ENOENT


def test_single_image_wrong_size_is_retried_then_integrity_error(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", body=b"DICM")
    with pytest.raises(IntegrityError, match="expected 10"):
        make_client(tokens, retries=1).single_image("1.2", "9.1", expected_size=10)
    assert len(calls_to(rsps, "getSingleImage")) == 2


def test_single_image_truncated_then_complete(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", body=b"DIC")
    rsps.get(f"{V2}/getSingleImage", body=b"DICMxx")
    assert make_client(tokens).single_image("1.2", "9.1", expected_size=6) == b"DICMxx"


def test_single_image_shorter_than_content_length_is_rejected(rsps, tokens):
    rsps.get(f"{V2}/getSingleImage", body=b"DICM", headers={"Content-Length": "100"}, auto_calculate_content_length=False)
    with pytest.raises(ProtocolError, match="cut short|announced"):
        make_client(tokens, retries=1).single_image("1.2", "9.1")


class CutShortServer(LocalServer):
    """A real HTTP server on 127.0.0.1 that announces 8 bytes, sends 4 and closes (first N times)."""

    def __init__(self, failures: int) -> None:
        import http.server

        owner = self
        self.failures = failures
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                if owner.requests <= owner.failures:
                    self.wfile.write(b"DICM")
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                else:
                    self.wfile.write(b"DICMxxxx")

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)


def test_single_image_cut_short_on_a_real_socket_is_retried():
    server = CutShortServer(failures=1)
    try:
        client = NbiaClient(server.url, api="v4", retries=2, backoff=0.001, deadline=10)
        assert client.single_image("1.2", "9.1") == b"DICMxxxx"
        assert server.requests == 2
        client.close()
    finally:
        server.close()


def test_single_image_always_cut_short_is_a_protocol_error():
    server = CutShortServer(failures=100)
    try:
        client = NbiaClient(server.url, api="v4", retries=1, backoff=0.001, deadline=10)
        with pytest.raises(ProtocolError, match="9.1"):
            client.single_image("1.2", "9.1")
        client.close()
    finally:
        server.close()


def test_a_server_dripping_bytes_cannot_hold_a_read_past_the_deadline():
    import time

    server = DripServer()
    try:
        client = NbiaClient(server.url, api="v4", retries=0, deadline=0.5, timeout=(1, 1))
        started = time.monotonic()
        with pytest.raises(ServerError, match="deadline"):
            client.single_image("1.2", "9.1")
        assert time.monotonic() - started < 5  # the read timeout alone would never end it
        client.close()
    finally:
        server.close()


class MidBodyFailureAdapter(requests.adapters.BaseAdapter):
    """Answers 200 and then fails while the body is read, with the urllib3 exception given."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc
        self.sends = 0

    def send(self, request, **kwargs):
        self.sends += 1
        exc = self.exc

        class Raw:
            def read1(self, *args, **kw):
                raise exc

            def read(self, *args, **kw):
                raise exc

            def close(self) -> None:
                pass

        response = requests.Response()
        response.status_code = 200
        response.raw = Raw()
        response.url = request.url
        response.request = request
        return response

    def close(self) -> None:
        pass


def test_a_tls_failure_in_the_middle_of_a_body_is_retried_as_a_transfer_failure():
    import urllib3

    adapter = MidBodyFailureAdapter(urllib3.exceptions.SSLError("decryption failed or bad record mac"))
    session = requests.Session()
    session.mount("http://", adapter)
    client = NbiaClient(BASE, api="v4", session=session, retries=2, backoff=0.001, deadline=10)
    with pytest.raises((ProtocolError, ServerError), match="9.1"):
        client.single_image("1.2", "9.1")
    assert adapter.sends == 3
    client.close()


# -- getImage zip ----------------------------------------------------------------------------

def read_zip(client: NbiaClient, **kw) -> dict[str, bytes]:
    out = {}
    for member, chunks in client.image_zip("1.2", **kw):
        out[member.name] = b"".join(chunks)
    return out


def test_image_zip_streams_members_with_data_descriptors(rsps, tokens):
    names = ["LICENSE", "00000001.dcm", "00000002.dcm"]
    rsps.get(f"{V2}/getImage", body=zip_bytes(names, size=200_000, streamed=True))
    got = read_zip(make_client(tokens), expected_count=2)
    assert list(got) == names
    assert got["00000002.dcm"] == bytes([2]) * 200_000


def test_image_zip_new_file_names_parameter(rsps, tokens):
    rsps.get(f"{V2}/getImage", body=zip_bytes(["LICENSE", "1-001.dcm"]))
    assert list(read_zip(make_client(tokens), new_file_names=True)) == ["LICENSE", "1-001.dcm"]
    assert "NewFileNames=Yes" in calls_to(rsps, "getImage")[0].request.url


def test_image_zip_skips_members_the_caller_did_not_read(rsps, tokens):
    rsps.get(f"{V2}/getImage", body=zip_bytes(["LICENSE", "00000001.dcm"]))
    names = [member.name for member, _chunks in make_client(tokens).image_zip("1.2")]
    assert names == ["LICENSE", "00000001.dcm"]


def test_short_zip_is_a_protocol_error(rsps, tokens):
    rsps.get(f"{V2}/getImage", body=zip_bytes(["LICENSE", "00000001.dcm"]))
    with pytest.raises(ProtocolError, match="short zip: 1 instance"):
        read_zip(make_client(tokens), expected_count=3)


def test_truncated_zip_is_a_protocol_error(rsps, tokens):
    body = zip_bytes(["LICENSE", "00000001.dcm", "00000002.dcm"], size=50_000, streamed=True)
    rsps.get(f"{V2}/getImage", body=body[: len(body) * 2 // 3])
    client = make_client(tokens)
    complete = []
    with pytest.raises(ProtocolError, match="getImage for series 1.2"):
        for member, chunks in client.image_zip("1.2", expected_count=2):
            data = b"".join(chunks)
            complete.append((member.name, len(data)))
    assert ("00000001.dcm", 50_000) in complete  # what arrived whole was delivered whole
    assert all(size == 50_000 for name, size in complete if name.endswith(".dcm"))


def test_get_image_400_is_forbidden_and_not_retried(rsps, tokens):
    rsps.get(f"{V2}/getImage", status=400)
    with pytest.raises(ForbiddenError, match="1.2"):
        make_client(tokens).image_zip("1.2")
    assert len(calls_to(rsps, "getImage")) == 1


# -- logs and secrets -----------------------------------------------------------------------

def test_requests_logged_at_debug_without_password_or_token(rsps, caplog):
    rsps.post(TOKEN_URL, json={"access_token": "tok-SECRET-1", "expires_in": 7200, "refresh_token": "ref-SECRET"})
    rsps.get(f"{V2}/getCollectionValues", status=401)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "C"}])
    rsps.get(f"{BASE}/nbia-api/logout", body="")
    with caplog.at_level(logging.DEBUG):
        client = make_client(TokenManager(BASE, "alice", SECRET))
        client.collections()
        client.tokens.close()
        client.close()
    assert "getCollectionValues" in caplog.text and "401" in caplog.text and "200" in caplog.text
    for secret in (SECRET, "tok-SECRET-1", "ref-SECRET", "Bearer"):
        assert secret not in caplog.text


def test_session_pool_holds_the_workers_and_the_connections_are_bounded():
    client = NbiaClient(BASE, api="v4", pool_size=13, connections=5)
    adapter = client.session.get_adapter("http://127.0.0.1:9/")
    assert adapter._pool_maxsize >= 13  # an idle connection for every worker: none is opened twice
    assert client.transport.max_connections == 5
    client.close()


def test_at_most_the_connection_bound_are_open_at_once_and_waiting_counts_against_the_deadline():
    import http.server

    inside = []
    most = [0]
    lock = threading.Lock()
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with lock:
                inside.append(1)
                most[0] = max(most[0], len(inside))
            release.wait(10)
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with lock:
                inside.pop()

        def log_message(self, *args) -> None:
            pass

    server = LocalServer(Handler)
    client = NbiaClient(server.url, api="v4", connections=3, retries=0, deadline=5, timeout=(2, 5))
    try:
        threads = [threading.Thread(target=client.collections, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        end = time.monotonic() + 5
        while len(inside) < 3 and time.monotonic() < end:
            threading.Event().wait(0.01)
        threading.Event().wait(0.2)  # time for more to get in, were they allowed
        assert most[0] == 3
        release.set()
        for t in threads:
            t.join(10)
        assert most[0] == 3
    finally:
        release.set()
        client.close()
        server.close()


# -- against the project's emulator (real sockets, real zips) --------------------------------

def walk_first_series(client: NbiaClient):
    collection = client.collections()[0].name
    patient = client.patients(collection)[0]
    study = client.studies(collection, patient.patient_id)[0]
    series = client.series(collection, patient.patient_id, study.study_uid)[0]
    return collection, patient, study, series


def test_emulator_tree_sizes_and_bytes_agree(make_emulator):
    emu = make_emulator()
    client = NbiaClient(emu.url, retries=2, backoff=0.01, deadline=20)
    try:
        _c, _p, study, series = walk_first_series(client)
        assert series.study_uid == study.study_uid
        uids = client.sop_instance_uids(series.series_uid)
        drill = client.study_drilldown([series.series_uid])
        pk = drill[0].series[0].series_pk_id
        instances = client.image_drilldown([pk])
        assert sorted(i.sop_uid for i in instances) == sorted(uids)
        first = instances[0]
        data = client.single_image(series.series_uid, first.sop_uid, expected_size=first.size)
        assert len(data) == first.size and data[128:132] == b"DICM"
        members = {m.name: b"".join(chunks) for m, chunks in client.image_zip(series.series_uid,
                                                                              expected_count=len(uids))}
        assert sum(name.endswith(".dcm") for name in members) == len(uids)
        assert data in members.values()
    finally:
        client.close()


def test_emulator_expired_token_hidden_behind_empty_answer_is_renewed(make_emulator):
    emu = make_emulator()
    clock = FakeClock()
    client = NbiaClient(emu.url, TokenManager(emu.url, clock=clock), api="v2", retries=2, backoff=0.01, deadline=20)
    try:
        collection, patient, _study, _series = walk_first_series(client)
        expected = client.patients(collection)
        emu.expire_tokens()  # the server forgets every token; getPatient now answers empty
        clock.now += 31  # past the window in which a proven token is trusted without a probe
        assert client.patients(collection) == expected
        assert client.tokens.renewals == 2
    finally:
        client.close()


# -- what the environment says about reaching the server --------------------------------------------
def test_proxy_and_ca_bundle_come_from_the_environment_and_netrc_never_replaces_the_bearer(
        rsps, tokens, monkeypatch, tmp_path):
    """requests read the environment (and ~/.netrc) at every request; the transport reads it once per
    server. Proxies, NO_PROXY and REQUESTS_CA_BUNDLE keep working; the Basic credentials of a ~/.netrc
    entry for the server would have replaced the bearer token of the call."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    rsps.get(f"{V2}/getCollectionValues", json=[{"Collection": "4D-Lung"}])
    client = make_client(tokens)
    client.collections()
    client.collections()
    calls = calls_to(rsps, "getCollectionValues")
    assert [auth_of(c) for c in calls] == ["Bearer tok1"] * 2
    for call in calls:
        assert call.request.req_kwargs["proxies"].get("http") == "http://proxy.example:3128"
        assert call.request.req_kwargs["verify"] == str(tmp_path / "ca.pem")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # read per server: a new client sees the new setting
    other = make_client(tokens)
    other.collections()
    assert calls_to(rsps, "getCollectionValues")[-1].request.req_kwargs["proxies"].get("http") is None


def test_requests_are_sent_as_session_request_would_send_them(rsps, monkeypatch, tmp_path):
    """The transport prepares requests itself (the endpoint URL once) and sends them with Session.send:
    what the server sees and what the session keeps are as with Session.request. A cookie the server
    set is sent back, a redirect is followed, lists in the query repeat their key and None drops it,
    form bodies are encoded, the session's own headers go out under the call's, and TLS verification
    stays on (the session's verify) when the environment names no CA bundle."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    rsps.get(f"{V4}/getCollectionValues", json=[{"Collection": "A"}], headers={"Set-Cookie": "lb=node7; Path=/"})
    rsps.get(f"{V4}/getPatient", status=302, headers={"Location": f"{V4}/getPatientMoved"})
    rsps.get(f"{V4}/getPatientMoved", json=[{"PatientId": "P1", "Collection": "A"}])
    rsps.post(f"{V4}/getPatient", body="")
    client = make_client(api="v4")
    client.session.headers["X-Extra"] = "kept"
    client.session.headers["Accept-Encoding"] = None  # None removes a session header, as requests does
    try:
        assert [c.name for c in client.collections()] == ["A"]
        assert [p.patient_id for p in client.patients("A")] == ["P1"]
        answer = client._transport.call(
            "POST", f"{V4}/getPatient", what="a form", endpoint="getPatient", handle=lambda r: r.status_code,
            params={"list": ["1.2", "1.3"], "skip": None}, data=[("list", "9.1"), ("list", "9.2")])
    finally:
        client.close()
    assert answer == 200
    first = calls_to(rsps, "getCollectionValues")[0]
    assert first.request.headers["User-Agent"].startswith("nbiafs/") and first.request.headers["X-Extra"] == "kept"
    assert "Accept-Encoding" not in first.request.headers
    assert first.request.req_kwargs["verify"] is True
    followed = calls_to(rsps, "getPatientMoved")
    assert followed and all(c.request.headers.get("Cookie") == "lb=node7" for c in followed)
    form = [c for c in calls_to(rsps, "getPatient") if c.request.method == "POST"][0]
    assert parse_qs(urlsplit(form.request.url).query) == {"list": ["1.2", "1.3"]}
    assert form.request.body == "list=9.1&list=9.2"
    assert form.request.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(rsps):
    """A token with a line break in it (a broken login answer) would split the request's headers:
    refused as a bad request, never sent, never retried."""
    rsps.get(f"{V4}/getCollectionValues", json=[{"Collection": "A"}])
    client = make_client(api="v4")
    try:
        with pytest.raises(BadRequestError, match="request failed"):
            client._transport.call("GET", f"{V4}/getCollectionValues", what="a listing", endpoint="getCollectionValues",
                                   handle=lambda r: r.status_code, token=lambda deadline: "tok\r\nX-Evil: 1")
    finally:
        client.close()
    assert calls_to(rsps, "getCollectionValues") == []
