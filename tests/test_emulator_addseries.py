"""Publishing a series while the emulator runs: every endpoint serves it, getUpdatedSeries reports it, and
the swap is safe with requests in flight."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import threading
import zipfile

import pydicom
import pytest
import requests

TIMEOUT = (5, 30)


def v4(emu, name: str, **params) -> requests.Response:
    return requests.get(f"{emu.url}/nbia-api/services/v4/{name}", params=params, timeout=TIMEOUT)


def v2(emu, name: str, **params) -> requests.Response:
    form = {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
    token = requests.post(emu.url + "/nbia-api/oauth/token", data=form, timeout=TIMEOUT).json()["access_token"]
    return requests.get(f"{emu.url}/nbia-api/services/v2/{name}", params=params, timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {token}"})


def test_added_series_is_served_by_every_endpoint(make_emulator) -> None:
    emu = make_emulator()
    before = emu.archive
    study = next(s for s in before.studies if s.collection == "Demo-Head-MR")
    added = emu.add_series("Demo-Head-MR", study_uid=study.uid, count=3, description="Fresh, \"new\" series")
    assert not added.new_patient and not added.new_study and added.study_uid == study.uid
    assert len(added.sop_uids) == 3 and before.series_by_uid(added.series_uid) is None  # the old one is untouched
    arch = emu.archive
    entry = arch.series_by_uid(added.series_uid)
    assert entry.image_count == 3 and entry.timestamp.date() == dt.date.today()
    assert arch.study_by_uid(study.uid).series_count == study.series_count + 1

    rows = v4(emu, "getSeries", StudyInstanceUID=study.uid).json()
    assert added.series_uid in {r["SeriesInstanceUID"] for r in rows}
    assert added.series_uid in {r["SeriesInstanceUID"] for r in v2(emu, "getSeries", Collection="Demo-Head-MR").json()}
    today = dt.date.today()
    for rows in (v4(emu, "getUpdatedSeries", fromDate=today.strftime("%d/%m/%Y")).json(),
                 v2(emu, "getUpdatedSeries", fromDate=today.strftime("%d/%m/%Y")).json()):
        assert [r["SeriesInstanceUID"] for r in rows] == [added.series_uid]
    uids = {r["SOPInstanceUID"] for r in v4(emu, "getSOPInstanceUIDs", SeriesInstanceUID=added.series_uid).json()}
    assert uids == set(added.sop_uids)

    dd = requests.post(f"{emu.url}/nbia-api/services/v4/getStudyDrillDownWithSeriesIds",
                       data={"list": added.series_uid}, timeout=TIMEOUT).json()
    item = dd[0]["seriesList"][0]
    assert item["totalSizeForAllImagesInSeries"] == entry.file_size
    images = requests.post(f"{emu.url}/nbia-api/services/v4/getImageDrillDown",
                           data={"list": str(item["seriesPkId"])}, timeout=TIMEOUT).json()
    assert {i["sopInstanceUid"]: i["size"] for i in images} == {
        i.sop_uid: i.size for i in arch.instances_of(added.series_uid)}

    for inst in arch.instances_of(added.series_uid):
        body = v4(emu, "getSingleImage", SeriesInstanceUID=added.series_uid, SOPInstanceUID=inst.sop_uid).content
        assert len(body) == inst.size and hashlib.md5(body).hexdigest() == inst.md5
        ds = pydicom.dcmread(io.BytesIO(body))
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID) == (
            inst.sop_uid, added.series_uid, study.uid)
        assert ds.PatientID == study.patient_id and ds.SeriesDescription == entry.description
    zf = zipfile.ZipFile(io.BytesIO(v4(emu, "getImage", SeriesInstanceUID=added.series_uid, IncludeMD5="Yes").content))
    assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 3


def test_added_series_to_a_new_patient_through_the_control_endpoint(make_emulator) -> None:
    emu = make_emulator()
    r = requests.post(emu.url + "/emulator/add-series", json={"collection": "Edge-Cases", "patient_id": "EC-NEW",
                                                              "count": 5}, timeout=TIMEOUT)
    assert r.status_code == 200
    added = r.json()
    assert added["new_patient"] and added["new_study"] and added["patient_id"] == "EC-NEW"
    assert len(added["sop_uids"]) == 5  # more than the 3 instances of the copied series: cycled and renumbered
    assert "EC-NEW" in {p["PatientId"] for p in v4(emu, "getPatient", Collection="Edge-Cases").json()}
    studies = v4(emu, "getPatientStudy", Collection="Edge-Cases", PatientID="EC-NEW").json()
    assert [s["StudyInstanceUID"] for s in studies] == [added["study_uid"]]
    numbers = sorted(i.instance_number for i in emu.archive.instances_of(added["series_uid"]))
    assert numbers == [1, 2, 3, 4, 5]
    bad = requests.post(emu.url + "/emulator/add-series", json={"collection": "Nope"}, timeout=TIMEOUT)
    assert bad.status_code == 400
    bad = requests.post(emu.url + "/emulator/add-series", json={"collection": "Edge-Cases", "colour": 1},
                        timeout=TIMEOUT)
    assert bad.status_code == 400


def test_add_series_refuses_inconsistent_requests(make_emulator) -> None:
    emu = make_emulator()
    study = next(s for s in emu.archive.studies if s.collection == "Demo-Head-MR")
    with pytest.raises(ValueError):
        emu.add_series("Demo-Chest-CT", study_uid=study.uid)  # a study of another collection
    with pytest.raises(ValueError):
        emu.add_series("Demo-Head-MR", study_uid=study.uid, patient_id="someone-else")
    with pytest.raises(ValueError):
        emu.add_series("Demo-Head-MR", like="1.2.3")
    with pytest.raises(ValueError):
        emu.add_series("Demo-Head-MR", count=0)


def test_adding_while_requests_are_in_flight(make_emulator) -> None:
    """Readers hammer listings and images while series are added: every answer is whole and consistent."""
    emu = make_emulator()
    errors: list[str] = []
    inst = emu.archive.instances_of(emu.archive.series[0].uid)[0]
    running = threading.Barrier(4)

    def reader() -> None:
        with requests.Session() as session:
            for n in range(40):
                if n == 1:
                    running.wait(30)  # every reader is mid-loop when the additions start
                rows = session.get(f"{emu.url}/nbia-api/services/v4/getSeries", timeout=TIMEOUT,
                                   params={"Collection": "Demo-Head-MR"}).json()
                if len({r["SeriesInstanceUID"] for r in rows}) != len(rows):
                    errors.append("duplicate rows")
                body = session.get(f"{emu.url}/nbia-api/services/v4/getSingleImage", timeout=TIMEOUT,
                                   params={"SeriesInstanceUID": inst.series_uid,
                                           "SOPInstanceUID": inst.sop_uid}).content
                if hashlib.md5(body).hexdigest() != inst.md5:
                    errors.append("bad image")

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    running.wait(30)
    adders = [threading.Thread(target=lambda: emu.add_series("Demo-Head-MR", count=1)) for _ in range(4)]
    for t in adders:
        t.start()
    for t in adders:
        t.join(60)
    for t in readers:
        t.join(60)
    assert errors == []
    added = [s for s in emu.archive.series if s.collection == "Demo-Head-MR" and s.timestamp.date() == dt.date.today()]
    assert len(added) == 4 and len({s.uid for s in added}) == 4
    assert len({s.pk_id for s in emu.archive.series}) == len(emu.archive.series)


def test_added_series_do_not_leak_into_other_emulators(make_emulator) -> None:
    first, second = make_emulator(), make_emulator()
    added = first.add_series("Demo-Head-MR", count=1)
    assert second.archive.series_by_uid(added.series_uid) is None
    assert v4(second, "getSeries", SeriesInstanceUID=added.series_uid).content == b""
