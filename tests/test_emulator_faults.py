"""Faults for the downloader and cache issues: length-preserving corruption (single images and inside
zips), faults named by API version, and the proxy's HTML error page."""

from __future__ import annotations

import hashlib
import http.client
import io
import zipfile
from collections.abc import Iterator

import pydicom
import pytest
import requests

from nbiafs.emulator.control import corrupt_offsets

TIMEOUT = (5, 30)


@pytest.fixture
def emu(emulator) -> Iterator[object]:
    emulator.clear_faults()
    emulator.reset_stats()
    yield emulator
    emulator.clear_faults()


def v4(emu, name: str, **params) -> requests.Response:
    return requests.get(f"{emu.url}/nbia-api/services/v4/{name}", params=params, timeout=TIMEOUT)


def token(emu) -> str:
    form = {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
    return requests.post(emu.url + "/nbia-api/oauth/token", data=form, timeout=TIMEOUT).json()["access_token"]


def v2(emu, name: str, bearer: str, **params) -> requests.Response:
    return requests.get(f"{emu.url}/nbia-api/services/v2/{name}", params=params, timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {bearer}"})


def mr_series(archive):
    return next(s for s in archive.series if s.collection == "Demo-Head-MR" and s.image_count == 8)


def test_corrupt_single_image_keeps_its_length_and_flips_a_few_bytes(emu, archive) -> None:
    s = mr_series(archive)
    inst = archive.instances_of(s.uid)[0]
    truth = inst.path.read_bytes()
    emu.inject_fault("getSingleImage", corrupt=True)
    r = v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == inst.size == len(r.content)
    diff = [i for i, (a, b) in enumerate(zip(r.content, truth)) if a != b]
    assert diff == list(corrupt_offsets(inst.size)) and diff
    assert hashlib.md5(r.content).hexdigest() != inst.md5
    assert pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == inst.sop_uid  # still parses: a bad file on disk
    assert v4(emu, "getMD5HashForImage", SOPInstanceUID=inst.sop_uid).text == inst.md5  # the server's md5 is true
    again = v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    assert again.content == truth  # one call only


def test_corrupt_zip_is_well_formed_with_a_bad_member_and_true_md5s(emu, archive) -> None:
    s = mr_series(archive)
    truth = archive.instances_of(s.uid)
    emu.inject_fault("v4/getImage", corrupt=True)
    r = v4(emu, "getImage", SeriesInstanceUID=s.uid, NewFileNames="Yes", IncludeMD5="Yes")
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.testzip() is None  # every CRC matches the bytes sent
    csv = dict(line.split(",") for line in zf.read("md5hashes.csv").decode().splitlines()[1:])
    bad = [name for name in csv if hashlib.md5(zf.read(name)).hexdigest() != csv[name]]
    assert bad == ["1-001.dcm"]
    first = zf.read("1-001.dcm")
    assert len(first) == truth[0].size and first != truth[0].path.read_bytes()
    assert csv["1-001.dcm"] == truth[0].md5
    assert [zf.read(f"1-{i:03d}.dcm") for i in range(2, s.image_count + 1)] == [
        t.path.read_bytes() for t in truth[1:]]


def test_corrupt_fault_through_the_control_endpoint(make_emulator, archive) -> None:
    emu = make_emulator()
    s = mr_series(archive)
    inst = archive.instances_of(s.uid)[0]
    r = requests.post(emu.url + "/emulator/faults", json={"endpoint": "getSingleImage", "corrupt": True},
                      timeout=TIMEOUT)
    assert r.status_code == 200
    body = v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid).content
    assert len(body) == inst.size and hashlib.md5(body).hexdigest() != inst.md5


def test_a_versioned_fault_hits_only_that_api_and_a_plain_one_hits_any(emu, archive) -> None:
    bearer = token(emu)
    emu.inject_fault("v4/getSeries", status=404)
    assert v2(emu, "getSeries", bearer, Collection="Edge-Cases").status_code == 200
    assert v4(emu, "getSeries", Collection="Edge-Cases").status_code == 404
    assert v4(emu, "getSeries", Collection="Edge-Cases").status_code == 200
    emu.inject_fault("getSeries", status=503, count=2)
    assert v4(emu, "getSeries", Collection="Edge-Cases").status_code == 503
    assert v2(emu, "getSeries", bearer, Collection="Edge-Cases").status_code == 503
    emu.inject_fault("advanced/getImageDrillDown", status=502)
    r = requests.post(emu.url + "/nbia-api/services/v4/getImageDrillDown", data={"list": "1"}, timeout=TIMEOUT)
    assert r.status_code == 200


def test_an_injected_status_is_a_proxy_page_without_the_servers_headers(emu) -> None:
    emu.inject_fault("v4/getPatient", status=404)
    r = v4(emu, "getPatient", Collection="Edge-Cases")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("text/html")
    assert "<center>nginx</center>" in r.text and "404 Not Found" in r.text
    assert r.headers["Server"] == "nginx" and "Pragma" not in r.headers
    ok = v4(emu, "getPatient", Collection="Edge-Cases")
    assert ok.status_code == 200 and ok.headers["Pragma"] == "no-cache"


def test_truncated_v4_single_image_is_cut_before_its_content_length(emu, archive) -> None:
    s = mr_series(archive)
    inst = archive.instances_of(s.uid)[0]
    emu.inject_fault("v4/getSingleImage", truncate=True)
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    try:
        conn.request("GET", f"/nbia-api/services/v4/getSingleImage?SeriesInstanceUID={s.uid}"
                            f"&SOPInstanceUID={inst.sop_uid}")
        resp = conn.getresponse()
        assert int(resp.getheader("Content-Length")) == inst.size
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        assert len(cut.value.partial) == inst.size // 2
    finally:
        conn.close()
    assert emu.bytes_sent()["getSingleImage"] == inst.size // 2


def test_corrupt_offsets_stay_inside_small_bodies() -> None:
    assert corrupt_offsets(0) == ()
    assert corrupt_offsets(1) == (0,)
    assert corrupt_offsets(3) == (0, 1, 2)
    assert corrupt_offsets(1000) == (750, 751, 752, 753)
