"""The series zip's pace, as the store asks it near where zip and singles meet: known only from members
that came in reading order, and never claimed for a zip that is late, waiting, ended or not allowed
that far. Driven by a fake clock and a zip fed member by member (no server, no threads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fakes import fake_dicom_bytes

from nbiafs.catalog import Node
from nbiafs.records import ZipMember
from nbiafs.store.zipfetch import PACE_MEMBERS, ZipFetch

SERIES = "1.2.826.0.1.3680043.9.7.2"
STEP = 0.01  # seconds between two members on the fake clock


def files(count: int, *, reversed_numbers: bool = False) -> list[Node]:
    """A series in reading order; ``reversed_numbers``: the zip's InstanceNumber order is the reverse."""
    return [Node("instance", f"/C/P/s/{i:03d}.dcm", ino=100 + i, mtime=0.0, size=200, collection="C",
                 patient_id="P", series_uid=SERIES, sop_uid=f"{SERIES}.{i}",
                 instance_number=count - i if reversed_numbers else i + 1) for i in range(count)]


def run_zip(series: list[Node], probe: Callable[[ZipFetch, int, float], None], *, limit: int | None = None) -> ZipFetch:
    """Read the zip of ``series`` (members in InstanceNumber order, STEP apart), calling
    ``probe(zip, k, now)`` before member k arrives; returns the ended ZipFetch."""
    clock = [0.0]
    ordered = sorted(series, key=lambda f: f.instance_number)
    holder: dict[str, ZipFetch] = {}

    def members() -> Iterator[tuple[ZipMember, Iterator[bytes]]]:
        yield ZipMember("LICENSE", 3), iter([b"lic"])
        for k, f in enumerate(ordered):
            clock[0] += STEP
            probe(holder["zip"], k, clock[0])
            yield ZipMember(f"{k + 1:08d}.dcm", 200), iter([fake_dicom_bytes(str(f.sop_uid), 200)])

    def deliver(node: Any, stream: Any) -> bool:
        for _ in stream.chunks():
            pass
        return True

    zf = ZipFetch(series_uid=SERIES, files=series, open_zip=members, skip=lambda node: False,
                  deliver=deliver, record_md5=lambda node, md5: None, clock=lambda: clock[0])
    holder["zip"] = zf
    zf.allow(len(series) if limit is None else limit)
    zf.run()
    assert zf.error is None
    return zf


def test_the_pace_is_known_once_enough_members_came_in_order() -> None:
    seen: dict[int, dict[str, bool]] = {}

    def probe(zf: ZipFetch, k: int, now: float) -> None:
        last = k - 1  # the reading position of the member before this one
        seen[k] = {
            "near": zf.brings_within(last + 3, 3.5 * STEP, now),  # ~2 members away at this pace
            "far": zf.brings_within(last + 30, 3.5 * STEP, now),
            "passed": zf.brings_within(max(last, 0), 1.0, now),
            "late": zf.brings_within(last + 3, 3.5 * STEP, now + 1.0),  # nothing came for a second
        }

    zf = run_zip(files(40), probe)
    for k in range(PACE_MEMBERS):  # before PACE_MEMBERS members, nothing is known
        assert not any(seen[k].values()), (k, seen[k])
    for k in range(PACE_MEMBERS, 30):
        assert seen[k] == {"near": True, "far": False, "passed": False, "late": False}, (k, seen[k])
    assert not zf.brings_within(39, 10.0, 0.4)  # ended


def test_members_out_of_reading_order_tell_no_pace() -> None:
    answers: list[bool] = []
    run_zip(files(30, reversed_numbers=True),  # --layout uid: the zip's order is not the reading order
            lambda zf, k, now: answers.extend(zf.brings_within(p, 10.0, now) for p in range(30)))
    assert not any(answers)


def test_a_position_the_zip_may_not_bring_yet_is_never_claimed() -> None:
    answers: dict[int, tuple[bool, bool]] = {}

    def probe(zf: ZipFetch, k: int, now: float) -> None:
        if k == 12:
            answers[k] = (zf.brings_within(13, 1.0, now), zf.brings_within(20, 1.0, now))
            zf.stop()  # (else it would wait at the window's end for its reader)

    run_zip(files(40), probe, limit=15)  # the window ends at 15: the zip waits there
    assert answers[12] == (True, False)
