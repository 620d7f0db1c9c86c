"""``nbiafs download (PATH... | --manifest FILE.tcia) DEST``: a real folder, named as the mount names it.

What it owns: writing the files asked for into DEST at their paths in the tree (``DEST/Collection/
Patient/Study/Series/1-001.dcm``: the catalog's names, so identical to the mount's, in its layout),
``DEST/metadata.csv`` as the Data Retriever writes it (:mod:`nbiafs.metacsv`, one row per complete
series, merged across resumed runs), resuming, and the dry run.

How a file gets there: the store's ``ensure`` makes it cached and checked against the server's MD5
(:func:`nbiafs.fetchjob.ensure_healing`); as soon as it is, the cached file is hard-linked into DEST
(same file system: no copy, no extra space) or else copied, under a temporary name in its series folder
(``.NAME.nbiafs-part``), checked (its MD5 against the server's: for a link that re-reads the cache's
copy, for a copy it is computed while copying), and renamed into place. So a file under its final name
is always complete and verified, and a download bigger than the cache works: each file is in DEST
before the cache may evict it. A cached copy that fails the check is dropped from the cache and
fetched again.

Resuming: ``DEST/.nbiafs-download`` records every file written (size, MD5, whether it was checked
against the server's, inode and mtime), one line each, appended as they are written and compacted at
the end. A file is skipped when its record says it was verified and its size (the catalog's exact
size), inode and mtime are unchanged, or, when only its inode or mtime changed (a hard link whose
cache copy was used), its MD5 still is the recorded one. Anything else (no record, another size: a
file cut short by a killed run or by hand, another MD5) is written again. Leftover temporary files
are removed. The record file is also a lock (``flock``): two downloads into one DEST at once are
refused.

Why it is shaped so: a download is the Data Retriever's job (a folder for programs that never see a
mount, on a cluster, resumable, verified); doing it from the cache means the mount, prefetch and
download share every byte fetched, and a hard link costs nothing. A full disk at DEST stops the run
with one clear line (what is there stays and a re-run resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import daemon, metacsv
from .errors import ConfigError, NbiaError
from .fetchjob import (
    FETCH_GROUPS,
    Target,
    ensure_healing,
    lost_under_the_store,
    open_targets,
    resolve_command,
    run_stoppable,
    start,
)
from .progress import Progress, human_bytes, human_seconds

log = logging.getLogger(__name__)

STATE = ".nbiafs-download"
PART = ".nbiafs-part"
#: Seconds between writes of metadata.csv while a download runs (it is always written at the end).
METADATA_EVERY = 5.0
#: Series per getSeriesMetadata call.
METADATA_BATCH = 200
#: errno values that mean "this file system cannot hard-link these files": copy instead.
NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES})
#: errno values that mean DEST is full: the run stops.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DestError(NbiaError):
    """DEST cannot be used (not writable, inside a mount, locked by another download, full)."""


# ---------------------------------------------------------------------------------- what is in DEST
@dataclass(slots=True)
class Written:
    """What the record file says of one file in DEST."""

    size: int
    md5: str | None
    verified: bool
    ino: int
    mtime_ns: int


class DoneLog:
    """``DEST/.nbiafs-download``: the files written and checked (see the module docstring). Thread-safe."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / STATE
        self.entries: dict[str, Written] = {}
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None

    def open(self) -> DoneLog:
        """Read the records and take the lock (DestError when another download holds it)."""
        try:
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open for the run: it is the lock
        except OSError as exc:
            raise DestError(f"cannot write into {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise DestError(f"another nbiafs download is writing into {self.path.parent}; wait for it, "
                            "or stop it first") from None
        self._fh = fh
        fh.seek(0)
        self.entries = parse_records(fh.read())
        fh.seek(0, os.SEEK_END)
        return self

    def load(self) -> DoneLog:
        """Read the records only (a dry run: no lock, nothing created)."""
        try:
            self.entries = parse_records(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            self.entries = {}
        return self

    def done(self, rel: str, path: Path, size: int, verify: bool) -> bool:
        """Whether the file ``rel`` (at ``path``) is complete and, with ``verify``, checked."""
        entry = self.entries.get(rel)
        if entry is None or entry.size != size or (verify and not entry.verified):
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != size:
            return False
        if (st.st_ino, st.st_mtime_ns) == (entry.ino, entry.mtime_ns):
            return True
        if entry.md5 is None or md5_of_file(path) != entry.md5:
            return False
        with self._lock:
            self.entries[rel] = dataclasses.replace(entry, ino=st.st_ino, mtime_ns=st.st_mtime_ns)
        return True

    def add(self, rel: str, st: os.stat_result, md5: str | None, verified: bool) -> None:
        entry = Written(st.st_size, md5, verified, st.st_ino, st.st_mtime_ns)
        with self._lock:
            self.entries[rel] = entry
            if self._fh is not None:
                self._fh.write(format_record(rel, entry))
                self._fh.flush()

    def close(self) -> None:
        """Write the records compacted (atomically), then let go of the lock."""
        with self._lock:
            fh, self._fh = self._fh, None
            entries = dict(self.entries)
        if fh is None:
            return
        try:
            tmp = self.path.with_name(f"{STATE}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as out:
                out.writelines(format_record(rel, e) for rel, e in sorted(entries.items()))
            os.replace(tmp, self.path)
        except OSError as exc:  # the appended records stay: a re-run reads them just the same
            log.warning("could not compact %s: %s", self.path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
        finally:
            fh.close()


def format_record(rel: str, e: Written) -> str:
    return f"{e.size}\t{e.md5 or '-'}\t{int(e.verified)}\t{e.ino}\t{e.mtime_ns}\t{rel}\n"


def parse_records(text: str) -> dict[str, Written]:
    """The records of a state file; a line cut short by a killed run (or anything unreadable) is skipped."""
    out: dict[str, Written] = {}
    for line in text.split("\n"):
        parts = line.split("\t", 5)
        if len(parts) != 6 or not parts[5]:
            continue
        size, md5, verified, ino, mtime_ns, rel = parts
        if not (size.isdigit() and ino.isdigit() and mtime_ns.isdigit() and verified in ("0", "1")):
            continue
        if md5 != "-" and (len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5)):
            continue
        out[rel] = Written(int(size), None if md5 == "-" else md5, verified == "1", int(ino), int(mtime_ns))
    return out


def md5_of_file(path: Path | str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- placing a file
class _Lost(Exception):
    """The cache no longer holds the file (evicted between ensure and the link or copy)."""


class _BadCopy(Exception):
    """The cached copy is not the server's file (altered on disk after it was checked)."""

    def __init__(self, source: Path, got: str, want: str) -> None:
        super().__init__(f"md5 {got} is not the server's {want}")
        self.source = source


@dataclass(slots=True)
class Placer:
    """Puts a cached instance at its place in DEST (see the module docstring). Thread-safe."""

    verify: bool
    link: bool = True
    linked: int = 0
    copied: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def place(self, store: Any, client: Any, node: Any, dst: Path) -> tuple[os.stat_result, str | None]:
        src = store.cached_path(node)
        if src is None:
            raise _Lost()
        tmp = dst.with_name(f".{dst.name}{PART}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        _unlink(tmp)
        try:
            md5 = None
            linked = self.link and self._link(src, tmp)
            if not linked:
                try:
                    md5 = _copy(src, tmp)
                except FileNotFoundError:
                    if not src.exists():
                        raise _Lost() from None
                    raise
            if self.verify:
                want = store.md5_of(node) or client.md5_for_image(node.sop_uid)
                got = md5 if md5 is not None else md5_of_file(tmp)
                if got != want:
                    raise _BadCopy(src, got, want)
                md5 = got
            st = os.stat(tmp)
            os.replace(tmp, dst)
        finally:
            _unlink(tmp)
        with self._lock:
            if linked:
                self.linked += 1
            else:
                self.copied += 1
        return st, md5

    def _link(self, src: Path, tmp: Path) -> bool:
        try:
            os.link(src, tmp)
            return True
        except FileNotFoundError:
            if not src.exists():
                raise _Lost() from None
            raise
        except OSError as exc:
            if exc.errno not in NO_LINK:
                raise
            with self._lock:
                if self.link:
                    log.info("cannot hard-link from the cache into %s (%s): copying", tmp.parent, exc.strerror)
                self.link = False
            return False


def _copy(src: Path, tmp: Path) -> str:
    """Copy ``src`` to ``tmp``; the MD5 of the bytes copied."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 20):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------- the plan
@dataclass(slots=True)
class FileJob:
    node: Any
    rel: str
    dst: Path
    series: SeriesJob
    cached: bool = False  # in the cache when planned


@dataclass(slots=True)
class SeriesJob:
    target: Target
    pick: Any
    dir: Path
    todo: list[FileJob] = field(default_factory=list)
    remaining: int = 0
    skipped: int = 0

    @property
    def label(self) -> str:
        return self.target.label(self.pick.series)


@dataclass(slots=True)
class Plan:
    dest: Path
    series: list[SeriesJob]

    @property
    def todo(self) -> list[FileJob]:
        return [f for s in self.series for f in s.todo]

    def files(self) -> int:
        return sum(len(s.pick.files) for s in self.series)


def plan_of(targets: list[Target], dest: Path, records: DoneLog) -> Plan:
    plan = Plan(dest, [])
    for target in targets:
        store = target.layers.store
        verify = target.settings.verify_md5
        for p in target.picks:
            job = SeriesJob(target, p, dest / p.series.path.lstrip("/"))
            for node in p.files:
                rel = node.path.lstrip("/")
                if records.done(rel, dest / rel, int(node.size), verify):
                    job.skipped += 1
                    continue
                job.todo.append(FileJob(node, rel, dest / rel, job, cached=store.contains(node)))
            job.remaining = len(job.todo)
            plan.series.append(job)
    return plan


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def space_needed(plan: Plan) -> tuple[int, int]:
    """(bytes DEST's file system needs, bytes free there). Linked files need nothing; copied ones their size."""
    where = _existing(plan.dest)
    free = shutil.disk_usage(where).free
    try:
        device = os.stat(where).st_dev
    except OSError:
        device = -1
    need = 0
    for s in plan.series:
        try:
            same = os.stat(s.target.settings.cache_dir).st_dev == device
        except OSError:
            same = False
        # a file fetched lands in the cache first: on DEST's disk when it is the same file system
        need += sum(int(f.node.size) for f in s.todo if not (same and f.cached))
    return need, free


# ---------------------------------------------------------------------------------- the command
def download(args: argparse.Namespace) -> int:
    try:
        return _download(args)
    except OSError as exc:  # a disk error nothing below expected: one line, not a traceback
        raise DestError(f"{exc.filename or 'download'}: {exc.strerror or exc}") from None


def _download(args: argparse.Namespace) -> int:
    resolved = resolve_command(args, FETCH_GROUPS)
    settings = resolved.settings
    items = list(args.items)
    dest = Path(items.pop()).expanduser().absolute()
    if not items and settings.manifest is None:
        raise ConfigError("nothing to download: give PATHs inside an nbiafs mount, or --manifest FILE.tcia, then DEST")
    _check_dest(dest)
    with open_targets(args, items, resolved) as targets:
        for target in targets:
            for note in target.notes:
                print(note, file=sys.stderr)
        if settings.dry_run:
            return dry_run(plan_of(targets, dest, DoneLog(dest).load()))
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DestError(f"cannot create {dest}: {exc.strerror or exc}") from None
        records = DoneLog(dest).open()
        try:
            plan = plan_of(targets, dest, records)
            need, free = space_needed(plan)
            if need > free:
                raise DestError(f"{dest} has {human_bytes(free)} free, but the download needs about {human_bytes(need)} "
                                "more: free some space or choose another DEST (a re-run resumes where one stopped)")
            return Run(plan, records).go()
        finally:
            records.close()


def _check_dest(dest: Path) -> None:
    try:
        mountpoint, _inside = daemon.mount_containing(dest)
    except NbiaError:
        return
    raise DestError(f"DEST {dest} is inside the nbiafs mount on {mountpoint} (read-only): choose a folder elsewhere")


def dry_run(plan: Plan) -> int:
    for s in plan.series:
        if s.todo:
            size = sum(int(f.node.size) for f in s.todo)
            fetch = sum(int(f.node.size) for f in s.todo if not f.cached)
            print(f"{s.label}: {len(s.todo)} of {len(s.pick.files)} files to write, {human_bytes(size)} "
                  f"({human_bytes(fetch)} to fetch)")
    for uid in (uid for t in dict.fromkeys(s.target for s in plan.series) for uid in t.missing):
        print(f"series {uid}: not on the server (or this account may not see it)")
    todo = plan.todo
    size = sum(int(f.node.size) for f in todo)
    fetch = sum(int(f.node.size) for f in todo if not f.cached)
    series = sum(1 for s in plan.series if s.todo)
    skipped = sum(s.skipped for s in plan.series)
    print(f"would write {series} series, {len(todo)} files, {human_bytes(size)} into {plan.dest} "
          f"({human_bytes(fetch)} to fetch, {human_bytes(size - fetch)} from the cache); "
          f"{skipped} of {plan.files()} files are there already")
    need, free = space_needed(plan)
    fits = need <= free
    verdict = "fits" if fits else "does NOT fit; the download would be refused"
    print(f"{_existing(plan.dest)}: {human_bytes(free)} free, needs about {human_bytes(need)}: {verdict}")
    return 0 if fits else 1


class Run:
    """One download run over a plan (see the module docstring)."""

    def __init__(self, plan: Plan, records: DoneLog) -> None:
        self.plan = plan
        self.records = records
        self.dest = plan.dest
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.verify = all(s.target.settings.verify_md5 for s in plan.series)
        self.placers = {id(t): Placer(verify=t.settings.verify_md5) for t in self._targets()}
        self.existing_rows = metacsv.read_rows(self.dest / metacsv.NAME)
        self.rows: list[dict[str, str]] = []
        self.server: dict[str, dict[str, str]] = {}
        self._rows_lock = threading.Lock()
        self._written_rows = time.monotonic()
        self.missing = [uid for t in self._targets() for uid in t.missing]
        todo = plan.todo
        self.progress = Progress("download", len(todo), sum(int(f.node.size) for f in todo))

    def _targets(self) -> list[Target]:
        return list(dict.fromkeys(s.target for s in self.plan.series))

    def go(self) -> int:
        for uid in self.missing:
            print(f"nbiafs: failed: series {uid}: the server does not know it (or this account may not see it)",
                  file=sys.stderr)
        try:
            start(self._targets())
            self._remove_leftovers()
            for target in self._targets():
                self.server.update(server_rows(target, [s.pick for s in self.plan.series if s.target is target]))
            for s in self.plan.series:
                if not s.todo:
                    self._series_complete(s, written=False)
            _, code = run_stoppable(self._work, self.stop, self._cut)
        finally:
            self.progress.close()
            self._write_rows()
        if self.fatal is not None:
            print(f"nbiafs: {self.fatal}", file=sys.stderr)
        self.progress.close(self.summary(code))
        if code is not None:
            return code
        t = self.progress.tally
        return 0 if self.fatal is None and not t.failed and not self.missing and t.done == self.progress.files else 1

    def _cut(self) -> None:
        for target in self._targets():
            target.layers.close_client()

    def _remove_leftovers(self) -> None:
        """Temporary files of a run that was killed (this run holds the lock: nobody else writes here)."""
        for s in self.plan.series:
            try:
                names = os.listdir(s.dir)
            except OSError:
                continue
            for name in names:
                if name.startswith(".") and name.endswith(PART):
                    _unlink(s.dir / name)

    def _work(self) -> None:
        for target in self._targets():
            if self.stop.is_set():
                return
            jobs = {f.node.path: f for s in self.plan.series if s.target is target for f in s.todo}
            if not jobs:
                continue

            def handle(outcome: Any, last: bool, target: Target = target, jobs: dict[str, FileJob] = jobs) -> bool:
                return self._handle(target, jobs[outcome.node.path], outcome, last)

            ensure_healing(target.layers.store, [f.node for f in jobs.values()],
                           verify_md5=target.settings.verify_md5, workers=target.settings.workers,
                           stop=self.stop, handle=handle)

    def _handle(self, target: Target, job: FileJob, outcome: Any, last: bool) -> bool:
        """One file is in the cache (or failed): put it in DEST. True: fetch it again first."""
        label = str(job.dst)
        if outcome.status == "failed":
            if self.stop.is_set():
                return False
            if not last and lost_under_the_store(outcome):
                return True
            self.progress.fail(label, str(outcome.error or "failed"), int(outcome.size))
            return False
        if self.stop.is_set() and self.fatal is not None:
            return False
        store = target.layers.store
        try:
            st, md5 = self.placers[id(target)].place(store, target.layers.client, job.node, job.dst)
        except _Lost:
            if not last:
                return True
            self.progress.fail(label, "the cache evicted it before it could be copied (is --cache-size tiny?)")
            return False
        except _BadCopy as bad:
            log.warning("the cached copy of %s is not the server's file (%s): dropped it, fetching it again",
                        target.label(job.node), bad)
            _unlink(bad.source)
            if not last:
                return True
            self.progress.fail(label, f"the cached copy is not the server's file ({bad})")
            return False
        except OSError as exc:
            if exc.errno in FULL:
                self._stop_for(f"{self.dest}: {exc.strerror or 'no space left'}")
                return False
            self.progress.fail(label, f"cannot write it: {exc.strerror or exc}")
            return False
        except NbiaError as exc:
            self.progress.fail(label, str(exc))
            return False
        try:
            self.records.add(job.rel, st, md5, verified=self.placers[id(target)].verify)
        except OSError as exc:
            if exc.errno in FULL:
                self._stop_for(f"{self.dest}: {exc.strerror or 'no space left'}")
                return False
            raise
        self.progress.add(int(st.st_size), fetched=outcome.status == "fetched")
        with self._rows_lock:
            job.series.remaining -= 1
            complete = job.series.remaining == 0
        if complete:
            self._series_complete(job.series, written=True)
        return False

    def _stop_for(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
        self.stop.set()

    # -- metadata.csv ------------------------------------------------------------------------
    def _series_complete(self, s: SeriesJob, *, written: bool) -> None:
        uid = str(s.pick.series.series_uid)
        if not written and uid in self.existing_rows:
            return  # all of it was there already, and so is its row
        files = [self.dest / f.path.lstrip("/") for f in s.pick.files]
        try:
            made = metacsv.row(self.server.get(uid) or {}, dest=self.dest, series_dir=s.dir, files=files)
        except OSError as exc:
            log.warning("no metadata.csv row for %s: %s", s.label, exc)
            return
        with self._rows_lock:
            self.rows.append(made)
            due = time.monotonic() - self._written_rows >= METADATA_EVERY
        if due:
            self._write_rows()

    def _write_rows(self) -> None:
        with self._rows_lock:
            rows, self.rows = self.rows, []
            self._written_rows = time.monotonic()
            if not rows:
                return
            try:
                metacsv.write(self.dest, rows)
            except OSError as exc:
                self.rows = rows + self.rows  # kept for the next try
                if exc.errno in FULL:
                    self._stop_for(f"{self.dest}: {exc.strerror or 'no space left'} (writing {metacsv.NAME})")
                else:
                    self.fatal = self.fatal or f"cannot write {self.dest / metacsv.NAME}: {exc.strerror or exc}"

    def summary(self, code: int | None) -> str:
        t = self.progress.tally
        total = self.progress.files
        seconds = human_seconds(self.progress.elapsed)
        skipped = sum(s.skipped for s in self.plan.series)
        linked = sum(p.linked for p in self.placers.values())
        copied = sum(p.copied for p in self.placers.values())
        how = (f"{t.done} written ({t.fetched} fetched, {t.cached} from the cache; {linked} hard-linked, "
               f"{copied} copied), {skipped} already there")
        if code is not None:
            return f"download stopped after {seconds}: {how}, {total - t.done} to go; run it again to resume"
        if self.fatal is not None or t.failed or self.missing or t.done < total:
            gone = f", {len(self.missing)} series not on the server" if self.missing else ""
            left = total - t.done - t.failed
            undone = f", {left} not done" if left > 0 else ""
            return (f"download incomplete in {self.dest}: {how}, {t.failed} failed{gone}{undone}, in {seconds}; "
                    "run it again to resume")
        series = len(self.plan.series)
        files = self.plan.files()
        size = sum(s.pick.size for s in self.plan.series)
        checked = ", verified" if self.verify else ""
        return f"downloaded {series} series, {files} files, {human_bytes(size)} into {self.dest}{checked}: {how}, in {seconds}"


def server_rows(target: Target, picks: list[Any]) -> dict[str, dict[str, str]]:
    """The server's facts of each series (v4 getSeriesMetadata; the listings' records otherwise)."""
    rows: dict[str, dict[str, str]] = {}
    uids = [str(p.series.series_uid) for p in picks]
    client = target.layers.client
    if not target.settings.offline and client.search_version == "v4":
        try:
            for start in range(0, len(uids), METADATA_BATCH):
                for r in client.series_metadata(uids[start:start + METADATA_BATCH]):
                    uid = str(r.get("Series Instance UID") or "")
                    if uid:
                        rows[uid] = dict(r)
        except NbiaError as exc:
            log.warning("getSeriesMetadata failed (%s): metadata.csv from the listings instead", exc)
    for p in picks:
        uid = str(p.series.series_uid)
        if uid not in rows and p.series.record is not None:
            rows[uid] = _row_from_records(target, p.series)
    return rows


def _row_from_records(target: Target, series: Any) -> dict[str, str]:
    row = metacsv.server_row(series.record)
    try:
        study = target.layers.catalog.lookup(series.path.rsplit("/", 1)[0]).record
    except NbiaError:
        study = None
    if study is not None:
        date = getattr(study, "date", None)
        row["Study Date"] = date.strftime("%m-%d-%Y") if date is not None else ""
        row["Study Description"] = str(getattr(study, "description", None) or "")
    return row
