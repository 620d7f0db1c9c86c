"""Directory listings that carry their entries' attributes to the kernel (READDIRPLUS), through mfusepy.

What it owns: the FUSE class every mount runs (mfusepy's, with its ``readdir`` and ``init`` callbacks
replaced), the capability that makes the kernel ask for READDIRPLUS on every chunk of a listing, and
the small protocol between that callback and the file system: ``readdir_entries(path, offset, plus)``,
and ``connected(capable)``, by which ``init`` tells the file system what else the kernel offers (the
file system uses FUSE ``no_open`` from it: :mod:`nbiafs.kernelopens`).

Why it exists: without it the kernel learns a directory's names and types only, and then sends one
LOOKUP per entry that a program stats or opens (`ls -l`, `find -ls`, `du`, `cp -r`, a DICOM indexer):
one round trip into Python per file, more than half of what a cold walk of a collection costs, and
one of the four requests per file of a `cp -r` after a remount. With READDIRPLUS each chunk of a
listing brings the attributes of its entries too; the kernel keeps them as it keeps a lookup's
(the mount's entry and attribute timeouts), and the stat or open of an entry needs no request.

How it is shaped, and why so:

* mfusepy's own ``readdir`` hands libfuse each entry's mode and inode only, at offset 0. libfuse then
  buffers the whole listing and, up to 3.16, answers READDIRPLUS from that buffer with inode 0, which
  tells the kernel to ignore the attributes. Entries with offsets (entry ``i`` carries ``i + 1``; each
  request asks from its offset) take libfuse's other path, where an entry given with
  ``FUSE_FILL_DIR_PLUS`` and its full ``stat`` reaches the kernel on every libfuse 3 version. So each
  request builds only the entries of its chunk: the rest of a big listing is never made twice.
* The file system decides which entries carry attributes (``full``): those whose attributes are
  exact and cheap when listed (folders, DICOM instances). A metadata file's size is its content,
  made when asked (`.collection.json` asks the server), and ``stats.json`` changes: those are given
  without, and the kernel looks them up as before.
* libfuse asks the kernel for "auto" READDIRPLUS: plus for a listing's first chunk only, plain
  READDIR for the rest unless the program already stat'ed an entry. Every chunk of an nbiafs listing
  is as cheap with attributes as without, so ``init`` asks for READDIRPLUS always.
* A listing that fails (a dead server, an expired token) fails the request with its errno, from the
  file system's ``readdir_entries`` (guarded there like every handler): never an empty folder.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

#: libfuse 3: ``flags`` of a readdir call that answers a READDIRPLUS request (enum fuse_readdir_flags).
FUSE_READDIR_PLUS = 1 << 0
#: libfuse 3: filler flag of an entry whose ``stat`` is complete (enum fuse_fill_dir_flags).
FUSE_FILL_DIR_PLUS = 1 << 1
#: libfuse 3 capabilities (fuse_common.h): READDIRPLUS at all, and the kernel's "auto" choice of it.
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14

#: One directory entry as the file system's ``readdir_entries(path, offset, plus)`` yields it (from
#: position ``offset`` on, "." and ".." first, made lazily: the callback stops when the kernel's buffer
#: is full): name, attributes (at least ``st_mode`` and ``st_ino``), and whether those attributes are
#: complete and may be handed to the kernel.
Entry = tuple[str, dict[str, Any], bool]


def want_readdirplus_always(conn: Any) -> bool:
    """Ask for READDIRPLUS on every chunk (not libfuse's "auto") when the kernel offers it; True if so."""
    if conn is None or not conn.capable & FUSE_CAP_READDIRPLUS:
        return False
    conn.want = (conn.want | FUSE_CAP_READDIRPLUS) & ~FUSE_CAP_READDIRPLUS_AUTO
    return True


@functools.cache
def fuse_class(mfusepy: Any) -> type:
    """mfusepy's ``FUSE`` (of the loaded module ``mfusepy``) serving listings with offsets and attributes."""

    class PlusFUSE(mfusepy.FUSE):
        """mfusepy.FUSE whose listings carry their entries' attributes (see the module's comment)."""

        def init_fuse_3(self, conn: Any, config: Any) -> None:
            info = conn.contents if conn else None
            if want_readdirplus_always(info):
                log.debug("READDIRPLUS on every chunk of a listing")
            else:
                log.info("this kernel offers no READDIRPLUS: every entry a program stats is looked up")
            connected = getattr(self.operations, "connected", None)
            if connected is not None:  # what else the kernel offers is the file system's to use
                connected(int(info.capable) if info is not None else 0)
            super().init_fuse_3(conn, config)

        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                           flags: int) -> int:
            plus = bool(flags & FUSE_READDIR_PLUS)
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            entries = self.operations.readdir_entries(decoded, offset, plus)
            st = mfusepy.c_stat()
            size = ctypes.sizeof(st)
            for position, (name, attrs, full) in enumerate(entries, offset + 1):
                ctypes.memset(ctypes.byref(st), 0, size)
                if plus and full:
                    mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
                    fill = FUSE_FILL_DIR_PLUS
                else:
                    st.st_mode = attrs["st_mode"]
                    st.st_ino = attrs.get("st_ino", 0)
                    fill = 0
                if filler(buf, name.encode(self.encoding, self.errors), st, position, fill) != 0:
                    break  # the kernel's buffer is full: the next request asks from this position
            return 0

    return PlusFUSE
