"""Tests of the instance store: cache hits without API calls, single flight, integrity, full disk, prefetch."""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import nbiafs.store as store_mod
from nbiafs.errors import IntegrityError, OfflineError, ServerError
from nbiafs.store import InstanceStore

WAIT = 10.0  # seconds any test waits for an event before failing (never reached when things work)
SERIES = "1.2.3.series"


@dataclass(frozen=True)
class Node:
    """The fields of catalog.Node the store uses (a stand-in until the catalog lands)."""

    kind: str
    path: str
    size: int = 0
    series_uid: str | None = None
    sop_uid: str | None = None


def body(sop: str, size: int) -> bytes:
    return random.Random(sop).randbytes(size)


def node(i: int, size: int = 5000, series: str = SERIES) -> Node:
    return Node("instance", f"/c/p/s/{series}/1-{i:03d}.dcm", size, series, f"{series}.{i}")


class FakeClient:
    """A client with per-instance call counts, gates that block a fetch, and injected failures."""

    deadline = 5.0

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.failures: dict[str, list[BaseException]] = {}
        self.short: set[str] = set()
        self.cond = threading.Condition()

    def gate(self, sop: str) -> threading.Event:
        self.started[sop] = threading.Event()
        self.gates[sop] = threading.Event()
        return self.gates[sop]

    @property
    def total(self) -> int:
        with self.cond:
            return sum(self.calls.values())

    def wait_calls(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(self.calls.values()) >= n, WAIT)

    def single_image(self, series_uid: str, sop_uid: str, expected_size: int | None = None) -> bytes:
        with self.cond:
            self.calls[sop_uid] += 1
            self.cond.notify_all()
        if sop_uid in self.started:
            self.started[sop_uid].set()
            assert self.gates[sop_uid].wait(WAIT), "test never opened the gate"
        failures = self.failures.get(sop_uid)
        if failures:
            raise failures.pop(0)
        size = expected_size or 5000
        data = body(sop_uid, size)
        return data[:-10] if sop_uid in self.short else data


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

    class CountingFlight(store_mod._Flight):
        def __init__(self) -> None:
            super().__init__()
            self.done = CountingEvent()

    monkeypatch.setattr(store_mod, "_Flight", CountingFlight)
    return w


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def make_store(tmp_path: Path, client: FakeClient):
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


# ------------------------------------------------------------------ cache hits


def test_cached_instance_is_read_with_zero_api_calls(make_store, client):
    store = make_store()
    n = node(1)
    assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.total == 1
    for _ in range(3):
        assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.total == 1
    st = store.stats()
    assert (st.hits, st.misses, st.fetches, st.bytes_fetched) == (3, 1, 1, n.size)
    assert store.contains(n)


def test_restart_with_same_cache_dir_makes_zero_api_calls(make_store, tmp_path):
    first = make_store()
    nodes = [node(i) for i in range(5)]
    for n in nodes:
        read_all(first, n)
    first.close()
    fresh = FakeClient()
    second = make_store(client=fresh)
    for n in nodes:
        assert read_all(second, n) == body(n.sop_uid, n.size)
    assert fresh.total == 0


def test_namespaces_do_not_share_instances(make_store, client):
    named = make_store(namespace="http://emu|alice")
    guest = make_store(namespace="http://emu|nbia_guest")
    n = node(1)
    read_all(named, n)
    assert not guest.contains(n)
    read_all(guest, n)
    assert client.total == 2


# ------------------------------------------------------------------ single flight


def test_sixteen_concurrent_openers_cause_one_fetch(make_store, client, waiters):
    store = make_store()
    n = node(7, size=300_000)
    gate = client.gate(n.sop_uid)
    barrier = threading.Barrier(16)

    def opener() -> bytes:
        barrier.wait(WAIT)
        return read_all(store, n)

    runs = [in_thread(opener) for _ in range(16)]
    client.started[n.sop_uid].wait(WAIT)
    waiters.wait_for(15)  # every other opener is parked on the one fetch
    gate.set()
    for t, out in runs:
        t.join(WAIT)
        assert out.get("value") == body(n.sop_uid, n.size), out.get("error")
    assert client.calls[n.sop_uid] == 1
    assert store.stats().joined == 15


def test_concurrent_openers_share_the_error_and_it_is_not_cached(make_store, client, waiters):
    store = make_store()
    n = node(8)
    gate = client.gate(n.sop_uid)
    client.failures[n.sop_uid] = [ServerError("503 after retries")]
    runs = [in_thread(read_all, store, n) for _ in range(4)]
    client.started[n.sop_uid].wait(WAIT)
    waiters.wait_for(3)
    gate.set()
    for t, out in runs:
        t.join(WAIT)
        assert isinstance(out.get("error"), ServerError)
    assert client.calls[n.sop_uid] == 1
    assert not store.contains(n)
    assert read_all(store, n) == body(n.sop_uid, n.size)  # the next open tries again
    assert client.calls[n.sop_uid] == 2


