"""The kernel's read-ahead for the mount: how much of a file the kernel asks for in one FUSE read.

What it owns: setting ``/sys/class/bdi/<major>:<minor>/read_ahead_kb`` of the mount's own device
once the mount is up (``--kernel-read-ahead``, 1 MiB by default; 0 leaves the kernel's).

Why: the kernel reads a FUSE file through its page cache in requests of at most the device's
read-ahead, 128 KiB by default, whatever size the reader asks for. Every request is a round trip
through libfuse into this Python process, so a 525 KB CT slice costs four reads besides its open and
release; with 1 MiB (libfuse 3 negotiates requests of up to 1 MiB) it costs one. A warm ``cp -r`` of
a cached series after a remount took 0.31 s instead of 0.42-0.49 s in a first trial, and 1.93x native
instead of 2.11x in back-to-back runs of ``scripts/bench_speed.py --only warm cold``
(docs/performance.md). Only root may write that file (a mount started by root, fstab or systemd is);
anyone else keeps the kernel's value and the log says how to raise it. A hint: nothing fails when it
cannot be set (a container's read-only /sys, another kernel).

The device is read from ``/proc/self/mountinfo``, never by a ``stat`` of the mount point: this runs
inside libfuse's ``init``, where a request to the mount itself would wait for the answer to ``init``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import daemon

log = logging.getLogger(__name__)

SYSFS_BDI = Path("/sys/class/bdi")


def set_read_ahead(mountpoint: str | os.PathLike[str], size: int, *, sysfs: Path = SYSFS_BDI) -> int | None:
    """Set the read-ahead of the device mounted at ``mountpoint`` to ``size`` bytes (rounded down to
    KiB; 0: leave it). The read-ahead in effect afterwards in KiB, or None when it is unknown."""
    device = daemon.mount_device(mountpoint)
    if device is None:
        log.debug("read-ahead: %s is not in the mount table", mountpoint)
        return None
    path = sysfs / device / "read_ahead_kb"
    try:
        current = int(path.read_text().strip())
    except (OSError, ValueError):
        log.debug("read-ahead: %s cannot be read", path)
        return None
    wanted = size // 1024
    if wanted <= 0 or wanted == current:
        return current
    try:
        path.write_text(f"{wanted}\n")
    except OSError as exc:
        log.info("kernel read-ahead of the mount stays %d KiB (%s); as root: echo %d > %s", current,
                 exc.strerror or exc, wanted, path)
        return current
    log.debug("kernel read-ahead of the mount: %d KiB (was %d)", wanted, current)
    return wanted
