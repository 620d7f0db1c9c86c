"""The cache index: which instances are complete on disk, how big, when last used, and the cache bound.

Why it is shaped so. The old store kept instance bytes in a diskcache (SQLite) database: every open
cost a database read, an LRU touch cost a write transaction, and libfuse's native threads reopened the
connection on every callback. Here the file system is the index: an instance is complete exactly when
its file exists under its final name, because it is written as ``<name>.part.<pid>.<n>`` and renamed
into place only once its length (and its md5, where one is known) has been checked. A crash or a
``kill -9`` leaves at most a part file, never a file that looks complete; part files of dead processes
are removed by the next scan. So any number of processes (a mount, ``nbiafs prefetch``, ``nbiafs
cache``) share one cache directory without a lock or a database.

Layout: ``cache_dir/objects/<namespace id>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (UIDs that are not
plain digits-and-dots are hashed into a safe name), ``<namespace id>/NAMESPACE`` holding the namespace
(server URL and account) for ``nbiafs cache info``. Plain files: ``nbiafs download`` hard-links them.

In memory: an LRU-ordered map of every complete file (this namespace and the others sharing the
directory), built by a scan in the background at start; a lookup that misses it looks at the disk
once (a file another process wrote) and adopts what it finds. The open path does one ``os.open`` and
one ``fstat``: no database, no write. Uses ("touches") are recorded in memory and written in batches
as the files' mtimes by :meth:`CacheIndex.flush_touches` (the LRU order survives a remount), and the
bound (``size_limit`` bytes over the whole directory) is kept by evicting the least recently used
files after each addition. Sizes and md5s of what was fetched live beside each file in its extended
attribute ``user.nbiafs.md5`` (or a ``.md5`` sidecar where the file system has no user xattrs):
``<md5 of the bytes fetched> <the server's md5 or -> <length fetched>``.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..daemon import process_alive

log = logging.getLogger(__name__)

OBJECTS = "objects"
NAMESPACE_FILE = "NAMESPACE"
SUFFIX = ".dcm"
PART = ".part."
XATTR = "user.nbiafs.md5"
SIDECAR = ".md5"
#: How many instances' cache paths :meth:`CacheIndex.path_for` remembers (about 300 bytes each).
PATHS_KEPT = 1 << 15
_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A UID as a file name: itself when it is a plain DICOM UID, else a hash (never '/' or '..')."""
    if len(uid) <= 64 and _SAFE_UID.match(uid):
        return uid
    return "h" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def namespace_id(namespace: str) -> str:
    return hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:16]


@dataclass(slots=True)
class Entry:
    """One complete file in the cache."""

    path: str
    size: int
    used: float  # wall-clock time of the last use (the file's mtime on disk)
    #: the length it had when fetched (its digests record), once read: -1 when there is no record
    fetched_length: int | None = None


@dataclass(frozen=True, slots=True)
class Digests:
    """What is known of a cached file's content: the md5 and length of the bytes fetched, the server's md5."""

    fetched: str | None
    server: str | None
    length: int | None = None


