"""Metadata files where the kernel keeps pages (nbiafs.keptfiles): lengths that never change, and forgetting."""

from __future__ import annotations

import json
import threading

from nbiafs.keptfiles import PAGE, Forgetter, padded


def test_padding_keeps_the_json_and_makes_every_version_one_length():
    small = json.dumps({"hits": 1}, indent=1).encode() + b"\n"
    larger = json.dumps({"hits": 123456789, "misses": 42}, indent=1).encode() + b"\n"
    assert len(padded(small)) == len(padded(larger)) == PAGE
    assert json.loads(padded(larger)) == {"hits": 123456789, "misses": 42}
    assert padded(small).endswith(b" \n") and padded(small).startswith(small[:-1])
    assert len(padded(b"x" * PAGE + b"\n")) == 2 * PAGE  # more than a page: whole pages
    assert len(padded(b"x" * (PAGE - 1) + b"\n")) == PAGE


def test_the_forgetter_forgets_in_its_own_thread_and_once_per_pending_path():
    calls: list[tuple[str, str]] = []
    release = threading.Event()
    entered = threading.Event()

    def invalidate(path: str) -> None:
        calls.append((path, threading.current_thread().name))
        entered.set()
        assert release.wait(10)

    forgetter = Forgetter(invalidate)
    try:
        forgetter.forget("/a")
        assert entered.wait(10)  # the worker is inside the kernel's call for /a
        for _ in range(3):
            forgetter.forget("/b")  # pending: asked once
        forgetter.forget("/a")  # after its turn began: asked again
        release.set()
        done = threading.Event()
        for _ in range(1000):
            if len(calls) == 3:
                break
            done.wait(0.005)
        assert [c[0] for c in calls] == ["/a", "/b", "/a"]
        assert {c[1] for c in calls} == {"nbiafs-forget"}
    finally:
        forgetter.close()
    forgetter.forget("/c")  # closed: nothing more
    assert len(calls) == 3
