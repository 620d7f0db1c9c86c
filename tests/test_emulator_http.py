"""The emulator over raw HTTP: every quirk of the real NBIA server that nbia-api.md lists, answered exactly."""

from __future__ import annotations

import hashlib
import http.client
import io
import socket
import threading
import zipfile
from collections.abc import Iterator

import pytest
import requests
from stream_unzip import stream_unzip

from nbiafs.emulator import TEST_PASSWORD, TEST_USER, Archive

TIMEOUT = (5, 30)


@pytest.fixture
def emu(emulator) -> Iterator[object]:
    """The session emulator, with faults cleared and stats reset around each test."""
    emulator.clear_faults()
    emulator.reset_stats()
    yield emulator
    emulator.clear_faults()


def api(emu) -> str:
    return emu.url + "/nbia-api"


def login(emu, user: str = "nbia_guest", password: str = "") -> dict:
    r = requests.post(api(emu) + "/oauth/token", timeout=TIMEOUT,
                      data={"username": user, "password": password, "client_id": "NBIA", "grant_type": "password"})
    assert r.status_code == 200, r.text
    return r.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def v2(emu, name: str, token: str | None, **params) -> requests.Response:
    headers = bearer(token) if token is not None else {}
    return requests.get(f"{api(emu)}/services/v2/{name}", params=params, headers=headers, timeout=TIMEOUT)


def advanced(emu, name: str, token: str | None, **form) -> requests.Response:
    headers = bearer(token) if token is not None else {}
    return requests.post(f"{api(emu)}/services/{name}", data=form, headers=headers, timeout=TIMEOUT)


@pytest.fixture
def guest(emu) -> str:
    return login(emu)["access_token"]


@pytest.fixture
def tester(emu) -> str:
    return login(emu, TEST_USER, TEST_PASSWORD)["access_token"]


def big_series(archive: Archive):
    return max(archive.series, key=lambda s: s.image_count)


def small_series(archive: Archive, collection: str = "Demo-Head-MR"):
    return min((s for s in archive.series if s.collection == collection), key=lambda s: s.image_count)


# ---- tokens ------------------------------------------------------------------------------------
def test_token_reply_has_the_guide_fields(emu) -> None:
    reply = login(emu)
    assert set(reply) >= {"access_token", "expires_in", "refresh_expires_in", "refresh_token", "token_type",
                          "not-before-policy", "session_state", "scope"}
    assert reply["token_type"] == "Bearer" and reply["expires_in"] == 7200
    assert len(reply["access_token"]) == 36 and reply["access_token"].count("-") == 4  # a uuid4


def test_wrong_password_is_401_invalid_grant(emu) -> None:
    r = requests.post(api(emu) + "/oauth/token", timeout=TIMEOUT, data={
        "username": TEST_USER, "password": "nope", "client_id": "NBIA", "grant_type": "password"})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_grant" and "error_description" in r.json()


