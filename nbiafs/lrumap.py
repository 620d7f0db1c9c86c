"""A bounded map whose entries expire: least recently used out first, each entry weighed by its size.

What it owns: the memory bound and the expiry of the catalog's built listings, which every ``open``,
``stat`` and ``lookup`` of the mount walks, once per path component. It does what cachetools'
``TLRUCache`` did there, at a fraction of the cost: an ``OrderedDict`` (C) of ``(expires, value,
size)`` instead of a linked list and a timer context in Python. A lookup is one dict access, one
comparison and one ``move_to_end``; ``cachetools`` spent several microseconds on each, five to ten
times per open of a cached file.

Not thread-safe: the caller holds its own lock around every call (the catalog does).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringLRU(Generic[K, V]):
    """At most ``maxsize`` in total of ``getsizeof(value)`` over the entries; an entry is gone once
    ``ttu(key, value, now)`` (its time to use, on the ``time.monotonic`` clock, fixed when it is set)
    has passed. A value bigger than ``maxsize`` on its own is refused with ValueError, as cachetools
    does, so the caller can tell it was not kept."""

    __slots__ = ("_maxsize", "_ttu", "_getsizeof", "_data", "_total")

    def __init__(self, maxsize: int, ttu: Callable[[K, V, float], float],
                 getsizeof: Callable[[V], int] = lambda value: 1) -> None:
        self._maxsize = maxsize
        self._ttu = ttu
        self._getsizeof = getsizeof
        self._data: OrderedDict[K, tuple[float, V, int]] = OrderedDict()
        self._total = 0

    def get(self, key: K, default: V | None = None) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return default
        if entry[0] <= time.monotonic():
            self._drop(key)
            return default
        self._data.move_to_end(key)
        return entry[1]

    def __setitem__(self, key: K, value: V) -> None:
        size = self._getsizeof(value)
        if size > self._maxsize:
            raise ValueError(f"value too large: {size} > {self._maxsize}")
        now = time.monotonic()
        if key in self._data:
            self._drop(key)
        self._data[key] = (self._ttu(key, value, now), value, size)
        self._total += size
        while self._total > self._maxsize:
            oldest = next(iter(self._data))
            self._drop(oldest)

    def pop(self, key: K, default: V | None = None) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return default
        self._drop(key)
        return entry[1] if entry[0] > time.monotonic() else default

    def _drop(self, key: K) -> None:
        self._total -= self._data.pop(key)[2]

    def expire(self) -> None:
        """Drop every entry whose time has passed (the others keep their order)."""
        now = time.monotonic()
        for key in [k for k, (expires, _, _) in self._data.items() if expires <= now]:
            self._drop(key)

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(key)  # type: ignore[arg-type]
        return entry is not None and entry[0] > time.monotonic()

    def __iter__(self) -> Iterator[K]:
        self.expire()
        return iter(list(self._data))

    def __len__(self) -> int:
        self.expire()
        return len(self._data)

    def values(self) -> list[V]:
        self.expire()
        return [value for _, value, _ in self._data.values()]

    @property
    def currsize(self) -> int:
        """The sum of the sizes of the entries held (expired ones included until they are looked at)."""
        return self._total
