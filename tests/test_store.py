"""The instance store against a fake client: cache hits without calls or databases, one fetch per
instance, streaming, integrity, crashes, full disks, read-ahead under a budget, and the bulk jobs."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fakes import FakeArchive, FakeNbiaClient, fake_dicom_bytes

from nbiafs.catalog import Node
from nbiafs.errors import CacheFullError, NbiaError, OfflineError, RemoteNotFoundError, ServerError, errno_for
from nbiafs.store import InstanceStore
from nbiafs.store.download import MEMORY_LIMIT
from nbiafs.store.index import CacheIndex
from nbiafs.store.readahead import FIRST_WINDOW
from nbiafs.store.zipmode import BOTH, ZIP_ONLY, Trial

WAIT = 10.0  # seconds a test waits for an event before failing (never reached when things work)
SERIES = "1.2.826.0.1.3680043.9.7.1.1.1.1"
N_INSTANCES = 200


def build_store_archive() -> FakeArchive:
    """One series of N_INSTANCES instances of 5000 bytes each."""
    archive = FakeArchive()
    archive.add_collection("Coll-1")
    archive.add_patient("Coll-1", "P1")
    study = archive.add_study("Coll-1", "P1", "1.2.826.0.1.3680043.9.7.1.1.1")
    series = archive.add_series(study, SERIES, number=1)
    for i in range(N_INSTANCES):
        archive.add_instance(series, f"{SERIES}.{i}", number=i + 1, size=5000)
    return archive


def node(i: int, size: int | None = None) -> Node:
    sop = f"{SERIES}.{i}"
    return Node("instance", f"/Coll-1/P1/s/1-{i:03d}.dcm", ino=1000 + i, mtime=0.0,
                size=5000 if size is None else size, collection="Coll-1", patient_id="P1",
                series_uid=SERIES, sop_uid=sop, instance_number=i + 1)


SIBLINGS = tuple(node(i) for i in range(N_INSTANCES))


def sized(client: FakeNbiaClient, i: int, size: int) -> Node:
    n = node(i, size)
    client.archive.data[n.sop_uid] = fake_dicom_bytes(n.sop_uid, size)
    return n


def fetches(client: FakeNbiaClient, n: Node | None = None) -> int:
    return sum(1 for method, args in list(client.call_log)
               if method == "single_image" and (n is None or args[1] == n.sop_uid))


def body(client: FakeNbiaClient, n: Node) -> bytes:
    return client.archive.data[n.sop_uid]


@pytest.fixture
def client() -> FakeNbiaClient:
    return FakeNbiaClient(build_store_archive())


@pytest.fixture
def make_store(tmp_path: Path, client: FakeNbiaClient):
    stores: list[InstanceStore] = []

    def make(**kw) -> InstanceStore:
        kw.setdefault("size_limit", 50 * 1024**2)
        kw.setdefault("namespace", "http://emu|nbia_guest")
        kw.setdefault("workers", 2)
        start = kw.pop("start", True)
        s = InstanceStore(kw.pop("client", client), kw.pop("cache_dir", tmp_path), **kw)
        if start:
            s.start()
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("nbiafs-prefetch") and t.is_alive()]
    assert not leftover, f"threads left running: {leftover}"


def read_all(store: InstanceStore, n: Node) -> bytes:
    """The whole file through a handle; returns once the fetch (if any) has settled in the index."""
    h = store.open(n)
    try:
        return store.read(h, store.size(h) + 100, 0)
    finally:
        store.release(h)
        store.wait_fetched(WAIT, n)


def wait_for(condition, timeout: float = WAIT) -> bool:
    end = threading.Event()
    deadline = __import__("time").monotonic() + timeout
    while not condition():
        if __import__("time").monotonic() > deadline:
            return False
        end.wait(0.01)
    return True


def in_thread(target, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = target(*args)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


# ------------------------------------------------------------------ cache hits
def test_a_cached_instance_is_read_with_no_call_and_no_database(make_store, client, monkeypatch):
    store = make_store()
    n = node(3)
    assert read_all(store, n) == body(client, n)
    connects = []
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: connects.append(a))
    for _ in range(20):  # each open from a brand-new thread, as from libfuse's native threads
        t, out = in_thread(read_all, store, n)
        t.join(WAIT)
        assert out["value"] == body(client, n)
    assert fetches(client, n) == 1 and connects == []
    assert store.stats().hits == 20


def test_a_restart_with_the_same_cache_dir_makes_no_call(make_store, client, tmp_path):
    first = make_store()
    for i in range(5):
        read_all(first, node(i))
    first.close()
    fresh = FakeNbiaClient(build_store_archive())
    second = make_store(client=fresh)
    for i in range(5):
        assert read_all(second, node(i)) == body(client, node(i))
    assert fresh.calls["single_image"] == 0


def test_namespaces_do_not_share_instances(make_store, client):
    guest = make_store(namespace="http://emu|nbia_guest")
    named = make_store(namespace="http://emu|alice")
    read_all(guest, node(1))
    assert not named.contains(node(1))
    read_all(named, node(1))
    assert fetches(client, node(1)) == 2


def test_the_cache_is_plain_files_renamed_into_place(make_store, client, tmp_path):
    store = make_store()
    read_all(store, node(2))
    path = store.cached_path(node(2))
    assert path is not None and path.read_bytes() == body(client, node(2))
    assert not list(tmp_path.rglob("*.part.*"))


# ------------------------------------------------------------------ one fetch per instance
def test_sixteen_concurrent_openers_cause_one_fetch(make_store, client):
    store = make_store()
    n = node(7)
    gate = client.gate("single_image", match=lambda series, sop, size: sop == n.sop_uid)
    threads = [in_thread(read_all, store, n) for _ in range(16)]
    assert gate.wait_entered(1)
    gate.release()
    for t, out in threads:
        t.join(WAIT)
        assert out.get("value") == body(client, n), out.get("error")
    assert fetches(client, n) == 1


def test_concurrent_openers_share_the_error_and_it_is_not_cached(make_store, client):
    store = make_store()
    n = node(8)
    client.fail("single_image", RemoteNotFoundError("500"), times=1)
    gate = client.gate("single_image", match=lambda series, sop, size: sop == n.sop_uid)
    threads = [in_thread(read_all, store, n) for _ in range(4)]
    assert gate.wait_entered(1)
    assert wait_for(lambda: store.stats().joined == 3)  # the other three wait for that fetch
    gate.release()
    for t, out in threads:
        t.join(WAIT)
        assert isinstance(out.get("error"), RemoteNotFoundError)
    assert fetches(client, n) == 1
    assert read_all(store, n) == body(client, n)  # the error was not remembered


def test_a_slow_fetch_does_not_block_another_file(make_store, client):
    store = make_store()
    slow, fast = node(10), node(11)
    gate = client.gate("single_image", match=lambda series, sop, size: sop == slow.sop_uid)
    t, out = in_thread(read_all, store, slow)
    assert gate.wait_entered(1)
    assert read_all(store, fast) == body(client, fast)
    gate.release()
    t.join(WAIT)
    assert out["value"] == body(client, slow)


# ------------------------------------------------------------------ streaming
def test_open_returns_with_the_first_bytes_and_a_read_waits_only_for_its_offset(make_store, client):
    store = make_store()
    n = sized(client, 12, 3_000_000)
    release = client.hold_body(n.sop_uid, after=1_000_000)
    h = store.open(n)  # returns although 2 MB are still to come
    assert store.read(h, 4096, 0) == body(client, n)[:4096]
    assert store.read(h, 4096, 900_000) == body(client, n)[900_000:904_096]
    t, out = in_thread(store.read, h, 4096, 2_000_000)  # beyond what arrived: waits
    t.join(0.2)
    assert t.is_alive()
    release.set()
    t.join(WAIT)
    assert out["value"] == body(client, n)[2_000_000:2_004_096]
    assert store.read(h, 10_000_000, 0) == body(client, n)
    store.release(h)
    assert store.wait_fetched(WAIT, n)  # the last bytes are served a moment before the fetch is recorded
    assert store.cached_path(n) is not None  # complete: renamed into place
    assert read_all(store, n) == body(client, n) and fetches(client, n) == 1


def test_an_open_plans_its_read_ahead_once_claimed_not_after_its_first_bytes(make_store, client):
    store = make_store()
    n = node(20)
    release = client.hold_body(n.sop_uid, after=0)
    planned = threading.Event()
    t, out = in_thread(store.open, n, planned.set)
    assert planned.wait(WAIT)  # the policy heard of the open (its zip and window go out now) ...
    assert t.is_alive()  # ... while the open still waits for the file's first bytes
    release.set()
    t.join(WAIT)
    store.release(out["value"])
    assert store.wait_fetched(WAIT, n)
    cached = threading.Event()
    store.release(store.open(n, cached.set))  # a cached file: at once
    assert cached.is_set() and fetches(client, n) == 1


def test_a_transfer_that_stalls_fails_the_read_and_leaves_nothing_in_the_cache(make_store, client):
    store = make_store()
    n = sized(client, 13, 1_000_000)
    release = client.hold_body(n.sop_uid, after=100_000, fail=ServerError("no byte for 60 s (the transfer stalled)"))
    h = store.open(n)
    assert store.read(h, 1000, 0) == body(client, n)[:1000]
    release.set()
    with pytest.raises(ServerError, match="stalled"):
        store.read(h, 1000, 500_000)
    store.release(h)
    assert store.cached_path(n) is None


def test_memory_stays_bounded_however_big_the_instance(make_store, client):
    import tracemalloc

    store = make_store()
    n = sized(client, 14, 40_000_000)
    tracemalloc.start()
    try:
        h = store.open(n)
        digest = hashlib.md5()
        offset = 0
        while chunk := store.read(h, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        store.release(h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == hashlib.md5(body(client, n)).hexdigest()
    client.archive.data.clear()  # what the fake holds is not the store's
    assert peak < 45_000_000 + 8 * 1024 * 1024  # the fake's own 40 MB body + a few read buffers


# ------------------------------------------------------------------ integrity and crashes
def test_a_complete_body_of_another_length_is_kept_served_whole_and_reported_once(make_store, client):
    reported = []
    store = make_store(on_size_mismatch=lambda ref, size: reported.append((ref.sop_uid, size)))
    n = node(15)
    true = body(client, n)[:-10]
    client.archive.data[n.sop_uid] = true
    h = store.open(n)
    assert store.size(h) == len(true) and store.read(h, 1 << 20, 0) == true
    store.release(h)
    assert read_all(store, n) == true  # the stale node again: still the true bytes, no refetch
    assert reported == [(n.sop_uid, len(true))] and fetches(client, n) == 1


def test_a_body_shorter_than_its_content_length_is_never_cached(make_store, client):
    store = make_store()
    n = node(16)
    client.hold_body(n.sop_uid, after=10**9, announce=6000).set()  # claims 6000, sends 5000
    with pytest.raises(NbiaError):
        read_all(store, n)
    assert store.cached_path(n) is None


def test_a_truncated_cached_file_is_dropped_and_fetched_again(make_store, client):
    store = make_store()
    n = node(17)
    read_all(store, n)
    path = store.cached_path(n)
    assert path is not None
    os.truncate(path, 100)
    assert read_all(store, n) == body(client, n)
    assert fetches(client, n) == 2 and store.stats().corrupt_dropped == 1


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[4])
    from pathlib import Path
    from fakes import FakeNbiaClient, FakeArchive, BodyPlan
    from nbiafs.store import InstanceStore
    import threading

    archive = FakeArchive()
    archive.add_collection("C"); archive.add_patient("C", "P")
    study = archive.add_study("C", "P", "1.2")
    series = archive.add_series(study, sys.argv[2], number=1)
    archive.add_instance(series, sys.argv[3], number=1, size=400_000)
    client = FakeNbiaClient(archive)
    client.hold_body(sys.argv[3], after=200_000)  # never released: the parent kills us here
    store = InstanceStore(client, Path(sys.argv[1]), size_limit=10**8, namespace="ns")
    node = type("N", (), {"series_uid": sys.argv[2], "sop_uid": sys.argv[3], "size": 400_000})()
    handle = store.open(node)
    plan = client._bodies[sys.argv[3]]
    plan.reached.wait(10)
    print("written", flush=True)
    sys.stdin.read()
    """
)


