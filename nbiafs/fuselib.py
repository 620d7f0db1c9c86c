"""Loading libfuse3 through mfusepy, whatever else the machine has installed.

What it owns: finding the libfuse3 shared library, importing mfusepy bound to it, telling the user
which package to install when there is none, and which libfuse options the loaded version accepts.

Why it exists: mfusepy looks for ``libfuse.so.2`` first and takes it when present. Ubuntu desktops ship
libfuse2 beside fuse3 (for AppImages), so a plain ``import mfusepy`` there binds libfuse2, which refuses
libfuse3's options (``max_threads``) and makes every mount fail with "libfuse error 1". mfusepy reads
``FUSE_LIBRARY_PATH`` once, at import: this module points it at libfuse3 for that import only (and
restores the environment, so no child process inherits it), then checks what mfusepy actually bound.
``FUSE_LIBRARY_PATH`` set by the user is honoured when it names a libfuse3, and ignored (with a log
line) when it names anything else.

The import happens on first use (:func:`load`), not when nbiafs is imported, so commands that never
mount (``nbiafs emulator``, ``nbiafs cache``, the fsspec file system) work on machines without FUSE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading
from types import ModuleType
from typing import Any

from .errors import NbiaError

log = logging.getLogger(__name__)

#: Where distributions put libfuse3 when ``ldconfig`` does not say (containers without its cache).
_SEARCH_GLOBS = (
    "/lib/*/libfuse3.so.3*", "/usr/lib/*/libfuse3.so.3*", "/lib64/libfuse3.so.3*", "/usr/lib64/libfuse3.so.3*",
    "/usr/lib/libfuse3.so.3*", "/usr/local/lib/libfuse3.so.3*", "/usr/local/lib/*/libfuse3.so.3*",
)
#: libfuse accepts ``-o max_threads`` from 3.12 on (it came with ``fuse_loop_cfg``); older 3.x refuse the
#: mount when given it. Ubuntu 22.04 ships 3.10.
MAX_THREADS_SINCE = (3, 12)
INSTALL_HINT = "install it with: sudo apt install fuse3 (Debian/Ubuntu; fuse3 on Fedora and Arch)"

_lock = threading.Lock()


class FuseUnavailableError(NbiaError):
    """libfuse3 cannot be loaded on this machine (missing, only libfuse2, or broken)."""


def library_version(path: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the libfuse at ``path`` by its ``fuse_version()``; None if it cannot load."""
    try:
        lib = ctypes.CDLL(path)
        code = int(lib.fuse_version())
    except (OSError, AttributeError):
        return None
    # libfuse encodes major * 10 + minor (26, 29, 31, 314 for 3.14: minor may have two digits)
    if code >= 100:
        return code // 100, code % 100
    return code // 10, code % 10


def find_libfuse3() -> str | None:
    """The path (or soname) of an installed libfuse3, or None."""
    candidates: list[str] = []
    override = os.environ.get("FUSE_LIBRARY_PATH")
    if override:
        candidates.append(override)
    found = ctypes.util.find_library("fuse3")
    if found:
        candidates.append(found)
    for pattern in _SEARCH_GLOBS:
        candidates.extend(sorted(glob.glob(pattern)))
    for candidate in dict.fromkeys(candidates):
        version = library_version(candidate)
        if version is not None and version[0] == 3:
            return candidate
        if candidate == override:
            log.warning("FUSE_LIBRARY_PATH=%s is not a libfuse3 (version %s); looking for libfuse3 instead",
                        override, "unknown" if version is None else f"{version[0]}.{version[1]}")
    return None


def _missing_message() -> str:
    if ctypes.util.find_library("fuse") or glob.glob("/lib/*/libfuse.so.2*") or glob.glob("/usr/lib/*/libfuse.so.2*"):
        return f"only libfuse2 is installed, and nbiafs needs libfuse3: {INSTALL_HINT}"
    return f"libfuse3 is not installed: {INSTALL_HINT}"


def load() -> ModuleType:
    """mfusepy, bound to libfuse3. Raises :class:`FuseUnavailableError` naming the package to install."""
    with _lock:
        loaded = sys.modules.get("mfusepy")
        if loaded is not None:
            module: ModuleType = loaded
        else:
            path = find_libfuse3()
            if path is None:
                raise FuseUnavailableError(_missing_message())
            saved = os.environ.get("FUSE_LIBRARY_PATH")
            os.environ["FUSE_LIBRARY_PATH"] = path
            try:
                import mfusepy

                module = mfusepy
            except (OSError, AttributeError) as exc:
                raise FuseUnavailableError(f"cannot load libfuse3 from {path} ({exc}); {INSTALL_HINT}") from exc
            finally:
                if saved is None:
                    os.environ.pop("FUSE_LIBRARY_PATH", None)
                else:
                    os.environ["FUSE_LIBRARY_PATH"] = saved
            log.debug("mfusepy bound to %s (libfuse %d.%d)", path, *loaded_version(module))
        if loaded_version(module)[0] != 3:
            major, minor = loaded_version(module)
            raise FuseUnavailableError(
                f"mfusepy was already bound to libfuse {major}.{minor} in this process; nbiafs needs libfuse3 "
                f"({INSTALL_HINT})")
        return module


def loaded_version(module: Any) -> tuple[int, int]:
    """The libfuse version mfusepy bound (``module`` is the imported mfusepy)."""
    return int(module.fuse_version_major), int(module.fuse_version_minor)


def check_options(options: dict[str, Any], version: tuple[int, int]) -> dict[str, Any]:
    """``options`` as the libfuse of ``version`` accepts them: FuseUnavailableError below 3.0, and the
    options that version does not know left out (each logged), so a mount never fails on them."""
    if version[0] != 3:
        raise FuseUnavailableError(f"libfuse {version[0]}.{version[1]} is not libfuse3; {INSTALL_HINT}")
    checked = dict(options)
    if version < MAX_THREADS_SINCE and "max_threads" in checked:
        log.info("libfuse %d.%d has no max_threads option (it came in 3.12): left to libfuse's default", *version)
        checked.pop("max_threads")
    return checked
