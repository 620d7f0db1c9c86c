"""stopping.stop_in_order: every part stopped in order, a failing one logged by name, none skipped."""

from __future__ import annotations

import logging

import pytest

from nbiafs.stopping import stop_in_order


def test_every_part_stops_in_order_even_after_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    stopped: list[str] = []

    def broken() -> None:
        stopped.append("store")
        raise RuntimeError("worker would not join")

    with caplog.at_level(logging.ERROR, logger="nbiafs.stopping"):
        stop_in_order((("HTTP client", lambda: stopped.append("client")),
                       ("walk-ahead", None),
                       ("store", broken),
                       ("tokens", lambda: stopped.append("tokens"))))
    assert stopped == ["client", "store", "tokens"]
    assert [r.getMessage() for r in caplog.records] == ["error while stopping the store"]
    assert "worker would not join" in caplog.text


def test_an_interrupt_is_not_swallowed() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stop_in_order((("store", interrupted),))