def test_kill_9_mid_fetch_never_leaves_a_file_that_looks_complete(make_store, client, tmp_path):
    n = sized(client, 18, 400_000)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), n.series_uid, n.sop_uid,
                              str(Path(__file__).parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()
    parts = list(tmp_path.rglob("*.part.*"))
    assert parts and parts[0].stat().st_size == 200_000  # what the killed process had written
    store = make_store(namespace="ns")
    assert not store.contains(n)
    assert read_all(store, n) == body(client, n) and fetches(client, n) == 1
    store._index.scan()
    assert not list(tmp_path.rglob("*.part.*"))  # the dead process's part file was removed


def test_a_file_removed_by_another_process_is_fetched_again(make_store, client):
    store = make_store()
    n = node(19)
    read_all(store, n)
    assert store.wait_fetched(WAIT)
    path = store.cached_path(n)
    assert path is not None
    path.unlink()
    assert read_all(store, n) == body(client, n) and fetches(client, n) == 2


# ------------------------------------------------------------------ full disk, offline
def test_enospc_while_writing_serves_from_memory_warns_once_and_leaves_no_part(make_store, client, monkeypatch,
                                                                                caplog, tmp_path):
    import nbiafs.store.download as download_mod

    store = make_store()
    real = download_mod.os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_mod.os, "pwrite", full)
    with caplog.at_level(logging.WARNING, logger="nbiafs.store"):
        assert read_all(store, node(20)) == body(client, node(20))
        assert read_all(store, node(21)) == body(client, node(21))
    monkeypatch.setattr(download_mod.os, "pwrite", real)
    assert caplog.text.count("cannot write to the instance cache") == 1
    assert store.stats().memory_fallbacks == 2 and not store.contains(node(20))
    assert not list(tmp_path.rglob("*.part.*"))


