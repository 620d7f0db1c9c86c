"""The FUSE adapter: kernel requests -> catalog (tree) and store (bytes), exceptions -> errno.

This module owns only the glue to libfuse3 (through mfusepy, bound by :mod:`nbiafs.fuselib`): turning paths into attribute dicts,
handing opens and reads to the instance store, refusing every write with EROFS, and mapping every
exception with :func:`nbiafs.errors.errno_for` (the one mapping). It does no HTTP and keeps no
caching policy of its own: listings and sizes come from :class:`nbiafs.catalog.Catalog`, bytes from
:class:`nbiafs.store.InstanceStore`.

Threads (token refresher, store workers) are started in :meth:`NbiaFS.init`, i.e. inside the FUSE
main loop, and stopped in :meth:`NbiaFS.destroy`, so nothing is lost if the process was forked
before mounting. libfuse calls Python from its own native threads; every handler first keeps the
thread's Python state for the next request (:mod:`nbiafs.threadstate`: building one per request was
most of a warm open's cost), but past that module's bound a thread still gets a fresh one per
callback: nothing here keeps ``threading.local`` state between callbacks.

Where the kernel offers FUSE ``no_open`` (and unless ``--no-kernel-opens``), the first ``open`` is
answered ENOSYS: the kernel then opens every file itself, keeps its pages and sends reads with handle
0, and a file's store handle is made at its first read (:mod:`nbiafs.kernelopens`). The metadata files
then never change length (:mod:`nbiafs.keptfiles`).

A file whose bytes turn out longer or shorter than the metadata said (a complete body by its own
Content-Length: the metadata was wrong) is opened with ``direct_io``, so the reader gets every true
byte whatever size the kernel cached, and the kernel's cached attributes of that path are invalidated
(``fuse_invalidate_path``, from a helper thread, never inside the request) so the next stat shows
the true size. Where the kernel opened the file itself there is no ``direct_io``: a read that reaches
the end the kernel believes in fails (EIO: never a file cut or padded with zeros) until the kernel
has asked the true size.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import fuselib, readdirplus
from .errors import (
    IsDirectoryError,
    NbiaError,
    NoSuchAttributeError,
    NotDirectoryError,
    ReadOnlyError,
    errno_for,
)
from .kernelopens import FUSE_CAP_NO_OPEN_SUPPORT, KernelOpens
from .stopping import stop_in_order
from .threadstate import ThreadStates

log = logging.getLogger(__name__)

#: mfusepy bound to libfuse3 (importing this module without libfuse3 raises FuseUnavailableError).
fuse: Any = fuselib.load()

#: Preferred I/O size reported in st_blksize: what readers size their buffers from (cp, cat, Python's
#: open()). 128 KiB, the buffer coreutils uses for a local file. Not more: how much the kernel asks of
#: the mount per request is its read-ahead's business (see :mod:`nbiafs.kernelreadahead`), whatever the
#: reader's buffer; a buffer of 1 MiB made cp and cat map and fault in a fresh 1 MiB for every file,
#: and a warm `cat` of a series took twice as long (docs/performance.md).
DEFAULT_BLKSIZE = 1 << 17

#: The kernel's page: a read of more is a read-ahead, which the kernel retries itself, page by page.
PAGE_SIZE = 4096

#: How long a read waits for another thread's open of the same file, if the store does not say.
DEFAULT_OPEN_WAIT = 180.0

#: How long the kernel remembers that a name does not exist. Listings are immutable too, but a
#: negative answer can come from a transient state (offline, a restricted collection before login),
#: so it is kept shorter than the positive entry/attribute timeouts.
DEFAULT_NEGATIVE_TIMEOUT = 60.0

#: Upper bound on libfuse worker threads. Every open of an uncached file holds one for up to the client
#: deadline, so this must comfortably exceed the store's download workers plus interactive listings.
MAX_THREADS = 64
#: Idle libfuse threads kept around (set explicitly: libfuse 3.14 warns about its own default). As many
#: as may run: a thread libfuse ends would take its kept Python thread state with it (see
#: :mod:`nbiafs.threadstate`), and a new one would pay for building its own again.
MAX_IDLE_THREADS = MAX_THREADS

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
DEFAULT_UMASK = 0o022
#: Node kinds that are files: DICOM instances and metadata files (everything else is a folder).
FILE_KINDS = frozenset({"instance", "meta"})

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(func: F) -> F:
    """Run a FUSE handler; turn any exception into FuseOSError(errno_for(exc)), logging by kind."""

    @functools.wraps(func)
    def wrapper(self: NbiaFS, *args: Any, **kwargs: Any) -> Any:
        self.thread_states.keep()  # first: later requests on this libfuse thread find their state
        try:
            return func(self, *args, **kwargs)
        except fuse.FuseOSError:
            raise
        except NbiaError as exc:
            code = errno_for(exc)
            level = logging.DEBUG if code in (errno.ENOENT, errno.EROFS, errno.ENODATA) else logging.INFO
            log.log(level, "%s%r -> %s: %s", func.__name__, args[:1], errno.errorcode.get(code, code), exc)
            raise fuse.FuseOSError(code) from exc
        except Exception as exc:  # the kernel must get an errno, whatever happened below
            code = errno_for(exc)
            log.exception("unexpected error in %s%r -> %s", func.__name__, args[:1],
                          errno.errorcode.get(code, code))
            raise fuse.FuseOSError(code) from exc

    return wrapper  # type: ignore[return-value]


def _reader() -> int:
    """The thread whose request is being answered (libfuse's context: the kernel's caller)."""
    return int(fuse.fuse_get_context()[2])


def _refused(name: str) -> Callable[..., int]:
    """A write operation of the read-only file system: always EROFS."""

    def refuse(self: NbiaFS, *args: Any, **kwargs: Any) -> int:
        log.debug("%s%r refused: read-only file system", name, args[:1])
        raise fuse.FuseOSError(errno_for(ReadOnlyError(name)))

    refuse.__name__ = refuse.__qualname__ = name
    return refuse


class NbiaFS(fuse.Operations):
    """The read-only file system: Collection / Patient / Study / Series / instance files.

    ``catalog`` answers ``lookup``/``children`` with :class:`nbiafs.catalog.Node`; ``store`` opens and
    reads instances. ``tokens`` (optional) is started in ``init`` and closed in ``destroy``.
    ``on_ready(error)`` is called once from ``init`` with ``None`` when the mount is usable, or with
    the exception that kept the background services from starting.
    """

    use_ns = True  # times are integer nanoseconds

    def __init__(self, catalog: Any, store: Any, *, tokens: Any | None = None,
                 prefetch: bool = True, uid: int | None = None, gid: int | None = None,
                 umask: int = DEFAULT_UMASK, blksize: int = DEFAULT_BLKSIZE,
                 on_ready: Callable[[BaseException | None], None] | None = None,
                 on_destroy: Callable[[], None] | None = None,
                 stop_first: Callable[[], None] | None = None,
                 on_readdir: Callable[[str, str], None] | None = None,
                 meta: Any | None = None, kernel_opens: bool = False) -> None:
        self.catalog = catalog
        self.store = store
        self.tokens = tokens
        self.prefetch_enabled = prefetch
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.dir_mode = stat.S_IFDIR | (0o555 & ~umask)
        self.file_mode = stat.S_IFREG | (0o444 & ~umask)
        self.blksize = blksize
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._stop_first = stop_first
        self._on_readdir = on_readdir
        self.meta = meta  # nbiafs.metafiles.MetaFiles: xattrs and the metadata files
        self.thread_states = ThreadStates()
        self._getattr_lock = threading.Lock()
        self._getattr_calls = 0  # every LOOKUP and GETATTR of the kernel is one (stats: what READDIRPLUS saves)
        #: Whether to let the kernel open files itself when it can (see :meth:`connected`), and whether it does.
        self.kernel_opens_wanted = kernel_opens
        self.kernel_opens = False
        self._opened: KernelOpens[int] = KernelOpens(self._release_instance)
        #: Files the kernel opened itself whose true size is not the one it holds (until it asks again).
        self._told_wrong: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def init(self, path: str) -> None:
        """Start the background services (after any fork), then report readiness."""
        error: BaseException | None = None
        try:  # the libfuse handle, for invalidations asked from other threads later
            self._fuse_handle = fuse._libfuse.fuse_get_context().contents.fuse
        except (AttributeError, ValueError):  # not inside libfuse (tests)
            self._fuse_handle = None
        try:
            if self.tokens is not None:
                self.tokens.start()
            self.store.start()
        except Exception as exc:  # reported to the parent through on_ready; the mount then exits
            log.exception("could not start the background services")
            error = exc
        if self._on_ready is not None:
            try:
                self._on_ready(error)
            except Exception:
                log.exception("on_ready callback failed")
        if error is not None:
            fuse.fuse_exit()

    def connected(self, capable: int) -> None:
        """What the kernel offers (libfuse's ``conn->capable``), before :meth:`init`: files are opened by
        the kernel itself if it can and that is wanted (:mod:`nbiafs.kernelopens`)."""
        self.kernel_opens = self.kernel_opens_wanted and bool(capable & FUSE_CAP_NO_OPEN_SUPPORT)
        if self.kernel_opens:
            log.debug("the kernel opens files itself: nbiafs sees their reads only")
            if self.meta is not None:  # their lengths must not change now (nbiafs.keptfiles)
                self.meta.keep_for_kernel(self.invalidate)
        elif self.kernel_opens_wanted:
            log.warning("this kernel asks nbiafs at every open (it offers no FUSE no_open)")

    def destroy(self, path: str) -> None:
        """Stop everything: first ``stop_first`` (the HTTP client: it cuts transfers in flight, so no
        worker is left waiting for a stalled server), then the store's workers, then the token
        refresher (logging out)."""
        stop_in_order((("HTTP client", self._stop_first),
                       ("files the kernel opened", self._opened.close),
                       ("metadata files", getattr(self.meta, "close", None)),
                       ("store", getattr(self.store, "close", None)),
                       ("tokens", getattr(self.tokens, "close", None))))
        if self._on_destroy is not None:
            try:
                self._on_destroy()
            except Exception:
                log.exception("on_destroy callback failed")

    # ------------------------------------------------------------------ attributes
    def _attrs(self, node: Any) -> dict[str, Any]:
        mtime_ns = int(round(float(node.mtime) * 1e9))
        is_dir = node.kind not in FILE_KINDS
        if is_dir:
            size = 0
        elif node.kind == "meta":
            size = self.meta.size(node) if self.meta is not None else 0  # made now: st_size is exact
        else:
            size = int(node.size)
        return {
            "st_mode": self.dir_mode if is_dir else self.file_mode,
            "st_nlink": 2 if is_dir else 1,
            "st_ino": int(node.ino) & 0xFFFFFFFFFFFFFFFF,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": self.blksize,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_mtime": mtime_ns,
            "st_ctime": mtime_ns,
            "st_atime": mtime_ns,
        }

    @_guarded
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        with self._getattr_lock:
            self._getattr_calls += 1
        attrs = self._attrs(self.catalog.lookup(path))
        if self._told_wrong:
            with self._getattr_lock:
                if attrs["st_size"] != self._told_wrong.get(path, attrs["st_size"]):
                    del self._told_wrong[path]  # the kernel is told the true size now
        return attrs

    @property
    def getattr_calls(self) -> int:
        """How many attribute requests (the kernel's LOOKUP and GETATTR) this file system answered."""
        with self._getattr_lock:
            return self._getattr_calls

    @_guarded
    def access(self, path: str, amode: int) -> int:
        self.catalog.lookup(path)
        if amode & os.W_OK:
            raise ReadOnlyError(path)
        return 0

    @_guarded
    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": self.blksize, "f_frsize": 512, "f_blocks": 0, "f_bfree": 0,
                "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    # ------------------------------------------------------------------ directories
    @_guarded
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self._xattrs(path).get(name)
        if value is None:
            raise NoSuchAttributeError(f"{path}: no attribute {name}")
        return value

    @_guarded
    def listxattr(self, path: str) -> list[str]:
        return list(self._xattrs(path))

    def _xattrs(self, path: str) -> dict[str, bytes]:
        node = self.catalog.lookup(path)
        return self.meta.xattrs(node) if self.meta is not None else {}

    # ------------------------------------------------------------------ directories
    @_guarded
    def opendir(self, path: str) -> int:
        node = self.catalog.lookup(path)
        if node.kind in FILE_KINDS:
            raise NotDirectoryError(path)
        return 0

    @_guarded
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, Any], int]]:
        """The whole listing as mfusepy's own readdir takes it (the mount serves :meth:`readdir_entries`)."""
        return [(name, attrs, 0) for name, attrs, _full in self._entries(path, 0, False)]

    @_guarded
    def readdir_entries(self, path: str, offset: int, plus: bool) -> Iterator[readdirplus.Entry]:
        """The entries of a listing from position ``offset`` on, for :mod:`nbiafs.readdirplus`: with
        ``plus``, folders and instances carry their full attributes (exact and cheap when listed);
        metadata files never do (a size made from their content; ``stats.json`` changes)."""
        return self._entries(path, offset, plus)

    def _entries(self, path: str, offset: int, plus: bool) -> Iterator[readdirplus.Entry]:
        node = self.catalog.lookup(path)
        if node.kind in FILE_KINDS:
            raise NotDirectoryError(path)
        children = self.catalog.children_of(node)  # listed now: a failure is the request's error
        if offset == 0 and self._on_readdir is not None:
            try:
                self._on_readdir(node.path, node.kind)  # the walk-ahead policy decides
            except Exception:
                log.warning("walk-ahead failed for %s", path, exc_info=True)
        return self._entries_from(node, children, offset, plus)

    def _entries_from(self, node: Any, children: list[Any], offset: int,
                      plus: bool) -> Iterator[readdirplus.Entry]:
        dir_mode, file_mode = self.dir_mode, self.file_mode
        if offset <= 0:
            yield ".", {"st_mode": dir_mode, "st_ino": node.ino}, False  # libfuse never passes attributes of . or ..
        if offset <= 1:
            yield "..", {"st_mode": dir_mode}, False
        for child in children[max(offset - 2, 0):]:
            name = child.path.rsplit("/", 1)[-1]
            if plus and child.kind != "meta":
                try:
                    attrs = self._attrs(child)
                except Exception:  # never fail a listing for one entry: the kernel then looks it up
                    log.exception("no attributes for %s in its listing", child.path)
                else:
                    yield name, attrs, True
                    continue
            yield name, {"st_mode": file_mode if child.kind in FILE_KINDS else dir_mode, "st_ino": child.ino}, False

    # ------------------------------------------------------------------ files
    @_guarded
    def open(self, path: str, fi: Any) -> int:
        if fi.flags & _WRITE_FLAGS:
            raise ReadOnlyError(path)
        if self.kernel_opens:
            # Asked once: from this answer on, the kernel opens every file itself, keeps its pages and
            # sends its reads with handle 0 (read() opens the file then).
            raise fuse.FuseOSError(errno.ENOSYS)
        node = self.catalog.lookup(path)
        if node.kind == "meta" and self.meta is not None:
            fi.fh = self.meta.open(node)
            fi.direct_io = 1  # made when opened; stats.json changes
            return 0
        if node.kind != "instance":
            raise IsDirectoryError(path)
        # the read-ahead policy hears of the open once the file is claimed, before its first bytes
        fi.fh = self.store.open(node, (lambda: self._prefetch_series_of(node)) if self.prefetch_enabled else None)
        if self.store.size(fi.fh) != node.size:
            # The true file differs from the size the metadata said (the store told the catalog): let
            # every read through whatever size the kernel cached, and make the kernel forget that size.
            fi.direct_io = 1
            self._invalidate_soon(path)
        else:
            fi.keep_cache = 1  # files never change: keep the kernel page cache across opens
        return 0

    def _prefetch_series_of(self, node: Any) -> None:
        """Tell the store's read-ahead policy that ``node`` was opened (it decides what to fetch)."""
        try:
            self.store.on_open(node, self.catalog.series_files(node))
        except Exception:  # read-ahead is an optimisation: never fail the open for it
            log.warning("could not plan the read-ahead of series %s", node.series_uid, exc_info=True)

    def invalidate(self, path: str) -> None:
        """Make the kernel forget its cached attributes and pages of ``path`` (any thread but a request's
        own: the kernel may wait for that request to end). A path it never looked up is left alone."""
        handle = getattr(self, "_fuse_handle", None)
        if not handle:
            return
        call = fuse._libfuse.fuse_invalidate_path
        call.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        call.restype = ctypes.c_int
        code = call(ctypes.c_void_p(handle), path.encode("utf-8", "surrogateescape"))
        log.debug("invalidated the kernel's attributes of %s (%d)", path, code)

    def _invalidate_soon(self, path: str) -> None:
        """:meth:`invalidate` ``path`` from a helper thread, once this request is answered."""
        threading.Thread(target=self.invalidate, args=(path,), name="nbiafs-invalidate", daemon=True).start()

    @_guarded
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        if not fi.fh:
            return self._read_unopened(path, size, offset)
        if self.meta is not None and self.meta.owns(fi.fh):
            return self.meta.read(fi.fh, size, offset)
        return self.store.read(fi.fh, size, offset)

    def _read_unopened(self, path: str, size: int, offset: int) -> bytes:
        """A read of a file the kernel opened itself (handle 0): the file's handle is made at its first
        read and kept for the next ones (:class:`nbiafs.kernelopens.KernelOpens`)."""
        node = self.catalog.lookup(path)
        if node.kind == "meta" and self.meta is not None:
            return self.meta.read_unopened(node, size, offset)
        if node.kind != "instance":
            raise IsDirectoryError(path)
        wait = float(getattr(self.store, "open_timeout", DEFAULT_OPEN_WAIT))
        data: bytes | None = None
        with self._opened.use(path, lambda: self._open_instance(path, node), wait, reader=_reader,
                              retried=size > PAGE_SIZE) as (handle, true):
            told = self._told_wrong.get(path) if self._told_wrong else None
            if told is None or offset + size < min(told, true):
                data = self.store.read(handle, size, offset)
        if data is not None:
            if offset + size >= true:  # read to its end: the kernel holds its pages now
                self._opened.let_go(path)
            return data
        # The kernel believes the file ends at ``told``: it would cut this reader there, or fill the rest
        # with zeros. An error, never wrong bytes, until it has asked the true size (not one the handle
        # shows: it retries a failed read-ahead page by page, so a reader often gets every byte at once
        # all the same).
        raise NbiaError(f"{path}: the server sent {true} bytes, not the {told} its metadata said; "
                        f"read the file again")

    def _open_instance(self, path: str, node: Any) -> tuple[int, int]:
        """Open ``node`` in the store for reads with handle 0: its handle and its true size."""
        handle = self.store.open(node, (lambda: self._prefetch_series_of(node)) if self.prefetch_enabled else None)
        try:
            true = self.store.size(handle)
        except BaseException:
            self.store.release(handle)
            raise
        told = int(node.size)
        if true != told:  # the metadata was wrong: the kernel must ask the size again
            with self._getattr_lock:
                self._told_wrong[path] = told
            self._invalidate_soon(path)
            if self.meta is not None:  # the series' .series.json says the true size now
                self._invalidate_soon(path.rsplit("/", 1)[0] + "/.series.json")
        return handle, true

    def _release_instance(self, handle: int) -> None:
        self.store.release(handle)

    @_guarded
    def release(self, path: str, fi: Any) -> int:
        if self.meta is not None and self.meta.owns(fi.fh):
            self.meta.release(fi.fh)
        else:
            self.store.release(fi.fh)
        return 0

    def flush(self, path: str, fi: Any) -> int:
        """Nothing to flush on a read-only file system. ENOSYS tells the kernel so once: it then stops
        sending a FLUSH at every close(), a third of the requests of a warm read."""
        raise fuse.FuseOSError(errno.ENOSYS)

    # ------------------------------------------------------------------ writes: all refused
    write = _refused("write")
    create = _refused("create")
    mkdir = _refused("mkdir")
    mknod = _refused("mknod")
    unlink = _refused("unlink")
    rmdir = _refused("rmdir")
    rename = _refused("rename")
    chmod = _refused("chmod")
    chown = _refused("chown")
    truncate = _refused("truncate")
    utimens = _refused("utimens")
    symlink = _refused("symlink")
    link = _refused("link")
    setxattr = _refused("setxattr")
    removexattr = _refused("removexattr")


