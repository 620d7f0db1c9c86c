"""What the store needs of an instance: its identifiers and exact size.

What it owns: the one shape every part of :mod:`nbiafs.store` takes an instance in (a catalog
``Node``, or a bare reference), and the check that an object names an instance at all. A module of
its own so that the store and its parts (:mod:`.jobs`) share it without importing each other.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import NbiaError


class InstanceRef(Protocol):
    """What the store needs of a catalog ``Node``: the instance's identifiers and exact size."""

    @property
    def series_uid(self) -> str | None: ...
    @property
    def sop_uid(self) -> str | None: ...
    @property
    def size(self) -> int: ...


def ids(node: InstanceRef) -> tuple[str, str]:
    """``(series_uid, sop_uid)`` of ``node``; :class:`NbiaError` when it does not name an instance."""
    if not node.series_uid or not node.sop_uid:
        raise NbiaError(f"not an instance: {node!r}")
    return node.series_uid, node.sop_uid


__all__ = ["InstanceRef", "ids"]