def test_a_body_too_big_for_memory_when_the_disk_is_full_is_enospc(make_store, client, monkeypatch):
    import nbiafs.store.download as download_mod

    monkeypatch.setattr(download_mod, "MEMORY_LIMIT", 10_000)
    monkeypatch.setattr(download_mod.os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    store = make_store()
    n = sized(client, 22, 50_000)
    with pytest.raises(CacheFullError, match="too many to keep in memory") as info:
        h = store.open(n)
        store.read(h, 60_000, 0)
    assert MEMORY_LIMIT > 10_000 and errno_for(info.value) == errno.ENOSPC


def test_offline_serves_the_cache_and_refuses_the_rest(make_store, client, tmp_path):
    online = make_store()
    read_all(online, node(23))
    online.close()
    offline = make_store(offline=True)
    assert read_all(offline, node(23)) == body(client, node(23))
    with pytest.raises(OfflineError):
        offline.open(node(24))
    assert fetches(client) == 1


# ------------------------------------------------------------------ reads, handles, eviction
def test_reads_are_exact_ranges_and_empty_past_the_end(make_store, client):
    store = make_store()
    n = node(25)
    data = body(client, n)
    h = store.open(n)
    for size, offset in ((10, 0), (100, 4990), (4096, 1000), (10, 5000), (1, 99999)):
        assert store.read(h, size, offset) == data[offset:offset + size]
    store.release(h)
    with pytest.raises(OSError) as info:
        store.read(h, 1, 0)
    assert info.value.errno == errno.EBADF


def test_an_open_file_stays_readable_after_eviction(make_store, client):
    store = make_store(size_limit=12_000)
    n = node(26)
    read_all(store, n)
    h = store.open(n)
    for i in range(27, 31):
        read_all(store, node(i))  # evicts node 26
    assert not store.contains(n)
    assert store.read(h, 10_000, 0) == body(client, n)
    store.release(h)


def test_the_bound_holds_and_the_recently_used_stay(make_store, client):
    store = make_store(size_limit=30_000)
    for i in range(40, 45):
        read_all(store, node(i))
    read_all(store, node(40))  # used again: most recent
    for i in range(45, 48):
        read_all(store, node(i))
    assert store.volume() <= 30_000
    assert store.contains(node(40)) and not store.contains(node(41))


def test_evict_all_removes_only_this_namespace(make_store, client):
    a = make_store(namespace="ns-a")
    b = make_store(namespace="ns-b")
    read_all(a, node(1))
    read_all(b, node(1))
    assert a.wait_fetched(WAIT) and b.wait_fetched(WAIT)
    assert a.evict_all() == 1
    assert not a.contains(node(1)) and b.contains(node(1))


# ------------------------------------------------------------------ read-ahead
# (by single images: the series zip, which joins in for readers from a series' start, is tested below)
def test_the_first_open_of_a_series_fetches_that_file_only(make_store, client):
    store = make_store()
    read_all(store, SIBLINGS[0])
    store.on_open(SIBLINGS[0], SIBLINGS)
    assert store.wait_prefetched(WAIT)
    assert fetches(client) == 1


def test_a_reader_walking_in_order_is_read_ahead_of_and_each_file_is_fetched_once(make_store, client):
    store = make_store(series_zip=False)
    for n in SIBLINGS[:30]:
        read_all(store, n)
        store.on_open(n, SIBLINGS)
    assert store.wait_prefetched(WAIT)
    assert store.stats().prefetches > 10  # files arrived before they were opened
    assert all(fetches(client, n) == 1 for n in SIBLINGS[:40] if store.contains(n))
    assert sum(store.contains(n) for n in SIBLINGS[30:]) >= 16  # the window ran ahead of the reader


@pytest.mark.parametrize("series_zip", [False, True])
def test_files_another_process_cached_are_not_fetched_again_by_a_reader_walking_in_order(make_store, client,
                                                                                        series_zip):
    reader = make_store(series_zip=series_zip)
    assert reader._index._scanned.wait(WAIT)  # its scan of the cache ended: it found nothing
    writer = make_store(series_zip=False)  # another process on the same cache dir (nbiafs prefetch)
    for n in SIBLINGS[:60]:
        read_all(writer, n)
    paths = [reader._index.path_for(n.series_uid, n.sop_uid) for n in SIBLINGS[:60]]
    assert all(os.path.exists(p) and reader._index.known(p) is None for p in paths)
    for n in SIBLINGS[:30]:  # its planning knows only memory: the disk is looked at before each fetch
        assert read_all(reader, n) == body(client, n)
        reader.on_open(n, SIBLINGS)
    assert reader.wait_prefetched(WAIT)
    assert all(fetches(client, n) == 1 for n in SIBLINGS[:60])  # the writer's fetch only
    assert client.calls["image_zip"] == 0  # the zip would bring files that are there


@pytest.mark.parametrize("scan", ["ended", "held"])
def test_a_reader_of_a_cached_series_has_its_next_files_hinted_to_the_disk_a_few_at_a_time(make_store, client,
                                                                                           monkeypatch, scan, request):
    monkeypatch.setattr("nbiafs.store.READ_SOON_AHEAD", 4 * 5000)  # four files ahead at most
    first = make_store(series_zip=False)
    for n in SIBLINGS[:60]:  # cache them first
        read_all(first, n)
    first.close()
    release = threading.Event()
    request.addfinalizer(release.set)
    if scan == "held":  # the remount's scan of a big cache is still running while the reader walks
        original = CacheIndex.scan
        monkeypatch.setattr(CacheIndex, "scan", lambda self: release.wait(WAIT) and original(self))
    store = make_store(series_zip=False)  # a remount: nothing known of the reader
    if scan == "ended":
        assert store._index._scanned.wait(WAIT)
    hinted: list[list[str]] = []
    monkeypatch.setattr(store._read_soon, "hint", lambda paths: hinted.append(list(paths)))
    for n in SIBLINGS[:40]:
        read_all(store, n)
        store.on_open(n, SIBLINGS)
    flat = [os.path.basename(p) for h in hinted for p in h]
    expected = [os.path.basename(store.cached_path(n) or "") for n in SIBLINGS[2:44]]
    assert flat == expected  # every next file once, in order, ending four files past the reader
    assert max(len(h) for h in hinted) <= 4  # never a whole window at once
    assert all(fetches(client, n) == 1 for n in SIBLINGS[:60])  # a cached file is not fetched again


def test_one_file_per_series_fetches_nothing_ahead(make_store, client):
    store = make_store()
    for i in (0, 50, 3, 120, 77):  # random access, or a header scan
        read_all(store, SIBLINGS[i])
        store.on_open(SIBLINGS[i], SIBLINGS)
    assert store.wait_prefetched(WAIT)
    assert fetches(client) == 5


def test_read_ahead_is_bounded_by_a_share_of_the_cache(make_store, client):
    store = make_store(size_limit=200_000, read_ahead_share=0.1)  # 20 KB ahead: four files
    for n in SIBLINGS[:12]:
        read_all(store, n)
        store.on_open(n, SIBLINGS)
    assert store.wait_prefetched(WAIT)
    ahead = [n for n in SIBLINGS[12:] if store.contains(n)]
    assert len(ahead) <= 5


def test_an_open_joins_a_read_ahead_in_flight(make_store, client):
    store = make_store(series_zip=False)
    for n in SIBLINGS[:3]:
        read_all(store, n)
        store.on_open(n, SIBLINGS)
    target = SIBLINGS[4]
    assert store.wait_prefetched(WAIT)
    assert read_all(store, target) == body(client, target)
    assert fetches(client, target) == 1


def test_close_drops_queued_read_ahead_and_joins_the_workers(make_store, client):
    store = make_store(workers=1, series_zip=False)
    gate = client.gate("single_image", match=lambda series, sop, size: sop == SIBLINGS[2].sop_uid)
    read_all(store, SIBLINGS[0])
    store.on_open(SIBLINGS[0], SIBLINGS)
    t, out = in_thread(read_all, store, SIBLINGS[1])
    t.join(WAIT)
    store.on_open(SIBLINGS[1], SIBLINGS)  # asks for 2 and 3: 2 is held
    assert gate.wait_entered(1)
    threading.Timer(0.3, gate.release).start()
    store.close()
    assert fetches(client) <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("nbiafs-prefetch") and t.is_alive()]


