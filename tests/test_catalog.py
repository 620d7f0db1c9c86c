"""The lazy tree: API call costs per level, stable names and inodes, exact sizes, fallbacks, errors, offline."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from pathlib import Path

import pytest
from fakes import FakeArchive, FakeNbiaClient, build_archive
from test_naming import assert_valid_name

from nbiafs.catalog import DEFAULT_MTIME, Catalog, Node
from nbiafs.errors import (
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    OfflineError,
    ProtocolError,
    RemoteNotFoundError,
    ServerError,
    TokenExpiredError,
)
from nbiafs.metacache import MetadataCache

NS = "http://127.0.0.1:1|nbia_guest"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "metadata"


@pytest.fixture
def metas():
    opened: list[MetadataCache] = []

    def make(path: Path | None, namespace: str = NS) -> MetadataCache:
        meta = MetadataCache(path, namespace, ttl=3600)
        opened.append(meta)
        return meta

    yield make
    for meta in opened:
        meta.close()


def walk(cat: Catalog, path: str = "/") -> dict[str, Node]:
    """Every node below ``path`` (listing every directory once)."""
    found: dict[str, Node] = {}
    for child in cat.children(path):
        found[child.path] = child
        if child.is_dir:
            found.update(walk(cat, child.path))
    return found


def first_instance_path() -> str:
    return "/Coll-1/Coll-1-P001/01-11-2001-1-Study 1-1.1.1/1-Series 1-1.1.1/1-001.dcm"


@pytest.fixture
def fake() -> FakeNbiaClient:
    return FakeNbiaClient(build_archive(), shuffle_seed=7)


@pytest.fixture
def cat(fake, cache_dir, metas) -> Catalog:
    return Catalog(fake, metas(cache_dir))


# -- call costs --------------------------------------------------------------------------------------

def test_each_directory_level_costs_one_call_and_a_series_two(cat, fake):
    cat.children("/")
    assert fake.calls == {"collections": 1}
    cat.children("/Coll-1")
    assert fake.calls["patients"] == 1 and fake.total_calls() == 2
    cat.children("/Coll-1/Coll-1-P001")
    assert fake.calls["studies"] == 1 and fake.total_calls() == 3
    study = cat.children("/Coll-1/Coll-1-P001")[0].path
    cat.children(study)
    assert fake.calls["series"] == 1 and fake.total_calls() == 4
    series = cat.children(study)[0].path
    files = cat.children(series)
    assert fake.calls["study_drilldown"] == 1 and fake.calls["image_drilldown"] == 1
    assert fake.total_calls() == 6
    assert len(files) == 3


def test_stat_of_anything_in_a_listed_directory_costs_no_call(cat, fake):
    tree = walk(cat)
    fake.reset_counts()
    for path, node in tree.items():
        assert cat.lookup(path) == node
    assert fake.total_calls() == 0


def test_unknown_names_in_a_listed_directory_cost_no_call_even_when_repeated(cat, fake):
    cat.children("/Coll-1")
    fake.reset_counts()
    for _ in range(3):
        with pytest.raises(NotFoundError):
            cat.lookup("/Coll-1/no-such-patient")
        with pytest.raises(NotFoundError):
            cat.lookup("/no-such-collection")
    assert fake.total_calls() == 0


def test_deep_lookup_lists_each_missing_ancestor_once(cat, fake):
    node = cat.lookup(first_instance_path())
    assert node.kind == "instance"
    assert fake.calls == {"collections": 1, "patients": 1, "studies": 1, "series": 1,
                          "study_drilldown": 1, "image_drilldown": 1}
    fake.reset_counts()
    cat.lookup(first_instance_path())
    assert fake.total_calls() == 0


def test_remount_on_the_same_cache_lists_the_whole_tree_without_calls(fake, cache_dir, metas):
    first = metas(cache_dir)
    before = walk(Catalog(fake, first))
    first.close()  # unmount
    fresh = FakeNbiaClient(fake.archive, shuffle_seed=99)
    after = walk(Catalog(fresh, metas(cache_dir)))
    assert fresh.total_calls() == 0
    assert after == before


def test_an_empty_listing_is_cached(fake, cache_dir, metas):
    fake.archive.add_collection("Empty")
    first = metas(cache_dir)
    cat = Catalog(fake, first)
    assert cat.children("/Empty") == []
    assert cat.children("/Empty") == []
    first.close()  # unmount: what it queued for the disk is written (writes are not waited for)
    fresh = FakeNbiaClient(fake.archive)
    assert Catalog(fresh, metas(cache_dir)).children("/Empty") == []
    assert fake.calls["patients"] == 1 and fresh.total_calls() == 0


# -- concurrency -------------------------------------------------------------------------------------

def test_sixteen_threads_listing_one_directory_make_one_call(cat, fake):
    cat.children("/")
    gate = fake.gate("patients")
    barrier = threading.Barrier(16)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def lister():
        try:
            barrier.wait(10)
            results.append([n.path for n in cat.children("/Coll-1")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lister) for _ in range(16)]
    for t in threads:
        t.start()
    assert gate.wait_entered(1)
    gate.release()
    for t in threads:
        t.join(10)
    assert not errors
    assert fake.calls["patients"] == 1
    assert len(results) == 16 and all(r == results[0] for r in results)


def test_a_slow_listing_does_not_block_listing_another_directory(cat, fake):
    cat.children("/")
    gate = fake.gate("patients", match=lambda collection: collection == "Coll-1")
    slow = threading.Thread(target=cat.children, args=("/Coll-1",))
    slow.start()
    try:
        assert gate.wait_entered(1)
        assert [n.patient_id for n in cat.children("/Coll-2")] == ["Coll-2-P001", "Coll-2-P002"]
        assert slow.is_alive() and gate.entered == 1  # answered while the slow listing is still held
    finally:
        gate.release()
        slow.join(10)
    assert cat.children("/Coll-1")


# -- nodes -------------------------------------------------------------------------------------------

def test_instance_sizes_are_the_exact_byte_counts(cat, fake):
    files = [n for n in walk(cat).values() if n.kind == "instance"]
    assert len(files) == len(fake.archive.instances)
    for node in files:
        assert node.size == len(fake.archive.data[node.sop_uid])


def test_inodes_are_unique_never_0_or_1_and_the_root_is_1(cat):
    tree = walk(cat)
    inos = [n.ino for n in tree.values()]
    assert len(set(inos)) == len(inos)
    assert all(1 < i < 2**63 for i in inos)
    assert cat.lookup("/").ino == 1


def test_inodes_and_mtimes_do_not_depend_on_the_namespace_cache_or_answer_order(fake, metas):
    one = walk(Catalog(FakeNbiaClient(fake.archive, shuffle_seed=1), metas(None)))
    two = walk(Catalog(FakeNbiaClient(fake.archive, shuffle_seed=2), metas(None)))
    assert {p: (n.ino, n.mtime) for p, n in one.items()} == {p: (n.ino, n.mtime) for p, n in two.items()}
    other = walk(Catalog(FakeNbiaClient(fake.archive), metas(None, "http://other|alice")))
    assert set(other) == set(one) and all(other[p].ino != one[p].ino for p in one)


def test_mtimes_come_from_metadata_dates(cat):
    study = cat.lookup("/Coll-1/Coll-1-P001/01-11-2001-1-Study 1-1.1.1")
    assert study.mtime == dt.datetime(2001, 1, 11, tzinfo=dt.timezone.utc).timestamp()
    assert cat.lookup("/Coll-1").mtime == DEFAULT_MTIME
    series = cat.children(study.path)[0]
    assert series.mtime == study.mtime
    assert all(f.mtime == series.mtime for f in cat.children(series.path))


def test_undated_study_gets_the_fixed_mtime(metas):
    archive = FakeArchive()
    archive.add_collection("C")
    archive.add_patient("C", "P")
    archive.add_study("C", "P", "1.2.3.45678")
    cat = Catalog(FakeNbiaClient(archive), metas(None))
    assert cat.lookup("/C/P/45678").mtime == DEFAULT_MTIME


def test_uid_layout_uses_uids_for_studies_series_and_files(fake, metas):
    cat = Catalog(fake, metas(None), layout="uid")
    inst = fake.archive.instances[0]
    series = next(s for s in fake.archive.series if s.series_uid == inst.series_uid)
    path = f"/{series.collection}/{series.patient_id}/{series.study_uid}/{series.series_uid}/{inst.sop_uid}.dcm"
    node = cat.instance(path)
    assert node.sop_uid == inst.sop_uid and node.size == inst.size


def test_wrong_kinds_of_path_are_not_found(cat, fake):
    file_path = first_instance_path()
    with pytest.raises(NotFoundError):
        cat.lookup(file_path + "/below")
    with pytest.raises(NotFoundError):
        cat.children(file_path)
    with pytest.raises(NotFoundError):
        cat.instance("/Coll-1")
    with pytest.raises(NotFoundError):
        cat.lookup("relative/path")
    with pytest.raises(NotFoundError):
        cat.lookup("/Coll-1/..")


# -- hostile metadata --------------------------------------------------------------------------------

def hostile_archive() -> FakeArchive:
    a = FakeArchive()
    a.add_collection("Odd/Collection")
    a.add_collection("Odd-Collection")  # clashes with the sanitised name above
    coll = "Odd/Collection"
    a.add_patient(coll, "PAT 01 ")
    a.add_patient(coll, "PAT 01")  # clashes once trailing spaces are stripped
    a.add_patient(coll, ".hidden")
    a.add_patient(coll, "")  # never listed: an empty ID would widen the next query
    studies = [
        a.add_study(coll, "PAT 01", "1.2.840.1.11111", date=dt.date(2000, 1, 1), description="CT"),
        a.add_study(coll, "PAT 01", "1.2.840.2.11111", date=dt.date(2000, 1, 1), description="CT"),
        a.add_study(coll, "PAT 01", "1.2.840.3.22222", description="Thorax/Abdomen\\Pelvis"),
        a.add_study(coll, "PAT 01", "1.2.840.4.33333", description="é" * 300, study_id="x" * 300),
        a.add_study(coll, "PAT 01", "1.2.840.5.44444", description="胸部 CT\n"),
        a.add_study(coll, "PAT 01", "1.2.840.6.55555", description=""),
    ]
    for _n, study in enumerate(studies):
        for k, desc in enumerate(["<MPR Range[1]>", "<MPR Range[1]>", None, "a/b"]):
            series = a.add_series(study, f"{study.study_uid}.{k}.77777", number=1 if k < 2 else k,
                                  description=desc)
            for i in range(3):
                a.add_instance(series, f"{series.series_uid}.{i}", number=None if i == 2 else 5, size=300 + i)
    a.set_image_counts()
    return a


@pytest.mark.parametrize("layout", ["descriptive", "uid"])
def test_hostile_metadata_gives_valid_unique_names_for_every_record(layout, metas):
    archive = hostile_archive()
    tree = walk(Catalog(FakeNbiaClient(archive, shuffle_seed=3), metas(None), layout=layout))
    for path in tree:
        assert_valid_name(path.rsplit("/", 1)[1])
    kinds = [n.kind for n in tree.values()]
    assert kinds.count("collection") == 2
    assert kinds.count("patient") == 3
    assert kinds.count("study") == 6
    assert kinds.count("series") == 24
    assert {n.sop_uid for n in tree.values() if n.kind == "instance"} == {i.sop_uid for i in archive.instances}
    again = walk(Catalog(FakeNbiaClient(archive, shuffle_seed=11), metas(None), layout=layout))
    assert {p: n.ino for p, n in again.items()} == {p: n.ino for p, n in tree.items()}


def test_duplicate_study_date_and_description_are_told_apart_by_uid_order(metas):
    cat = Catalog(FakeNbiaClient(hostile_archive(), shuffle_seed=5), metas(None))
    names = {n.path.rsplit("/", 1)[1]: n.study_uid for n in cat.children("/Odd-Collection-2/PAT 01")}
    assert names["01-01-2000-CT-11111"] == "1.2.840.1.11111"
    assert names["01-01-2000-CT-11111-2"] == "1.2.840.2.11111"


# -- sizes without the drill-down --------------------------------------------------------------------

class Probe:
    """Stands in for the store: 'fetches' an instance and reports its size and InstanceNumber."""

    def __init__(self, archive: FakeArchive):
        self.archive = archive
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, series_uid: str, sop_uid: str) -> tuple[int, int | None]:
        with self.lock:
            self.calls.append(sop_uid)
        inst = next(i for i in self.archive.instances if i.sop_uid == sop_uid)
        return len(self.archive.data[sop_uid]), inst.number


def series_path(cat: Catalog) -> str:
    return cat.children(cat.children("/Coll-1/Coll-1-P001")[0].path)[0].path


def check_probed_listing(cat: Catalog, fake: FakeNbiaClient, probe: Probe) -> None:
    path = series_path(cat)
    files = cat.children(path)
    assert [n.instance_number for n in files] == [1, 2, 3]
    assert all(n.size == len(fake.archive.data[n.sop_uid]) for n in files)
    assert sorted(probe.calls) == sorted(n.sop_uid for n in files)
    assert fake.calls["sop_instance_uids"] == 1


def test_without_drilldown_sizes_are_learned_by_probing(fake, metas):
    probe = Probe(fake.archive)
    cat = Catalog(fake, metas(None), use_drilldown=False, probe=probe)
    check_probed_listing(cat, fake, probe)
    assert fake.calls["study_drilldown"] == 0


@pytest.mark.parametrize("method,error", [("study_drilldown", ForbiddenError("advanced API refused")),
                                          ("image_drilldown", BadRequestError("400")),
                                          ("study_drilldown", RemoteNotFoundError("404: no such endpoint"))])
def test_refused_drilldown_falls_back_to_probing(fake, metas, method, error):
    fake.fail(method, error)
    probe = Probe(fake.archive)
    check_probed_listing(Catalog(fake, metas(None), probe=probe), fake, probe)


def test_series_missing_from_the_drilldown_falls_back_to_probing(fake, metas, monkeypatch):
    monkeypatch.setattr(fake, "study_drilldown", lambda uids, route="advanced": [])
    probe = Probe(fake.archive)
    check_probed_listing(Catalog(fake, metas(None), probe=probe), fake, probe)


def test_without_drilldown_or_probe_sizes_are_never_guessed(fake, metas):
    cat = Catalog(fake, metas(None), use_drilldown=False)
    path = series_path(cat)
    with pytest.raises(ProtocolError, match="exact file sizes"):
        cat.children(path)


def test_drilldown_instances_without_size_are_probed(fake, metas, monkeypatch):
    real = fake.image_drilldown
    monkeypatch.setattr(fake, "image_drilldown",
                        lambda pks, route="advanced": [i if i.number != 2 else type(i)(i.sop_uid, i.series_uid, 2, None)
                                                       for i in real(pks)])
    probe = Probe(fake.archive)
    cat = Catalog(fake, metas(None), probe=probe)
    files = cat.children(series_path(cat))
    assert len(probe.calls) == 1
    assert all(n.size == len(fake.archive.data[n.sop_uid]) for n in files)


def test_image_count_mismatch_is_logged(fake, metas, caplog, monkeypatch):
    real_drill = fake.image_drilldown
    kept: set[str] = set()

    def short_drilldown(pks, route="advanced"):
        found = [i for i in real_drill(pks) if i.series_uid == series_uid][:2]
        kept.update(i.sop_uid for i in found)
        return found

    monkeypatch.setattr(fake, "image_drilldown", short_drilldown)
    monkeypatch.setattr(fake, "sop_instance_uids", lambda uid: sorted(kept))  # the search API agrees
    cat = Catalog(fake, metas(None))
    series_uid = cat.lookup(series_path(cat)).series_uid
    with caplog.at_level(logging.WARNING, logger="nbiafs.catalog"):
        assert len(cat.children(series_path(cat))) == 2
    assert "announced 3 images but lists 2" in caplog.text


def test_a_short_drilldown_is_completed_from_the_search_api_by_probing(fake, metas, monkeypatch):
    real = fake.image_drilldown
    monkeypatch.setattr(fake, "image_drilldown", lambda pks, route="advanced": [
        i for i in real(pks) if i.number == 1])
    probe = Probe(fake.archive)
    cat = Catalog(fake, metas(None), probe=probe)
    files = cat.children(series_path(cat))
    assert len(files) == 3 and len(probe.calls) == 2  # the two the drill-down did not list
    assert all(n.size == len(fake.archive.data[n.sop_uid]) for n in files)
    assert [n.instance_number for n in files] == [1, 2, 3]


def test_a_drilldown_refused_with_401_after_renewal_falls_back_to_probing(fake, metas):
    fake.fail("study_drilldown", TokenExpiredError("401 after a refresh"))
    probe = Probe(fake.archive)
    check_probed_listing(Catalog(fake, metas(None), probe=probe), fake, probe)


def test_on_series_listed_gets_the_series_and_its_files(fake, metas):
    seen: list[tuple[Node, list[Node]]] = []
    cat = Catalog(fake, metas(None), on_series_listed=lambda s, files: seen.append((s, files)))
    path = series_path(cat)
    files = cat.children(path)
    assert len(seen) == 1 and seen[0][0].path == path and seen[0][1] == files


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [ForbiddenError("restricted"), ServerError("503"), ProtocolError("bad json")])
def test_client_errors_propagate_and_are_not_cached(cat, fake, error):
    cat.children("/")
    fake.fail("patients", error, times=1)
    with pytest.raises(type(error)):
        cat.children("/Coll-1")
    assert [n.patient_id for n in cat.children("/Coll-1")] == ["Coll-1-P001", "Coll-1-P002"]
    assert fake.calls["patients"] == 2


# -- offline -----------------------------------------------------------------------------------------

def test_offline_serves_the_cached_tree_without_calls(fake, cache_dir, metas):
    first = metas(cache_dir)
    before = walk(Catalog(fake, first))
    first.close()  # unmount: what it queued for the disk is written
    quiet = FakeNbiaClient(fake.archive)
    offline = Catalog(quiet, metas(cache_dir), offline=True)
    assert walk(offline) == before
    assert quiet.total_calls() == 0


def test_offline_without_a_cached_listing_is_an_offline_error(fake, cache_dir, metas):
    first = metas(cache_dir)
    Catalog(fake, first).children("/Coll-1")
    first.close()  # unmount: what it queued for the disk is written
    quiet = FakeNbiaClient(fake.archive)
    offline = Catalog(quiet, metas(cache_dir), offline=True)
    assert offline.children("/Coll-1")
    with pytest.raises(OfflineError):
        offline.children("/Coll-2")
    with pytest.raises(OfflineError):
        Catalog(quiet, metas(None), offline=True).children("/")
    assert quiet.total_calls() == 0


# -- against the emulator, through the real client ---------------------------------------------------

def test_real_client_tree_has_exact_sizes_one_request_per_level_and_two_per_study_and_none_after_remount(
        make_emulator, tmp_path):
    from nbiafs.client import NbiaClient

    emulator = make_emulator()  # its own: the shared one's request counts belong to other tests

    namespace = f"{emulator.url}|nbia_guest"
    client = NbiaClient(emulator.url, retries=1, backoff=0.01, deadline=20)
    try:
        with MetadataCache(tmp_path / "metadata", namespace, ttl=3600) as meta:
            cat = Catalog(client, meta)
            before = emulator.stats()
            tree = walk(cat)
            spent = emulator.stats() - before
        directories = Counter(n.kind for n in tree.values())
        assert spent["getCollectionValues"] <= 2  # one listing (+ possibly one auth check)
        assert spent["getPatient"] == directories["collection"]
        assert spent["getPatientStudy"] == directories["patient"]
        assert spent["getSeries"] == directories["study"]
        # one drill-down pair per study gives the exact sizes of all its series
        assert spent["getStudyDrillDownWithSeriesIds"] == directories["study"]
        assert spent["getImageDrillDown"] == directories["study"]
        files = [n for n in tree.values() if n.kind == "instance"]
        for node in files[:: max(1, len(files) // 5)]:
            assert node.size == len(client.single_image(node.series_uid, node.sop_uid))
        with MetadataCache(tmp_path / "metadata", namespace, ttl=3600) as meta:
            before = emulator.stats()
            assert walk(Catalog(client, meta)) == tree
            assert emulator.stats() - before == Counter()
    finally:
        client.close()


def test_built_listings_in_memory_are_bounded_by_nodes(metas, monkeypatch):
    # Walking a tree of big series must not keep LISTINGS_MAXSIZE listings of any length: the
    # catalog's built listings are bounded by the number of nodes they hold.
    import nbiafs.catalog as catalog_mod

    monkeypatch.setattr(catalog_mod, "LISTINGS_MAX_NODES", 40)
    fake = FakeNbiaClient(build_archive(collections=1, patients=1, studies=1, series=4, instances=15))
    cat = Catalog(fake, metas(None))
    walk(cat)
    assert sum(len(v) for v in cat._listings.values()) <= 40
    before = fake.metadata_calls()
    assert len(walk(cat)) == 1 + 1 + 1 + 4 + 4 * 15  # evicted listings are rebuilt from the metadata cache
    assert fake.metadata_calls() == before


def test_instance_inodes_follow_the_name_order_of_their_series_and_stay_unique_and_stable():
    """cp -r reads a folder in inode order: numbered in name order, it reads a series as the read-ahead
    expects (in reading order), not at random."""
    from nbiafs.catalog import POSITION_BITS, series_file_inos

    ids = ("Coll", "P1", "1.2.3", "1.2.3.4")
    sops = [f"sop{i}" for i in range(500)]
    inos = series_file_inos("ns", ids, sops)
    assert inos == sorted(inos) and len(set(inos)) == 500 and min(inos) > 1
    assert inos == series_file_inos("ns", ids, sops)  # stable
    assert not set(inos) & set(series_file_inos("ns", ("Coll", "P1", "1.2.3", "1.2.3.5"), sops))
    assert all(ino >> POSITION_BITS == inos[0] >> POSITION_BITS for ino in inos)  # one series, one prefix
