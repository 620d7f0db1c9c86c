"""The ``mount`` and ``unmount`` commands: settings -> a running mount, and back.

``mount`` without ``--foreground`` resolves the settings (flags, environment, config file: see
:mod:`nbiafs.config`), reads a named account's password (environment or prompt), checks the server
once so that a wrong password or a dead server fails here with one clear line (and, for
``--api auto``, decides which API the server speaks), then starts the mount process in the
background (:mod:`nbiafs.daemon`: every setting as a flag, the password on a pipe) and returns when
the mount is ready. The mount process (``--foreground``) builds the layers (:mod:`nbiafs.app`) and
runs the FUSE main loop; its threads start in the FUSE ``init`` callback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import daemon, options
from .config import Resolved, Settings, resolve
from .errors import ConfigError, NbiaError
from .kernelreadahead import set_read_ahead

log = logging.getLogger(__name__)

PASSWORD_ENV = "NBIA_PASSWORD"
#: The option groups a mount takes (see nbiafs.options).
MOUNT_GROUPS = ("server", "cache", "scope", "mount", "log")
#: How long ``unmount`` waits for the mount process to exit after the kernel let go of the mount.
UNMOUNT_EXIT_TIMEOUT = 30.0
#: With --lazy, how long unmount waits for the process before returning anyway (the mount may be busy).
LAZY_EXIT_WAIT = 2.0
FUSE_CONF = "/etc/fuse.conf"


class MountError(NbiaError):
    """The mount point cannot be used, or unmounting failed."""


# ---------------------------------------------------------------------------------- settings
def resolve_args(args: argparse.Namespace, groups: tuple[str, ...] = MOUNT_GROUPS) -> Resolved:
    """Settings for a command's parsed arguments: flags over environment over config file over defaults."""
    config = getattr(args, "config", None)
    return resolve(options.given_flags(args, groups), config_path=Path(config).expanduser() if config else None)


def check_mountpoint(path: str) -> str:
    """The absolute mount point; ConfigError/MountError when it cannot be mounted on."""
    mp = os.path.abspath(os.path.expanduser(path))
    entry = daemon.mount_entry(mp)
    if entry is not None and daemon.is_nbiafs_mount(entry) and is_stale(mp):
        raise MountError(f"{mp} is a stale nbiafs mount (its process is gone); "
                         f"clean it up first (nbiafs unmount {mp})")
    if entry is not None:
        raise MountError(f"{mp} is already a mount point ({entry[1] or entry[0]}); "
                         f"unmount it first (nbiafs unmount {mp})")
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise ConfigError(f"mount point {mp} does not exist (create it with: mkdir -p {mp})") from None
    except OSError as exc:
        raise MountError(f"cannot use mount point {mp}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mount point {mp} is not a directory")
    return mp


def is_stale(mp: str) -> bool:
    """True when no nbiafs process serves the mount on ``mp`` (it died, e.g. kill -9).

    Decided from the run record only: a stat of the mount point could block on a live but busy mount.
    """
    return not daemon.mount_processes(mp)


def check_fuse() -> None:
    """A clear error when this machine cannot mount FUSE file systems (naming what to install)."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install FUSE 3 (apt install fuse3) or load the fuse module")
    if not (shutil.which("fusermount3") or os.geteuid() == 0):
        raise MountError("fusermount3 is missing: install FUSE 3 (apt install fuse3)")
    from . import fuselib

    fuselib.load()  # libfuse3, or a FuseUnavailableError naming the package to install


def check_allow_other(settings: Settings, fuse_conf: str = FUSE_CONF) -> None:
    """--allow-other needs root or ``user_allow_other`` in /etc/fuse.conf: say so before mounting."""
    if not settings.allow_other or os.geteuid() == 0:
        return
    try:
        with open(fuse_conf, encoding="utf-8") as fh:
            enabled = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in fh)
    except OSError:
        enabled = False
    if not enabled:
        raise ConfigError(f"--allow-other needs 'user_allow_other' in {fuse_conf} (a line of its own, "
                          "added by root), or running the mount as root")


def password_for(settings: Settings) -> str:
    """A named account's password (environment or prompt); "" for anonymous and guest use."""
    if not settings.user:
        return ""
    from .auth import password_from_env_or_prompt

    return password_from_env_or_prompt(settings.user)


def check_server(settings: Settings, password: str) -> str:
    """Reach the server once before mounting; the search API to use ("v2" or "v4").

    A named account (or ``--api v2``) logs in, so a wrong password fails here with one line. Anonymous
    use asks the server whether it serves anonymous v4 (``--api auto``) and, if it does not, logs in
    as the guest; nothing is mounted when the server cannot be reached.
    """
    from .app import make_client

    tokens, client = make_client(settings, password)
    try:
        version = client.resolve_api() if settings.api == "auto" else settings.api
        if version == "v2":
            client.tokens.get_token()
        elif settings.api == "v4":
            client.collections()  # the one check that v4 answers at all
        return version
    except NbiaError as exc:
        who = f" as {settings.user}" if settings.user else ""
        raise type(exc)(f"cannot use {settings.base_url}{who}: {exc}") from exc
    finally:
        client.close()
        if tokens is not None:
            tokens.close()  # logs out the check's token, if one was made