def test_read_ahead_errors_are_counted_and_not_remembered(make_store, client):
    store = make_store(series_zip=False)
    client.fail("single_image", RemoteNotFoundError("500"), match=lambda s, sop, z: sop == SIBLINGS[2].sop_uid,
                times=1)
    for n in SIBLINGS[:2]:
        read_all(store, n)
        store.on_open(n, SIBLINGS)
    assert store.wait_prefetched(WAIT)
    assert store.stats().prefetch_errors == 1
    assert read_all(store, SIBLINGS[2]) == body(client, SIBLINGS[2])


def test_read_ahead_before_start_does_nothing(make_store, client):
    store = make_store(start=False)
    assert store.prefetch(SIBLINGS[:5]) == 0


# ------------------------------------------------------------------ the series zip
def zips(client: FakeNbiaClient) -> int:
    return sum(1 for method, _args in list(client.call_log) if method == "image_zip")


def walk(store: InstanceStore, client: FakeNbiaClient, positions) -> None:
    for i in positions:
        assert read_all(store, SIBLINGS[i]) == body(client, SIBLINGS[i])
        store.on_open(SIBLINGS[i], SIBLINGS)


def test_a_series_read_from_its_start_comes_through_its_zip_and_singles_each_file_once(make_store, client):
    store = make_store(workers=2)
    walk(store, client, range(N_INSTANCES))
    assert store.wait_prefetched(WAIT)
    stats = store.stats()
    assert zips(client) == 1 and stats.zips == 1
    assert stats.zip_files > 0
    # no instance came twice: what the zip wrote was never fetched alone, and the other way round
    assert fetches(client) + stats.zip_files == N_INSTANCES
    assert all(fetches(client, n) <= 1 for n in SIBLINGS)