def test_waiting_for_a_stuck_fetch_is_bounded(make_store, client, waiters):
    store = make_store(wait_timeout=0.2)
    n = node(9)
    gate = client.gate(n.sop_uid)
    leader, out = in_thread(read_all, store, n)
    client.started[n.sop_uid].wait(WAIT)
    with pytest.raises(ServerError, match="gave up waiting"):
        store.open(n)
    gate.set()
    leader.join(WAIT)
    assert out["value"] == body(n.sop_uid, n.size)


def test_slow_fetch_does_not_block_another_file(make_store, client):
    store = make_store()
    slow, fast = node(1), node(2)
    gate = client.gate(slow.sop_uid)
    t, out = in_thread(read_all, store, slow)
    client.started[slow.sop_uid].wait(WAIT)
    assert read_all(store, fast) == body(fast.sop_uid, fast.size)
    assert t.is_alive()
    gate.set()
    t.join(WAIT)
    assert out["value"] == body(slow.sop_uid, slow.size)


# ------------------------------------------------------------------ integrity


def test_short_body_raises_integrity_error_and_caches_nothing(make_store, client):
    store = make_store()
    n = node(3)
    client.short.add(n.sop_uid)
    with pytest.raises(IntegrityError):
        store.open(n)
    assert not store.contains(n)
    client.short.clear()
    assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 2


def test_truncated_cache_file_is_dropped_and_refetched(make_store, client):
    store = make_store()
    n = node(4)
    read_all(store, n)
    with store._cache.get(store._key(n), read=True) as f:
        path = f.name
    os.truncate(path, 100)
    assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 2
    assert store.stats().corrupt_dropped == 1
    assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 2


