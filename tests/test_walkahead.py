"""Walk-ahead: the pure policy, the bounded pool against a fake tree, and a real mount's calls."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ls, visible_walk, wait_until

from nbiafs.errors import ServerError
from nbiafs.walkahead import WalkAhead, walk_starts


def test_a_child_listed_soon_after_its_parent_starts_a_walk_of_the_parent() -> None:
    listed = {"/C": 100.0}
    assert walk_starts("/C/P1", listed, now=101.0) == "/C"
    assert walk_starts("/C/P1", listed, now=200.0) is None  # too late: not a walk
    assert walk_starts("/D/P1", listed, now=101.0) is None  # its parent was never listed
    assert walk_starts("/", listed, now=101.0) is None


@dataclass(frozen=True)
class D:
    kind: str
    path: str


class FakeTree:
    """collection /C -> 6 patients -> 2 studies -> 3 series; counts listings, can hold them."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.hold = hold
        self.inside = 0
        self.most_inside = 0
        self.fail: set[str] = set()
        self.series_listing_is_cheap: bool | None = True
        #: what listing a series shows of the drill-down while it is unknown (None)
        self.drill_works: bool | None = None

    def lookup(self, path: str) -> D:
        depth = 0 if path == "/" else path.count("/")
        return D(("root", "collection", "patient", "study", "series", "instance")[depth], path)

    def children_of(self, node: D) -> list[D]:
        path = node.path
        with self.lock:
            self.calls.append(path)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.hold is not None and path.count("/") >= 2:  # patients and below wait
                self.hold.wait(10)
            if path in self.fail:
                raise ServerError("503")
            if path.count("/") == 4 and self.series_listing_is_cheap is None:
                self.series_listing_is_cheap = self.drill_works  # a series listing tried the drill-down
            depth = 0 if path == "/" else path.count("/")
            kinds = {0: ("collection", 1), 1: ("patient", 6), 2: ("study", 2), 3: ("series", 3), 4: ("instance", 4)}
            kind, count = kinds[depth]
            return [D(kind, f"{path.rstrip('/')}/{kind[0]}{n}") for n in range(count)]
        finally:
            with self.lock:
                self.inside -= 1


@pytest.fixture
def clock():
    now = [1000.0]
    return now


def make(tree: FakeTree, clock, **kw) -> WalkAhead:
    walker = WalkAhead(tree, clock=lambda: clock[0], **kw)
    walker.start()
    return walker


def test_listing_one_folder_alone_lists_nothing_ahead(clock) -> None:
    tree = FakeTree()
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        assert walker.idle(5)
        assert tree.calls == []  # ls of a collection is not a walk
    finally:
        walker.stop()


def test_going_down_into_a_child_lists_the_whole_subtree_of_folders_once(clock) -> None:
    tree = FakeTree()
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")  # find goes down: a walk of /C
        assert walker.idle(10)
        listed = set(tree.calls)
        patients = {f"/C/p{n}" for n in range(6)}
        studies = {f"{p}/s{k}" for p in patients for k in range(2)}
        series = {f"{s}/s{k}" for s in studies for k in range(3)}
        assert listed >= patients | studies | series  # series too: their listing holds the exact sizes
        assert not any(c.rsplit("/", 1)[-1].startswith("i") for c in tree.calls)  # never a file
        assert len(tree.calls) == len(set(tree.calls))  # each folder once
    finally:
        walker.stop()


def test_listings_ahead_run_in_parallel_but_never_more_than_the_workers(clock) -> None:
    hold = threading.Event()
    tree = FakeTree(hold)
    walker = make(tree, clock, workers=3)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert wait_until(lambda: tree.inside == 3, 5)
        hold.set()
        assert walker.idle(10)
        assert tree.most_inside == 3
    finally:
        hold.set()
        walker.stop()


def test_a_failed_listing_ahead_is_dropped_and_the_walk_goes_on(clock) -> None:
    tree = FakeTree()
    tree.fail = {"/C/p1"}
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        assert "/C/p2/s0" in tree.calls and not any(c.startswith("/C/p1/") for c in tree.calls)
    finally:
        walker.stop()