class _Verdict(Trial):
    """A trial that decides at the zip's first byte (the measurement itself is tests/test_zipmode.py)."""

    __slots__ = ("verdict",)

    def add(self, now: float, nbytes: int, *, via_zip: bool, source: object = None) -> bool:
        if self.decided or not via_zip:
            return False
        self.phase = self.verdict
        return True


def verdict(phase: str):
    def make() -> Trial:
        trial = _Verdict()
        trial.verdict = phase
        return trial
    return make


def test_a_zip_measured_faster_alone_brings_the_series_and_openers_wait_for_it(make_store, client):
    store = make_store(workers=2, zip_trial=verdict(ZIP_ONLY))
    walk(store, client, range(N_INSTANCES))
    assert store.wait_prefetched(WAIT)
    stats = store.stats()
    assert stats.zips == 1 and stats.zips_alone == 1
    assert stats.prefetches == 0  # no single image ahead of the reader: the zip had the series
    # only the files opened before the zip started were fetched alone; openers after it joined the zip
    assert fetches(client) <= 3
    assert fetches(client) + stats.zip_files == N_INSTANCES
    assert all(fetches(client, n) <= 1 for n in SIBLINGS)


def test_the_next_zip_starts_from_a_recent_verdict_without_measuring_again(make_store, client):
    made: list[_Verdict] = []

    def counting() -> Trial:  # measured, the first zip would go alone and the second with singles
        trial = verdict(BOTH if made else ZIP_ONLY)()
        made.append(trial)
        return trial

    store = make_store(workers=2, zip_trial=counting)
    walk(store, client, range(40))
    assert store.wait_prefetched(WAIT)
    assert made[0].phase == ZIP_ONLY
    store.evict_all()
    client.reset_counts()
    walk(store, client, range(40))  # the same reading again: a second zip
    assert store.wait_prefetched(WAIT)
    stats = store.stats()
    assert stats.zips == 2 and stats.zips_alone == 2
    assert stats.prefetches == 0  # the second zip was alone from its start: no single ran beside it
    assert made[1].phase == ZIP_ONLY  # the verdict of the first, not a measurement of its own


class _Broken(Trial):
    __slots__ = ()

    def add(self, now: float, nbytes: int, *, via_zip: bool, source: object = None) -> bool:
        raise RuntimeError("a bug in the measurement")


def test_a_measurement_that_breaks_never_fails_a_fetch(make_store, client):
    store = make_store(workers=2, zip_trial=_Broken)
    walk(store, client, range(60))  # exact bytes
    assert store.wait_prefetched(WAIT)
    stats = store.stats()
    assert stats.zips == 1 and stats.fetch_errors == 0 and stats.prefetch_errors == 0


def test_an_opener_stops_waiting_for_a_zip_that_stalls_and_singles_take_over(make_store, client, monkeypatch):
    import nbiafs.store as store_module

    monkeypatch.setattr(store_module, "ZIP_WAIT", 1.0)
    client.zip_hold_at = 10
    store = make_store(workers=2, zip_trial=verdict(ZIP_ONLY))
    try:
        started = time.monotonic()
        walk(store, client, range(40))  # exact bytes, the zip held before file 10
        took = time.monotonic() - started
        # one opener waited out ZIP_WAIT, then none did (the next two were within the zip's reach too)
        assert took < 2.5 * 1.0, took
        assert store.stats().prefetches > 0  # read-ahead singles were let go
    finally:
        client.zip_go_on.set()
    assert store.wait_prefetched(WAIT)
    assert all(fetches(client, n) <= 1 for n in SIBLINGS)


