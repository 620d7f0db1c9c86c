"""The catalog's bounded, expiring map of built listings (nbiafs.lrumap), on a clock the test moves."""

from __future__ import annotations

import pytest

from nbiafs import lrumap
from nbiafs.lrumap import ExpiringLRU


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(lrumap.time, "monotonic", c)
    return c


def sized(maxsize: int, ttl: float = 60.0) -> ExpiringLRU[str, list[int]]:
    return ExpiringLRU(maxsize, lambda key, value, now: now + ttl, getsizeof=len)


def test_the_least_recently_used_go_first_when_the_sizes_pass_the_bound(clock) -> None:
    m = sized(10)
    m["a"], m["b"], m["c"] = [1] * 4, [2] * 4, [3] * 2
    assert m.get("a") == [1] * 4  # a is now the most recent
    m["d"] = [4] * 3  # 13 > 10: b, the least recently used, goes
    assert m.get("b") is None
    assert sorted(m) == ["a", "c", "d"] and m.currsize == 9


def test_replacing_a_key_counts_its_new_size_only(clock) -> None:
    m = sized(10)
    m["a"] = [1] * 6
    m["a"] = [1] * 8
    assert m.currsize == 8 and len(m) == 1


def test_a_value_bigger_than_the_bound_is_refused_and_nothing_is_evicted_for_it(clock) -> None:
    m = sized(5)
    m["a"] = [1] * 3
    with pytest.raises(ValueError):
        m["big"] = [0] * 6
    assert m.get("a") == [1] * 3 and "big" not in m


def test_entries_expire_at_their_own_time_to_use(clock) -> None:
    m: ExpiringLRU[str, str] = ExpiringLRU(100, lambda key, value, now: now + (10.0 if key == "short" else 1e9))
    m["short"], m["long"] = "s", "l"
    clock.now += 9.9
    assert m.get("short") == "s"
    clock.now += 0.2
    assert m.get("short") is None and "short" not in m
    assert m.get("long") == "l"
    assert list(m) == ["long"] and m.values() == ["l"] and len(m) == 1


def test_pop_returns_the_value_unless_it_expired_and_frees_its_size_either_way(clock) -> None:
    m = sized(10, ttl=5.0)
    m["a"], m["b"] = [1, 1], [2, 2, 2]
    assert m.pop("a") == [1, 1] and m.currsize == 3
    clock.now += 6
    assert m.pop("b") is None and m.currsize == 0
    assert m.pop("missing", [7]) == [7]


def test_an_expired_entry_looked_at_gives_its_size_back(clock) -> None:
    m = sized(10, ttl=5.0)
    m["a"] = [1] * 7
    clock.now += 6
    assert m.get("a") is None and m.currsize == 0
    m["b"] = [2] * 10  # fits: the expired entry no longer counts
    assert m.get("b") == [2] * 10