# ---------------------------------------------------------------------------------- mount
def mount(args: argparse.Namespace) -> int:
    """``nbiafs mount``: background by default, returns once the mount is ready."""
    if args.ready_fd is not None:
        return run_child(args)
    resolved = resolve_args(args)
    settings = resolved.settings
    mp = check_mountpoint(args.mountpoint)
    check_fuse()
    check_allow_other(settings)
    if settings.manifest is not None:
        from .manifest import read_manifest

        read_manifest(settings.manifest)  # a bad manifest is one clear line, before anything starts
    password = password_for(settings)
    os.environ.pop(PASSWORD_ENV, None)  # no process started from here inherits it
    if not settings.offline:
        settings.api = check_server(settings, password)
    if settings.foreground:
        return run_mount(settings, mp, password)
    start_background("mount", mp, settings, password)
    who = settings.user or "anonymous"
    print(f"nbiafs: mounted {settings.base_url} ({who}, {settings.api}) on {mp}", file=sys.stderr)
    return 0


def child_flags(settings: Settings, groups: tuple[str, ...] = MOUNT_GROUPS) -> list[str]:
    """Every setting of ``groups`` as flags, so the child builds exactly the parent's settings."""
    values = {o.name: getattr(settings, o.name) for o in options.in_groups(groups) if o.name != "foreground"}
    return options.to_flags(values)


def start_background(command: str, mp: str, settings: Settings, password: str,
                     extra: tuple[str, ...] = ()) -> int:
    """Start ``nbiafs COMMAND MP --foreground ...`` detached; its pid once it is ready."""
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    return daemon.spawn_and_wait_ready(
        daemon.child_command(command, mp, [*child_flags(settings), *extra]), env=env,
        log_file=str(settings.log_file) if settings.log_file else None, timeout=settings.ready_timeout,
        password=password or None)


def run_child(args: argparse.Namespace, serve: Callable[[Settings, str, str, daemon.ReadyReporter], int]
              | None = None) -> int:
    """The background mount process: report ready/error on the pipe, then serve until unmounted."""
    reporter = daemon.ReadyReporter(args.ready_fd)
    try:
        password = daemon.read_password(args.password_fd) if args.password_fd is not None else ""
        # The parent resolved the settings (its --config, config file, environment) and passed every one
        # as a flag: the child reads nothing else, or a default config file could undo what it said
        settings = resolve(options.given_flags(args, MOUNT_GROUPS), environ={}, use_config=False).settings
        mp = check_mountpoint(args.mountpoint)
        if serve is not None:
            return serve(settings, mp, password, reporter)
        return run_mount(settings, mp, password, reporter=reporter)
    except BaseException as exc:
        reporter.error(str(exc) or type(exc).__name__)
        raise


#: What libfuse's fuse_main returns when its loop ended on a signal after a good mount (it returns 8
#: for any non-zero loop result; a mount that never came up is told apart by init never running).
LOOP_ENDED_BY_SIGNAL = 8


def run_mount(settings: Settings, mountpoint: str, password: str, *,
              reporter: daemon.ReadyReporter | None = None) -> int:
    """Build the layers for ``settings`` and serve ``mountpoint`` until it is unmounted."""
    from . import fs
    from .app import build_layers

    reporter = reporter or daemon.ReadyReporter(None)
    failure: list[BaseException] = []
    served: list[bool] = []  # the mount came up (init ran)

    control: list[Any] = []

    def finish_start() -> None:
        try:
            os.stat(mountpoint)
        except OSError as exc:  # the mount went away meanwhile; its own error is reported elsewhere
            log.debug("the mount did not answer after init: %s", exc)
        else:
            set_read_ahead(mountpoint, settings.kernel_read_ahead)
        log.info("mounted %s on %s", settings.base_url, mountpoint)
        reporter.ready()

    def on_ready(error: BaseException | None) -> None:
        if error is None:
            served.append(True)
            try:
                control.append(_start_control(mountpoint, layers, operations))
                daemon.record_mount(mountpoint, **_record_facts(settings, str(control[0].path)))
            except (OSError, NbiaError) as exc:  # unmount then falls back to the mount table alone
                log.warning("could not record this mount's process (%s)", exc)
            if layers.walker is not None:
                layers.walker.start()
            # Still inside libfuse's init: the kernel takes its read-ahead from the answer to init, after
            # this returns. So a thread waits for the mount to answer (a stat of its root returns only
            # then), sets the read-ahead and only then reports ready: ``nbiafs mount`` returns once
            # the mount serves, read-ahead in place.
            threading.Thread(target=finish_start, name="nbiafs-ready", daemon=True).start()
        else:
            failure.append(error)
            reporter.error(f"cannot start the mount: {error}")

    with ExitStack() as stack:
        layers = build_layers(settings, password)
        stack.callback(layers.close)
        operations = fs.NbiaFS(layers.catalog, layers.store, tokens=layers.tokens, prefetch=settings.prefetch,
                               uid=settings.uid, gid=settings.gid, umask=settings.umask, on_ready=on_ready,
                               on_destroy=lambda: _stop_control(mountpoint, control),
                               stop_first=layers.close_client,
                               on_readdir=layers.walker.on_readdir if layers.walker is not None else None,
                               meta=layers.metafiles, kernel_opens=settings.kernel_opens)
        try:
            fs.serve(operations, mountpoint, kernel_timeout=settings.kernel_timeout,
                     negative_timeout=settings.negative_timeout, allow_other=settings.allow_other)
        except RuntimeError as exc:
            if served and not failure and str(exc) == str(LOOP_ENDED_BY_SIGNAL):
                # libfuse's loop ended on SIGTERM/SIGINT/SIGHUP (systemd stop, Ctrl-C): it unmounted
                # cleanly, which is a stop, not a failure
                log.info("stopped by a signal; %s is unmounted", mountpoint)
            else:  # libfuse refused to mount (its reason went to the log/stderr)
                raise MountError(f"could not mount {mountpoint} (libfuse error {exc}); "
                                 f"is it already mounted, or is FUSE unavailable?") from exc
        finally:
            daemon.remove_record(mountpoint)
    if failure:
        raise MountError(f"the mount stopped: {failure[0]}")
    return 0


