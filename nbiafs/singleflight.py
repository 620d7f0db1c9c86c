"""One piece of work in flight per key: the first caller does it, the others wait and share its outcome.

The registries (which key has a flight) stay with their owners (the metadata cache, the instance store),
because each guards them with the lock that also guards its own state; this module owns the flight
itself: finishing it exactly once, and a bounded wait that hands each waiter the value or its own copy
of the error.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


def fresh_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise in another thread (so tracebacks do not pile up on one object)."""
    try:
        return copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: raise the original
        return error


class Flight(Generic[V]):
    """One load or fetch in progress."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None

    def succeed(self, value: V) -> None:
        self.value = value

    def fail(self, error: BaseException) -> None:
        self.error = error

    def wait(self, timeout: float, on_timeout: Callable[[], BaseException]) -> V:
        """The leader's value, or a copy of its error; ``on_timeout()`` is raised after ``timeout`` s."""
        if not self.done.wait(timeout):
            raise on_timeout()
        if self.error is not None:
            raise fresh_copy(self.error)
        return self.value  # type: ignore[return-value]
