"""Metadata beside the images: citations, xattrs and the dot-files, through a real mount."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ls, require_tool, wait_until

from nbiafs.citation import Citation, citation_from, doi_from, html_to_text
from nbiafs.emulator import Emulator
from nbiafs.metafiles import _jsonable, to_json


def test_dois_are_found_in_links_and_text() -> None:
    assert doi_from("https://doi.org/10.7937/K9/TCIA.2015.PF0M9REI") == "10.7937/K9/TCIA.2015.PF0M9REI"
    assert doi_from("see doi:10.7937/tcia.xyz.") == "10.7937/tcia.xyz"
    assert doi_from("https://www.cancerimagingarchive.net/") is None and doi_from(None) is None


def test_descriptions_become_text_with_their_paragraphs() -> None:
    assert html_to_text("<p>Lung&nbsp;CT &amp; PET</p><p>second <b>part</b></p>") == "Lung CT & PET\nsecond part"


def test_a_datacite_record_becomes_a_citation() -> None:
    record = {"data": {"attributes": {"doi": "10.1/x", "titles": [{"title": "A Collection"}],
                                      "creators": [{"name": "Doe, Jane"}, {"name": "Roe, Rick"}],
                                      "publicationYear": 2021, "publisher": {"name": "TCIA"}}}}
    citation = citation_from(record, "10.1/x")
    assert citation == Citation("10.1/x", "A Collection", ("Doe, Jane", "Roe, Rick"), 2021, "TCIA")
    assert citation.text == "Doe, Jane; Roe, Rick (2021). A Collection [Data set]. TCIA. https://doi.org/10.1/x"
    assert citation_from({"data": {"attributes": {}}}, "10.1/x") is None


def test_an_unreachable_datacite_costs_one_retry_not_the_nbia_calls_backoff() -> None:
    import random

    import requests
    import responses

    from nbiafs.citation import fetch_citation
    from nbiafs.http import RetryPolicy, Transport

    waits: list[float] = []
    transport = Transport(requests.Session(), policy=RetryPolicy(retries=4, backoff=0.5, deadline=120),
                          rng=random.Random(1))
    transport.closed.wait = lambda delay: bool(waits.append(delay))  # type: ignore[method-assign]
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, "https://datacite.test/dois/10.1/x",
                 body=requests.ConnectionError("Name or service not known"))
        assert fetch_citation(transport, "https://datacite.test", "10.1/x") is None
        assert len(mock.calls) == 2  # one retry: stat of a .collection.json waits ~0.5 s, not ~7 s
    assert len(waits) == 1 and waits[0] <= 0.5


@pytest.fixture
def emu_no_datacite(archive_dir: Path):
    emu = Emulator(archive_dir, datacite=False).start()
    yield emu
    emu.stop()


def _collection_truth(archive, name: str) -> dict:
    series = [s for s in archive.series if s.collection == name]
    return {"patients": len({s.patient_id for s in series}), "studies": len({s.study_uid for s in series}),
            "series": len(series), "images": sum(s.image_count for s in series),
            "bytes": sum(s.file_size for s in series)}


@pytest.mark.fuse
def test_collection_json_says_what_the_collection_is_and_how_to_cite_it(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--datacite-url", emulator.url))
    name = "Demo-Chest-CT"
    facts = json.loads((m.path / name / ".collection.json").read_text())
    entry = archive.collection(name)
    assert facts["collection"] == name and facts["description"]
    assert facts["doi_url"] == entry.description_uri
    assert facts["license"] == {"name": entry.license.long_name, "url": entry.license.url}
    assert facts["counts"] == _collection_truth(archive, name)
    citation = facts["citation"]
    assert citation["title"].startswith(name) and citation["creators"] and citation["year"] == entry.timestamp.year
    assert citation["text"].endswith(f"https://doi.org/{citation['doi']}")
    assert (m.path / name / ".collection.json").stat().st_size == len((m.path / name / ".collection.json").read_bytes())


@pytest.mark.fuse
def test_without_datacite_the_file_simply_lacks_the_citation(emu_no_datacite, mounter) -> None:
    m = mounter(emu_no_datacite, extra=("--datacite-url", emu_no_datacite.url))
    facts = json.loads((m.path / "Demo-Chest-CT" / ".collection.json").read_text())
    assert "citation" not in facts and facts["doi"]


@pytest.mark.fuse
def test_every_level_has_its_uid_and_record_as_xattrs(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--layout", "uid"))
    study = next(s for s in archive.studies if s.collection == "Demo-Head-MR")
    series = archive.series_of_study(study.uid)[0]
    inst = archive.instances_of(series.uid)[0]
    levels = [(m.path / study.collection, study.collection),
              (m.path / study.collection / study.patient_id, study.patient_id),
              (m.path / study.collection / study.patient_id / study.uid, study.uid),
              (m.path / study.collection / study.patient_id / study.uid / series.uid, series.uid),
              (m.path / study.collection / study.patient_id / study.uid / series.uid / f"{inst.sop_uid}.dcm",
               inst.sop_uid)]
    for path, uid in levels:
        assert os.getxattr(path, "user.nbia.uid").decode() == uid
        record = json.loads(os.getxattr(path, "user.nbia.json"))
        assert uid in record.values()
        assert set(os.listxattr(path)) >= {"user.nbia.uid", "user.nbia.json"}
    with pytest.raises(OSError) as info:
        os.getxattr(levels[0][0], "user.nbia.nothing")
    assert info.value.errno == 61  # ENODATA
    with pytest.raises(OSError):
        os.setxattr(levels[-1][0], "user.nbia.uid", b"x")  # read-only


@pytest.mark.fuse
def test_getfattr_lists_them(emulator, mounter) -> None:
    require_tool("getfattr", "attr")
    m = mounter(emulator)
    done = subprocess.run(["getfattr", "-d", str(m.path / "Demo-Chest-CT")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and 'user.nbia.uid="Demo-Chest-CT"' in done.stdout and "user.nbia.json" in done.stdout


@pytest.mark.fuse
def test_series_json_lists_the_instances_and_stats_json_counts_the_store(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch",))
    coll = m.path / "Demo-Head-MR"
    series = coll / ls(coll)[0]
    series = series / ls(series)[0]
    series = series / ls(series)[0]
    assert ls(series) == sorted(f for f in os.listdir(series) if f.endswith(".dcm"))  # readers see DICOM only
    facts = json.loads((series / ".series.json").read_text())
    files = {e["file"]: e for e in facts["instances"]}
    assert set(files) == set(ls(series))
    for name, entry in files.items():
        assert entry["size"] == (series / name).stat().st_size and entry["sop_instance_uid"]
    assert facts["series"]["series_uid"] == os.getxattr(series, "user.nbia.uid").decode()
    before = json.loads((m.path / ".nbiafs" / "stats.json").read_text())
    (series / ls(series)[0]).read_bytes()

    def stats() -> dict:
        return json.loads((m.path / ".nbiafs" / "stats.json").read_text())

    # a read may return its last bytes a moment before its fetch is recorded as complete
    assert wait_until(lambda: stats()["bytes_fetched"] > before["bytes_fetched"], 10)
    assert stats()["fetches"] == before["fetches"] + 1


@pytest.mark.fuse
def test_no_metadata_files_hides_them(emulator, mounter) -> None:
    m = mounter(emulator, extra=("--no-metadata-files",))
    assert not any(n.startswith(".") for n in os.listdir(m.path))
    assert not any(n.startswith(".") for n in os.listdir(m.path / "Demo-Chest-CT"))


def test_metadata_json_is_what_the_records_hold_sorted_with_one_line_per_key_and_per_listed_element() -> None:
    import dataclasses
    import datetime as dt

    @dataclasses.dataclass
    class Rec:
        uid: str
        date: dt.date
        tags: tuple[str, ...]
        record: dict  # the raw server record: never written

    value = {"series": Rec("1.2.3", dt.date(2020, 1, 2), ("a", "b"), {"raw": 1}), "n": 3, "empty": [],
             "instances": [{"size": 2, "file": "1-002.dcm", "md5": None}, {"file": "1-001.dcm", "size": 1}],
             "nested": {"z": [1, 2], "a": "é"}}
    text = to_json(value).decode("utf-8")
    assert json.loads(text) == _jsonable(value)  # the same content the records hold, dates and records plain
    lines = text.splitlines()
    assert text.endswith("}\n") and lines[0] == "{" and lines[-1] == "}"
    keys = [line.split(":", 1)[0].strip() for line in lines[1:-1] if line.startswith(' "')]
    assert keys == sorted(keys) == ['"empty"', '"instances"', '"n"', '"nested"', '"series"']
    assert '  {"file": "1-002.dcm", "md5": null, "size": 2},' in lines  # one element per line, keys sorted
    assert "é" in text and '"record"' not in text
    assert to_json({}) == b"{}\n" and json.loads(to_json([1, {"b": 1, "a": 2}])) == [1, {"a": 2, "b": 1}]
