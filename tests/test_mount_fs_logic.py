"""The FUSE adapter's logic without a kernel: attributes, listings, opens, errno mapping, lifecycle."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from nbiafs import fs as fsmod
from nbiafs.errors import ForbiddenError, NotFoundError, OfflineError, RemoteNotFoundError, ServerError
from nbiafs.fs import NbiaFS

mfusepy = fsmod.fuse  # mfusepy as nbiafs bound it (to libfuse3)


@dataclass(frozen=True)
class N:
    kind: str
    path: str
    ino: int
    mtime: float
    size: int = 0
    series_uid: str | None = None
    sop_uid: str | None = None


SERIES = "/C/P/S/SE"
NODES = {
    "/": N("root", "/", 1, 1000.0),
    "/C": N("collection", "/C", 2, 1000.0),
    "/C/P": N("patient", "/C/P", 3, 1000.0),
    "/C/P/S": N("study", "/C/P/S", 4, 1000.0),
    SERIES: N("series", SERIES, 5, 1_100_000_000.25),
    f"{SERIES}/.series.json": N("meta", f"{SERIES}/.series.json", 9, 1_100_000_000.25),
    **{f"{SERIES}/1-00{i}.dcm": N("instance", f"{SERIES}/1-00{i}.dcm", 10 + i, 1_100_000_000.25,
                                   size=1000 + i, series_uid="1.2.3", sop_uid=f"1.2.3.{i}")
       for i in (1, 2, 3)},
}


class FakeCatalog:
    def __init__(self, errors: dict[str, Exception] | None = None) -> None:
        self.errors = errors or {}
        self.children_calls: list[str] = []

    def lookup(self, path: str) -> N:
        if path in self.errors:
            raise self.errors[path]
        try:
            return NODES[path]
        except KeyError:
            raise NotFoundError(path) from None

    def children(self, path: str) -> list[N]:
        self.children_calls.append(path)
        self.lookup(path)
        return [n for p, n in NODES.items() if p != "/" and p.rsplit("/", 1)[0] == (path.rstrip("/"))
                or (path == "/" and p.count("/") == 1 and p != "/")]

    def children_of(self, node: N) -> list[N]:
        return self.children(node.path)

    def series_files(self, node: N) -> tuple[N, ...]:
        return tuple(n for n in self.children(node.path.rsplit("/", 1)[0]) if n.kind == "instance")


@dataclass
class FakeStore:
    open_error: Exception | None = None
    on_open_error: Exception | None = None
    opened: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    on_open_calls: list[tuple[str, list[str]]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    sizes: dict[int, int] = field(default_factory=dict)

    def open(self, node: N, then: Callable[[], None] | None = None) -> int:
        if self.open_error:
            raise self.open_error
        self.opened.append(node.path)
        handle = 40 + len(self.opened)
        self.sizes[handle] = node.size
        if then is not None:
            then()
        return handle

    def size(self, handle: int) -> int:
        return self.sizes[handle]

    def read(self, handle: int, size: int, offset: int) -> bytes:
        return bytes([handle]) * size

    def release(self, handle: int) -> None:
        self.released.append(handle)

    def on_open(self, node: N, siblings: list[N]) -> int:
        if self.on_open_error:
            raise self.on_open_error
        self.on_open_calls.append((node.path, [s.path for s in siblings]))
        return len(siblings) - 1

    def start(self) -> None:
        self.events.append("store.start")

    def close(self) -> None:
        self.events.append("store.close")


def fi(flags: int = os.O_RDONLY) -> SimpleNamespace:
    return SimpleNamespace(flags=flags, fh=0, keep_cache=0)


def make(**kw) -> tuple[NbiaFS, FakeCatalog, FakeStore]:
    catalog = kw.pop("catalog", FakeCatalog())
    store = kw.pop("store", FakeStore())
    return NbiaFS(catalog, store, uid=1234, gid=5678, **kw), catalog, store


def errno_of(excinfo: pytest.ExceptionInfo) -> int:
    assert isinstance(excinfo.value, mfusepy.FuseOSError)
    return excinfo.value.errno


def test_directories_are_read_only_dirs_owned_by_the_mounting_user() -> None:
    ops, _, _ = make()
    attrs = ops.getattr("/C/P")
    assert stat.S_ISDIR(attrs["st_mode"]) and stat.S_IMODE(attrs["st_mode"]) == 0o555
    assert (attrs["st_uid"], attrs["st_gid"], attrs["st_ino"]) == (1234, 5678, 3)


def test_files_have_exact_size_stable_ino_and_nanosecond_mtime_from_the_catalog() -> None:
    ops, _, store = make()
    attrs = ops.getattr(f"{SERIES}/1-002.dcm")
    assert stat.S_ISREG(attrs["st_mode"]) and stat.S_IMODE(attrs["st_mode"]) == 0o444
    assert attrs["st_size"] == 1002 and attrs["st_blocks"] == 2
    assert attrs["st_ino"] == 12
    assert attrs["st_mtime"] == 1_100_000_000_250_000_000
    assert attrs["st_blksize"] == fsmod.DEFAULT_BLKSIZE
    assert store.opened == []  # a stat never opens (fetches) anything


def test_readdir_lists_children_with_their_attributes() -> None:
    ops, _, _ = make()
    entries = {name: attrs for name, attrs, _ in ops.readdir(SERIES, 0)}
    assert set(entries) == {".", "..", ".series.json", "1-001.dcm", "1-002.dcm", "1-003.dcm"}
    # mfusepy passes libfuse only st_mode and st_ino of an entry: nothing else is built
    assert entries["1-003.dcm"] == {"st_mode": stat.S_IFREG | 0o444, "st_ino": 13}
    assert stat.S_ISDIR(entries["."]["st_mode"])


def test_readdirplus_entries_carry_the_attributes_of_instances_and_folders_not_of_metadata_files() -> None:
    """What the kernel keeps from a READDIRPLUS must be what a stat would answer; a metadata file's size
    is made from its content (and stats.json changes), so it is left to the kernel's own lookup."""
    ops, _, _ = make(meta=SimpleNamespace(size=lambda node: pytest.fail("a listing made a metadata file")))
    entries = {name: (attrs, full) for name, attrs, full in ops.readdir_entries(SERIES, 0, True)}
    assert list(entries) == [".", "..", ".series.json", "1-001.dcm", "1-002.dcm", "1-003.dcm"]
    for name in ("1-001.dcm", "1-002.dcm", "1-003.dcm"):
        assert entries[name] == (ops.getattr(f"{SERIES}/{name}"), True)
    assert entries[".series.json"] == ({"st_mode": stat.S_IFREG | 0o444, "st_ino": 9}, False)
    assert not entries["."][1] and not entries[".."][1]
    folders = {name: (attrs, full) for name, attrs, full in ops.readdir_entries("/C/P", 0, True)}
    assert folders["S"] == (ops.getattr("/C/P/S"), True)
    plain = list(ops.readdir_entries(SERIES, 0, False))  # a READDIR: modes and inodes only
    assert [(name, full) for name, _, full in plain] == [(name, False) for name in entries]
    assert plain[3][1] == {"st_mode": stat.S_IFREG | 0o444, "st_ino": 11}


