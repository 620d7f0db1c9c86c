"""Fault schedule and statistics of the emulator: what tests and benchmarks steer and read.

* :class:`FaultBook`: "the next N calls of endpoint E misbehave" (status, delay, truncation,
  length-preserving corruption). An endpoint is named plainly (``getSeries``: any API version) or
  with its API (``v4/getSeries``, ``v2/getSeries``, ``advanced/getImageDrillDown``, ``oauth/token``);
  ``*`` matches every call.
* :class:`Stats`: calls and body bytes sent, per plain endpoint name (``getSingleImage``, ``token``:
  the keys the tests have always read) and per versioned name (``v4/getSeries``), so a test can
  prove "zero token requests" or "v4 served this" and a benchmark can report the bytes fetched.

Corruption flips a few bytes at fixed offsets (three quarters into the body, where a DICOM file
holds pixels), so the body keeps its length, still parses, and fails only an md5 check, as a
bad file on the server's disk would. Both classes are thread-safe (one lock each).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .replies import Fault

#: How many bytes a corrupting fault flips.
CORRUPT_BYTES = 4


def corrupt_offsets(size: int) -> tuple[int, ...]:
    """The offsets a corrupting fault flips in a body of ``size`` bytes (none for an empty body)."""
    if size <= 0:
        return ()
    start = min(size * 3 // 4, max(size - CORRUPT_BYTES, 0))
    return tuple(range(start, min(start + CORRUPT_BYTES, size)))


def flip(chunk: bytes, offset: int, marks: Iterable[int]) -> bytes:
    """``chunk`` (which starts at ``offset`` of its body) with the bytes at ``marks`` inverted."""
    end = offset + len(chunk)
    hits = [m - offset for m in marks if offset <= m < end]
    if not hits:
        return chunk
    data = bytearray(chunk)
    for i in hits:
        data[i] ^= 0xFF
    return bytes(data)


@dataclass(slots=True)
class _Scheduled:
    fault: Fault
    remaining: int


class FaultBook:
    """Faults waiting for calls; each hits the next ``count`` matching calls, then is gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Scheduled] = []

    def add(self, endpoint: str, *, status: int | None = None, count: int = 1, delay: float = 0.0,
            truncate: bool = False, corrupt: bool = False) -> None:
        if not endpoint or count < 1 or delay < 0 or (status is not None and not 100 <= status <= 599):
            raise ValueError("bad fault: need an endpoint, count >= 1, delay >= 0, status 100-599")
        fault = Fault(endpoint, status, float(delay), bool(truncate), bool(corrupt))
        with self._lock:
            self._queue.append(_Scheduled(fault, int(count)))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def take(self, endpoint: str, versioned: str) -> Fault | None:
        """The first fault matching a call of ``endpoint`` (plain) / ``versioned``, used up by one."""
        with self._lock:
            for item in self._queue:
                if item.fault.endpoint in (endpoint, versioned, "*"):
                    item.remaining -= 1
                    if item.remaining == 0:
                        self._queue.remove(item)
                    return item.fault
        return None


class Stats:
    """Call and byte counters, plain and versioned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._versioned: collections.Counter[str] = collections.Counter()
        self._bytes: collections.Counter[str] = collections.Counter()
        self._versioned_bytes: collections.Counter[str] = collections.Counter()
        self._instances: collections.Counter[str] = collections.Counter()  # getSingleImage answers per SOP UID

    def call(self, endpoint: str, versioned: str) -> None:
        with self._lock:
            self._calls[endpoint] += 1
            self._versioned[versioned] += 1

    def sent(self, endpoint: str, versioned: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self._bytes[endpoint] += nbytes
            self._versioned_bytes[versioned] += nbytes

    def instance_served(self, sop_uid: str) -> None:
        with self._lock:
            self._instances[sop_uid] += 1

    def instances(self) -> collections.Counter[str]:
        """``getSingleImage`` answers per SOPInstanceUID (so one fetch per instance can be checked)."""
        with self._lock:
            return collections.Counter(self._instances)

    def calls(self, versioned: bool = False) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self._versioned if versioned else self._calls)

    def bytes_sent(self, versioned: bool = False) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self._versioned_bytes if versioned else self._bytes)

    def reset(self) -> None:
        with self._lock:
            for counter in (self._calls, self._versioned, self._bytes, self._versioned_bytes, self._instances):
                counter.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Everything at once (the ``GET /emulator/stats?detail=1`` answer)."""
        with self._lock:
            return {"calls": dict(self._calls), "versioned": dict(self._versioned),
                    "bytes": dict(self._bytes), "versioned_bytes": dict(self._versioned_bytes),
                    "instances": dict(self._instances)}