def test_a_walk_nobody_continues_stops(clock) -> None:
    hold = threading.Event()
    tree = FakeTree(hold)
    walker = make(tree, clock, workers=1, idle=5.0)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert wait_until(lambda: tree.inside == 1, 5)
        clock[0] += 60  # the program went away
        hold.set()
        assert walker.idle(10)
        assert len(tree.calls) <= 2  # the listing in progress, maybe one more: not the whole tree
    finally:
        hold.set()
        walker.stop()


def test_a_subtree_walked_completely_is_not_walked_ahead_again(clock) -> None:
    tree = FakeTree()
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        first = len(tree.calls)
        clock[0] += 1
        walker.on_readdir("/C", "collection")  # the same walk again: everything is cached
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        assert len(tree.calls) == first
    finally:
        walker.stop()


def test_without_a_working_drill_down_series_are_never_listed_ahead(clock) -> None:
    tree = FakeTree()
    tree.series_listing_is_cheap = False  # listing a series would fetch its files
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        assert "/C/p5/s1" in tree.calls and not any(c.count("/") == 4 for c in tree.calls)
    finally:
        walker.stop()


def test_a_cold_walk_probes_the_drill_down_with_one_series_then_lists_the_rest_ahead(clock) -> None:
    tree = FakeTree()
    tree.series_listing_is_cheap = None  # a cold mount: no drill-down tried yet
    tree.drill_works = True
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        series = {c for c in tree.calls if c.count("/") == 4}
        # every series, as when the drill-down is known to work (the first of a study before its siblings)
        assert series == {f"/C/p{p}/s{s}/s{n}" for p in range(6) for s in range(2) for n in range(3)}
    finally:
        walker.stop()


def test_a_cold_walk_whose_probe_finds_no_drill_down_lists_no_other_series(clock) -> None:
    tree = FakeTree()
    tree.series_listing_is_cheap = None
    tree.drill_works = False  # the probe learns that listing a series fetches its files
    walker = make(tree, clock)
    try:
        walker.on_readdir("/C", "collection")
        walker.on_readdir("/C/p0", "patient")
        assert walker.idle(10)
        assert len([c for c in tree.calls if c.count("/") == 4]) == 1
        assert "/C/p5/s1" in tree.calls  # every study still listed ahead
    finally:
        walker.stop()


def test_stop_ends_the_workers(clock) -> None:
    tree = FakeTree()
    walker = make(tree, clock)
    walker.stop()
    walker.on_readdir("/C", "collection")
    walker.on_readdir("/C/p0", "patient")
    assert tree.calls == []


# ---------------------------------------------------------------------------------- a real mount
@pytest.mark.fuse
def test_a_cold_find_costs_one_call_per_listing_two_per_study_and_a_second_walk_none(
        mounter, tmp_path: Path) -> None:
    from nbiafs.emulator import Emulator

    emu = Emulator(tmp_path / "wide", profile="wide:patients=12,series=3,instances=4", latency=0.02).start()
    try:
        walk_twice(emu, mounter(emu))
    finally:
        emu.stop()


def walk_twice(emu, m) -> None:
    collections = ls(m.path)
    assert len(collections) == 1
    before = emu.stats()
    found = []
    for dirpath, dirnames, filenames in visible_walk(m.path / collections[0]):  # what find -ls does
        for name in dirnames + filenames:
            found.append(os.lstat(os.path.join(dirpath, name)).st_size)
    spent = emu.stats() - before
    assert len(found) == 12 + 12 + 36 + 144  # patients, studies, series, files
    assert spent["getPatient"] <= 1 and spent["getPatientStudy"] == 12 and spent["getSeries"] == 12
    assert spent["getStudyDrillDownWithSeriesIds"] == 12 and spent["getImageDrillDown"] == 12
    assert spent["getSingleImage"] == 0 and spent["token"] == 0
    before = emu.stats()
    for dirpath, dirnames, filenames in visible_walk(m.path / collections[0]):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
    assert emu.stats() - before == {}