def test_readdir_entries_resume_at_the_offset_the_kernel_gives_back() -> None:
    """Entry i carries offset i + 1 (mfusepy's readdir override): a listing asked from offset k starts
    with entry k, so chunks neither repeat nor skip entries; only the first chunk starts the walk-ahead."""
    walked: list[str] = []
    ops, _, _ = make(on_readdir=lambda path, kind: walked.append(path))
    names = [name for name, _, _ in ops.readdir_entries(SERIES, 0, True)]
    assert walked == [SERIES]
    for offset in range(1, len(names) + 1):
        assert [name for name, _, _ in ops.readdir_entries(SERIES, offset, True)] == names[offset:]
    assert walked == [SERIES]


def test_a_listing_that_fails_is_the_error_of_the_request_never_an_empty_folder() -> None:
    ops, _, _ = make(catalog=FakeCatalog(errors={SERIES: ServerError("503 from the server")}))
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.readdir_entries(SERIES, 0, True)  # raised at the call, before any entry is handed on
    assert errno_of(e) == errno.EIO


def test_readdir_of_a_file_is_enotdir() -> None:
    ops, _, _ = make()
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.readdir(f"{SERIES}/1-001.dcm", 0)
    assert errno_of(e) == errno.ENOTDIR


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND])
def test_open_for_writing_is_erofs_and_fetches_nothing(flags: int) -> None:
    ops, _, store = make()
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.open(f"{SERIES}/1-001.dcm", fi(flags))
    assert errno_of(e) == errno.EROFS
    assert store.opened == []


def test_open_keeps_kernel_cache_and_reads_and_releases_through_the_store() -> None:
    ops, _, store = make()
    info = fi()
    assert ops.open(f"{SERIES}/1-001.dcm", info) == 0
    assert info.fh == 41 and info.keep_cache == 1
    assert ops.read(f"{SERIES}/1-001.dcm", 3, 0, info) == bytes([41]) * 3
    ops.release(f"{SERIES}/1-001.dcm", info)
    assert store.released == [41]


def test_open_of_a_directory_is_eisdir() -> None:
    ops, _, _ = make()
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.open(SERIES, fi())
    assert errno_of(e) == errno.EISDIR


def test_open_hands_the_series_to_the_store_prefetch_policy() -> None:
    ops, catalog, store = make()
    ops.open(f"{SERIES}/1-002.dcm", fi())
    assert store.on_open_calls == [(f"{SERIES}/1-002.dcm", [f"{SERIES}/1-00{i}.dcm" for i in (1, 2, 3)])]


