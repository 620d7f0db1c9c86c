"""The metadata cache: memory over disk, namespaces, single-flight, never caching errors, surviving bad disks."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from nbiafs.errors import ServerError
from nbiafs.metacache import MetadataCache
from nbiafs.records import Collection


class Loader:
    """A loader that counts its calls and answers ``value`` (or raises ``error``)."""

    def __init__(self, value=None, error: Exception | None = None):
        self.value = [Collection("A"), Collection("B")] if value is None else value
        self.error = error
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def is_collections(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, Collection) for v in value)


@pytest.fixture
def meta(tmp_path: Path):
    cache = MetadataCache(tmp_path / "metadata", "http://server|guest", ttl=60)
    yield cache
    cache.close()


def test_second_get_is_served_from_memory(meta):
    load = Loader()
    assert meta.get_or_load("collections", (), load) == load.value
    assert meta.get_or_load("collections", (), load) == load.value
    assert load.calls == 1


def test_listing_survives_a_new_cache_on_the_same_directory(tmp_path):
    load = Loader()
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as first:
        first.get_or_load("patients", ("C",), load)
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as second:
        assert second.get_or_load("patients", ("C",), load) == load.value
    assert load.calls == 1


def test_another_namespace_never_sees_the_listing(tmp_path):
    load = Loader()
    with MetadataCache(tmp_path / "m", "server|alice", ttl=60) as alice:
        alice.get_or_load("collections", (), load)
    with MetadataCache(tmp_path / "m", "server|nbia_guest", ttl=60) as guest:
        assert guest.get("collections") is None
        guest.get_or_load("collections", (), load)
    assert load.calls == 2


def test_errors_are_not_cached(meta):
    failing = Loader(error=ServerError("down"))
    with pytest.raises(ServerError):
        meta.get_or_load("collections", (), failing)
    good = Loader()
    assert meta.get_or_load("collections", (), good) == good.value
    assert good.calls == 1
    assert meta.get("collections") == good.value


def test_empty_listings_are_cached(meta):
    load = Loader(value=[])
    assert meta.get_or_load("patients", ("Empty",), load) == []
    assert meta.get_or_load("patients", ("Empty",), load) == []
    assert load.calls == 1


def test_memory_expiry_falls_back_to_disk_without_loading(tmp_path):
    now = [0.0]
    load = Loader()
    with MetadataCache(tmp_path / "m", "ns", ttl=10, timer=lambda: now[0]) as cache:
        cache.get_or_load("collections", (), load)
        now[0] = 1000.0
        assert cache.get_or_load("collections", (), load) == load.value
    assert load.calls == 1


def test_memory_only_cache_expires_and_reloads():
    now = [0.0]
    load = Loader()
    cache = MetadataCache(None, "ns", ttl=10, timer=lambda: now[0])
    cache.get_or_load("collections", (), load)
    now[0] = 11.0
    cache.get_or_load("collections", (), load)
    assert load.calls == 2


def test_concurrent_loads_of_one_key_call_the_loader_once(meta):
    release = threading.Event()
    started = threading.Event()
    calls = []

    def slow():
        calls.append(1)
        started.set()
        assert release.wait(10)
        return [Collection("X")]

    barrier = threading.Barrier(16)
    results = []

    def worker():
        barrier.wait(10)
        results.append(meta.get_or_load("collections", (), slow))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    assert started.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert results == [[Collection("X")]] * 16


def test_waiters_share_the_leaders_error_and_nothing_is_cached(meta):
    release = threading.Event()
    started = threading.Event()
    calls = []

    def failing():
        calls.append(1)
        started.set()
        assert release.wait(10)
        raise ServerError("boom")

    errors = []

    def call():
        try:
            meta.get_or_load("patients", ("C",), failing)
        except ServerError as exc:
            errors.append(exc)

    leader = threading.Thread(target=call)
    leader.start()
    assert started.wait(10)
    follower = threading.Thread(target=call)
    follower.start()
    # the follower is either waiting on the flight or will find no flight and load itself (and fail)
    release.set()
    leader.join(10)
    follower.join(10)
    assert len(errors) == 2
    assert meta.get("patients", "C") is None


def test_a_slow_load_does_not_block_another_key(meta):
    release = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        assert release.wait(10)
        return []

    t = threading.Thread(target=meta.get_or_load, args=("patients", ("Slow",), slow))
    t.start()
    try:
        assert started.wait(10)
        assert meta.get_or_load("patients", ("Fast",), lambda: [Collection("F")]) == [Collection("F")]
    finally:
        release.set()
        t.join(10)


def test_waiting_for_a_stuck_load_is_bounded(tmp_path):
    cache = MetadataCache(None, "ns", ttl=60, wait_timeout=0.2)
    release = threading.Event()
    started = threading.Event()

    def stuck():
        started.set()
        release.wait(10)
        return []

    t = threading.Thread(target=cache.get_or_load, args=("collections", (), stuck))
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(ServerError):
            cache.get_or_load("collections", (), Loader())
    finally:
        release.set()
        t.join(10)


def _corrupt_all_values(directory: Path) -> int:
    con = sqlite3.connect(directory / "cache.db")
    try:
        changed = con.execute("UPDATE Cache SET value = ?", (b"\x80\x04garbage",)).rowcount
        con.commit()
    finally:
        con.close()
    return changed


def test_corrupt_disk_entry_is_dropped_and_reloaded(tmp_path, caplog):
    load = Loader()
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as first:
        first.get_or_load("collections", (), load)
    assert _corrupt_all_values(tmp_path / "m") >= 1
    with caplog.at_level(logging.WARNING, logger="nbiafs.metacache"):
        with MetadataCache(tmp_path / "m", "ns", ttl=60) as second:
            assert second.get_or_load("collections", (), load, validate=is_collections) == load.value
    assert load.calls == 2
    assert "unreadable" in caplog.text


def test_disk_entry_of_the_wrong_shape_is_dropped_and_reloaded(tmp_path):
    load = Loader()
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as first:
        first.put("collections", value="not a list")
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as second:
        assert second.get_or_load("collections", (), load, validate=is_collections) == load.value
    assert load.calls == 1


def test_unreadable_cache_database_falls_back_to_memory(tmp_path, caplog):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"this is not sqlite" * 100)
    load = Loader()
    with caplog.at_level(logging.WARNING, logger="nbiafs.metacache"):
        cache = MetadataCache(directory, "ns", ttl=60)
        assert cache.get_or_load("collections", (), load) == load.value
        assert cache.get_or_load("collections", (), load) == load.value
        cache.close()
    assert load.calls == 1
    assert "memory only" in caplog.text


def test_full_disk_keeps_serving_from_memory(meta, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(meta._disk, "set", full)
    load = Loader()
    with caplog.at_level(logging.WARNING, logger="nbiafs.metacache"):
        assert meta.get_or_load("collections", (), load) == load.value
        assert meta.get_or_load("collections", (), load) == load.value
        meta.flush()  # writes are queued on the database thread
    assert load.calls == 1
    assert "cannot write the metadata cache" in caplog.text


def test_enospc_while_writing_keeps_serving_from_memory(meta, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(meta._disk, "set", full)
    with caplog.at_level(logging.WARNING, logger="nbiafs.metacache"):
        assert meta.get_or_load("patients", ("C",), Loader(value=[])) == []
        assert meta.get("patients", "C") == []
        meta.flush()  # the failed write (queued on the database thread) logs within the test, not after it
    assert "No space left on device" in caplog.text


def _records_in_memory(cache: MetadataCache) -> int:
    return sum(len(entry[1]) for entry in cache._memory.values())


def test_memory_is_bounded_by_records_not_only_by_listings():
    # A walk over a huge tree (series of thousands of instances) must not keep `maxsize` listings
    # of any length in memory: the memory layer is bounded by the records it holds.
    cache = MetadataCache(None, "ns", ttl=60, maxsize=100, max_records=1000)
    for n in range(20):
        cache.put("instances", f"series-{n}", value=[Collection(f"C{n}.{i}") for i in range(300)])
    assert _records_in_memory(cache) <= 1000
    assert cache.get("instances", "series-19") is not None  # the most recent stays
    assert cache.get("instances", "series-0") is None  # the oldest went


def test_memory_still_bounds_the_number_of_small_listings():
    cache = MetadataCache(None, "ns", ttl=60, maxsize=10, max_records=1000)
    for n in range(50):
        cache.put("patients", f"c{n}", value=[Collection("x")])
    assert len(cache._memory) <= 10


def test_a_listing_bigger_than_the_memory_bound_is_served_from_disk(tmp_path):
    load = Loader(value=[Collection(f"C{i}") for i in range(50)])
    with MetadataCache(tmp_path / "m", "ns", ttl=60, max_records=20) as cache:
        assert cache.get_or_load("collections", (), load) == load.value
        assert cache.get_or_load("collections", (), load) == load.value
        assert load.calls == 1
        assert _records_in_memory(cache) == 0


def test_one_database_connection_whatever_thread_asks(tmp_path, monkeypatch):
    # libfuse gives every callback a fresh Python thread state, so thread-local connections (diskcache's
    # own) were opened again on every callback. The cache's database lives on one thread instead.
    connects = []
    real_connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        connects.append(args[0] if args else kwargs.get("database"))
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting_connect)
    with MetadataCache(tmp_path / "m", "ns", ttl=60) as cache:
        cache.put("patients", "C", value=[Collection("x")])
        cache.flush()
        cache._memory.clear()  # every lookup below reads the disk
        baseline = len(connects)
        for _ in range(40):  # each from a brand-new thread, as from libfuse's native threads
            seen: list = []
            worker = threading.Thread(target=lambda seen=seen: seen.append(cache.get("patients", "C")))
            worker.start()
            worker.join()
            assert seen == [[Collection("x")]]
            cache._memory.clear()
        assert len(connects) == baseline  # no new connection for any of them
    assert baseline <= 2  # diskcache connects twice while it sets a new cache up


def test_a_database_lock_timeout_falls_back_to_loading(tmp_path):
    # Another process holding the database (or a slow disk) must cost a load from the server, never a
    # failed listing.
    with MetadataCache(tmp_path / "m", "ns", ttl=60, db_timeout=0.2) as cache:
        cache.put("patients", "C", value=[Collection("old")])
        cache.flush()
        cache._memory.clear()
        hold = threading.Event()
        assert cache._db is not None
        cache._db.submit(lambda: hold.wait(30))  # the database thread is stuck behind a lock
        try:
            load = Loader(value=[Collection("fresh")])
            assert cache.get_or_load("patients", ("C",), load) == [Collection("fresh")]
            assert load.calls == 1
        finally:
            hold.set()