def test_cached_value_of_another_size_than_the_node_is_not_served(make_store, client):
    store = make_store()
    read_all(store, node(5, size=5000))
    bigger = node(5, size=6000)  # the catalog learned a different exact size: the cached bytes are wrong
    assert read_all(store, bigger) == body(bigger.sop_uid, 6000)
    assert client.calls[bigger.sop_uid] == 2


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
    key = store._key(type("N", (), {"series_uid": "s", "sop_uid": sys.argv[2], "size": 400_000})())
    store._cache.set(key, Reader(), read=True, tag=400_000)
    """
)


def test_kill_9_during_a_cache_write_never_leaves_a_servable_value(make_store, client, tmp_path):
    n = Node("instance", "/x", 400_000, "s", "sop.killed")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), n.sop_uid],
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
    assert read_all(store, n) == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 1


# ------------------------------------------------------------------ full disk, offline


def test_full_disk_still_serves_fetched_bytes_and_warns_once(make_store, client, monkeypatch, caplog):
    store = make_store()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store._cache, "set", full)
    caplog.set_level(logging.WARNING, logger="nbiafs.store")
    nodes = [node(1), node(2)]
    for n in nodes:
        assert read_all(store, n) == body(n.sop_uid, n.size)
    assert store.stats().memory_fallbacks == 2
    assert not store.contains(nodes[0])
    warnings = [r for r in caplog.records if "disk is full" in r.getMessage()]
    assert len(warnings) == 1


def test_failed_value_write_leaves_no_partial_file(make_store, monkeypatch, tmp_path):
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
    assert read_all(store, n) == body(n.sop_uid, n.size)
    monkeypatch.undo()
    assert list((tmp_path / "instances").rglob("*.val")) == []


def test_offline_serves_cached_and_refuses_the_rest(make_store, client):
    online = make_store()
    cached = node(1)
    read_all(online, cached)
    online.close()
    fresh = FakeClient()
    offline = make_store(client=fresh, offline=True)
    offline.start()
    assert read_all(offline, cached) == body(cached.sop_uid, cached.size)
    with pytest.raises(OfflineError):
        offline.open(node(2))
    assert offline.prefetch([node(3)]) == 0
    assert fresh.total == 0


# ------------------------------------------------------------------ handles and reads


def test_read_returns_exact_ranges_and_empty_past_the_end(make_store):
    store = make_store()
    n = node(1, size=10_000)
    data = body(n.sop_uid, n.size)
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


def test_many_threads_read_one_handle_at_once(make_store):
    store = make_store()
    n = node(1, size=256 * 1024)
    data = body(n.sop_uid, n.size)
    h = store.open(n)
    barrier = threading.Barrier(8)

    def reader(k: int) -> bool:
        barrier.wait(WAIT)
        return all(store.read(h, 4096, off) == data[off : off + 4096] for off in range(k * 512, n.size, 8 * 4096))

    runs = [in_thread(reader, k) for k in range(8)]
    for t, out in runs:
        t.join(WAIT)
        assert out.get("value") is True, out.get("error")
    store.release(h)


def test_open_file_stays_readable_after_eviction(make_store):
    store = make_store()
    n = node(1)
    h = store.open(n)
    assert store.clear() == 1
    assert not store.contains(n)
    assert store.read(h, n.size, 0) == body(n.sop_uid, n.size)
    store.release(h)


def test_evict_all_removes_only_this_namespace(make_store, client):
    mine = make_store(namespace="A")
    other = make_store(namespace="B")
    read_all(mine, node(1))
    read_all(other, node(1))
    assert mine.evict_all() == 1
    assert not mine.contains(node(1)) and other.contains(node(1))


def test_lru_bound_holds_and_keeps_the_recently_used(make_store):
    limit, size = 1_000_000, 10_000
    store = make_store(size_limit=limit)
    first, second = node(0, size), node(1, size)
    read_all(store, first)
    read_all(store, second)
    older = 2 + 2 * store_mod.CULL_LIMIT  # one cull evicts CULL_LIMIT entries: keep `first` out of reach
    for i in range(2, older):
        read_all(store, node(i, size))
    read_all(store, first)  # used again: now more recent than `second` and the others
    i = older
    while store.contains(second):
        read_all(store, node(i, size))
        assert store.volume() <= limit + 2 * size
        i += 1
        assert i < 300, "nothing was ever evicted"
    assert store.contains(first)
    assert store.contains(node(i - 1, size))
    for j in range(i, i + 100):
        read_all(store, node(j, size))
        assert store.volume() <= limit + 2 * size


# ------------------------------------------------------------------ prefetch


def test_prefetch_fetches_the_rest_of_a_series_once(make_store, client, tmp_path):
    store = make_store(workers=3)
    store.start()
    series = [node(i) for i in range(10)]
    read_all(store, series[0])
    assert store.on_open(series[0], series) == 9
    assert store.on_open(series[3], series) == 0  # the series was scheduled already
    client.wait_calls(10)
    store.close()  # joins the workers, so every prefetch is stored
    assert all(client.calls[n.sop_uid] == 1 for n in series)
    assert store.stats().prefetches == 9
    fresh = FakeClient()
    again = make_store(client=fresh)
    for n in series:
        assert read_all(again, n) == body(n.sop_uid, n.size)
    assert fresh.total == 0


def test_prefetch_skips_cached_instances(make_store, client):
    store = make_store()
    store.start()
    read_all(store, node(1))
    assert store.prefetch([node(1)]) == 0


def test_direct_open_joins_a_running_prefetch(make_store, client, waiters):
    store = make_store(workers=1)
    store.start()
    n = node(1)
    gate = client.gate(n.sop_uid)
    assert store.prefetch([n]) == 1
    client.started[n.sop_uid].wait(WAIT)
    t, out = in_thread(read_all, store, n)
    waiters.wait_for(1)
    gate.set()
    t.join(WAIT)
    assert out["value"] == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 1


def test_direct_open_does_not_queue_behind_prefetch(make_store, client):
    store = make_store(workers=1)
    store.start()
    busy, queued = node(1), node(2)
    gate = client.gate(busy.sop_uid)
    assert store.prefetch([busy, queued]) == 2
    client.started[busy.sop_uid].wait(WAIT)
    assert read_all(store, queued) == body(queued.sop_uid, queued.size)  # the worker is still busy
    gate.set()
    store.close()
    assert client.calls[queued.sop_uid] == 1  # the queued prefetch found it cached


def test_close_cancels_queued_prefetches_and_joins_workers(make_store, client):
    store = make_store(workers=1)
    store.start()
    series = [node(i) for i in range(20)]
    gate = client.gate(series[0].sop_uid)
    assert store.prefetch(series) == 20
    client.started[series[0].sop_uid].wait(WAIT)
    pool = store._pool
    real_shutdown = pool.shutdown

    def shutdown(wait: bool = True, *, cancel_futures: bool = False) -> None:
        real_shutdown(wait=False, cancel_futures=cancel_futures)  # queued work is cancelled now...
        gate.set()  # ...then the busy worker may finish
        real_shutdown(wait=wait)

    pool.shutdown = shutdown
    store.close()
    assert client.total == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("nbiafs-prefetch")]


def test_prefetch_errors_are_counted_not_cached(make_store, client):
    store = make_store(workers=1)
    store.start()
    n = node(1)
    client.failures[n.sop_uid] = [ServerError("boom")]
    store.prefetch([n])
    client.wait_calls(1)
    store.close()
    assert store.stats().prefetch_errors == 1
    again = make_store()
    assert read_all(again, n) == body(n.sop_uid, n.size)
    assert client.calls[n.sop_uid] == 2


def test_prefetch_before_start_does_nothing(make_store, client):
    store = make_store()
    assert store.prefetch([node(1)]) == 0
    assert store.on_open(node(1), [node(1), node(2)]) == 0
    assert client.total == 0
