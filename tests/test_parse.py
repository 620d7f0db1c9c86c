"""JSON -> records: key spellings, omitted keys, the API's date formats, numbers as strings."""

from __future__ import annotations

import datetime as dt

import pytest

from nbiafs import parse
from nbiafs.errors import ProtocolError


@pytest.mark.parametrize("text, expected", [
    ("2003-12-12 00:00:00.0", dt.date(2003, 12, 12)),   # v2
    ("12-31-2003", dt.date(2003, 12, 31)),              # v4 MM-DD-YYYY
    (874299600000, dt.date(1997, 9, 15)),               # advanced: epoch ms
    ("874299600000", dt.date(1997, 9, 15)),
    ("1997-10-20", dt.date(1997, 10, 20)),              # tolerated
    ("not a date", None),
    ("13-45-2003", None),
    ("", None),
    (None, None),
    ({"x": 1}, None),
])
def test_dates_in_every_api_format(text, expected):
    assert parse.date_or_none(text) == expected


def test_garbage_date_is_logged_at_debug_not_raised(caplog):
    with caplog.at_level("DEBUG", logger="nbiafs.parse"):
        assert parse.datetime_or_none("31/31/31 xx") is None
    assert "31/31/31" in caplog.text


@pytest.mark.parametrize("value, expected", [
    (3, 3), ("3000566.000000", 3000566), ("7", 7), (601.0, 601), ("1.5", None), ("abc", None),
    (None, None), (True, None), ("nan", None),
])
def test_series_number_as_int_or_string(value, expected):
    assert parse.int_or_none(value) == expected


def test_empty_body_is_an_empty_list():
    assert parse.json_rows(b"", "getSeries") == []
    assert parse.json_rows(b"  \n", "getSeries") == []


def test_malformed_json_is_a_protocol_error_naming_the_endpoint():
    with pytest.raises(ProtocolError, match="getSeries"):
        parse.json_rows(b'[{"a": 1', "getSeries")
    with pytest.raises(ProtocolError):
        parse.json_rows(b'"just a string"', "getSeries")


def test_patient_reads_lowercase_patientid_key():
    patient = parse.patient_from({"PatientId": "P-1", "Collection": "C"})
    assert patient is not None and patient.patient_id == "P-1" and patient.collection == "C"
    assert patient.sex is None  # omitted key


def test_patient_also_reads_uppercase_key_and_falls_back_to_requested_collection():
    patient = parse.patient_from({"PatientID": "P-2"}, collection="C")
    assert patient is not None and (patient.patient_id, patient.collection) == ("P-2", "C")


def test_series_with_omitted_keys_gets_none():
    s = parse.series_from({"SeriesInstanceUID": "1.2", "StudyInstanceUID": "1.1",
                           "SeriesNumber": "3000566.000000", "SeriesDate": "2001-01-02 00:00:00.0"})
    assert s is not None
    assert s.number == 3000566 and s.date == dt.date(2001, 1, 2)
    assert s.description is None and s.modality is None and s.file_size is None


def test_rows_without_their_uid_are_dropped_with_a_warning(caplog):
    rows = [{"SeriesInstanceUID": "1.2", "StudyInstanceUID": "1.1"}, {"Modality": "CT"}]
    with caplog.at_level("WARNING", logger="nbiafs.parse"):
        out = parse.build_all(rows, parse.series_from, "getSeries")
    assert [s.series_uid for s in out] == ["1.2"]
    assert "dropped" in caplog.text


def test_study_drilldown_with_series_list_and_epoch_date():
    row = {"studyId": "1.1", "date": 874299600000, "description": "p4", "seriesList": [
        {"seriesNumber": "500", "seriesUID": "1.2", "numberImages": 50, "patientId": "P",
         "studyId": "1.1", "project": "4D-Lung", "seriesPkId": 221872172, "exactSize": 26405888},
        {"seriesUID": "1.3"}]}  # no pk: dropped
    study = parse.drilldown_study_from(row)
    assert study is not None and study.date == dt.date(1997, 9, 15)
    assert len(study.series) == 1
    series = study.series[0]
    assert (series.series_pk_id, series.exact_size, series.number_images, series.collection) == \
        (221872172, 26405888, 50, "4D-Lung")


def test_image_drilldown_instance_ignores_acquisition_number():
    inst = parse.instance_from_drilldown({"sopInstanceUid": "9", "seriesInstanceUid": "1.2", "instanceNumber": 73,
                                          "acquisitionNumber": 99, "size": 526592, "imagePkId": 5})
    assert inst is not None and (inst.number, inst.size, inst.image_pk_id) == (73, 526592, 5)


def test_license_reads_flat_or_nested_fields():
    lic = parse.license_from({"id": 1, "longName": "CC BY 3.0 long", "shortName": "CC BY 3.0",
                              "licenseURL": "http://x", "commercialUse": "YES",
                              "license": {"id": 1, "url": "http://y"}})
    assert lic is not None and (lic.short_name, lic.url, lic.commercial_use) == ("CC BY 3.0", "http://x", "YES")
    nested = parse.license_from({"license": {"id": 2, "shortName": "N", "url": "http://z"}})
    assert nested is not None and (nested.id, nested.short_name, nested.url) == (2, "N", "http://z")


def test_collection_description_with_null_license_and_epoch_timestamp():
    desc = parse.collection_description_from({"collectionName": "4D-Lung", "description": "<p>x</p>",
                                              "collectionDescTimestamp": 1678942800000, "licenseId": None})
    assert desc is not None and desc.license_id is None and desc.timestamp == dt.datetime(2023, 3, 16, 5, 0)


def test_series_size_empty_is_none():
    assert parse.series_size_from([]) is None
    size = parse.series_size_from([{"TotalSizeInBytes": 1.5e6, "ObjectCount": 3}])
    assert size is not None and (size.total_bytes, size.object_count) == (1500000, 3)


def test_md5_text_checked():
    assert parse.md5_from(b"D41D8CD98F00B204E9800998ECF8427E\n", "x") == "d41d8cd98f00b204e9800998ecf8427e"
    assert parse.md5_from(b"", "x") is None
    with pytest.raises(ProtocolError):
        parse.md5_from(b"<html>error</html>", "x")