def test_a_reading_order_that_is_not_the_zips_never_makes_an_opener_wait_it_out(make_store, client, monkeypatch):
    # --layout uid: files are read in UID order, the zip comes in InstanceNumber order
    import nbiafs.store as store_module

    monkeypatch.setattr(store_module, "ZIP_WAIT", 5.0)
    order = tuple(sorted(SIBLINGS, key=lambda n: hashlib.sha1(n.sop_uid.encode()).hexdigest()))
    store = make_store(workers=2, zip_trial=verdict(ZIP_ONLY))
    started = time.monotonic()
    for n in order:
        assert read_all(store, n) == body(client, n)
        store.on_open(n, order)
    assert time.monotonic() - started < 5.0  # no opener waited for the zip until ZIP_WAIT
    assert store.wait_prefetched(WAIT)
    assert all(fetches(client, n) <= 1 for n in SIBLINGS)


def test_the_zip_goes_no_further_than_the_read_ahead_window(make_store, client):
    store = make_store(workers=1)
    gate = client.gate("single_image", match=lambda series, sop, size: sop == SIBLINGS[3].sop_uid)
    walk(store, client, range(2))  # window 2: files 2 and 3; the single worker is held on 3
    assert wait_for(lambda: store.contains(SIBLINGS[2]))
    assert client.zip_members_sent <= 5  # the zip waits at the window's end (positions 0-3, then one)
    assert not any(store.contains(n) for n in SIBLINGS[4:])
    gate.release()
    assert store.wait_prefetched(WAIT)
    assert not any(store.contains(n) for n in SIBLINGS[4:])


def test_no_zip_for_a_header_scan_random_access_or_a_reader_from_the_middle(make_store, client):
    store = make_store()
    walk(store, client, (0, 50, 3, 120, 77))
    walk(store, client, range(100, 110))
    assert store.wait_prefetched(WAIT)
    assert zips(client) == 0


def test_no_zip_for_a_series_whose_next_files_are_cached(make_store, client):
    store = make_store()
    walk(store, client, (5, 6, 7))  # cached by an earlier reader
    store.close()
    store = make_store()
    walk(store, client, range(4))
    assert store.wait_prefetched(WAIT)
    assert zips(client) == 0


def test_files_from_the_zip_carry_the_servers_md5_and_a_mismatch_is_dropped(make_store, client):
    bad = SIBLINGS[150]
    client.zip_md5s[bad.sop_uid] = "0" * 32
    # single images of the rest fail at once (and are not asked again): the zip brings all of it
    client.fail("single_image", RemoteNotFoundError("500"), match=lambda s, sop, z: int(sop.rsplit(".", 1)[1]) >= 10)
    store = make_store(workers=1)
    walk(store, client, range(10))
    assert wait_for(lambda: not store._zips)  # the zip read to its end, md5hashes.csv included
    client.clear_failures()
    from_zip = [n for n in SIBLINGS if store.md5_of(n) is not None]
    assert from_zip, "no file of the zip got the server's md5"
    assert all(store.md5_of(n) == hashlib.md5(body(client, n)).hexdigest() for n in from_zip)
    if fetches(client, bad) == 0:  # the zip wrote it: the md5 list dropped it
        assert not store.contains(bad) and store.stats().md5_mismatches == 1
    assert read_all(store, bad) == body(client, bad)


def test_a_zip_that_breaks_off_leaves_every_file_readable(make_store, client):
    client.zip_break_at = 12
    store = make_store(workers=2)
    walk(store, client, range(N_INSTANCES))
    assert store.wait_prefetched(WAIT)
    assert zips(client) == 1
    assert all(fetches(client, n) <= 1 for n in SIBLINGS)


def test_close_stops_a_zip_waiting_for_its_reader(make_store, client):
    store = make_store(workers=1)
    walk(store, client, range(3))
    assert store.wait_prefetched(WAIT)
    assert store._zips  # waiting at the end of the window
    store.close()
    assert not [t for t in threading.enumerate() if t.name == "nbiafs-zip" and t.is_alive()]


def test_the_zip_can_be_turned_off(make_store, client):
    store = make_store(series_zip=False)
    walk(store, client, range(40))
    assert store.wait_prefetched(WAIT)
    assert zips(client) == 0


# ------------------------------------------------------------------ probe
def _dicom_bytes(instance_number: int) -> bytes:
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.Dataset()
    ds.InstanceNumber = instance_number
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_the_probe_fetches_once_keeps_the_file_and_reads_the_instance_number(make_store, client):
    store = make_store()
    n = node(60)
    client.archive.data[n.sop_uid] = _dicom_bytes(61)
    assert store.probe(SERIES, n.sop_uid) == (len(body(client, n)), 61)
    assert store.probe(SERIES, n.sop_uid) == (len(body(client, n)), 61)
    assert read_all(store, node(60, len(body(client, n)))) == body(client, n)
    assert fetches(client, n) == 1


# ------------------------------------------------------------------ the bulk jobs of the commands
def test_ensure_fetches_what_is_missing_checks_md5s_and_a_rerun_fetches_nothing(make_store, client):
    store = make_store()
    read_all(store, node(70))  # already cached (md5 never checked yet)
    nodes = [node(i) for i in range(70, 80)]
    report = store.ensure(nodes)
    assert report.ok and {o.status for o in report.outcomes} == {"cached", "fetched"}
    assert all(store.md5_of(n) == hashlib.md5(body(client, n)).hexdigest() for n in nodes)
    before = fetches(client)
    md5_calls = client.calls["md5_for_image"]
    again = store.ensure(nodes)
    assert again.ok and all(o.status == "cached" for o in again.outcomes)
    assert fetches(client) == before and client.calls["md5_for_image"] == md5_calls  # nothing asked again


