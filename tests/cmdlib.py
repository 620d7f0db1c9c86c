"""Helpers of the prefetch, download and cache command tests: carts, the cache seen through the store's
public API, and the archive's true bytes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbiafs.fetchjob import open_cache

HEADER = """downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet
includeAnnotation=true
noOfrRetry=4
databasketId=manifest-1733000000000.tcia
manifestVersion=3.0
ListOfSeriesToDownload=
"""
#: Small series with hostile names (Edge-Cases) and plain ones (Demo-Head-MR).
CART_COLLECTIONS = ("Demo-Head-MR", "Edge-Cases")


def interruptible(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """A child to send Ctrl-C (SIGINT) to. A test run started as a background job of a non-interactive
    shell ignores SIGINT, and children inherit that: the child then never sees the Ctrl-C this test
    sends. So the child starts with SIGINT's default (Python then raises KeyboardInterrupt in it)."""
    with _sigint_default():
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, **kwargs)


@contextlib.contextmanager
def _sigint_default() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # a handler of this process is reset at exec: nothing to do
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_manifest(path: Path, uids: Iterable[str]) -> Path:
    path.write_text(HEADER + "\n".join(uids) + "\n")
    return path


def cart(archive: Any, count: int = 4) -> list[Any]:
    """``count`` small public series, from two collections."""
    chosen = []
    for name in CART_COLLECTIONS:
        chosen += [s for s in archive.series if s.collection == name][: (count + 1) // 2]
    return chosen[:count]


def instances(archive: Any, series: Iterable[Any]) -> list[Any]:
    return [i for s in series for i in archive.instances_of(s.uid)]


def true_bytes(instance: Any) -> bytes:
    return Path(instance.path).read_bytes()


@dataclass(frozen=True)
class Ref:
    """What the store needs of an instance."""

    series_uid: str
    sop_uid: str
    size: int = 0


def ref(instance: Any) -> Ref:
    return Ref(instance.series_uid, instance.sop_uid, instance.size)


def cache_view(cache_dir: Path, server: str, account: str = "nbia_guest") -> Any:
    """The store over ``cache_dir`` (never evicts, never fetches): close it after use."""
    return open_cache(cache_dir, f"{server}|{account}")


def cached(cache_dir: Path, server: str, items: Iterable[Any]) -> dict[str, bytes | None]:
    """SOPInstanceUID -> the cached bytes (None when not cached)."""
    out: dict[str, bytes | None] = {}
    with cache_view(cache_dir, server) as view:
        for inst in items:
            path = view.cached_path(ref(inst))
            out[inst.sop_uid] = path.read_bytes() if path is not None else None
    return out


def part_files(root: Path) -> list[str]:
    """Files under ``root`` that are transfers or copies in progress (never a complete file)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if ".part" in f]
    return found


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every visible file under ``root`` (dot-files and metadata.csv left out)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or (Path(dirpath) == root and name == "metadata.csv"):
                continue
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = path.read_bytes()
    return out
