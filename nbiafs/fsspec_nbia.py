"""nbiafs as an fsspec file system: the mount's tree, names, sizes and bytes without FUSE.

``fsspec.filesystem("nbia", server=..., cache_dir=...)`` and ``fsspec.open("nbia://Coll/Patient/...")``
(registered as the ``nbia`` protocol through the ``fsspec.specs`` entry point) read through exactly the
layers a mount builds (:func:`nbiafs.app.build_layers`): the same catalog gives the same names and
exact sizes, the same on-disk cache under ``cache_dir`` serves the bytes, so a file fetched through
either is a cache hit for the other. This module is an adapter only, like :mod:`nbiafs.fs` is for
FUSE: paths -> catalog nodes, opens and reads -> the store, exceptions -> ``OSError``. It imports
nothing of FUSE (neither :mod:`nbiafs.fuselib` nor mfusepy), so it works where there is no libfuse,
no ``/dev/fuse`` and no root: Colab, clusters, containers, macOS.

Keyword arguments are the names of the options table (:mod:`nbiafs.options`) that make sense without
a mount: the ``server`` and ``cache`` groups plus ``layout``, ``prefetch`` and ``series_zip`` (and ``config``, the
config file, as ``--config``). They are layered over the config file and the ``NBIAFS_*`` variables
as for ``nbiafs mount``; an unknown name or a mount-only one is refused (``TypeError``), a bad value
too (``ValueError``). A named account's password comes from ``NBIA_PASSWORD`` (or a prompt on a
terminal), never from an argument: fsspec pickles and tokenizes its keyword arguments.

Paths are relative to the archive's root (``"Coll/Patient/Study/Series/1-001.dcm"``, ``""`` the root);
``nbia://`` and a leading ``/`` are accepted. Errors: ``FileNotFoundError`` only for a name missing
from a successful listing; a failed or refused call is ``OSError`` (EIO, EACCES...), never an absence,
so ``exists``, ``isdir``, ``isfile`` and ``walk``/``find`` raise on I/O errors instead of answering
"no" (fsspec's defaults swallow them).

Lifetime: layers are built on first use, not when the object is made, so a file system made in a
parent process and forked or pickled into workers (a PyTorch DataLoader) builds its own layers in
each worker; they are shared per process by equal settings and closed at exit or by :meth:`close`
(see :mod:`nbiafs.sharedlayers`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from . import options
from .app import Layers
from .catalog import Node
from .config import Settings, resolve
from .errors import ConfigError, NbiaError, errno_for
from .sharedlayers import Lease, SharedLayers

log = logging.getLogger(__name__)

PROTOCOL = "nbia"
#: Option names the file system takes: everything about the server and the cache, and the mount
#: options that shape the tree and the fetching. The rest (allow_other, uid, kernel_timeout...) only
#: mean something to a kernel mount; logging is the application's to configure.
FSSPEC_OPTIONS: frozenset[str] = frozenset(
    [o.name for o in options.in_groups(("server", "cache"))] + ["layout", "prefetch", "series_zip"])
#: Keyword arguments beside the options: the config file (as ``--config``).
EXTRA_KWARGS = frozenset({"config"})
#: Read-ahead of an open file: instances are 0.1-1 MB, so one block usually holds the whole file and
#: pydicom's many small reads cost no call into the store.
DEFAULT_BLOCK_SIZE = 1 << 20


class OptionNameError(ConfigError, TypeError):
    """A keyword argument that is not one of the file system's options."""


class OptionValueError(ConfigError, ValueError):
    """A keyword argument whose value its option does not accept."""


