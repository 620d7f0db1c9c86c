"""Tests of the instance store: cache hits without API calls, single flight, integrity, full disk, prefetch."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from fakes import FakeArchive, FakeNbiaClient, fake_dicom_bytes

import nbiafs.store as store_mod
from nbiafs.catalog import Node
from nbiafs.errors import OfflineError, ServerError
from nbiafs.store import InstanceStore

WAIT = 10.0  # seconds any test waits for an event before failing (never reached when things work)
SERIES = "1.2.826.0.1.3680043.9.7.1.1.1.1"
N_INSTANCES = 400


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
    """The catalog node of instance ``i`` (of exact size ``size``, default 5000 as in the archive)."""
    sop = f"{SERIES}.{i}"
    return Node("instance", f"/Coll-1/P1/s/1-{i:03d}.dcm", ino=1000 + i, mtime=0.0,
                size=5000 if size is None else size, collection="Coll-1", patient_id="P1",
                series_uid=SERIES, sop_uid=sop, instance_number=i + 1)


def sized(client: FakeNbiaClient, i: int, size: int) -> Node:
    """Instance ``i`` made ``size`` bytes long on the fake server, and its node."""
    n = node(i, size)
    client.archive.data[n.sop_uid] = fake_dicom_bytes(n.sop_uid, size)
    return n


def fetches(client: FakeNbiaClient, n: Node | None = None) -> int:
    """single_image calls made (for ``n`` only, when given)."""
    return sum(1 for method, args in list(client.call_log)
               if method == "single_image" and (n is None or args[1] == n.sop_uid))


def hold(client: FakeNbiaClient, n: Node):
    """A gate holding every fetch of ``n`` until released."""
    return client.gate("single_image", match=lambda series, sop, size: sop == n.sop_uid)


def body(client: FakeNbiaClient, n: Node) -> bytes:
    return client.archive.data[n.sop_uid]


class Waiters:
    """Counts threads waiting on a single-flight fetch (installed by the ``waiters`` fixture)."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, WAIT), f"only {self.count} waiters"


@pytest.fixture
def waiters(monkeypatch: pytest.MonkeyPatch) -> Waiters:
    w = Waiters()

    class CountingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            with w.cond:
                w.count += 1
                w.cond.notify_all()
            return super().wait(timeout)

    class CountingFlight(store_mod.Flight):
        def __init__(self) -> None:
            super().__init__()
            self.done = CountingEvent()

    monkeypatch.setattr(store_mod, "Flight", CountingFlight)
    return w


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
        s = InstanceStore(kw.pop("client", client), kw.pop("cache_dir", tmp_path), **kw)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("nbiafs-prefetch")]
    assert not leftover, f"threads left running: {leftover}"


def read_all(store: InstanceStore, n: Node) -> bytes:
    h = store.open(n)
    try:
        return store.read(h, n.size + 100, 0)
    finally:
        store.release(h)


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


def fresh_client() -> FakeNbiaClient:
    return FakeNbiaClient(build_store_archive())


# ------------------------------------------------------------------ cache hits


def test_cached_instance_is_read_with_zero_api_calls(make_store, client):
    store = make_store()
    n = node(1)
    assert read_all(store, n) == body(client, n)
    assert client.total_calls() == 1
    for _ in range(3):
        assert read_all(store, n) == body(client, n)
    assert client.total_calls() == 1
    st = store.stats()
    assert (st.hits, st.misses, st.fetches, st.bytes_fetched) == (3, 1, 1, n.size)
    assert store.contains(n)


def test_restart_with_same_cache_dir_makes_zero_api_calls(make_store, client):
    first = make_store()
    nodes = [node(i) for i in range(5)]
    for n in nodes:
        read_all(first, n)
    first.close()
    fresh = fresh_client()
    second = make_store(client=fresh)
    for n in nodes:
        assert read_all(second, n) == body(client, n)
    assert fresh.total_calls() == 0


def test_namespaces_do_not_share_instances(make_store, client):
    named = make_store(namespace="http://emu|alice")
    guest = make_store(namespace="http://emu|nbia_guest")
    n = node(1)
    read_all(named, n)
    assert not guest.contains(n)
    read_all(guest, n)
    assert fetches(client, n) == 2