def _record_facts(settings: Settings, control: str) -> dict[str, Any]:
    """What other commands need to know of this mount (never a secret)."""
    return {"control": control, "server": settings.base_url, "user": settings.user, "api": settings.api,
            "cache_dir": str(settings.cache_dir), "cache_size": settings.cache_size, "layout": settings.layout,
            "manifest": str(settings.manifest) if settings.manifest else None}


def _start_control(mountpoint: str, layers: Any, operations: Any) -> Any:
    """The mount's control socket (``nbiafs refresh`` ...), served from this process."""
    from .control import ControlServer

    def refresh(request: dict[str, Any]) -> dict[str, Any]:
        path = str(request.get("path") or "/")
        report = layers.catalog.refresh(path)
        operations.invalidate(report.path)
        return {"path": report.path, "added": report.added, "removed": report.removed,
                "forgotten": report.forgotten, "changed_series": report.changed_series, "note": report.note}

    def stats(request: dict[str, Any]) -> dict[str, Any]:
        from .app import store_counters

        return {"stats": store_counters(layers.store), "thread_states": operations.thread_states.counts(),
                "kernel_opens": operations.kernel_opens,
                "getattr_calls": operations.getattr_calls}

    return ControlServer(daemon.control_socket_path(mountpoint), {"refresh": refresh, "stats": stats,
                                                                  "ping": lambda request: {}})


def _stop_control(mountpoint: str, control: list[Any]) -> None:
    for server in control:
        server.close()
    daemon.remove_record(mountpoint)


# ---------------------------------------------------------------------------------- unmount
def unmount(args: argparse.Namespace) -> int:
    """``nbiafs unmount``: let go of the mount, then wait for its process to exit."""
    mp = os.path.abspath(os.path.expanduser(args.mountpoint))
    entry = daemon.mount_entry(mp)
    if entry is None:
        raise MountError(f"{mp} is not mounted")
    if not daemon.is_nbiafs_mount(entry):
        raise MountError(f"{mp} is not an nbiafs mount ({entry[1] or entry[0]}); not touching it")
    pids = daemon.mount_processes(mp)
    unmount_path(mp, lazy=args.lazy)
    if not pids:
        print(f"nbiafs: cleaned up the stale mount on {mp} (its process was gone)", file=sys.stderr)
        return 0
    # A lazy unmount of a busy mount ends only when its last user lets go: do not wait for that.
    timeout = LAZY_EXIT_WAIT if args.lazy else UNMOUNT_EXIT_TIMEOUT
    slow = [pid for pid in pids if not daemon.wait_for_exit(pid, timeout)]
    if slow and not args.lazy:
        raise MountError(f"unmounted {mp}, but its process {slow[0]} is still running")
    if slow:
        print(f"nbiafs: detached {mp}; it goes away when the programs using it let go", file=sys.stderr)
    return 0


def unmount_path(mp: str, *, lazy: bool = False) -> None:
    """fusermount3 -u (fallback umount); MountError with the tool's reason."""
    attempts: list[list[str]] = []
    if shutil.which("fusermount3"):
        attempts.append(["fusermount3", "-u", *(["-z"] if lazy else []), mp])
    if shutil.which("umount"):
        attempts.append(["umount", *(["-l"] if lazy else []), mp])
    if not attempts:
        raise MountError("neither fusermount3 nor umount is installed")
    reasons = []
    for cmd in attempts:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{cmd[0]}: {exc}")
            continue
        if done.returncode == 0 or daemon.mount_entry(mp) is None:
            return
        reasons.append(f"{cmd[0]}: {(done.stderr or done.stdout).strip()}")
        if "busy" in (done.stderr or "").lower():
            raise MountError(f"{mp} is busy (a program is using it): close it, or use --lazy")
    raise MountError(f"could not unmount {mp}: " + "; ".join(reasons))
