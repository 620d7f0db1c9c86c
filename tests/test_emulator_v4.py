"""Today's public server: the anonymous v4 API as the NBIA source has it, and the server shapes (no logins,
no v4) that one emulator can take."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator

import pytest
import requests

from nbiafs.emulator import Archive
from nbiafs.emulator.downloads import hierarchy_md5
from nbiafs.emulator.seriesmeta import COLUMNS

TIMEOUT = (5, 30)


@pytest.fixture
def emu(emulator) -> Iterator[object]:
    emulator.clear_faults()
    emulator.reset_stats()
    yield emulator
    emulator.clear_faults()


def v4(emu, name: str, **params) -> requests.Response:
    return requests.get(f"{emu.url}/nbia-api/services/v4/{name}", params=params, timeout=TIMEOUT)


def v4_post(emu, name: str, data) -> requests.Response:
    return requests.post(f"{emu.url}/nbia-api/services/v4/{name}", data=data, timeout=TIMEOUT)


def series_of(archive: Archive, collection: str) -> list:
    return [s for s in archive.series if s.collection == collection]


def restricted_series(archive: Archive):
    return next(s for s in archive.series if s.collection == "Restricted-Demo")


# ---- drill-downs -------------------------------------------------------------------------------
def test_study_drilldown_needs_no_token_and_takes_many_series(emu, archive) -> None:
    chosen = series_of(archive, "Demo-Chest-CT")
    r = v4_post(emu, "getStudyDrillDownWithSeriesIds", [("list", s.uid) for s in chosen])
    assert r.status_code == 200
    studies = r.json()
    got = {item["seriesUID"]: item for study in studies for item in study["seriesList"]}
    assert set(got) == {s.uid for s in chosen}
    for s in chosen:
        item = got[s.uid]
        assert isinstance(item["seriesPkId"], int) and item["seriesPkId"] == s.pk_id
        assert item["totalSizeForAllImagesInSeries"] == s.file_size == item["exactSize"]
        assert item["numberImages"] == s.image_count
        assert {"modality", "licenseName", "descriptionURI", "studyId", "patientId"} <= set(item)
    dated = next(st for st in studies if st["studyId"] == chosen[0].study_uid)
    assert dated["date"] == "12-12-2003"  # v4 writes MM-DD-YYYY where the advanced API has epoch ms


def test_study_drilldown_hides_restricted_series_from_the_anonymous_caller(emu, archive) -> None:
    r = v4_post(emu, "getStudyDrillDownWithSeriesIds", {"list": restricted_series(archive).uid})
    assert r.status_code == 200 and r.content == b""


def test_image_drilldown_gives_every_instance_of_several_series_in_database_order(emu, archive) -> None:
    chosen = [max(archive.series, key=lambda s: s.image_count), series_of(archive, "Demo-Head-MR")[0]]
    r = v4_post(emu, "getImageDrillDown", [("list", str(s.pk_id)) for s in chosen])
    assert r.status_code == 200
    rows = r.json()
    for s in chosen:
        truth = archive.instances_of(s.uid)
        mine = [row for row in rows if row["seriesInstanceUid"] == s.uid]
        assert sorted((m["sopInstanceUid"], m["instanceNumber"], m["size"]) for m in mine) == sorted(
            (t.sop_uid, t.instance_number, t.size) for t in truth)
        assert [m["instanceNumber"] for m in mine] != sorted(m["instanceNumber"] for m in mine)  # shuffled
        study = archive.study_by_uid(s.study_uid)
        assert {m["contentDate"] for m in mine} == {study.date.strftime("%m-%d-%Y")}
        assert {m["studyInstanceUid"] for m in mine} == {s.study_uid}
    again = v4_post(emu, "getImageDrillDown", [("list", str(s.pk_id)) for s in chosen]).json()
    assert again == rows  # deterministic


def test_image_drilldown_of_an_undated_study_has_no_content_date(emu, archive) -> None:
    undated = next(st for st in archive.studies if st.date is None)
    s = next(x for x in archive.series if x.study_uid == undated.uid)
    rows = v4_post(emu, "getImageDrillDown", {"list": str(s.pk_id)}).json()
    assert rows and all("contentDate" not in row for row in rows)


def test_drilldowns_are_post_forms(emu) -> None:
    r = requests.get(f"{emu.url}/nbia-api/services/v4/getImageDrillDown", params={"list": "1"}, timeout=TIMEOUT)
    assert r.status_code == 405


# ---- zips and md5s -----------------------------------------------------------------------------
def test_get_image_with_md5_csv_gives_every_byte_and_every_checksum(emu, archive) -> None:
    s = series_of(archive, "Demo-Head-MR")[0]
    r = v4(emu, "getImage", SeriesInstanceUID=s.uid, NewFileNames="Yes", IncludeMD5="Yes")
    assert r.status_code == 200 and r.headers["Transfer-Encoding"] == "chunked"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = zf.namelist()
    images = [f"1-{i:03d}.dcm" for i in range(1, s.image_count + 1)]
    assert names == ["LICENSE", *images, "md5hashes.csv"]
    lines = zf.read("md5hashes.csv").decode().splitlines()
    assert lines[0] == "Filename,MD5Hash" and len(lines) == 1 + s.image_count
    truth = archive.instances_of(s.uid)
    for line, inst in zip(lines[1:], truth):
        name, md5 = line.split(",")
        assert md5 == inst.md5 == hashlib.md5(zf.read(name)).hexdigest()


def test_get_image_without_include_md5_has_no_csv_and_old_names(emu, archive) -> None:
    s = series_of(archive, "Demo-Head-MR")[0]
    names = zipfile.ZipFile(io.BytesIO(v4(emu, "getImage", SeriesInstanceUID=s.uid).content)).namelist()
    assert names == ["LICENSE", *[f"{i:08d}.dcm" for i in range(1, s.image_count + 1)]]
    r = v4(emu, "getImage", SeriesInstanceUID=s.uid, IncludeMD5="Yes")
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert names[-1] == "md5hashes.csv" and names[1] == "00000001.dcm"


def test_md5_for_image_v4_spelling_and_v2_spelling(emu, archive) -> None:
    inst = archive.instances_of(series_of(archive, "Demo-Head-MR")[0].uid)[1]
    assert v4(emu, "getMD5HashForImage", SOPInstanceUID=inst.sop_uid).text == inst.md5
    assert v4(emu, "getMD5HashForImage", SOPInstanceUid=inst.sop_uid).status_code == 400  # v2 spelling on v4
    r = v4(emu, "getMD5HashForImage", SOPInstanceUID="1.2.3")
    assert r.status_code == 200 and r.content == b""
    secret = archive.instances_of(restricted_series(archive).uid)[0]
    assert v4(emu, "getMD5HashForImage", SOPInstanceUID=secret.sop_uid).content == b""


def test_md5_hierarchy_is_the_md5_of_the_sorted_instance_md5s_at_each_level(emu, archive) -> None:
    s = series_of(archive, "Demo-Chest-CT")[0]
    study = archive.study_by_uid(s.study_uid)

    def expected(instances) -> str:
        return hashlib.md5("".join(sorted(i.md5 for i in instances)).encode()).hexdigest()

    def of_series(pred) -> list:
        return [i for x in archive.series if pred(x) for i in archive.instances_of(x.uid)]

    cases = {
        "SeriesInstanceUID": (s.uid, archive.instances_of(s.uid)),
        "StudyInstanceUID": (study.uid, of_series(lambda x: x.study_uid == study.uid)),
        "PatientID": ("DCC-0002", of_series(lambda x: x.patient_id == "DCC-0002")),  # two studies
        "Collection": ("Demo-Chest-CT", of_series(lambda x: x.collection == "Demo-Chest-CT")),
    }
    seen = set()
    for key, (value, instances) in cases.items():
        r = v4_post(emu, "getMD5Hierarchy", {key: value})
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert r.text == expected(instances) == hierarchy_md5(i.md5 for i in instances)
        seen.add(r.text)
    assert len(seen) == 4
    both = v4_post(emu, "getMD5Hierarchy", {"PatientID": "DCC-0002", "Collection": "Demo-Chest-CT"})
    assert both.text == expected(cases["PatientID"][1])


def test_md5_hierarchy_refuses_two_levels_none_and_hides_restricted(emu, archive) -> None:
    s = series_of(archive, "Demo-Chest-CT")[0]
    assert v4_post(emu, "getMD5Hierarchy", {"SeriesInstanceUID": s.uid, "StudyInstanceUID": s.study_uid}
                   ).status_code == 400
    assert v4_post(emu, "getMD5Hierarchy", {}).status_code == 400
    r = v4_post(emu, "getMD5Hierarchy", {"Collection": "Restricted-Demo"})
    assert r.status_code == 200 and r.content == b""


# ---- series metadata, collection descriptions, licenses ----------------------------------------
def test_series_metadata_is_quoted_csv_that_survives_hostile_descriptions(emu, archive) -> None:
    hostile = [s for s in archive.series if s.collection == "Edge-Cases"]
    wanted = [s.uid for s in hostile] + [restricted_series(archive).uid, "1.2.3.unknown"]
    r = v4_post(emu, "getSeriesMetadata", {"list": ",".join(wanted)})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert "SeriesMetaData.csv" in r.headers["Content-Disposition"]
    table = list(csv.reader(io.StringIO(r.content.decode("utf-8"), newline="")))
    assert tuple(table[0]) == COLUMNS
    rows = {row[COLUMNS.index("Series Instance UID")]: dict(zip(COLUMNS, row)) for row in table[1:]}
    assert set(rows) == {s.uid for s in hostile}  # restricted and unknown series are simply absent
    for s in hostile:
        row = rows[s.uid]
        assert row["Series Description"] == (s.description or "")
        assert row["Image Count"] == str(s.image_count) and row["File Size"] == str(s.file_size)
        assert row["Patient ID"] == s.patient_id and row["Project"] == "Edge-Cases"
        assert row["Collection URI"].startswith("https://doi.org/")
    assert any("\\" in row["Series Description"] for row in rows.values())
    assert r.content.count(b'"') >= 2 * len(COLUMNS)  # every field quoted


def test_series_metadata_quotes_commas_quotes_and_newlines(emu, archive) -> None:
    from nbiafs.emulator.tables import csv_text

    nasty = 'a, "b"\nc'
    parsed = list(csv.reader(io.StringIO(csv_text(["x", "y"], [[nasty, None]]), newline="")))
    assert parsed == [["x", "y"], [nasty, ""]]


def test_series_metadata_repeated_list_fields_and_errors(emu, archive) -> None:
    chosen = series_of(archive, "Demo-Head-MR")
    r = v4_post(emu, "getSeriesMetadata", [("list", s.uid) for s in chosen])
    assert len(list(csv.reader(io.StringIO(r.text, newline="")))) == 1 + len(chosen)
    assert v4_post(emu, "getSeriesMetadata", {}).status_code == 400
    assert v4_post(emu, "getSeriesMetadata", {"list": "1.2.3"}).content == b""
    assert v4_post(emu, "getSeriesMetadata", {"list": chosen[0].uid, "format": "json"}).status_code == 400


def test_collection_descriptions_carry_html_doi_and_last_update(emu, archive) -> None:
    rows = v4(emu, "getCollectionDescriptions").json()
    assert {r["collectionName"] for r in rows} == {c.name for c in archive.public_collections()}
    one = v4(emu, "getCollectionDescriptions", collectionName="Demo-Head-MR").json()
    assert len(one) == 1
    row = one[0]
    coll = archive.collection("Demo-Head-MR")
    assert row["description"] == coll.description and row["description"].startswith("<p>")
    assert row["descriptionURI"] == coll.description_uri and row["descriptionURI"].startswith("https://doi.org/10.")
    assert row["lastUpdated"] == coll.timestamp.strftime("%m-%d-%Y")
    assert "licenseId" not in row and "collectionDescTimestamp" not in row
    assert v4(emu, "getCollectionDescriptions", collectionName="Restricted-Demo").content == b""


def test_v4_series_rows_carry_license_and_doi_and_there_is_no_v4_get_licenses(emu, archive) -> None:
    s = series_of(archive, "Edge-Cases")[0]
    row = v4(emu, "getSeries", SeriesInstanceUID=s.uid).json()[0]
    coll = archive.collection("Edge-Cases")
    assert row["LicenseName"] == coll.license.long_name and row["LicenseURI"] == coll.license.url
    assert row["DataDescriptionURI"] == coll.description_uri and "CollectionURI" not in row
    assert v4(emu, "getLicenses").status_code == 404


# ---- parameter checks --------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, bad", [
    ("getCollectionValues", {"Colection": "x"}, "Colection"),
    ("getSeries", {"Collection": "Edge-Cases", "SeriesUID": "x"}, "SeriesUID"),
    ("getPatient", {"collection": "Edge-Cases"}, "collection"),
    ("getSingleImage", {"SeriesInstanceUID": "x", "SOPInstanceUID": "y", "extra": "1"}, "extra"),
    ("getImage", {"SeriesInstanceUID": "x", "IncludeMd5": "Yes"}, "IncludeMd5"),
    ("getUpdatedSeries", {"fromDate": "01/01/2020", "toDate": "01/01/2021"}, "toDate"),
    ("getCollectionDescriptions", {"Collection": "Edge-Cases"}, "Collection"),
])
def test_unknown_query_parameter_is_400_naming_it(emu, name, params, bad) -> None:
    r = v4(emu, name, **params)
    assert r.status_code == 400
    assert r.text.startswith("Invalid query parameter") and f"'{bad}'" in r.text


def test_unknown_form_field_of_a_post_endpoint_is_400(emu, archive) -> None:
    r = v4_post(emu, "getImageDrillDown", {"list": "1", "lists": "2"})
    assert r.status_code == 400 and r.text.startswith("Invalid form parameter") and "'lists'" in r.text
    r = requests.post(f"{emu.url}/nbia-api/services/v4/getImageDrillDown?x=1", data={"list": "1"},
                      timeout=TIMEOUT)
    assert r.status_code == 400 and r.text.startswith("Invalid query parameter")


def test_v4_empty_results_are_200_with_an_empty_body(emu) -> None:
    for name, params in (("getSeries", {"Collection": "Nope"}), ("getPatient", {"Collection": "Nope"}),
                         ("getSOPInstanceUIDs", {"SeriesInstanceUID": "1.2.3"})):
        r = v4(emu, name, **params)
        assert r.status_code == 200 and r.content == b""


def test_v4_listing_as_csv(emu, archive) -> None:
    r = v4(emu, "getSeries", Collection="Demo-Head-MR", format="csv")
    assert r.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text, newline="")))
    assert {row["SeriesInstanceUID"] for row in table} == {s.uid for s in series_of(archive, "Demo-Head-MR")}


# ---- stats -------------------------------------------------------------------------------------
def test_versioned_stats_tell_which_api_served_and_that_no_token_was_asked(emu, archive) -> None:
    s = series_of(archive, "Demo-Head-MR")[0]
    v4(emu, "getSeries", Collection="Demo-Head-MR")
    v4_post(emu, "getImageDrillDown", {"list": str(s.pk_id)})
    requests.get(f"{emu.url}/nbia-api/services/v1/getCollectionValues", timeout=TIMEOUT)
    versioned = emu.versioned_stats()
    assert versioned == {"v4/getSeries": 1, "v4/getImageDrillDown": 1, "v1/getCollectionValues": 1}
    assert emu.stats() == {"getSeries": 1, "getImageDrillDown": 1, "getCollectionValues": 1}
    assert emu.stats()["token"] == 0 and versioned["oauth/token"] == 0
    detail = requests.get(emu.url + "/emulator/stats", params={"detail": "1"}, timeout=TIMEOUT).json()
    assert detail["versioned"] == dict(versioned) and detail["calls"] == dict(emu.stats())
    assert detail["bytes"]["getImageDrillDown"] > 0
    assert requests.get(emu.url + "/emulator/stats", timeout=TIMEOUT).json() == dict(emu.stats())


def test_byte_stats_count_the_bodies_sent(emu, archive) -> None:
    s = series_of(archive, "Demo-Head-MR")[0]
    inst = archive.instances_of(s.uid)[0]
    v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    zipped = v4(emu, "getImage", SeriesInstanceUID=s.uid).content
    assert emu.bytes_sent()["getSingleImage"] == 2 * inst.size
    assert emu.bytes_sent(versioned=True)["v4/getSingleImage"] == 2 * inst.size
    assert emu.bytes_sent()["getImage"] == len(zipped)
    assert emu.instance_fetches()[inst.sop_uid] == 2  # per instance, so a test can prove one fetch each
    detail = requests.get(emu.url + "/emulator/stats", params={"detail": "1"}, timeout=TIMEOUT).json()
    assert detail["instances"][inst.sop_uid] == 2


# ---- server shapes -----------------------------------------------------------------------------
def test_server_without_logins_refuses_tokens_v2_and_advanced_but_serves_v4(make_emulator, archive) -> None:
    emu = make_emulator(oauth=False)
    form = {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
    assert requests.post(emu.url + "/nbia-api/oauth/token", data=form, timeout=TIMEOUT).status_code == 404
    assert requests.get(emu.url + "/nbia-api/services/v2/getCollectionValues",
                        headers={"Authorization": "Bearer x"}, timeout=TIMEOUT).status_code == 404
    assert requests.post(emu.url + "/nbia-api/services/getImageDrillDown", data={"list": "1"},
                         timeout=TIMEOUT).status_code == 404
    assert requests.get(emu.url + "/nbia-api/logout", timeout=TIMEOUT).status_code == 404
    r = v4(emu, "getCollectionValues")
    assert r.status_code == 200 and {"Collection": "Edge-Cases"} in r.json()
    assert emu.stats()["token"] == 0


def test_old_server_has_no_v4_or_v1_but_v2_and_advanced_work(make_emulator, archive) -> None:
    emu = make_emulator(v4=False)
    assert v4(emu, "getCollectionValues").status_code == 404
    assert v4_post(emu, "getImageDrillDown", {"list": "1"}).status_code == 404
    assert requests.get(emu.url + "/nbia-api/services/v1/getCollectionValues", timeout=TIMEOUT).status_code == 404
    form = {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
    token = requests.post(emu.url + "/nbia-api/oauth/token", data=form, timeout=TIMEOUT).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(emu.url + "/nbia-api/services/v2/getCollectionValues", headers=headers,
                        timeout=TIMEOUT).status_code == 200
    s = series_of(archive, "Demo-Head-MR")[0]
    r = requests.post(emu.url + "/nbia-api/services/getImageDrillDown", data={"list": str(s.pk_id)},
                      headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()) == s.image_count
    assert emu.versioned_stats()["advanced/getImageDrillDown"] == 1


def test_a_server_with_neither_api_is_refused(archive_dir) -> None:
    from nbiafs.emulator import Emulator

    with pytest.raises(ValueError):
        Emulator(archive_dir, oauth=False, v4=False)


def test_api_answers_carry_spring_security_no_cache_headers(emu, archive) -> None:
    for r in (v4(emu, "getCollectionValues"), v4(emu, "getSeries", Collection="Nope"),
              v4(emu, "getSeries", bogus="1")):
        assert r.headers["Cache-Control"] == "no-cache, no-store, max-age=0, must-revalidate"
        assert r.headers["Pragma"] == "no-cache" and r.headers["Expires"] == "0"
    s = series_of(archive, "Demo-Head-MR")[0]
    inst = archive.instances_of(s.uid)[0]
    r = v4(emu, "getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    assert r.headers["Cache-Control"].startswith("no-cache") and int(r.headers["Content-Length"]) == inst.size
    assert r.headers["Content-Type"] == "application/dicom"
    control = requests.get(emu.url + "/emulator/stats", timeout=TIMEOUT)
    assert "Pragma" not in control.headers
    assert json.loads(control.content) is not None
