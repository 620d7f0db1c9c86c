"""Running a mount in the background: the ready pipe, the password pipe, spawning the mount process,
the run records that find it again, and the mount table.

The parent (``nbiafs mount`` without ``--foreground``) starts ``python -m nbiafs mount ... --foreground
--ready-fd N [--password-fd M]`` in a new session and waits on the ready pipe for one line: ``ready``
(written from the FUSE ``init`` callback, so the mount is usable when the parent returns) or
``error: <message>``. A password travels on its own pipe, never in the child's environment or command
line (both are readable in ``/proc``).

Every mount process records itself (:func:`record_mount`: pid, start time, mount point) in the
per-user runtime directory when it is mounted and removes the record when it ends; ``unmount`` and
the stale-mount check read the record (:func:`mount_processes`), so a mount is found whatever its
command line looks like, and a pid reused by another process after a ``kill -9`` is not mistaken for
it (the start time differs). Nothing here knows about NBIA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
                         timeout: float = DEFAULT_READY_TIMEOUT, password: str | None = None) -> int:
    """Start ``argv`` (which must accept ``--ready-fd N`` and ``--password-fd M``) detached; return its
    pid once it is ready. ``password`` goes to the child on a pipe (``--password-fd``).

    Raises :class:`MountStartError` with the child's own message, or when it exits or stays silent
    for ``timeout`` seconds (then it is killed).
    """
    read_fd, write_fd = os.pipe()
    pass_fds = [write_fd]
    extra = ["--ready-fd", str(write_fd)]
    secret_fd = None
    if password:
        secret_fd = password_pipe(password)
        pass_fds.append(secret_fd)
        extra += ["--password-fd", str(secret_fd)]
    out = open(log_file, "ab") if log_file else open(os.devnull, "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [*argv, *extra],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=dict(env),
            pass_fds=tuple(pass_fds), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(write_fd)
        if secret_fd is not None:
            os.close(secret_fd)
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


#: A password longer than this is refused (it must fit a pipe's buffer, written before the child starts).
MAX_PASSWORD_BYTES = 4096


def password_pipe(password: str) -> int:
    """The read end of a pipe that holds ``password`` (and then EOF): for a child's ``--password-fd``."""
    data = password.encode("utf-8")
    if len(data) > MAX_PASSWORD_BYTES:
        raise MountStartError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    return read_fd


def read_password(fd: int) -> str:
    """The password the parent wrote on pipe ``fd`` (closes it)."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def child_command(command: str, mountpoint: str, extra: Sequence[str]) -> list[str]:
    """``python -m nbiafs <command> <mountpoint> --foreground <extra...>``."""
    return [sys.executable, "-m", "nbiafs", command, mountpoint, "--foreground", *extra]


# ---------------------------------------------------------------------------------- mount table
def canonical(mountpoint: str | os.PathLike[str]) -> str:
    """The mount point as the mount table spells it, without ever touching the mount point itself.

    ``realpath`` would ``lstat`` it, and a stat of a FUSE mount point is answered by the mount: from
    the mount's own ``init`` (before it serves) or against a hung mount it blocks forever. Only the
    parent directory's symlinks are resolved.
    """
    absolute = os.path.abspath(os.fspath(mountpoint))
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name) if name else absolute



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


def _mountinfo_at(mountpoint: str | os.PathLike[str]) -> tuple[list[str], list[str]] | None:
    """The fields of the ``/proc/self/mountinfo`` line of what is mounted exactly at ``mountpoint``
    (before and after its `` - `` separator), or None. The last line wins: it is the one on top."""
    target = canonical(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == target:
            found = (fields, right.split())
    return found


def mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(fstype, source)`` of what is mounted exactly at ``mountpoint``, or None."""
    found = _mountinfo_at(mountpoint)
    if found is None:
        return None
    rfields = found[1]
    return (rfields[0] if rfields else "", _unescape_mountinfo(rfields[1]) if len(rfields) > 1 else "")


def mount_device(mountpoint: str | os.PathLike[str]) -> str | None:
    """``major:minor`` of the device mounted exactly at ``mountpoint`` (from the mount table, without
    touching the mount itself), or None."""
    found = _mountinfo_at(mountpoint)
    return found[0][2] if found is not None else None