# ------------------------------------------------------------------ single flight


def test_sixteen_concurrent_openers_cause_one_fetch(make_store, client, waiters):
    store = make_store()
    n = sized(client, 7, 300_000)
    gate = hold(client, n)
    barrier = threading.Barrier(16)

    def opener() -> bytes:
        barrier.wait(WAIT)
        return read_all(store, n)

    runs = [in_thread(opener) for _ in range(16)]
    assert gate.wait_entered(1)
    waiters.wait_for(15)  # every other opener is parked on the one fetch
    gate.release()
    for t, out in runs:
        t.join(WAIT)
        assert out.get("value") == body(client, n), out.get("error")
    assert fetches(client, n) == 1
    assert store.stats().joined == 15


def test_concurrent_openers_share_the_error_and_it_is_not_cached(make_store, client, waiters):
    store = make_store()
    n = node(8)
    gate = hold(client, n)
    client.fail("single_image", ServerError("503 after retries"), times=1)
    runs = [in_thread(read_all, store, n) for _ in range(4)]
    assert gate.wait_entered(1)
    waiters.wait_for(3)
    gate.release()
    for t, out in runs:
        t.join(WAIT)
        assert isinstance(out.get("error"), ServerError)
    assert fetches(client, n) == 1
    assert not store.contains(n)
    assert read_all(store, n) == body(client, n)  # the next open tries again
    assert fetches(client, n) == 2


def test_waiting_for_a_stuck_fetch_is_bounded(make_store, client):
    store = make_store(wait_timeout=0.2)
    n = node(9)
    gate = hold(client, n)
    leader, out = in_thread(read_all, store, n)
    assert gate.wait_entered(1)
    with pytest.raises(ServerError, match="gave up waiting"):
        store.open(n)
    gate.release()
    leader.join(WAIT)
    assert out["value"] == body(client, n)


def test_slow_fetch_does_not_block_another_file(make_store, client):
    store = make_store()
    slow, fast = node(1), node(2)
    gate = hold(client, slow)
    t, out = in_thread(read_all, store, slow)
    assert gate.wait_entered(1)
    assert read_all(store, fast) == body(client, fast)
    assert t.is_alive()
    gate.release()
    t.join(WAIT)
    assert out["value"] == body(client, slow)


# ------------------------------------------------------------------ integrity


def test_a_complete_body_of_another_length_is_kept_served_whole_and_reported_once(tmp_path, client):
    # The client returns only bodies complete by their own Content-Length: a length other than the
    # metadata's means the metadata was wrong. Fetching again would give the same bytes, again and again.
    from nbiafs.store import InstanceStore

    reported = []
    store = InstanceStore(client, tmp_path / "c", size_limit=50 * 1024**2, namespace="ns", workers=0,
                          on_size_mismatch=lambda ref, true_size: reported.append((ref.sop_uid, true_size)))
    try:
        n = node(3)
        true = body(client, n)[:-10]
        client.archive.data[n.sop_uid] = true
        handle = store.open(n)
        assert store.size(handle) == len(true) and store.read(handle, 1 << 20, 0) == true
        store.release(handle)
        assert reported == [(n.sop_uid, len(true))]
        corrected = node(3, size=len(true))  # what the catalog shows from now on
        assert read_all(store, corrected) == true
        assert fetches(client, n) == 1 and store.stats().size_mismatches == 1
    finally:
        store.close()


def test_truncated_cache_file_is_dropped_and_refetched(make_store, client):
    store = make_store()
    n = node(4)
    read_all(store, n)
    with store._cache.get(store._key(n), read=True) as f:
        path = f.name
    os.truncate(path, 100)
    assert read_all(store, n) == body(client, n)
    assert fetches(client, n) == 2
    assert store.stats().corrupt_dropped == 1
    assert read_all(store, n) == body(client, n)
    assert fetches(client, n) == 2