def settings_from(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for the keyword arguments: defaults < config file < NBIAFS_* < ``kwargs``."""
    unknown = sorted(set(kwargs) - FSSPEC_OPTIONS - EXTRA_KWARGS)
    for name in unknown:
        if name in options.BY_NAME:
            raise OptionNameError(f"{name} is a mount option; the nbia fsspec file system does not take it "
                                  f"(it takes: {', '.join(sorted(FSSPEC_OPTIONS))})")
    if unknown:
        raise OptionNameError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                              f"(the nbia file system takes: {', '.join(sorted(FSSPEC_OPTIONS))}, config)")
    flags = {k: v for k, v in kwargs.items() if k in FSSPEC_OPTIONS}
    config = kwargs.get("config")
    try:
        settings = resolve(flags, environ=environ, config_path=Path(config).expanduser() if config else None,
                           only=FSSPEC_OPTIONS).settings
    except ConfigError as exc:
        raise OptionValueError(str(exc)) from None
    # A program walking this file system wants the DICOM files only: the mount's dot-files of metadata
    # (.collection.json, .series.json, .nbiafs/) are for people; the records are in info() here.
    return dataclasses.replace(settings, metadata_files=False)


def os_error(exc: BaseException, path: str) -> OSError:
    """``exc`` as the OSError a Python program expects: FileNotFoundError only for an absent name."""
    code = errno_for(exc)
    return OSError(code, str(exc) or os.strerror(code), path)


@contextmanager
def _mapped(path: str) -> Iterator[None]:
    try:
        yield
    except (NbiaError, OSError) as exc:
        raise os_error(exc, path) from exc


def _info(node: Node, name: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": name,
        "size": node.size if node.kind == "instance" else 0,
        "type": "file" if node.kind == "instance" else "directory",
        "kind": node.kind,
        "ino": node.ino,
        "mtime": node.mtime,
    }
    for field in ("collection", "patient_id", "study_uid", "series_uid", "sop_uid", "image_count",
                  "instance_number"):
        value = getattr(node, field)
        if value is not None:
            info[field] = value
    return info


class NbiaFileSystem(AbstractFileSystem):
    """The NBIA archive as a read-only fsspec file system (protocol ``nbia``)."""

    protocol: ClassVar[tuple[str, ...]] = (PROTOCOL,)
    root_marker = ""
    cachable = True
    #: Layers shared by every instance of this process with equal settings (see nbiafs.sharedlayers).
    _shared: ClassVar[SharedLayers] = SharedLayers()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.settings = settings_from(kwargs)
        self._lease: Lease | None = None
        self._lease_lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # ------------------------------------------------------------------ layers
    def _layers(self) -> Layers:
        """This process's layers for these settings (built on first use, again after a fork)."""
        pid = os.getpid()
        lease = self._lease
        if lease is not None and lease.usable:
            return lease.layers
        if self._lock_pid != pid:  # a lock inherited through fork may be held by a thread that is gone
            self._lease_lock, self._lock_pid = threading.Lock(), pid
        with self._lease_lock:
            lease = self._lease
            if lease is None or not lease.usable:
                if self._finalizer is not None:
                    self._finalizer.detach()  # a lease from before a fork or a close_all: spent
                with _mapped(""):
                    password = self._password()
                    lease = self._shared.acquire(self.settings, password)
                self._lease = lease
                self._finalizer = weakref.finalize(self, self._shared.release, lease, wait=False)
                self._finalizer.atexit = False  # at exit SharedLayers.close_all closes everything
            return lease.layers

    def _password(self) -> str:
        if not self.settings.user:
            return ""
        from .auth import password_from_env_or_prompt  # NBIA_PASSWORD, or a prompt on a terminal

        return password_from_env_or_prompt(self.settings.user)

    def close(self) -> None:
        """Release this instance's layers now (the last user closes them: threads stopped, caches
        written). The instance stays usable: it builds or shares layers again on next use."""
        with self._lease_lock:
            lease, self._lease = self._lease, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if lease is not None:
            self._shared.release(lease)

    @property
    def layers(self) -> Layers:
        """The layers behind this file system (catalog, store, client...), for diagnostics and tests."""
        return self._layers()

    @property
    def fsid(self) -> str:
        blob = f"{self.settings.namespace}|{self.settings.layout}".encode()
        return "nbia_" + hashlib.blake2b(blob, digest_size=8).hexdigest()

    # ------------------------------------------------------------------ paths
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        for prefix in (f"{PROTOCOL}://", f"{PROTOCOL}::"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        return "/".join(part for part in text.split("/") if part)

    @staticmethod
    def _catalog_path(path: str) -> str:
        return "/" + path

    def _node(self, path: str) -> tuple[str, Node]:
        name = self._strip_protocol(path)
        layers = self._layers()
        with _mapped(name):
            return name, layers.catalog.lookup(self._catalog_path(name))

    # ------------------------------------------------------------------ listing
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        name, node = self._node(path)
        if node.kind == "instance":
            entries = [_info(node, name)]
        else:
            with _mapped(name):
                children = self._layers().catalog.children(node.path)
            prefix = f"{name}/" if name else ""
            entries = [_info(child, prefix + child.path.rsplit("/", 1)[-1]) for child in children]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        name, node = self._node(path)
        return _info(node, name)

    def walk(self, path: str, maxdepth: int | None = None, topdown: bool = True, on_error: Any = "raise",
             **kwargs: Any) -> Any:
        """As fsspec's, but an I/O error is raised by default: a listing that failed is not empty."""
        return super().walk(path, maxdepth=maxdepth, topdown=topdown, on_error=on_error, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        """False only for a name missing from a successful listing; I/O errors are raised."""
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def lexists(self, path: str, **kwargs: Any) -> bool:
        return self.exists(path)

    def isdir(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "directory")
        except FileNotFoundError:
            return False

    def isfile(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "file")
        except FileNotFoundError:
            return False

    def modified(self, path: str) -> dt.datetime:
        """The entry's stable mtime (from the archive's dates), as the mount shows it."""
        return dt.datetime.fromtimestamp(self._node(path)[1].mtime, tz=dt.timezone.utc)

    def created(self, path: str) -> dt.datetime:
        return self.modified(path)

    # ------------------------------------------------------------------ bytes
    def _instance(self, path: str) -> tuple[str, Node]:
        name, node = self._node(path)
        if node.kind != "instance":
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a DICOM instance file", name)
        return name, node

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> NbiaFile:
        if mode != "rb":
            raise OSError(errno.EROFS, f"the nbia file system is read-only (mode {mode!r})", path)
        name, node = self._instance(path)
        kwargs.pop("size", None)  # fsspec's reopen (unpickling) passes the size: the store knows it better
        return NbiaFile(self, name, node, block_size=DEFAULT_BLOCK_SIZE if block_size in (None, "default")
                        else block_size, cache_type=kwargs.pop("cache_type", "readahead"),
                        cache_options=cache_options, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The bytes ``[start, end)`` of a file (negative values count from its end, as slices do)."""
        name, node = self._instance(path)
        store = self._layers().store
        with _mapped(name):
            # an open as the mount sees one: the prefetch policy hears of it once the file is claimed
            handle = store.open(node, lambda: self.opened(node))
            try:
                size = store.size(handle)
                begin, stop, _ = slice(start, end).indices(size)
                data = store.read(handle, stop - begin, begin) if stop > begin else b""
            finally:
                store.release(handle)
        return bytes(data)

    def opened(self, node: Node) -> None:
        """Tell the store's prefetch policy that ``node`` was opened, as the mount does (never fails)."""
        if not self.settings.prefetch:
            return
        layers = self._layers()
        try:
            parent = node.path.rsplit("/", 1)[0] or "/"
            siblings = [n for n in layers.catalog.children(parent) if n.kind == "instance"]
            layers.store.on_open(node, siblings)
        except Exception:  # prefetch is an optimisation: never fail the open for it
            log.warning("could not schedule the prefetch of series %s", node.series_uid, exc_info=True)

    # ------------------------------------------------------------------ writes: refused
    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "the nbia file system is read-only")

    mkdir = makedirs = rmdir = rm_file = _rm = rm = cp_file = mv = pipe_file = touch = _refuse


class NbiaFile(AbstractBufferedFile):
    """A random-access, read-only open file: reads go to a store handle; closing releases it.

    The handle belongs to the store of the process that opened it. A file handed to another process
    (fork; a pickled file is reopened by fsspec) opens its own handle there, through that process's
    layers, on its first read.
    """

    def __init__(self, fs: NbiaFileSystem, path: str, node: Node, **kwargs: Any) -> None:
        self.node = node
        self.path = path  # set again by fsspec; needed before, should releasing a handle fail
        self._store: Any = None
        self._handle: int | None = None
        self._handle_pid = 0
        self._handle_lock = threading.Lock()
        with _mapped(path):
            store, handle = self._open_handle(fs, lambda: fs.opened(node))
        try:
            with _mapped(path):
                size = store.size(handle)
            super().__init__(fs, path, mode="rb", size=size, **kwargs)
        except BaseException:
            self._release_quietly(store, handle)
            raise

    def _open_handle(self, fs: NbiaFileSystem, then: Callable[[], None] | None = None) -> tuple[Any, int]:
        """A store handle of this file (``then``: the prefetch policy's hearing of the open, see
        :meth:`InstanceStore.open`)."""
        store = fs._layers().store
        handle = store.open(self.node, then)
        self._store, self._handle, self._handle_pid = store, handle, os.getpid()
        return store, handle

    def _current(self) -> tuple[Any, int]:
        """The handle to read from: this one, or a new one when the layers it came from were closed
        (a fork closes them in the parent) or belong to the parent process (in a forked child)."""
        pid = os.getpid()
        if self._handle_pid != pid:  # inherited through fork: the parent's lock, store and handle
            self._handle_lock, self._store, self._handle, self._handle_pid = threading.Lock(), None, None, pid
        store = self.fs._layers().store
        with self._handle_lock:
            if self._handle is not None and self._store is store:
                return store, self._handle
            if self.closed:
                raise ValueError("I/O operation on closed file")
            self._release_quietly(self._store, self._handle)
            return self._open_handle(self.fs)

    def _release_quietly(self, store: Any, handle: int | None) -> None:
        if store is None or handle is None:
            return
        try:
            store.release(handle)
        except (NbiaError, OSError) as exc:  # its store was closed first (at a fork, at exit)
            log.debug("could not release the handle of %s: %s", self.path, exc)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with _mapped(self.path):
            store, handle = self._current()
            return bytes(store.read(handle, end - start, start))

    def close(self) -> None:
        try:
            super().close()
        finally:
            with self._handle_lock:
                store, handle, self._store, self._handle = self._store, self._handle, None, None
            if self._handle_pid == os.getpid():
                self._release_quietly(store, handle)