def test_no_prefetch_means_the_store_is_never_asked_to_prefetch() -> None:
    ops, _, store = make(prefetch=False)
    ops.open(f"{SERIES}/1-002.dcm", fi())
    assert store.on_open_calls == [] and store.opened == [f"{SERIES}/1-002.dcm"]


def test_a_failing_prefetch_does_not_fail_the_open() -> None:
    ops, _, store = make(store=FakeStore(on_open_error=RuntimeError("pool gone")))
    info = fi()
    assert ops.open(f"{SERIES}/1-001.dcm", info) == 0 and info.fh == 41


def test_an_instance_the_server_will_not_deliver_is_eio_not_enoent() -> None:
    ops, _, _ = make(store=FakeStore(open_error=RemoteNotFoundError("getSingleImage: 500")))
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.open(f"{SERIES}/1-001.dcm", fi())
    assert errno_of(e) == errno.EIO


@pytest.mark.parametrize(("exc", "code"), [
    (NotFoundError("x"), errno.ENOENT),
    (RemoteNotFoundError("x"), errno.EIO),
    (ForbiddenError("x"), errno.EACCES),
    (ServerError("x"), errno.EIO),
    (OfflineError("x"), errno.EIO),
    (TimeoutError("x"), errno.ETIMEDOUT),
    (ValueError("bug"), errno.EIO),
])
def test_every_exception_becomes_the_errno_of_the_single_table(exc: Exception, code: int) -> None:
    ops, _, _ = make(catalog=FakeCatalog(errors={"/C": exc}), store=FakeStore(open_error=exc))
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.getattr("/C")
    assert errno_of(e) == code
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.open(f"{SERIES}/1-001.dcm", fi())
    assert errno_of(e) == code


def test_unexpected_errors_are_logged_with_traceback_expected_ones_are_not(caplog) -> None:
    ops, _, _ = make(catalog=FakeCatalog(errors={"/C": ValueError("bug"), "/C/P": NotFoundError("gone")}))
    with caplog.at_level(logging.DEBUG, logger="nbiafs.fs"):
        with pytest.raises(mfusepy.FuseOSError):
            ops.getattr("/C")
        with pytest.raises(mfusepy.FuseOSError):
            ops.getattr("/C/P")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert any(r.levelno == logging.DEBUG and "ENOENT" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("method", "args"), [
    ("write", ("/C/x", b"a", 0, 0)), ("create", ("/C/x", 0o644, 0)), ("mkdir", ("/C/x", 0o755)),
    ("mknod", ("/C/x", 0o644, 0)), ("unlink", ("/C",)), ("rmdir", ("/C",)), ("rename", ("/C", "/D")),
    ("chmod", ("/C", 0o777)), ("chown", ("/C", 0, 0)), ("truncate", ("/C", 0)), ("utimens", ("/C", None)),
    ("symlink", ("/C/x", "/C")), ("link", ("/C/x", "/C")), ("setxattr", ("/C", "user.a", b"1", 0)),
    ("removexattr", ("/C", "user.a")),
])
def test_every_write_operation_is_erofs(method: str, args: tuple) -> None:
    ops, _, _ = make()
    with pytest.raises(mfusepy.FuseOSError) as e:
        getattr(ops, method)(*args)
    assert errno_of(e) == errno.EROFS


def test_access_allows_reading_refuses_writing_and_knows_missing_names() -> None:
    ops, _, _ = make()
    assert ops.access("/C", os.R_OK | os.X_OK) == 0
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.access("/C", os.W_OK)
    assert errno_of(e) == errno.EROFS
    with pytest.raises(mfusepy.FuseOSError) as e:
        ops.access("/nope", os.R_OK)
    assert errno_of(e) == errno.ENOENT


class Tokens:
    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events, self.fail = events, fail

    def start(self) -> None:
        if self.fail:
            raise RuntimeError("no threads")
        self.events.append("tokens.start")

    def close(self) -> None:
        self.events.append("tokens.close")


def test_init_starts_services_then_reports_ready_and_destroy_stops_them() -> None:
    store = FakeStore()
    reports: list[object] = []
    ops = NbiaFS(FakeCatalog(), store, tokens=Tokens(store.events),
                 on_ready=lambda err: (reports.append(err), store.events.append("ready")))
    assert store.events == []  # nothing starts before the FUSE loop calls init
    ops.init("/")
    assert store.events == ["tokens.start", "store.start", "ready"] and reports == [None]
    ops.destroy("/")
    assert store.events[3:] == ["store.close", "tokens.close"]


def test_init_failure_is_reported_and_stops_the_loop(monkeypatch) -> None:
    exits: list[bool] = []
    monkeypatch.setattr(fsmod.fuse, "fuse_exit", lambda: exits.append(True))
    store = FakeStore()
    reports: list[object] = []
    ops = NbiaFS(FakeCatalog(), store, tokens=Tokens(store.events, fail=True), on_ready=reports.append)
    ops.init("/")
    assert isinstance(reports[0], RuntimeError) and exits == [True]
