"""Running a mount in the background: the ready pipe, spawning the mount process, finding and awaiting it.

The parent (``nbiafs mount`` without ``--foreground``) starts ``python -m nbiafs mount ... --foreground
--ready-fd N`` in a new session and waits on the pipe for one line: ``ready`` (written from the FUSE
``init`` callback, so the mount is usable when the parent returns) or ``error: <message>``. Nothing
here knows about NBIA; it only owns process plumbing and the mount table.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import NbiaError

log = logging.getLogger(__name__)

READY = "ready"
ERROR_PREFIX = "error: "

#: How long the parent waits for the mount process to say ready. Covers a slow first login and the
#: first build of the demo archive's index; a healthy mount is ready in about a second.
DEFAULT_READY_TIMEOUT = 60.0


class MountStartError(NbiaError):
    """The background mount process failed before it became ready."""


class ReadyReporter:
    """Child side of the ready pipe: report ``ready`` or an error exactly once, then close the fd."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self) -> None:
        self._send(READY)

    def error(self, message: str) -> None:
        self._send(ERROR_PREFIX + " ".join(message.split()))

    def _send(self, line: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, (line + "\n").encode("utf-8", "replace"))
        except OSError as exc:  # the parent gave up waiting; nothing else to tell
            log.debug("could not write to the ready pipe: %s", exc)
        finally:
            os.close(fd)


def spawn_and_wait_ready(argv: Sequence[str], *, env: Mapping[str, str], log_file: str | None,
                         timeout: float = DEFAULT_READY_TIMEOUT) -> int:
    """Start ``argv`` (which must accept ``--ready-fd N``) detached; return its pid once it is ready.

    Raises :class:`MountStartError` with the child's own message, or when it exits or stays silent
    for ``timeout`` seconds (then it is killed).
    """
    read_fd, write_fd = os.pipe()
    out = open(log_file, "ab") if log_file else open(os.devnull, "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [*argv, "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=dict(env),
            pass_fds=(write_fd,), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(write_fd)
        out.close()
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    if line == READY:
        return proc.pid
    if line is None:  # silent for too long
        proc.kill()
        proc.wait()
        raise MountStartError(f"the mount process was not ready within {timeout:.0f} s (killed it)")
    code = proc.wait(timeout=timeout)  # it reported an error (or died): it exits on its own
    if line.startswith(ERROR_PREFIX):
        raise MountStartError(line[len(ERROR_PREFIX):])
    hint = f"see {log_file}" if log_file else "run again with --foreground or --log-file to see why"
    raise MountStartError(f"the mount process exited with code {code} before it was ready ({hint})")


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from ``fd``; '' on EOF without a line, None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def child_command(command: str, mountpoint: str, extra: Sequence[str]) -> list[str]:
    """``python -m nbiafs <command> <mountpoint> --foreground <extra...>``."""
    return [sys.executable, "-m", "nbiafs", command, mountpoint, "--foreground", *extra]


# ---------------------------------------------------------------------------------- mount table
def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(fstype, source)`` of what is mounted exactly at ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or _unescape_mountinfo(fields[4]) != target:
            continue
        rfields = right.split()
        found = (rfields[0] if rfields else "", _unescape_mountinfo(rfields[1]) if len(rfields) > 1 else "")
    return found  # the last entry wins: it is the one on top


def is_nbiafs_mount(entry: tuple[str, str] | None) -> bool:
    return entry is not None and entry[0].startswith("fuse") and (
        entry[1] == "nbiafs" or entry[0] == "fuse.nbiafs")


# ---------------------------------------------------------------------------------- processes
def mount_processes(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Pids of nbiafs mount/demo processes serving ``mountpoint`` (found through /proc)."""
    target = os.path.realpath(mountpoint)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        words = [a.decode("utf-8", "surrogateescape") for a in args if a]
        names = [os.path.basename(w) for w in words]
        if "nbiafs" not in names or "--foreground" not in words:
            continue
        i = names.index("nbiafs")
        rest = words[i + 1:]
        if len(rest) < 2 or rest[0] not in ("mount", "demo"):
            continue
        if os.path.realpath(os.path.join(cwd, rest[1])) == target:
            pids.append(int(entry.name))
    return pids


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited; True if it did within ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd support: poll politely
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.05)
        return not _alive(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
