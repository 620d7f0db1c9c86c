"""Bandwidth shaping for the speed benchmarks: per-connection and shared link caps, latency, all settable at
run time, and bodies written in chunks streamed from disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from nbiafs.emulator.shaping import CHUNK_SIZE, Pacer, Shaper, parse_rate

TIMEOUT = (5, 60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_lets_a_burst_through_then_spaces_reservations_at_its_rate() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, burst=100, clock=clock)
    assert pacer.reserve(100) == 0.0  # within the burst
    assert pacer.reserve(100) == pytest.approx(0.1)
    assert pacer.reserve(500) == pytest.approx(0.6)
    clock.now += 10  # idle: the backlog is forgotten, not banked beyond the burst
    assert pacer.reserve(100) == 0.0
    assert pacer.reserve(200) == pytest.approx(0.2)


def test_pacer_serves_interleaved_callers_fairly() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, burst=0, clock=clock)
    waits = {"a": [], "b": []}
    for _ in range(4):
        for who in ("a", "b"):
            waits[who].append(pacer.reserve(100))
    # each caller's n-th chunk is due one slot after the other's: both progress at rate/2
    assert waits["a"] == pytest.approx([0.1, 0.3, 0.5, 0.7])
    assert waits["b"] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_unlimited_and_changed_rates() -> None:
    clock = FakeClock()
    pacer = Pacer(None, clock=clock)
    assert pacer.reserve(10**9) == 0.0
    pacer.set_rate(100.0)
    assert pacer.rate == 100.0 and pacer.reserve(CHUNK_SIZE + 100) == pytest.approx(1.0)
    pacer.set_rate(0)
    assert pacer.rate is None and pacer.reserve(10**6) == 0.0


def test_parse_rate_units() -> None:
    assert parse_rate("2.5M") == 2_500_000
    assert parse_rate("500k") == 500_000
    assert parse_rate("1Mi") == 1024 ** 2
    assert parse_rate("1GiB/s") == 1024 ** 3
    assert parse_rate("1200") == 1200
    assert parse_rate("0") is None and parse_rate("none") is None
    with pytest.raises(ValueError):
        parse_rate("fast")


def test_shaper_settings_change_only_what_is_given() -> None:
    shaper = Shaper(0.1, 1000, 5000)
    shaper.set(latency=0.2)
    assert shaper.settings() == {"latency": 0.2, "per_connection": 1000, "link": 5000}
    shaper.set(per_connection=None)
    assert shaper.settings() == {"latency": 0.2, "per_connection": None, "link": 5000}
    with pytest.raises(ValueError):
        shaper.set(latency=-1)


def big_zip_params(archive) -> dict[str, str]:
    big = max(archive.series, key=lambda s: s.image_count)
    return {"SeriesInstanceUID": big.uid}


def fetch(url: str, params: dict[str, str]) -> tuple[int, float, float]:
    """(bytes, start, end) of one GET on its own connection."""
    started = time.monotonic()
    body = requests.get(url, params=params, timeout=TIMEOUT).content
    return len(body), started, time.monotonic()


def test_per_connection_cap_bounds_one_download(make_emulator, archive) -> None:
    rate = 4_000_000
    emu = make_emulator(per_connection=rate)
    size, start, end = fetch(f"{emu.url}/nbia-api/services/v4/getImage", big_zip_params(archive))
    assert size > 10 * CHUNK_SIZE
    assert end - start >= (size - CHUNK_SIZE) / rate * 0.95
    assert end - start < (size / rate) * 3 + 2  # paced, not stalled


def test_link_cap_is_shared_between_connections(make_emulator, archive) -> None:
    rate = 8_000_000
    emu = make_emulator(link=rate)
    params = big_zip_params(archive)
    results: list[tuple[int, float, float]] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(f"{emu.url}/nbia-api/services/v4/getImage",
                                                                    params))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    total = sum(r[0] for r in results)
    first_start = min(r[1] for r in results)
    assert max(r[2] for r in results) - first_start >= (total - CHUNK_SIZE) / rate * 0.95
    for _size, _start, end in results:  # both progressed together: neither had the link to itself
        assert end - first_start >= 0.7 * total / rate


def test_shaping_changes_at_run_time_through_the_control_endpoint(make_emulator, archive) -> None:
    emu = make_emulator()
    r = requests.post(emu.url + "/emulator/shaping", json={"latency": 0.3, "per_connection": 2_000_000},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"latency": 0.3, "per_connection": 2_000_000, "link": None}
    started = time.monotonic()
    requests.get(f"{emu.url}/nbia-api/services/v4/getCollectionValues", timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.3
    emu.set_shaping(latency=0.0, per_connection=None, link=1_000_000)
    assert requests.get(emu.url + "/emulator/shaping", timeout=TIMEOUT).json() == {
        "latency": 0.0, "per_connection": None, "link": 1_000_000}
    emu.set_bandwidth()
    emu.set_latency(0.0)
    assert emu.shaping() == {"latency": 0.0, "per_connection": None, "link": None}
    assert requests.post(emu.url + "/emulator/shaping", json={"speed": 1}, timeout=TIMEOUT).status_code == 400
    assert requests.post(emu.url + "/emulator/shaping", json={"latency": -1}, timeout=TIMEOUT).status_code == 400


def test_latency_attribute_still_reads_and_sets(make_emulator) -> None:
    emu = make_emulator(latency=0.25)
    assert emu.latency == 0.25
    emu.latency = 0.0
    assert emu.shaping()["latency"] == 0.0


def test_instance_files_are_streamed_not_read_whole(make_emulator, archive, monkeypatch) -> None:
    emu = make_emulator()
    big = max(archive.series, key=lambda s: s.image_count)
    inst = archive.instances_of(big.uid)[0]

    def refuse(self: Path) -> bytes:
        raise AssertionError(f"read whole: {self}")

    expected = inst.path.read_bytes()
    monkeypatch.setattr(Path, "read_bytes", refuse)
    r = requests.get(f"{emu.url}/nbia-api/services/v4/getSingleImage", timeout=TIMEOUT,
                     params={"SeriesInstanceUID": big.uid, "SOPInstanceUID": inst.sop_uid})
    assert r.status_code == 200 and r.content == expected
    r = requests.get(f"{emu.url}/nbia-api/services/v4/getImage", params={"SeriesInstanceUID": big.uid},
                     timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.content) > inst.size


def test_stop_interrupts_a_paced_download(make_emulator, archive) -> None:
    emu = make_emulator(per_connection=50_000)  # the big zip would take minutes
    outcome: list[object] = []
    arrived = threading.Event()

    def call() -> None:
        try:
            with requests.get(f"{emu.url}/nbia-api/services/v4/getImage", params=big_zip_params(archive),
                              timeout=TIMEOUT, stream=True) as r:
                arrived.set()
                outcome.append(sum(len(c) for c in r.iter_content(65536)))
        except requests.RequestException as exc:
            outcome.append(exc)
        finally:
            arrived.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert arrived.wait(20)
    started = time.monotonic()
    emu.stop()
    caller.join(20)
    assert not caller.is_alive() and time.monotonic() - started < 10