@pytest.mark.parametrize("verify_md5", [True, False])
def test_ensure_fetches_again_a_cached_file_that_went_away_or_was_cut_under_the_index(make_store, client,
                                                                                      verify_md5):
    store = make_store()
    gone, cut = node(81), node(82)
    report = store.ensure([gone, cut])
    assert report.ok
    os.unlink(store.cached_path(gone))  # another process evicted it, or a hand
    with open(store.cached_path(cut), "r+b") as fh:
        fh.truncate(10)
    again = store.ensure([gone, cut], verify_md5=verify_md5)
    assert again.ok and {o.status for o in again.outcomes} == {"fetched"}
    for n in (gone, cut):
        assert Path(store.cached_path(n)).read_bytes() == body(client, n)


def test_a_body_that_is_not_the_servers_file_is_fetched_again_then_reported_never_kept(make_store, client,
                                                                                      monkeypatch):
    store = make_store()
    n = node(81)
    true = body(client, n)
    monkeypatch.setattr(client, "md5_for_image", lambda sop: hashlib.md5(b"the true file").hexdigest())
    report = store.ensure([n])
    assert not report.ok and report.failed[0].node == n and "md5" in report.failed[0].error
    assert fetches(client, n) == 2 and store.cached_path(n) is None
    assert true == body(client, n)


def test_verify_drops_a_cached_file_altered_on_disk(make_store, client):
    store = make_store()
    nodes = [node(i) for i in range(90, 93)]
    assert store.ensure(nodes).ok
    path = store.cached_path(nodes[1])
    assert path is not None
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # same length, another byte
    path.write_bytes(bytes(data))
    report = store.verify_all()
    assert report.checked == 3 and report.dropped == [str(path)]
    assert not store.contains(nodes[1]) and store.contains(nodes[0])


def test_info_and_clear_cover_every_namespace(make_store, client, tmp_path):
    a = make_store(namespace="http://one|nbia_guest")
    b = make_store(namespace="http://two|alice")
    read_all(a, node(1))
    read_all(a, node(2))
    read_all(b, node(3))
    info = a.info()
    assert info.instances == 3 and info.series == 2 and info.bytes == 15_000
    assert info.namespaces == {"http://one|nbia_guest": 2, "http://two|alice": 1}
    assert a.clear() == 3
    assert a.info().instances == 0


def test_an_old_diskcache_store_in_the_cache_dir_is_ignored(make_store, client, tmp_path):
    (tmp_path / "instances").mkdir()
    (tmp_path / "instances" / "cache.db").write_bytes(b"SQLite format 3\x00 from an older nbiafs")
    store = make_store()
    assert read_all(store, node(4)) == body(client, node(4))


def test_the_index_scan_learns_what_another_process_wrote(tmp_path, client, make_store):
    writer = make_store()
    read_all(writer, node(5))
    index = CacheIndex(tmp_path, "http://emu|nbia_guest", 10**9)
    assert index.scan() == 1 and index.total == 5000


def test_known_answers_from_memory_once_scanned_and_lookup_adopts_what_another_process_wrote(tmp_path, make_store,
                                                                                            monkeypatch):
    index = CacheIndex(tmp_path, "http://emu|nbia_guest", 10**9)
    assert index.scan() == 0
    writer = make_store()
    read_all(writer, node(6))  # written after the scan, by another process
    path = index.path_for(SERIES, node(6).sop_uid)
    with monkeypatch.context() as m:
        m.setattr(os, "stat", lambda *a, **k: pytest.fail("known() looked at the disk"))
        assert index.known(path) is None
    entry = index.lookup(path)
    assert entry is not None and index.known(path) == entry and index.total == 5000


def test_known_looks_at_the_disk_until_the_start_scan_has_ended(tmp_path, make_store):
    writer = make_store()
    read_all(writer, node(6))
    index = CacheIndex(tmp_path, "http://emu|nbia_guest", 10**9)  # a remount whose scan has not ended
    path = index.path_for(SERIES, node(6).sop_uid)
    entry = index.known(path)
    assert entry is not None and entry.size == 5000 and index.total == 5000
    assert index.known(index.path_for(SERIES, node(7).sop_uid)) is None  # not cached: a miss, still


def test_md5s_of_a_series_are_md5_of_each_and_a_series_never_cached_is_one_look_at_the_disk(make_store,
                                                                                             monkeypatch):
    store = make_store()
    nodes = [node(i) for i in range(6)]
    assert store.ensure(nodes[:3]).ok  # checked against the server: their md5s are known
    assert store.md5s_of(nodes) == [store.md5_of(n) for n in nodes]
    assert all(store.md5s_of(nodes[:3])) and store.md5s_of(nodes[3:]) == [None] * 3
    other = [dataclasses.replace(n, series_uid="1.2.826.0.1.3680043.9.7.1.9", sop_uid=f"1.2.9.{i}")
             for i, n in enumerate(nodes)]
    monkeypatch.setattr(store._index, "lookup", lambda path: pytest.fail(f"looked for {path}"))
    assert store.md5s_of(other) == [None] * 6  # its folder does not exist: no file of it was asked for