def is_nbiafs_mount(entry: tuple[str, str] | None) -> bool:
    return entry is not None and entry[0].startswith("fuse") and (
        entry[1] == "nbiafs" or entry[0] == "fuse.nbiafs")


# ---------------------------------------------------------------------------------- run records
def runtime_dir() -> Path:
    """The per-user directory of run records: ``$XDG_RUNTIME_DIR/nbiafs`` (``/run/user/UID/nbiafs``), or
    a private directory under the system's temporary directory when there is no runtime directory."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        base = os.path.join(tempfile.gettempdir(), f"nbiafs-{uid}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        info = os.lstat(base)
        if info.st_uid != uid or (info.st_mode & 0o077):
            raise NbiaError(f"{base} is not private to this user: cannot keep the mounts' run records there")
        return Path(base)
    path = Path(base) / "nbiafs"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _record_path(mountpoint: str | os.PathLike[str]) -> Path:
    target = canonical(mountpoint)
    name = hashlib.sha256(target.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return runtime_dir() / f"mount-{name}.json"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def control_socket_path(mountpoint: str | os.PathLike[str]) -> Path:
    """Where the mount on ``mountpoint`` listens for control requests (see :mod:`nbiafs.control`)."""
    return _record_path(mountpoint).with_suffix(".sock")


def record_mount(mountpoint: str | os.PathLike[str], pid: int | None = None, **facts: Any) -> None:
    """Record that process ``pid`` (default: this one) serves ``mountpoint``; ``facts`` (its server,
    account, cache dir, control socket: never a secret) are kept with it for other commands."""
    pid = os.getpid() if pid is None else pid
    record = {**facts, "pid": pid, "start_time": _start_time(pid), "mountpoint": canonical(mountpoint)}
    path = _record_path(mountpoint)
    tmp = path.with_suffix(f".{pid}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def remove_record(mountpoint: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove the run record of ``mountpoint`` if it is ``pid``'s (default: this process)."""
    pid = os.getpid() if pid is None else pid
    try:
        path = _record_path(mountpoint)
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, NbiaError):
        pass


def mount_record(mountpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run record of the live nbiafs process serving ``mountpoint``, or None (none, or it died)."""
    try:
        path = _record_path(mountpoint)
        record = json.loads(path.read_text())
        pid, started = int(record["pid"]), record.get("start_time")
    except (OSError, ValueError, KeyError, TypeError, NbiaError):
        return None
    if not isinstance(record, dict) or record.get("mountpoint") != canonical(mountpoint):
        return None
    if not process_alive(pid) or (started is not None and _start_time(pid) != started):
        try:  # the process died (kill -9?): the record is stale
            path.unlink()
        except OSError:
            pass
        return None
    return record


def live_mounts() -> list[dict[str, Any]]:
    """The run records of every live nbiafs mount of this user (stale records are removed on the way)."""
    try:
        paths = sorted(runtime_dir().glob("mount-*.json"))
    except (OSError, NbiaError):
        return []
    records = []
    for path in paths:
        try:
            mountpoint = json.loads(path.read_text()).get("mountpoint")
        except (OSError, ValueError, AttributeError):
            continue
        record = mount_record(mountpoint) if isinstance(mountpoint, str) else None
        if record is not None:
            records.append(record)
    return records


def mount_processes(mountpoint: str | os.PathLike[str]) -> list[int]:
    """The pid of the nbiafs process serving ``mountpoint`` ([] when none: never mounted, or it died)."""
    record = mount_record(mountpoint)
    return [int(record["pid"])] if record is not None else []


def mount_containing(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(mount point, path inside the mount)`` of the nbiafs mount holding ``path``; NbiaError if none.

    Reads the mount table only: nothing under a (possibly hung) mount is touched.
    """
    target = canonical(path)
    candidate = target
    while True:
        entry = mount_entry(candidate)
        if entry is not None:
            if not is_nbiafs_mount(entry):
                break
            inside = target[len(candidate):] or "/"
            return candidate, inside if inside.startswith("/") else "/" + inside
        parent = os.path.dirname(candidate)
        if parent == candidate:
            break
        candidate = parent
    raise NbiaError(f"{path} is not inside an nbiafs mount")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited; True if it did within ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd support: poll politely
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return True
            time.sleep(0.05)
        return not process_alive(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists, even as another user's, and is not a zombie)."""
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
