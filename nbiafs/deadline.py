"""One deadline per call: everything the call waits for (a connection, a token, a lock, another thread's
fetch, a backoff) draws on the same remaining time.

Why an object and not a number of seconds: a call crosses layers (transport -> token manager -> another
thread's login) and each layer used to start a timeout of its own, so the waits added up: a hanging
token endpoint held an ``open()`` for minutes although the call's deadline was seconds. A
:class:`Deadline` is passed down instead, and each wait asks it how much time is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Deadline:
    """An instant on ``clock`` (``time.monotonic`` by default) by which a call must be over."""

    at: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at

    def cap(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes first (never negative)."""
        return min(seconds, self.remaining())

    def sooner(self, seconds: float) -> Deadline:
        """This deadline or one ``seconds`` from now, whichever comes first."""
        return Deadline(min(self.at, self.clock() + seconds), self.clock)
