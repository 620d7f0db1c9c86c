"""The DataCite-compatible DOI service: every collection's DOI, as the NBIA answers give it, resolves to a
JSON:API record with deterministic titles, creators and years; unknown DOIs are JSON:API 404s."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import requests

from nbiafs.emulator.datacite import CONTENT_TYPE, creators, doi_of

TIMEOUT = (5, 30)


def doi_url(emu, doi: str) -> str:
    return f"{emu.url}/dois/{doi}"


def test_every_collection_doi_the_api_serves_resolves(emulator, archive) -> None:
    emulator.reset_stats()
    served = {row["descriptionURI"] for row in requests.get(
        f"{emulator.url}/nbia-api/services/v4/getCollectionDescriptions", timeout=TIMEOUT).json()}
    served |= {row["DataDescriptionURI"] for row in requests.get(
        f"{emulator.url}/nbia-api/services/v4/getSeries", timeout=TIMEOUT).json()}
    assert served == {c.description_uri for c in archive.public_collections()}
    for coll in archive.collections:  # DataCite is public: the restricted collection's DOI resolves too
        doi = doi_of(coll)
        assert doi is not None and coll.description_uri == "https://doi.org/" + doi
        r = requests.get(doi_url(emulator, doi), timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["Content-Type"] == CONTENT_TYPE
        data = r.json()["data"]
        assert data["id"] == doi.lower() and data["type"] == "dois"
        attrs = data["attributes"]
        assert attrs["doi"] == doi.lower() and attrs["publicationYear"] == coll.timestamp.year
        assert attrs["titles"][0]["title"].startswith(coll.name)
        assert attrs["publisher"] == "The Cancer Imaging Archive"
        assert attrs["url"].startswith("https://") and attrs["types"]["resourceTypeGeneral"] == "Dataset"
        assert attrs["creators"] and all({"name", "nameType", "givenName", "familyName"} <= set(c)
                                         for c in attrs["creators"])
        assert attrs["creators"] == creators(coll.name) == requests.get(
            doi_url(emulator, doi), timeout=TIMEOUT).json()["data"]["attributes"]["creators"]
    assert emulator.stats()["dois"] == 2 * len(archive.collections)
    assert emulator.versioned_stats()["datacite/dois"] == 2 * len(archive.collections)


def test_dois_match_case_insensitively_with_slashes_or_percent_encoded(emulator, archive) -> None:
    coll = archive.collection("Edge-Cases")
    doi = doi_of(coll)
    assert doi.count("/") >= 2  # a suffix with a slash, as 10.7937/K9/TCIA.2015.PF0M9REI has
    for spelling in (doi, doi.lower(), quote(doi, safe=""), "https://doi.org/" + doi):
        r = requests.get(doi_url(emulator, spelling), timeout=TIMEOUT)
        assert r.status_code == 200, spelling
        assert r.json()["data"]["attributes"]["doi"] == doi.lower()


def test_publisher_as_an_object_on_request(emulator, archive) -> None:
    doi = doi_of(archive.collections[0])
    r = requests.get(doi_url(emulator, doi), params={"publisher": "true"}, timeout=TIMEOUT)
    assert r.json()["data"]["attributes"]["publisher"] == {"name": "The Cancer Imaging Archive"}


@pytest.mark.parametrize("doi", ["10.7937/K9/TCIA.2015.PF0M9REI", "10.0000/nothing", ""])
def test_unknown_doi_is_a_json_api_404(emulator, doi: str) -> None:
    r = requests.get(doi_url(emulator, doi), timeout=TIMEOUT)
    assert r.status_code == 404 and r.headers["Content-Type"] == CONTENT_TYPE
    assert r.json()["errors"][0]["status"] == "404"
    assert "Pragma" not in r.headers  # not a Spring answer


def test_datacite_can_be_switched_off(make_emulator, archive) -> None:
    emu = make_emulator(datacite=False)
    r = requests.get(doi_url(emu, doi_of(archive.collections[0])), timeout=TIMEOUT)
    assert r.status_code == 404 and "errors" not in r.text
