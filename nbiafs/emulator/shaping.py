"""Traffic shaping of the emulator: latency per request, a bandwidth cap per connection, a shared link cap.

Benchmarks need a server that is slow the way a distant one is: every answer starts ``latency``
seconds late, each connection sends at most ``per_connection`` bytes/s, and all connections
together at most ``link`` bytes/s (one uplink shared by everyone). All three can change while the
server runs.

Each cap is a :class:`Pacer`, a GCRA ("virtual scheduling") token bucket: a reservation of ``n``
bytes moves the pacer's theoretical arrival time by ``n / rate`` and the caller waits until that
time, less the burst allowance. Writers reserve one chunk (64 KiB at most) at a time and the
reservations are served in arrival order, so N busy connections on one link each get about 1/N of
it. A connection reserves on its own pacer first, then on the link, so a connection held back by
its own cap does not hold a slot of the shared link while it waits.

Waiting uses the emulator's stop event (``wait``), so stopping the server interrupts every paced
writer at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Largest piece a writer sends in one go: keeps pacing smooth and memory flat.
CHUNK_SIZE = 64 * 1024


class Pacer:
    """One rate cap (bytes/s; ``None`` = unlimited), reservable from many threads."""

    def __init__(self, rate: float | None = None, burst: int = CHUNK_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._burst = burst
        self._rate: float | None = None
        self._tat = 0.0  # theoretical arrival time of the next byte
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        with self._lock:
            return self._rate

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            rate = None
        with self._lock:
            self._rate = None if rate is None else float(rate)
            self._tat = self._clock()

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes``; returns how many seconds the caller must wait before sending them."""
        with self._lock:
            if self._rate is None:
                return 0.0
            now = self._clock()
            start = max(self._tat, now)
            self._tat = start + nbytes / self._rate
            return max(0.0, self._tat - self._burst / self._rate - now)


class Shaper:
    """The emulator's shaping settings, plus one :class:`Pacer` per connection made on demand."""

    def __init__(self, latency: float = 0.0, per_connection: float | None = None,
                 link: float | None = None) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self._lock = threading.Lock()
        self._latency = float(latency)
        self._per_connection = _rate(per_connection)
        self.link = Pacer(_rate(link))

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @property
    def per_connection(self) -> float | None:
        with self._lock:
            return self._per_connection

    def set(self, *, latency: float | None = None, per_connection: float | None | str = "keep",
            link: float | None | str = "keep") -> None:
        """Change what is given (``"keep"``: leave as is; ``None`` or 0: unlimited)."""
        if latency is not None and latency < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            if latency is not None:
                self._latency = float(latency)
            if per_connection != "keep":
                self._per_connection = _rate(per_connection)  # type: ignore[arg-type]
        if link != "keep":
            self.link.set_rate(_rate(link))  # type: ignore[arg-type]

    def settings(self) -> dict[str, float | None]:
        return {"latency": self.latency, "per_connection": self.per_connection, "link": self.link.rate}

    def connection(self) -> ConnectionPacer:
        return ConnectionPacer(self)


class ConnectionPacer:
    """The pacing of one connection: its own cap (read from the shaper on each chunk) and the link's."""

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper
        self._own = Pacer(shaper.per_connection)

    def before_send(self, nbytes: int, wait: Callable[[float], object]) -> None:
        """Block (through ``wait``) until ``nbytes`` may go out on this connection."""
        rate = self._shaper.per_connection
        if rate != self._own.rate:
            self._own.set_rate(rate)
        delay = self._own.reserve(nbytes)
        if delay > 0:
            wait(delay)
        delay = self._shaper.link.reserve(nbytes)
        if delay > 0:
            wait(delay)


def _rate(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if value < 0:
        raise ValueError("a bandwidth cap must be >= 0 bytes/s (0 or None = unlimited)")
    return value or None


def parse_rate(text: str) -> float | None:
    """``"2.5M"`` -> 2_500_000.0 bytes/s; k/M/G are powers of 1000, Ki/Mi/Gi of 1024; 0/none = unlimited."""
    value = text.strip().removesuffix("/s").removesuffix("B")
    if value.lower() in ("", "0", "none", "off", "unlimited"):
        return None
    factors = {"Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in factors.items():
        if value.endswith(suffix):
            return _rate(float(value[: -len(suffix)]) * factor)
    return _rate(float(value))