def mount_options(kernel_timeout: float, negative_timeout: float = DEFAULT_NEGATIVE_TIMEOUT, *,
                  allow_other: bool = False, version: tuple[int, int] | None = None) -> dict[str, Any]:
    """The libfuse options of every nbiafs mount (read-only, long kernel caches, stable inodes), as the
    libfuse of ``version`` (default: the one loaded) accepts them."""
    wanted: dict[str, Any] = {
        "ro": True,
        "fsname": "nbiafs",
        "subtype": "nbiafs",
        "use_ino": True,
        "entry_timeout": kernel_timeout,
        "attr_timeout": kernel_timeout,
        "negative_timeout": negative_timeout,
        "default_permissions": True,
        # libfuse's multithreaded loop: enough threads that slow fetches never starve listings.
        "max_threads": MAX_THREADS,
        "max_idle_threads": MAX_IDLE_THREADS,
    }
    if allow_other:
        wanted["allow_other"] = True
    return fuselib.check_options(wanted, version or fuselib.loaded_version(fuse))


def serve(operations: NbiaFS, mountpoint: str, *, kernel_timeout: float,
          negative_timeout: float = DEFAULT_NEGATIVE_TIMEOUT, allow_other: bool = False,
          debug: bool = False) -> None:
    """Mount and run the FUSE main loop in this process (multithreaded) until unmounted."""
    readdirplus.fuse_class(fuse)(operations, mountpoint, raw_fi=True, foreground=True, nothreads=False, debug=debug,
              **mount_options(kernel_timeout, negative_timeout, allow_other=allow_other))