def test_cached_value_of_another_size_than_the_node_is_not_served(make_store, client):
    store = make_store()
    read_all(store, node(5))
    bigger = sized(client, 5, 6000)  # the catalog now knows another exact size: the cached bytes are wrong
    assert read_all(store, bigger) == body(client, bigger)
    assert fetches(client, bigger) == 2


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nbiafs.store import InstanceStore

    class Reader:  # hands diskcache one large chunk, then blocks as a slow download would
        calls = 0
        def read(self, n):
            Reader.calls += 1
            if Reader.calls == 1:
                return b"x" * 200_000
            print("written", flush=True)
            sys.stdin.read()  # never returns: the parent kills us here
            return b""

    store = InstanceStore(None, Path(sys.argv[1]), size_limit=10**8, namespace="ns")
    node = type("N", (), {"series_uid": sys.argv[2], "sop_uid": sys.argv[3], "size": 400_000})()
    store._cache.set(store._key(node), Reader(), read=True, tag=400_000)
    """
)


def test_kill_9_during_a_cache_write_never_leaves_a_servable_value(make_store, client, tmp_path):
    n = sized(client, 6, 400_000)
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), n.series_uid, n.sop_uid],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()
    partial = [p for p in (tmp_path / "instances").rglob("*.val") if p.stat().st_size == 200_000]
    assert partial, "the child should have left a partial value file"
    store = make_store(namespace="ns")
    assert not store.contains(n)
    assert read_all(store, n) == body(client, n)
    assert fetches(client, n) == 1


# ------------------------------------------------------------------ full disk, offline


def test_full_disk_still_serves_fetched_bytes_and_warns_once(make_store, client, monkeypatch, caplog):
    store = make_store()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store._cache, "set", full)
    caplog.set_level(logging.WARNING, logger="nbiafs.store")
    nodes = [node(1), node(2)]
    for n in nodes:
        assert read_all(store, n) == body(client, n)
    assert store.stats().memory_fallbacks == 2
    assert not store.contains(nodes[0])
    warnings = [r for r in caplog.records if "disk is full" in r.getMessage()]
    assert len(warnings) == 1


def test_failed_value_write_leaves_no_partial_file(make_store, client, monkeypatch, tmp_path):
    store = make_store()
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, chunk):
            self.f.write(chunk[:100])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullFile(f) if str(path).endswith(".val") and "x" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    n = node(1)
    assert read_all(store, n) == body(client, n)
    monkeypatch.undo()
    assert store.stats().memory_fallbacks == 1
    assert list((tmp_path / "instances").rglob("*.val")) == []


def test_offline_serves_cached_and_refuses_the_rest(make_store, client):
    online = make_store()
    cached = node(1)
    read_all(online, cached)
    online.close()
    fresh = fresh_client()
    offline = make_store(client=fresh, offline=True)
    offline.start()
    assert read_all(offline, cached) == body(client, cached)
    with pytest.raises(OfflineError):
        offline.open(node(2))
    assert offline.prefetch([node(3)]) == 0
    assert fresh.total_calls() == 0


# ------------------------------------------------------------------ handles and reads


def test_read_returns_exact_ranges_and_empty_past_the_end(make_store, client):
    store = make_store()
    n = sized(client, 1, 10_000)
    data = body(client, n)
    h = store.open(n)
    assert store.read(h, 100, 0) == data[:100]
    assert store.read(h, 4096, 9000) == data[9000:]
    assert store.read(h, 10, 10_000) == b""
    assert store.read(h, 10, 50_000) == b""
    with pytest.raises(OSError) as bad:
        store.read(h, 10, -1)
    assert bad.value.errno == errno.EINVAL
    store.release(h)
    for call in (lambda: store.read(h, 1, 0), lambda: store.release(h), lambda: store.read(999, 1, 0)):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EBADF


def test_many_threads_read_one_handle_at_once(make_store, client):
    store = make_store()
    n = sized(client, 1, 256 * 1024)
    data = body(client, n)
    h = store.open(n)
    barrier = threading.Barrier(8)

    def reader(k: int) -> bool:
        barrier.wait(WAIT)
        offsets = range(k * 512, n.size, 8 * 4096)
        return all(store.read(h, 4096, off) == data[off : off + 4096] for off in offsets)

    runs = [in_thread(reader, k) for k in range(8)]
    for t, out in runs:
        t.join(WAIT)
        assert out.get("value") is True, out.get("error")
    store.release(h)


def test_open_file_stays_readable_after_eviction(make_store, client):
    store = make_store()
    n = node(1)
    h = store.open(n)
    assert store.clear() == 1
    assert not store.contains(n)
    assert store.read(h, n.size, 0) == body(client, n)
    store.release(h)


def test_entry_removed_by_another_process_is_fetched_again_not_served_stale(make_store, client):
    store = make_store()
    n = node(1)
    read_all(store, n)
    read_all(store, n)  # remembered for the fast open path now
    other = make_store()  # e.g. `nbiafs cache clear` in another process
    assert other.clear() == 1
    assert read_all(store, n) == body(client, n)
    assert fetches(client, n) == 2


def test_evict_all_removes_only_this_namespace(make_store, client):
    mine = make_store(namespace="A")
    other = make_store(namespace="B")
    read_all(mine, node(1))
    read_all(other, node(1))
    assert mine.evict_all() == 1
    assert not mine.contains(node(1)) and other.contains(node(1))


def test_lru_bound_holds_and_keeps_the_recently_used(make_store, client):
    limit, size = 1_000_000, 10_000
    store = make_store(size_limit=limit, touch_interval=0)  # mark every use in the LRU order
    nodes = [sized(client, i, size) for i in range(N_INSTANCES)]
    first, second = nodes[0], nodes[1]
    read_all(store, first)
    read_all(store, second)
    older = 2 + 2 * store_mod.CULL_LIMIT  # one cull evicts CULL_LIMIT entries: keep `first` out of reach
    for n in nodes[2:older]:
        read_all(store, n)
    read_all(store, first)  # used again: now more recent than `second` and the others
    i = older
    while store.contains(second):
        read_all(store, nodes[i])
        assert store.volume() <= limit + 2 * size
        i += 1
        assert i < 250, "nothing was ever evicted"
    assert store.contains(first)
    assert store.contains(nodes[i - 1])
    for n in nodes[i : i + 100]:
        read_all(store, n)
        assert store.volume() <= limit + 2 * size


# ------------------------------------------------------------------ prefetch


def test_prefetch_fetches_the_rest_of_a_series_once(make_store, client):
    store = make_store(workers=3)
    store.start()
    series = [node(i) for i in range(10)]
    read_all(store, series[0])
    assert store.on_open(series[0], series) == 9
    assert store.on_open(series[3], series) == 0  # the series was scheduled already
    assert store.wait_prefetched(WAIT)
    store.close()
    assert [fetches(client, n) for n in series] == [1] * 10
    assert store.stats().prefetches == 9
    fresh = fresh_client()
    again = make_store(client=fresh)
    for n in series:
        assert read_all(again, n) == body(client, n)
    assert fresh.total_calls() == 0


def test_prefetch_starts_after_the_opened_file_and_wraps_around(make_store, client):
    store = make_store(workers=1)
    store.start()
    series = [node(i) for i in range(6)]
    assert store.on_open(series[2], series) == 5  # one worker: fetches happen in queue order
    assert store.wait_prefetched(WAIT)
    order = [args[1] for method, args in client.call_log if method == "single_image"]
    assert order == [series[i].sop_uid for i in (3, 4, 5, 0, 1)]


def test_prefetch_skips_cached_instances_and_directories(make_store, client):
    store = make_store()
    store.start()
    read_all(store, node(1))
    directory = Node("series", "/Coll-1/P1/s", ino=7, mtime=0.0, series_uid=SERIES)
    assert store.prefetch([node(1), directory]) == 0


def test_direct_open_joins_a_running_prefetch(make_store, client, waiters):
    store = make_store(workers=1)
    store.start()
    n = node(1)
    gate = hold(client, n)
    assert store.prefetch([n]) == 1
    assert gate.wait_entered(1)
    t, out = in_thread(read_all, store, n)
    waiters.wait_for(1)
    gate.release()
    t.join(WAIT)
    assert out["value"] == body(client, n)
    assert fetches(client, n) == 1


def test_direct_open_does_not_queue_behind_prefetch(make_store, client):
    store = make_store(workers=1)
    store.start()
    busy, queued = node(1), node(2)
    gate = hold(client, busy)
    assert store.prefetch([busy, queued]) == 2
    assert gate.wait_entered(1)
    assert read_all(store, queued) == body(client, queued)  # the only worker is still busy
    gate.release()
    assert store.wait_prefetched(WAIT)
    assert fetches(client, queued) == 1  # the queued prefetch found it cached


def test_close_cancels_queued_prefetches_and_joins_workers(make_store, client):
    store = make_store(workers=1)
    store.start()
    series = [node(i) for i in range(20)]
    gate = hold(client, series[0])
    assert store.prefetch(series) == 20
    assert gate.wait_entered(1)
    pool = store._pool
    real_shutdown = pool.shutdown

    def shutdown(wait: bool = True, *, cancel_futures: bool = False) -> None:
        real_shutdown(wait=False, cancel_futures=cancel_futures)  # queued work is cancelled now...
        gate.release()  # ...then the busy worker may finish
        real_shutdown(wait=wait)

    pool.shutdown = shutdown
    store.close()
    assert fetches(client) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("nbiafs-prefetch")]


def test_prefetch_errors_are_counted_not_cached(make_store, client):
    store = make_store(workers=1)
    store.start()
    n = node(1)
    client.fail("single_image", ServerError("boom"), times=1)
    store.prefetch([n])
    assert store.wait_prefetched(WAIT)
    assert store.stats().prefetch_errors == 1
    again = make_store()
    assert read_all(again, n) == body(client, n)
    assert fetches(client, n) == 2


def test_prefetch_before_start_does_nothing(make_store, client):
    store = make_store()
    assert store.prefetch([node(1)]) == 0
    assert store.on_open(node(1), [node(1), node(2)]) == 0
    assert client.total_calls() == 0


# -- probe: sizes learned by fetching when the drill-down is unavailable ---------------------------

def _dicom_bytes(instance_number: int) -> bytes:
    import io as _io

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.InstanceNumber = instance_number
    buf = _io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_probe_fetches_once_caches_and_reads_the_instance_number(tmp_path):
    from nbiafs.store import InstanceStore

    class OneFile:
        deadline = 5.0

        def __init__(self):
            self.calls = 0
            self.data = _dicom_bytes(42)

        def single_image(self, series_uid, sop_uid, expected_size=None):
            self.calls += 1
            return self.data

    client = OneFile()
    with InstanceStore(client, tmp_path, size_limit=10**8, namespace="ns") as store:
        assert store.probe("1.2", "1.2.3") == (len(client.data), 42)
        assert store.probe("1.2", "1.2.3") == (len(client.data), 42)  # from the cache now
        assert client.calls == 1


def test_opener_joining_a_probe_of_another_length_gets_the_true_bytes_and_length(make_store, client, waiters):
    # A probe fetches without a known size; an open that joins it knows a size (the metadata's). The
    # bytes are the server's complete file: the opener gets them whole, and the store says how long
    # they are (the FUSE layer then reads past the stale st_size).
    store = make_store()
    n = node(3, size=4000)  # the server holds 5000 bytes for this instance
    gate = hold(client, n)
    probing = in_thread(store.probe, SERIES, n.sop_uid)
    assert gate.wait_entered(1)

    def read_whole(ref: Node) -> bytes:
        h = store.open(ref)
        try:
            return store.read(h, store.size(h), 0)
        finally:
            store.release(h)

    opening = in_thread(read_whole, n)
    waiters.wait_for(1)
    gate.release()
    for t, _ in (probing, opening):
        t.join(WAIT)
    assert probing[1].get("value", (None,))[0] == 5000
    assert len(opening[1]["value"]) == 5000


def test_prefetch_of_a_series_larger_than_the_cache_stops_at_half_the_bound(tmp_path):
    from nbiafs.store import InstanceStore

    class Sized:
        def __init__(self, i):
            self.series_uid, self.sop_uid, self.size = "s", f"i{i}", 1000

    class Thousand:
        deadline = 5.0

        def __init__(self):
            self.fetched = []

        def single_image(self, series_uid, sop_uid, expected_size=None):
            self.fetched.append(sop_uid)
            return b"x" * 1000

    nodes = [Sized(i) for i in range(100)]
    client = Thousand()
    with InstanceStore(client, tmp_path, size_limit=20_000, namespace="ns", workers=2) as store:
        store.start()
        assert store.on_open(nodes[0], nodes) == 10  # 10 x 1000 bytes = half of the 20 000 bound
        assert store.wait_prefetched(10)
    assert sorted(client.fetched) == sorted(f"i{i}" for i in range(1, 11))
