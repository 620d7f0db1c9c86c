"""The emulator through nbiafs' own client: what the client reads equals the archive's ground truth, and the
client survives the emulator's traps (hidden auth failures, refused refresh, short zips, 5xx)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nbiafs.auth import TokenManager
from nbiafs.client import NbiaClient
from nbiafs.emulator import TEST_PASSWORD, TEST_USER
from nbiafs.errors import ForbiddenError, ProtocolError, RemoteNotFoundError


def make_client(emu, user: str = "nbia_guest", password: str = "", api: str = "v2") -> NbiaClient:
    tokens = TokenManager(emu.url, user, password) if api == "v2" else None
    return NbiaClient(emu.url, tokens, api=api, retries=3, backoff=0.01, deadline=20.0, timeout=(5, 20))


@pytest.fixture
def guest_client(emulator) -> Iterator[NbiaClient]:
    emulator.clear_faults()
    client = make_client(emulator)
    yield client
    client.close()
    emulator.clear_faults()


def test_client_lists_what_the_archive_holds(guest_client: NbiaClient, archive) -> None:
    assert {c.name for c in guest_client.collections()} == {c.name for c in archive.public_collections()}
    patients = guest_client.patients("Demo-Chest-CT")
    assert {p.patient_id for p in patients} == {p.patient_id for p in archive.patients_of("Demo-Chest-CT")}
    studies = guest_client.studies("Edge-Cases")
    assert {s.study_uid for s in studies} == {s.uid for s in archive.studies_of("Edge-Cases")}
    undated = [s for s in studies if s.date is None]
    assert len(undated) == 1
    series = {s.series_uid: s for s in guest_client.series(collection="Demo-Chest-CT")}
    for entry in (s for s in archive.series if s.collection == "Demo-Chest-CT"):
        got = series[entry.uid]
        assert (got.number, got.description, got.image_count, got.file_size) == (
            entry.number, entry.description, entry.image_count, entry.file_size)


def test_client_drilldown_sizes_and_numbers_match_the_files(guest_client: NbiaClient, archive) -> None:
    entry = max(archive.series, key=lambda s: s.image_count)
    studies = guest_client.study_drilldown([entry.uid])
    dd = studies[0].series[0]
    assert dd.series_pk_id == entry.pk_id and dd.exact_size == entry.file_size
    instances = sorted(guest_client.image_drilldown([dd.series_pk_id]), key=lambda i: i.number)
    truth = archive.instances_of(entry.uid)
    assert [(i.sop_uid, i.number, i.size) for i in instances] == [
        (t.sop_uid, t.instance_number, t.size) for t in truth]


def test_client_bytes_equal_the_stored_files(guest_client: NbiaClient, archive) -> None:
    inst = archive.instances_of(archive.series[1].uid)[0]
    assert guest_client.single_image(inst.series_uid, inst.sop_uid, inst.size) == inst.path.read_bytes()
    assert guest_client.md5_for_image(inst.sop_uid) == inst.md5
    with pytest.raises(RemoteNotFoundError):
        guest_client.single_image(inst.series_uid, "1.2.3.4")


def test_client_streams_the_zip_in_instance_order(guest_client: NbiaClient, archive) -> None:
    entry = next(s for s in archive.series if s.image_count == 12)
    files = []
    for member, chunks in guest_client.image_zip(entry.uid, expected_count=entry.image_count):
        data = b"".join(chunks)
        name = member.name if hasattr(member, "name") else member
        if name.endswith(".dcm"):
            files.append(data)
    assert files == [i.path.read_bytes() for i in archive.instances_of(entry.uid)]


def test_client_detects_a_short_zip(emulator, guest_client: NbiaClient, archive) -> None:
    entry = next(s for s in archive.series if s.image_count == 12)
    emulator.inject_fault("getImage", truncate=True)
    with pytest.raises(ProtocolError):
        for _member, chunks in guest_client.image_zip(entry.uid, expected_count=entry.image_count):
            for _ in chunks:
                pass


def test_client_gets_forbidden_for_a_restricted_zip_as_guest(guest_client: NbiaClient, archive) -> None:
    secret = archive.restricted_collections()[0].name
    entry = next(s for s in archive.series if s.collection == secret)
    with pytest.raises(ForbiddenError):
        guest_client.image_zip(entry.uid)


def test_client_retries_through_transient_5xx(emulator, guest_client: NbiaClient) -> None:
    emulator.inject_fault("getCollectionValues", status=503, count=2)
    assert guest_client.collections()


def test_client_survives_expired_tokens_behind_empty_listings_and_refused_refresh(make_emulator, archive) -> None:
    emu = make_emulator(refuse_refresh=True)
    client = make_client(emu, TEST_USER, TEST_PASSWORD)
    try:
        before = client.series(collection="Restricted-Demo")
        assert before
        emu.expire_tokens()  # getSeries now answers 200 with an empty body: must not be taken as truth
        assert client.series(collection="Restricted-Demo") == before
    finally:
        client.close()


def test_v4_client_sees_public_data_anonymously(emulator, archive) -> None:
    client = make_client(emulator, api="v4")
    try:
        assert {c.name for c in client.collections()} == {c.name for c in archive.public_collections()}
        rows = client.series(collection="Demo-Head-MR")
        assert rows and all(r.date is not None for r in rows)
    finally:
        client.close()