def test_refresh_grant_gives_a_new_working_pair(emu) -> None:
    first = login(emu, TEST_USER, TEST_PASSWORD)
    r = requests.post(api(emu) + "/oauth/token", timeout=TIMEOUT, data={
        "client_id": "nbia", "grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json()
    assert second["access_token"] != first["access_token"]
    names = {row["Collection"] for row in v2(emu, "getCollectionValues", second["access_token"]).json()}
    assert "Restricted-Demo" in names  # the refreshed token keeps the account


def test_refresh_is_refused_when_switched_off_or_unknown(make_emulator) -> None:
    emu = make_emulator()
    pair = login(emu)
    emu.set_refuse_refresh(True)
    form = {"client_id": "NBIA", "grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}
    r = requests.post(api(emu) + "/oauth/token", data=form, timeout=TIMEOUT)
    assert r.status_code == 401 and r.json()["error"] == "invalid_grant"
    emu.set_refuse_refresh(False)
    assert requests.post(api(emu) + "/oauth/token", data=form, timeout=TIMEOUT).status_code == 200
    form["refresh_token"] = "made-up"
    assert requests.post(api(emu) + "/oauth/token", data=form, timeout=TIMEOUT).status_code == 401


def test_expired_refresh_token_is_refused(make_emulator) -> None:
    emu = make_emulator(refresh_ttl=0.0)
    pair = login(emu)
    r = requests.post(api(emu) + "/oauth/token", timeout=TIMEOUT, data={
        "client_id": "NBIA", "grant_type": "refresh_token", "refresh_token": pair["refresh_token"]})
    assert r.status_code == 401


def test_logout_invalidates_that_token_only(emu) -> None:
    a, b = login(emu)["access_token"], login(emu)["access_token"]
    r = requests.get(api(emu) + "/logout", headers=bearer(a), timeout=TIMEOUT)
    assert r.status_code == 200
    assert v2(emu, "getCollectionValues", a).status_code == 401
    assert v2(emu, "getCollectionValues", b).status_code == 200


# ---- visibility and shapes ---------------------------------------------------------------------
def test_guest_sees_public_collections_and_test_account_also_the_restricted(emu, guest, tester) -> None:
    public = {c.name for c in emu.archive.public_collections()}
    assert {r["Collection"] for r in v2(emu, "getCollectionValues", guest).json()} == public
    assert {r["Collection"] for r in v2(emu, "getCollectionValues", tester).json()} == public | {"Restricted-Demo"}


def test_restricted_collection_is_simply_absent_for_the_guest(emu, guest) -> None:
    r = v2(emu, "getPatient", guest, Collection="Restricted-Demo")
    assert r.status_code == 200 and r.content == b""
    r = v2(emu, "getSeries", guest, Collection="Restricted-Demo")
    assert r.status_code == 200 and r.content == b""


def test_get_patient_uses_the_PatientId_spelling(emu, guest) -> None:
    rows = v2(emu, "getPatient", guest, Collection="Demo-Chest-CT").json()
    assert {"PatientId", "Collection"} <= set(rows[0]) and "PatientID" not in rows[0]
    assert "DCC 0003" in {r["PatientId"] for r in rows}


def test_empty_result_is_200_with_an_empty_body(emu, guest) -> None:
    r = v2(emu, "getSeries", guest, Collection="No-Such-Collection")
    assert r.status_code == 200 and r.content == b""


def test_null_values_are_omitted_not_sent_as_null(emu, guest) -> None:
    r = v2(emu, "getPatientStudy", guest, Collection="Edge-Cases")
    assert b"null" not in r.content
    undated = [row for row in r.json() if "StudyDate" not in row]
    assert undated, "the study without a date must have no StudyDate key"
    series = v2(emu, "getSeries", guest, Collection="Edge-Cases").json()
    assert any("SeriesDescription" not in row and "SeriesNumber" not in row for row in series)


def test_v2_dates_v4_dates_and_int_series_numbers(emu, guest, archive) -> None:
    uid = big_series(archive).uid
    row = v2(emu, "getSeries", guest, SeriesInstanceUID=uid).json()[0]
    assert row["SeriesDate"] == "2003-12-12 00:00:00.0" and isinstance(row["SeriesNumber"], int)
    assert row["ImageCount"] == 120 and row["FileSize"] == big_series(archive).file_size
    for key in ("TimeStamp", "LicenseName", "LicenseURI", "CollectionURI", "DateReleased"):
        assert key in row
    r = requests.get(f"{api(emu)}/services/v4/getSeries", params={"SeriesInstanceUID": uid}, timeout=TIMEOUT)
    assert r.json()[0]["SeriesDate"] == "12-12-2003"
    study = v2(emu, "getPatientStudy", guest, StudyInstanceUID=row["StudyInstanceUID"]).json()[0]
    assert study["StudyDate"] == "2003-12-12 00:00:00.0"


def test_hostile_descriptions_travel_intact(emu, guest, archive) -> None:
    texts = {r.get("SeriesDescription") for r in v2(emu, "getSeries", guest).json()}
    assert "Thorax ünd Bäuch 胸部" in texts and "<MPR Range[1]>" in texts and "PET/CT fused\\recon" in texts
    assert any(t and len(t) == 300 for t in texts)


def test_sop_instance_uids_come_shuffled_without_numbers(emu, guest, archive) -> None:
    series = big_series(archive)
    rows = v2(emu, "getSOPInstanceUIDs", guest, SeriesInstanceUID=series.uid).json()
    assert all(set(row) == {"SOPInstanceUID"} for row in rows)
    got = [row["SOPInstanceUID"] for row in rows]
    ordered = [i.sop_uid for i in archive.instances_of(series.uid)]
    assert sorted(got) == sorted(ordered) and got != ordered
    again = [row["SOPInstanceUID"] for row in v2(emu, "getSOPInstanceUIDs", guest, SeriesInstanceUID=series.uid).json()]
    assert again == got  # deterministic


def test_series_size_counts_bytes_and_objects(emu, guest, archive) -> None:
    s = small_series(archive)
    assert v2(emu, "getSeriesSize", guest, SeriesInstanceUID=s.uid).json() == [
        {"TotalSizeInBytes": s.file_size, "ObjectCount": s.image_count}]


def test_updated_series_accepts_both_date_formats(emu, guest, archive) -> None:
    expected = {s.uid for s in archive.series if not s.collection.startswith("Restricted")
                and s.timestamp.year >= 2021}
    for date in ("01/01/2021", "2021-01-01"):
        r = v2(emu, "getUpdatedSeries", guest, fromDate=date)
        assert {row["SeriesInstanceUID"] for row in r.json()} == expected
    assert v2(emu, "getUpdatedSeries", guest, fromDate="yesterday").status_code == 400


# ---- instance bytes ----------------------------------------------------------------------------
def test_single_image_is_the_stored_file_byte_for_byte(emu, guest, archive) -> None:
    inst = archive.instances_of(small_series(archive).uid)[0]
    r = v2(emu, "getSingleImage", guest, SeriesInstanceUID=inst.series_uid, SOPInstanceUID=inst.sop_uid)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom"
    assert int(r.headers["Content-Length"]) == inst.size and r.content == inst.path.read_bytes()


def test_range_requests_are_ignored(emu, guest, archive) -> None:
    inst = archive.instances_of(small_series(archive).uid)[0]
    r = requests.get(f"{api(emu)}/services/v2/getSingleImage", timeout=TIMEOUT,
                     params={"SeriesInstanceUID": inst.series_uid, "SOPInstanceUID": inst.sop_uid},
                     headers={**bearer(guest), "Range": "bytes=0-9"})
    assert r.status_code == 200 and len(r.content) == inst.size


def test_single_image_unknown_or_unauthorized_is_500(emu, guest, archive) -> None:
    s = small_series(archive)
    assert v2(emu, "getSingleImage", guest, SeriesInstanceUID=s.uid, SOPInstanceUID="1.2.3").status_code == 500
    secret = archive.instances_of(archive.restricted_collections() and next(
        x for x in archive.series if x.collection == "Restricted-Demo").uid)[0]
    r = v2(emu, "getSingleImage", guest, SeriesInstanceUID=secret.series_uid, SOPInstanceUID=secret.sop_uid)
    assert r.status_code == 500


def test_restricted_image_is_served_to_the_test_account(emu, tester, archive) -> None:
    secret = archive.instances_of(next(x for x in archive.series if x.collection == "Restricted-Demo").uid)[0]
    r = v2(emu, "getSingleImage", tester, SeriesInstanceUID=secret.series_uid, SOPInstanceUID=secret.sop_uid)
    assert r.status_code == 200 and r.content == secret.path.read_bytes()


def test_md5_for_image_is_plain_text(emu, guest, archive) -> None:
    inst = archive.instances_of(small_series(archive).uid)[2]
    r = v2(emu, "getM5HashForImage", guest, SOPInstanceUid=inst.sop_uid)
    assert r.text == hashlib.md5(inst.path.read_bytes()).hexdigest()


# ---- zips --------------------------------------------------------------------------------------
def test_get_image_streams_a_chunked_zip_license_first_then_instance_order(emu, guest, archive) -> None:
    series = big_series(archive)
    with v2_stream(emu, guest, "getImage", SeriesInstanceUID=series.uid) as r:
        assert r.status_code == 200 and "Content-Length" not in r.headers
        assert r.headers.get("Transfer-Encoding") == "chunked"
        members = [(name.decode(), b"".join(chunks)) for name, _, chunks in stream_unzip(r.iter_content(65536))]
    names = [m[0] for m in members]
    assert names[0] == "LICENSE" and names[1:] == [f"{i:08d}.dcm" for i in range(1, 121)]
    files = [i.path.read_bytes() for i in archive.instances_of(series.uid)]
    assert [m[1] for m in members[1:]] == files


def v2_stream(emu, token: str, name: str, **params) -> requests.Response:
    return requests.get(f"{api(emu)}/services/v2/{name}", params=params, headers=bearer(token),
                        timeout=TIMEOUT, stream=True)


def test_get_image_with_new_file_names(emu, guest, archive) -> None:
    s = small_series(archive)
    r = v2(emu, "getImage", guest, SeriesInstanceUID=s.uid, NewFileNames="Yes")
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert names == ["LICENSE"] + [f"1-{i:03d}.dcm" for i in range(1, s.image_count + 1)]


def test_get_image_for_an_unauthorized_series_is_400(emu, guest, archive) -> None:
    secret = next(x for x in archive.series if x.collection == "Restricted-Demo")
    assert v2(emu, "getImage", guest, SeriesInstanceUID=secret.uid).status_code == 400


def test_get_image_with_md5_hash_has_a_matching_csv(emu, guest, archive) -> None:
    s = small_series(archive)
    zf = zipfile.ZipFile(io.BytesIO(v2(emu, "getImageWithMD5Hash", guest, SeriesInstanceUID=s.uid).content))
    csv = zf.read("md5hashes.csv").decode().splitlines()
    assert csv[0] == "Filename,MD5Hash"
    for line in csv[1:]:
        name, md5 = line.split(",")
        assert hashlib.md5(zf.read(name)).hexdigest() == md5
    assert len(csv) - 1 == s.image_count


# ---- auth quirks -------------------------------------------------------------------------------
def test_v2_without_authorization_header_is_500_with_the_48_byte_body(emu) -> None:
    for name in ("getCollectionValues", "getSeries", "getSingleImage"):
        r = v2(emu, name, None)
        assert r.status_code == 500
        assert r.content == b"Server was not able to process your request\nnull" and len(r.content) == 48


@pytest.mark.parametrize("name", ["getSeries", "getPatient", "getPatientStudy", "getSOPInstanceUIDs",
                                  "getSeriesSize"])
def test_expired_token_hides_behind_an_empty_200_on_listing_endpoints(make_emulator, name) -> None:
    emu = make_emulator()
    token = login(emu)["access_token"]
    series = small_series(emu.archive)
    params = {"Collection": series.collection, "SeriesInstanceUID": series.uid}
    assert v2(emu, name, token, **params).content != b""
    emu.expire_tokens()
    r = v2(emu, name, token, **params)
    assert r.status_code == 200 and r.content == b""


def test_expired_token_is_401_on_images_collections_and_advanced(make_emulator) -> None:
    emu = make_emulator()
    token = login(emu)["access_token"]
    series = small_series(emu.archive)
    inst = emu.archive.instances_of(series.uid)[0]
    emu.expire_tokens()
    assert v2(emu, "getCollectionValues", token).status_code == 401
    assert v2(emu, "getSingleImage", token, SeriesInstanceUID=series.uid,
              SOPInstanceUID=inst.sop_uid).status_code == 401
    assert v2(emu, "getImage", token, SeriesInstanceUID=series.uid).status_code == 401
    assert advanced(emu, "getStudyDrillDownWithSeriesIds", token, list=series.uid).status_code == 401
    assert advanced(emu, "getImageDrillDown", token, list=str(series.pk_id)).status_code == 401


def test_unknown_token_behaves_like_an_expired_one(emu) -> None:
    assert v2(emu, "getSeries", "not-a-token").content == b""
    assert v2(emu, "getCollectionValues", "not-a-token").status_code == 401


def test_short_token_ttl_expires_by_itself(make_emulator) -> None:
    emu = make_emulator(token_ttl=0.0)
    token = login(emu)["access_token"]
    assert v2(emu, "getCollectionValues", token).status_code == 401


def test_missing_required_parameter_is_400(emu, guest) -> None:
    for name in ("getSOPInstanceUIDs", "getSeriesSize", "getSingleImage", "getImage", "getUpdatedSeries",
                 "getM5HashForImage", "getPatientStudy"):
        assert v2(emu, name, guest).status_code == 400, name
    assert advanced(emu, "getImageDrillDown", guest).status_code == 400
    assert advanced(emu, "getImageDrillDown", guest, list="abc").status_code == 400


def test_v4_and_v1_are_anonymous_and_public_only(emu, archive) -> None:
    for version in ("v1", "v4"):
        r = requests.get(f"{api(emu)}/services/{version}/getCollectionValues", timeout=TIMEOUT)
        assert {row["Collection"] for row in r.json()} == {c.name for c in archive.public_collections()}


# ---- advanced API ------------------------------------------------------------------------------
def test_study_drilldown_gives_exact_sizes_pk_ids_and_epoch_dates(emu, guest, archive) -> None:
    a, b = big_series(archive), small_series(archive)
    rows = advanced(emu, "getStudyDrillDownWithSeriesIds", guest, list=[a.uid, b.uid]).json()
    assert len(rows) == 2
    first = rows[0]
    assert first["date"] == 1071187200000  # 2003-12-12 00:00 UTC in ms
    entry = first["seriesList"][0]
    assert entry["seriesUID"] == entry["seriesId"] == a.uid
    assert entry["seriesPkId"] == a.pk_id and isinstance(entry["seriesPkId"], int)
    assert entry["exactSize"] == entry["totalSizeForAllImagesInSeries"] == a.file_size
    assert entry["numberImages"] == 120 and entry["seriesNumber"] == str(a.number)


def test_study_drilldown_omits_series_the_user_may_not_see(emu, guest, tester, archive) -> None:
    secret = next(x for x in archive.series if x.collection == "Restricted-Demo")
    assert advanced(emu, "getStudyDrillDownWithSeriesIds", guest, list=secret.uid).content == b""
    assert advanced(emu, "getStudyDrillDownWithSeriesIds", tester, list=secret.uid).json()[0]["seriesList"]


def test_image_drilldown_gives_every_instance_with_size_and_the_buggy_acquisition_number(emu, guest, archive):
    s = big_series(archive)
    rows = advanced(emu, "getImageDrillDown", guest, list=str(s.pk_id)).json()
    by_uid = {i.sop_uid: i for i in archive.instances_of(s.uid)}
    assert len(rows) == 120 and {r["sopInstanceUid"] for r in rows} == set(by_uid)
    for row in rows:
        inst = by_uid[row["sopInstanceUid"]]
        assert row["size"] == inst.size and row["instanceNumber"] == inst.instance_number
        assert row["acquisitionNumber"] == row["instanceNumber"] and row["frameNum"] == 0
        assert row["seriesPkId"] == s.pk_id and row["seriesInstanceUid"] == s.uid
    assert [r["instanceNumber"] for r in rows] != sorted(r["instanceNumber"] for r in rows)


def test_collection_descriptions_and_licenses(emu, guest) -> None:
    rows = requests.get(f"{api(emu)}/services/getCollectionDescriptions", params={"collectionName": "Edge-Cases"},
                        headers=bearer(guest), timeout=TIMEOUT).json()
    assert rows[0]["collectionName"] == "Edge-Cases" and "description" in rows[0]
    licenses = requests.get(f"{api(emu)}/services/getLicenses", headers=bearer(guest), timeout=TIMEOUT).json()
    assert {"CC BY 4.0", "CC BY-NC 4.0"} <= {x["shortName"] for x in licenses}


# ---- faults, stats, control --------------------------------------------------------------------
def test_injected_status_hits_the_next_count_calls_only(emu, guest) -> None:
    emu.inject_fault("getSeries", status=503, count=2)
    assert v2(emu, "getSeries", guest, Collection="Demo-Head-MR").status_code == 503
    assert v2(emu, "getCollectionValues", guest).status_code == 200  # other endpoints unaffected
    assert v2(emu, "getSeries", guest, Collection="Demo-Head-MR").status_code == 503
    assert v2(emu, "getSeries", guest, Collection="Demo-Head-MR").status_code == 200


def test_wildcard_fault_hits_any_endpoint(emu, guest) -> None:
    emu.inject_fault("*", status=429)
    assert v2(emu, "getCollectionValues", guest).status_code == 429
    assert v2(emu, "getCollectionValues", guest).status_code == 200


def test_truncated_single_image_is_cut_before_its_content_length(emu, guest, archive) -> None:
    inst = archive.instances_of(small_series(archive).uid)[0]
    emu.inject_fault("getSingleImage", truncate=True)
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    try:
        conn.request("GET", f"/nbia-api/services/v2/getSingleImage?SeriesInstanceUID={inst.series_uid}"
                            f"&SOPInstanceUID={inst.sop_uid}", headers=bearer(guest))
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == inst.size
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        assert 0 < len(cut.value.partial) < inst.size
    finally:
        conn.close()


def test_truncated_get_image_is_a_short_but_valid_zip(emu, guest, archive) -> None:
    s = small_series(archive)
    emu.inject_fault("getImage", truncate=True)
    r = v2(emu, "getImage", guest, SeriesInstanceUID=s.uid)
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert 1 < len(names) < s.image_count + 1


def test_stats_count_calls_per_endpoint_and_reset(emu, guest) -> None:
    emu.reset_stats()
    v2(emu, "getCollectionValues", guest)
    v2(emu, "getCollectionValues", guest)
    login(emu)
    stats = emu.stats()
    assert stats["getCollectionValues"] == 2 and stats["token"] == 1
    emu.reset_stats()
    assert emu.stats() == {}


def test_control_endpoints_drive_faults_stats_and_expiry(make_emulator) -> None:
    emu = make_emulator()
    token = login(emu)["access_token"]
    r = requests.post(emu.url + "/emulator/faults", json={"endpoint": "getPatient", "status": 502}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert v2(emu, "getPatient", token).status_code == 502
    requests.post(emu.url + "/emulator/faults", json={"endpoint": "getPatient", "status": 502}, timeout=TIMEOUT)
    requests.post(emu.url + "/emulator/clear-faults", timeout=TIMEOUT)
    assert v2(emu, "getPatient", token).status_code == 200
    stats = requests.get(emu.url + "/emulator/stats", timeout=TIMEOUT).json()
    assert stats == {"token": 1, "getPatient": 2}
    requests.post(emu.url + "/emulator/reset-stats", timeout=TIMEOUT)
    assert requests.get(emu.url + "/emulator/stats", timeout=TIMEOUT).json() == {}
    requests.post(emu.url + "/emulator/expire-tokens", timeout=TIMEOUT)
    assert v2(emu, "getCollectionValues", token).status_code == 401
    bad = requests.post(emu.url + "/emulator/faults", json={"endpoint": "x", "colour": 1}, timeout=TIMEOUT)
    assert bad.status_code == 400


def test_keep_alive_serves_many_requests_on_one_connection(emu, guest) -> None:
    with requests.Session() as session:
        for _ in range(5):
            r = session.get(f"{api(emu)}/services/v2/getCollectionValues", headers=bearer(guest), timeout=TIMEOUT)
            assert r.status_code == 200
        assert len(session.get_adapter("http://").poolmanager.pools) == 1


def test_stop_closes_idle_keep_alive_connections_and_joins_threads(make_emulator) -> None:
    before = set(threading.enumerate())
    emu = make_emulator()
    sock = socket.create_connection(("127.0.0.1", emu.port), timeout=5)
    sock.sendall(b"GET /nbia-api/services/v4/getCollectionValues HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    emu.stop()
    sock.settimeout(5)
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk  # the server closed the connection: recv returns b"" instead of blocking
    sock.close()
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", emu.port), timeout=2).close()


def test_latency_is_added_to_every_request(make_emulator) -> None:
    import time

    emu = make_emulator(latency=0.3)
    started = time.monotonic()
    requests.get(f"{api(emu)}/services/v4/getCollectionValues", timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.3


def test_stop_does_not_wait_for_an_injected_delay(make_emulator) -> None:
    import time

    emu = make_emulator()
    emu.inject_fault("getCollectionValues", delay=60.0)
    errors: list[BaseException] = []
    arrived = threading.Event()

    def call() -> None:
        try:
            requests.get(f"{api(emu)}/services/v4/getCollectionValues", timeout=TIMEOUT)
        except requests.RequestException as exc:
            errors.append(exc)
        finally:
            arrived.set()

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while emu.stats()["getCollectionValues"] == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.01)  # poll the counter: the request has reached the server
    started = time.monotonic()
    emu.stop()
    assert arrived.wait(10) and time.monotonic() - started < 10
    caller.join(10)