class CacheIndex:
    """The complete files under ``cache_dir/objects``, for namespace ``namespace``. Thread-safe."""

    def __init__(self, cache_dir: Path, namespace: str, size_limit: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(cache_dir) / OBJECTS
        self.namespace = namespace
        self.size_limit = size_limit
        self.dir = self.root / namespace_id(namespace)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()  # LRU first
        self._total = 0
        self._touched: set[str] = set()
        self._part_counter = 0
        #: path_for's answers (a pure function of the UIDs, asked at every open): building one took a
        #: regex, a hash check and a join per UID, a tenth of a warm open's Python time. Cleared when full.
        self._paths: dict[tuple[str, str], str] = {}
        self._scanned = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = self.dir / NAMESPACE_FILE
        if not marker.exists():
            tmp = marker.with_name(f"{NAMESPACE_FILE}.{os.getpid()}")
            tmp.write_text(namespace + "\n", encoding="utf-8")
            os.replace(tmp, marker)

    # ------------------------------------------------------------------ names
    def path_for(self, series_uid: str, sop_uid: str) -> str:
        key = (series_uid, sop_uid)
        path = self._paths.get(key)
        if path is None:
            path = os.path.join(self.dir, safe_name(series_uid), safe_name(sop_uid) + SUFFIX)
            if len(self._paths) >= PATHS_KEPT:
                self._paths.clear()
            self._paths[key] = path
        return path

    def part_for(self, final: str) -> str:
        """A fresh part-file name for ``final`` (unique per process and call); its folder exists."""
        with self._lock:
            self._part_counter += 1
            n = self._part_counter
        folder = os.path.dirname(final)
        if not os.path.isdir(folder):  # (one stat: makedirs of a folder that is there raises inside)
            os.makedirs(folder, exist_ok=True)
        return f"{final}{PART}{os.getpid()}.{n}"

    # ------------------------------------------------------------------ lookups
    def lookup(self, path: str) -> Entry | None:
        """The entry of complete file ``path``, or None. Looks at the disk when memory does not know it."""
        with self._lock:
            entry = self._entries.get(path)
        if entry is not None:
            return entry
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self._adopt(path, st.st_size, st.st_mtime)

    def known(self, path: str) -> Entry | None:
        """The entry of ``path`` if memory knows it: for planning, where a file another process put in
        the cache since the start's scan may be missed, because what is then fetched is looked up with
        :meth:`lookup` first. Each miss of :meth:`lookup` is a ``stat``, and on the paths a zip and its
        reader take for every file those were most of the syscalls, each one a moment the thread gives up
        the GIL to the others. Until the start's scan has ended memory knows nothing of what earlier
        mounts cached, so until then this is :meth:`lookup` (a remount's reader of a cached series has
        its next files read from the disk ahead of it, and no read-ahead queued for them)."""
        if not self._scanned.is_set():
            return self.lookup(path)
        with self._lock:
            return self._entries.get(path)

    def touch(self, entry: Entry) -> None:
        """``entry`` was used now: most recently used in memory; on disk at the next flush."""
        with self._lock:
            entry.used = self._clock()
            if entry.path in self._entries:
                self._entries.move_to_end(entry.path)
                self._touched.add(entry.path)

    def flush_touches(self) -> int:
        """Write the recorded uses as the files' mtimes (the LRU order a remount starts from)."""
        with self._lock:
            touched, self._touched = self._touched, set()
            pending = [(p, self._entries[p].used) for p in touched if p in self._entries]
        for path, used in pending:
            try:
                os.utime(path, (used, used))
            except OSError:  # evicted meanwhile, or by another process
                pass
        return len(pending)

    # ------------------------------------------------------------------ changes
    def add(self, path: str, size: int) -> Entry:
        """A file just renamed into place: record it, then keep the bound (evicting others)."""
        entry = Entry(path, size, self._clock(), size)
        with self._lock:
            old = self._entries.pop(path, None)
            if old is not None:
                self._total -= old.size
            self._entries[path] = entry
            self._total += size
        self.evict_as_needed(keep=path)
        return entry

    def remove(self, path: str) -> bool:
        """Delete a cached file (and what is stored beside it); True if there was one."""
        with self._lock:
            entry = self._entries.pop(path, None)
            if entry is not None:
                self._total -= entry.size
            self._touched.discard(path)
        removed = entry is not None
        for name in (path, path + SIDECAR):
            try:
                os.unlink(name)
                removed = removed or name == path
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s from the cache: %s", name, exc)
        return removed

    def evict_as_needed(self, keep: str | None = None) -> int:
        """Evict least recently used files until the cache is within its bound; how many went."""
        evicted = 0
        while True:
            with self._lock:
                if self._total <= self.size_limit or not self._entries:
                    return evicted
                path, entry = next(iter(self._entries.items()))
                if path == keep:
                    if len(self._entries) == 1:
                        return evicted  # the file just added is bigger than the whole bound: keep it
                    self._entries.move_to_end(path)
                    continue
            self.remove(path)
            evicted += 1
            log.debug("evicted %s (%d bytes)", path, entry.size)

    def _adopt(self, path: str, size: int, used: float) -> Entry:
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                return entry
            entry = Entry(path, size, used)
            self._entries[path] = entry
            self._total += size
        return entry

    def fetched_length(self, entry: Entry) -> int | None:
        """The length ``entry`` had when it was fetched (None when unrecorded), read from disk once."""
        known = entry.fetched_length
        if known is None:
            recorded = self.digests(entry.path).length
            known = entry.fetched_length = recorded if recorded is not None else -1
        return known if known >= 0 else None

    # ------------------------------------------------------------------ the whole cache
    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    def scan(self) -> int:
        """Learn every complete file under ``objects`` (all namespaces), oldest use first, and remove the
        part files of processes that are gone; then keep the bound. Returns how many files were found."""
        found: list[tuple[float, str, int]] = []
        for path, st in _walk_files(self.root):
            if PART in os.path.basename(path):
                if not _writer_alive(path):
                    try:
                        os.unlink(path)
                        log.info("removed %s, left by a process that is gone", path)
                    except OSError:
                        pass
                continue
            if path.endswith(SUFFIX):
                found.append((st.st_mtime, path, st.st_size))
        found.sort()
        with self._lock:
            known = dict(self._entries)
            fresh: collections.OrderedDict[str, Entry] = collections.OrderedDict()
            for used, path, size in found:
                fresh[path] = known.pop(path) if path in known else Entry(path, size, used)
            for path, entry in known.items():  # added while scanning (the newest): keep them last
                if os.path.exists(path):
                    fresh[path] = entry
            self._entries = fresh
            self._total = sum(e.size for e in fresh.values())
        self._scanned.set()
        self.evict_as_needed()
        return len(found)

    def entries(self, *, all_namespaces: bool = False) -> list[Entry]:
        """A snapshot of the known complete files (this namespace's, or every namespace's)."""
        prefix = str(self.dir) + os.sep
        with self._lock:
            return [e for e in self._entries.values() if all_namespaces or e.path.startswith(prefix)]

    def namespaces(self) -> dict[str, str]:
        """Namespace id -> namespace (server URL | account) of every namespace in the cache directory."""
        out = {}
        try:
            for child in os.scandir(self.root):
                if child.is_dir():
                    try:
                        out[child.name] = (Path(child.path) / NAMESPACE_FILE).read_text(encoding="utf-8").strip()
                    except OSError:
                        out[child.name] = "?"
        except OSError:
            pass
        return out

    # ------------------------------------------------------------------ what is known of the content
    def set_digests(self, path: str, digests: Digests) -> None:
        length = "-" if digests.length is None else str(digests.length)
        value = f"{digests.fetched or '-'} {digests.server or '-'} {length}".encode("ascii")
        try:
            os.setxattr(path, XATTR, value)
            return
        except OSError:  # no user xattrs on this file system: a sidecar file
            pass
        tmp = f"{path}{SIDECAR}.{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(value)
            os.replace(tmp, path + SIDECAR)
        except OSError as exc:
            log.debug("cannot record the md5 of %s: %s", path, exc)

    def digests(self, path: str) -> Digests:
        raw: bytes | None
        try:
            raw = os.getxattr(path, XATTR)
        except OSError:
            try:
                with open(path + SIDECAR, "rb") as fh:
                    raw = fh.read(200)
            except OSError:
                raw = None
        if not raw:
            return Digests(None, None)
        parts = raw.decode("ascii", "replace").split()
        fetched = parts[0] if parts and parts[0] != "-" else None
        server = parts[1] if len(parts) > 1 and parts[1] != "-" else None
        length = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
        return Digests(fetched, server, length)


def _walk_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                for child in it:
                    try:
                        if child.is_dir(follow_symlinks=False):
                            stack.append(child.path)
                        elif child.is_file(follow_symlinks=False):
                            yield child.path, child.stat(follow_symlinks=False)
                    except OSError:
                        continue
        except OSError:
            continue


def _writer_alive(part_path: str) -> bool:
    """Whether the process that writes part file ``part_path`` (``<final>.part.<pid>.<n>``) still runs."""
    try:
        pid = int(part_path.rsplit(PART, 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return False
    return pid == os.getpid() or process_alive(pid)
