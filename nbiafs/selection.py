"""What a ``prefetch`` or ``download`` is asked for: the series (and files) under some paths of the tree.

What it owns: turning paths of the tree (a collection, patient, study or series folder, or one file)
into :class:`Pick` records, each a series folder and the files of it that are wanted, in the order a
reader of the tree meets them, each series once; and the totals a dry run prints. It lists the tree
through the catalog (same names, same caches as the mount), never fetches a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import NotFoundError


@dataclass(slots=True)
class Pick:
    """One series folder and the files of it asked for (all of them, or the ones named)."""

    series: Any  # catalog.Node of kind "series"
    files: list[Any] = field(default_factory=list)  # catalog.Node of kind "instance"

    @property
    def size(self) -> int:
        return sum(int(f.size) for f in self.files)


def _series_below(catalog: Any, node: Any) -> Iterator[Any]:
    if node.kind == "series":
        yield node
        return
    for child in catalog.children_of(node):
        if child.kind in ("collection", "patient", "study", "series"):
            yield from _series_below(catalog, child)


def pick(catalog: Any, paths: Iterable[str]) -> list[Pick]:
    """The series and files under ``paths`` (paths of the tree, ``/Collection/...``). NotFoundError for a
    path that is not in the tree, naming it."""
    picks: dict[str, Pick] = {}
    whole: set[str] = set()
    for path in paths:
        node = catalog.lookup(path)
        if node.kind in ("meta", "metadir"):
            raise NotFoundError(f"{path}: a metadata file, not DICOM data")
        if node.kind == "instance":
            parent = catalog.lookup(node.path.rsplit("/", 1)[0] or "/")
            entry = picks.setdefault(parent.path, Pick(parent))
            if parent.path not in whole and all(f.path != node.path for f in entry.files):
                entry.files.append(node)
            continue
        for series in _series_below(catalog, node):
            files = [c for c in catalog.children_of(series) if c.kind == "instance"]
            picks[series.path] = Pick(series, files)
            whole.add(series.path)
    return list(picks.values())


def totals(picks: Iterable[Pick]) -> tuple[int, int, int]:
    """(series, files, bytes)."""
    series = files = size = 0
    for p in picks:
        series += 1
        files += len(p.files)
        size += p.size
    return series, files, size