def test_cache_paths_are_remembered_within_their_bound_and_stay_what_the_uids_make(tmp_path, monkeypatch):
    from nbiafs.store import index as index_mod

    monkeypatch.setattr(index_mod, "PATHS_KEPT", 8)
    index = CacheIndex(tmp_path, "http://emu|nbia_guest", 10**9)
    hostile = "../../etc/passwd"
    for i in range(20):
        path = index.path_for("1.2.3", f"1.2.3.{i}")
        assert path == os.path.join(index.dir, "1.2.3", f"1.2.3.{i}.dcm")
        assert index.path_for("1.2.3", f"1.2.3.{i}") is path
        assert len(index._paths) <= 8
    outside = index.path_for(hostile, hostile)
    assert os.path.dirname(os.path.dirname(outside)) == str(index.dir) and ".." not in outside


# ---------------------------------------------------------------------------------- from series to series
def three_series() -> tuple[FakeNbiaClient, list[tuple[Node, ...]]]:
    """Three series of 40 instances in one study (a study read folder after folder)."""
    archive = FakeArchive()
    archive.add_collection("Coll-1")
    archive.add_patient("Coll-1", "P1")
    study = archive.add_study("Coll-1", "P1", "1.2.826.0.1.3680043.9.7.1.1.2")
    all_series = []
    for s in range(3):
        uid = f"1.2.826.0.1.3680043.9.7.1.1.2.{s + 1}"
        series = archive.add_series(study, uid, number=s + 1)
        nodes = []
        for i in range(40):
            archive.add_instance(series, f"{uid}.{i}", number=i + 1, size=5000)
            nodes.append(Node("instance", f"/Coll-1/P1/s/{s + 1}/1-{i:03d}.dcm", ino=5000 + 100 * s + i, mtime=0.0,
                              size=5000, collection="Coll-1", patient_id="P1", series_uid=uid,
                              sop_uid=f"{uid}.{i}", instance_number=i + 1))
        all_series.append(tuple(nodes))
    return FakeNbiaClient(archive), all_series


def open_in_order(store: InstanceStore, client: FakeNbiaClient, files, positions) -> None:
    for i in positions:
        assert read_all(store, files[i]) == body(client, files[i])
        store.on_open(files[i], files)


def test_a_reader_that_read_a_series_to_its_end_walks_on_into_the_next_from_its_first_file(make_store):
    client, (a, b, _) = three_series()
    store = make_store(client=client, series_zip=False)
    open_in_order(store, client, a, range(40))
    assert store.wait_prefetched(WAIT)
    open_in_order(store, client, b, [0])  # one open of the next series' first file
    assert store.wait_prefetched(WAIT)
    assert all(store.contains(n) for n in b[:3])  # its window opened at once: files 1 and 2 came too
    assert store.stats().walks_on == 1
    assert all(fetches(client, n) == 1 for n in a + b if store.contains(n))


def test_the_next_series_zip_starts_at_its_first_open_after_a_series_read_to_its_end(make_store):
    client, (a, b, _) = three_series()
    store = make_store(client=client, workers=2)
    open_in_order(store, client, a, range(40))
    assert store.wait_prefetched(WAIT)
    assert zips(client) == 1
    open_in_order(store, client, b, [0])
    assert wait_for(lambda: zips(client) == 2)  # without a second open
    open_in_order(store, client, b, range(1, 40))
    assert store.wait_prefetched(WAIT)
    assert all(fetches(client, n) <= 1 for n in b)


def test_a_header_scan_after_a_series_read_to_its_end_pays_for_one_window_once(make_store):
    client, series = three_series()
    a, b, c = series
    store = make_store(client=client, series_zip=False)
    open_in_order(store, client, a, range(40))
    assert store.wait_prefetched(WAIT)
    before = fetches(client)
    for files in (b, c):  # the first file of each series: a scan, not a walk
        open_in_order(store, client, files, [0])
    assert store.wait_prefetched(WAIT)
    assert fetches(client) - before == 1 + FIRST_WINDOW + 1  # b's first file and window once, c's file only
    assert not store.contains(c[1]) and store.stats().walks_on == 1


def test_the_zip_of_a_series_guessed_wrongly_stops_when_the_scan_moves_on(make_store):
    client, (a, b, c) = three_series()
    store = make_store(client=client, workers=2)
    open_in_order(store, client, a, range(40))
    assert store.wait_prefetched(WAIT)
    open_in_order(store, client, b, [0])
    assert wait_for(lambda: zips(client) == 2)  # b guessed as walked: its zip started at the first open
    open_in_order(store, client, c, [0])  # but the reader scans: b's zip has no reader, and stops
    assert wait_for(lambda: b[0].series_uid not in store._zips)
    assert store.wait_prefetched(WAIT) and zips(client) == 2
    assert sum(store.contains(n) for n in b) <= 1 + FIRST_WINDOW + 1 and not store.contains(c[1])


def test_cached_files_of_a_readers_window_are_read_from_disk_ahead_of_it(make_store, client, monkeypatch):
    store = make_store(series_zip=False)
    for n in SIBLINGS[:12]:
        read_all(store, n)  # all cached
    assert store.wait_fetched(WAIT)
    hinted: list[str] = []
    done = threading.Event()

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        hinted.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(hinted) >= 5:
            done.set()

    monkeypatch.setattr(os, "posix_fadvise", advise)
    for n in SIBLINGS[:3]:  # a reader walking the cached files in order (after a remount: cold pages)
        store.on_open(n, SIBLINGS)
    assert done.wait(WAIT)  # the window's cached files (positions 2..6), from the hinting thread
    expected = {store._index.path_for(n.series_uid, n.sop_uid) for n in SIBLINGS[2:7]}
    assert set(hinted) == expected
    assert fetches(client) == 12  # a hint fetches nothing
