"""The ``mount``, ``unmount`` and ``demo`` commands: settings -> a running mount, and back.

``mount`` without ``--foreground`` resolves the settings, reads the password (env or prompt), logs in
once so that a wrong password or a dead server fails here with one clear line, then starts the mount
process in the background (:mod:`nbiafs.daemon`) and returns when the mount is ready. The mount
process (``--foreground``) wires client, catalog, store and the FUSE adapter together and runs the FUSE
main loop; its threads start in the FUSE ``init`` callback.

Hidden knobs for tests and slow links (environment, never argv): ``NBIAFS_DEADLINE``,
``NBIAFS_RETRIES``, ``NBIAFS_BACKOFF``, ``NBIAFS_CONNECT_TIMEOUT``, ``NBIAFS_READ_TIMEOUT`` (client)
and ``NBIAFS_READY_TIMEOUT`` (how long ``mount`` waits for the background process).
"""

from __future__ import annotations

import argparse
import dataclasses
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

import platformdirs

from . import daemon
from .config import GUEST_USER, Settings, default_cache_dir, parse_size
from .errors import ConfigError, NbiaError

log = logging.getLogger(__name__)

#: Environment knobs (name -> Settings field) read by the mount process; see the module docstring.
ENV_KNOBS = {
    "NBIAFS_DEADLINE": "deadline",
    "NBIAFS_RETRIES": "retries",
    "NBIAFS_BACKOFF": "backoff",
    "NBIAFS_CONNECT_TIMEOUT": "connect_timeout",
    "NBIAFS_READ_TIMEOUT": "read_timeout",
}
PASSWORD_ENV = "NBIA_PASSWORD"
#: How long ``unmount`` waits for the mount process to exit after the kernel let go of the mount.
UNMOUNT_EXIT_TIMEOUT = 30.0
#: With --lazy, how long unmount waits for the process before returning anyway (the mount may be busy).
LAZY_EXIT_WAIT = 2.0


class MountError(NbiaError):
    """The mount point cannot be used, or unmounting failed."""


@dataclasses.dataclass
class MountRequest:
    """Everything one ``mount``/``demo`` invocation asks for, beyond :class:`Settings`."""

    settings: Settings
    mountpoint: str
    api: str = "v2"
    prefetch: bool = True
    ready_fd: int | None = None


# ---------------------------------------------------------------------------------- settings
def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Settings from parsed arguments and the hidden environment knobs; raises ConfigError."""
    env = os.environ if environ is None else environ
    settings = Settings(
        server=args.server,
        user=args.user or GUEST_USER,
        cache_dir=Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_dir(),
        layout=args.layout,
        offline=bool(args.offline),
        foreground=bool(args.foreground),
        log_file=Path(args.log_file).expanduser().resolve() if args.log_file else None,
        log_level=args.log_level,
    )
    if args.cache_size is not None:
        settings.cache_size = parse_size(args.cache_size)
    if args.workers is not None:
        if args.workers < 1 or args.workers > 256:
            raise ConfigError(f"--workers must be between 1 and 256, not {args.workers}")
        settings.workers = args.workers
    for name, field in ENV_KNOBS.items():
        if env.get(name):
            kind = type(getattr(settings, field))
            try:
                value = kind(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}={env[name]!r} is not a valid {kind.__name__}") from exc
            if value < 0:
                raise ConfigError(f"{name} cannot be negative")
            setattr(settings, field, value)
    settings.validate()
    return settings


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

    Decided from /proc only: a stat of the mount point could block on a live but busy mount.
    """
    return not daemon.mount_processes(mp)


def check_fuse() -> None:
    """A clear error when this machine cannot mount FUSE file systems."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install FUSE 3 (apt install fuse3) or load the fuse module")
    if not (shutil.which("fusermount3") or os.geteuid() == 0):
        raise MountError("fusermount3 is missing: install FUSE 3 (apt install fuse3)")
    from . import fuselib

    fuselib.load()  # libfuse3, or a FuseUnavailableError naming the package to install


def _forward_args(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The options the background process needs to rebuild the same settings (no secrets)."""
    out = ["--layout", settings.layout, "--cache-dir", str(settings.cache_dir),
           "--cache-size", str(settings.cache_size), "--workers", str(settings.workers),
           "--log-level", settings.log_level, "--api", args.api]
    if args.server is not None:
        out += ["--server", args.server]
    if args.user:
        out += ["--user", args.user]
    if settings.offline:
        out.append("--offline")
    if args.no_prefetch:
        out.append("--no-prefetch")
    if settings.log_file:
        out += ["--log-file", str(settings.log_file)]
    return out


def _password(settings: Settings) -> str:
    if settings.user == GUEST_USER:
        return ""
    from .auth import password_from_env_or_prompt

    return password_from_env_or_prompt(settings.user)


def _check_login(settings: Settings, password: str) -> None:
    """Log in once so that a wrong password or a dead server fails before anything is mounted."""
    from .auth import TokenManager

    tokens = TokenManager(settings.base_url, settings.user, password,
                          timeout=(settings.connect_timeout, settings.read_timeout))
    try:
        tokens.get_token()
    except NbiaError as exc:
        raise type(exc)(f"cannot log in to {settings.base_url} as {settings.user}: {exc}") from exc
    except OSError as exc:  # connection refused etc. if auth lets them through
        raise MountError(f"cannot reach {settings.base_url}: {exc}") from exc
    finally:
        try:
            tokens.logout()
        except Exception:  # logging out a probe token is a courtesy only
            log.debug("logout after the login check failed", exc_info=True)


# ---------------------------------------------------------------------------------- mount
def mount(args: argparse.Namespace) -> int:
    """``nbiafs mount``: background by default, returns once the mount is ready."""
    if args.ready_fd is not None:
        return _run_child(args, emulator_data=None)
    settings = settings_from_args(args)
    mp = check_mountpoint(args.mountpoint)
    check_fuse()
    password = _password(settings)
    if not settings.offline:
        _check_login(settings, password)
    request = MountRequest(settings, mp, api=args.api, prefetch=not args.no_prefetch)
    if settings.foreground:
        return run_mount(request, password)
    env = dict(os.environ)
    env.pop(PASSWORD_ENV, None)
    if password:
        env[PASSWORD_ENV] = password
    _start_background("mount", mp, _forward_args(args, settings), env, settings)
    print(f"nbiafs: mounted {settings.base_url} ({settings.user}) on {mp}", file=sys.stderr)
    return 0


def _start_background(command: str, mp: str, extra: list[str], env: dict[str, str],
                      settings: Settings) -> int:
    timeout = float(os.environ.get("NBIAFS_READY_TIMEOUT") or daemon.DEFAULT_READY_TIMEOUT)
    return daemon.spawn_and_wait_ready(
        daemon.child_command(command, mp, extra), env=env,
        log_file=str(settings.log_file) if settings.log_file else None, timeout=timeout)


def _run_child(args: argparse.Namespace, emulator_data: Path | None) -> int:
    """The background mount process: report ready/error on the pipe, then serve until unmounted."""
    reporter = daemon.ReadyReporter(args.ready_fd)
    try:
        if emulator_data is None:
            settings = settings_from_args(args)
        mp = check_mountpoint(args.mountpoint)
        with ExitStack() as stack:
            if emulator_data is not None:
                args.server = _start_emulator(stack, emulator_data)
                settings = settings_from_args(args)
            password = os.environ.get(PASSWORD_ENV, "") if settings.user != GUEST_USER else ""
            request = MountRequest(settings, mp, api=args.api, prefetch=not args.no_prefetch,
                                   ready_fd=args.ready_fd)
            return run_mount(request, password, reporter=reporter)
    except BaseException as exc:
        reporter.error(str(exc) or type(exc).__name__)
        raise


def _start_emulator(stack: ExitStack, data_dir: Path) -> str:
    from .emulator import Emulator

    emu = Emulator(data_dir, port=0)
    emu.start()
    stack.callback(emu.stop)
    log.info("emulator serving %s on %s", data_dir, emu.url)
    return str(emu.url)


def run_mount(request: MountRequest, password: str, *,
              reporter: daemon.ReadyReporter | None = None) -> int:
    """Wire the layers together and serve ``request.mountpoint`` until it is unmounted."""
    from . import fs

    reporter = reporter or daemon.ReadyReporter(None)
    settings = request.settings
    failure: list[BaseException] = []

    def on_ready(error: BaseException | None) -> None:
        if error is None:
            log.info("mounted %s on %s", settings.base_url, request.mountpoint)
            reporter.ready()
        else:
            failure.append(error)
            reporter.error(f"cannot start the mount: {error}")

    with ExitStack() as stack:
        tokens, client, catalog, store = build_layers(settings, password, api=request.api, stack=stack)
        operations = fs.NbiaFS(catalog, store, tokens=tokens, prefetch=request.prefetch, on_ready=on_ready)
        try:
            fs.serve(operations, request.mountpoint, kernel_timeout=settings.kernel_timeout)
        except RuntimeError as exc:  # libfuse refused to mount (its reason went to the log/stderr)
            raise MountError(f"could not mount {request.mountpoint} (libfuse error {exc}); "
                             f"is it already mounted, or is FUSE unavailable?") from exc
    if failure:
        raise MountError(f"the mount stopped: {failure[0]}")
    return 0


def build_layers(settings: Settings, password: str, *, api: str = "v2",
                 stack: ExitStack) -> tuple[Any, Any, Any, Any]:
    """TokenManager (None offline), NbiaClient, Catalog and InstanceStore for ``settings``.

    Nothing here starts a thread: that happens in the FUSE ``init`` callback.
    """
    from .auth import TokenManager
    from .catalog import Catalog
    from .client import NbiaClient
    from .metacache import MetadataCache
    from .store import InstanceStore

    base_url = settings.base_url
    tokens = None
    if not settings.offline:
        tokens = TokenManager(base_url, settings.user, password,
                              timeout=(settings.connect_timeout, settings.read_timeout))
    client = NbiaClient(base_url, tokens, api=api, timeout=(settings.connect_timeout, settings.read_timeout),
                        retries=settings.retries, backoff=settings.backoff, deadline=settings.deadline,
                        pool_size=max(settings.workers, 4) + 4)
    stack.callback(client.close)
    namespace = f"{base_url}|{settings.user}"
    meta = _metadata_cache(MetadataCache, settings, namespace)
    if hasattr(meta, "close"):
        stack.callback(meta.close)
    store = InstanceStore(client, settings.cache_dir, size_limit=settings.cache_size, namespace=namespace,
                          offline=settings.offline, workers=settings.workers,
                          wait_timeout=settings.deadline + 15.0)
    stack.callback(store.close)
    # Without the advanced API (drill-down refused), exact sizes are learned by fetching: store.probe.
    catalog = Catalog(client, meta, layout=settings.layout, offline=settings.offline,
                      use_drilldown=settings.use_drilldown, probe=store.probe)
    return tokens, client, catalog, store


def _metadata_cache(kind: Callable[..., Any], settings: Settings, namespace: str) -> Any:
    return kind(settings.cache_dir / "metadata", namespace, settings.metadata_ttl)


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
    """fusermount3 -u (fallback fusermount -u, then umount); MountError with the tool's reason."""
    attempts: list[list[str]] = []
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            attempts.append([tool, "-u", *(["-z"] if lazy else []), mp])
    if shutil.which("umount"):
        attempts.append(["umount", *(["-l"] if lazy else []), mp])
    if not attempts:
        raise MountError("neither fusermount3, fusermount nor umount is installed")
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


# ---------------------------------------------------------------------------------- demo
def demo_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("nbiafs", appauthor=False)) / "demo-archive"


def demo(args: argparse.Namespace) -> int:
    """``nbiafs demo``: the bundled emulator and its sample archive, mounted, with a short guide."""
    data_dir = demo_data_dir()
    if args.cache_dir is None:
        args.cache_dir = str(default_cache_dir() / "demo")
    if args.ready_fd is not None:
        return _run_child(args, emulator_data=data_dir)
    args.server = args.server or "http://127.0.0.1:1"  # placeholder until the emulator has a port
    settings = settings_from_args(args)
    mp = check_mountpoint(args.mountpoint)
    check_fuse()
    from .emulator import ensure_archive

    print(f"nbiafs demo: preparing the sample archive in {data_dir} ...", file=sys.stderr, flush=True)
    ensure_archive(data_dir)
    args.server = None
    extra = _forward_args(args, settings)
    if settings.foreground:
        return _demo_foreground(args, mp, data_dir)
    env = dict(os.environ)
    env.pop(PASSWORD_ENV, None)
    if settings.user != GUEST_USER:
        env[PASSWORD_ENV] = _password(settings)
    _start_background("demo", mp, extra, env, settings)
    print(demo_guide(mp))
    return 0


def _demo_foreground(args: argparse.Namespace, mp: str, data_dir: Path) -> int:
    """Foreground demo: serve here; print the guide from a thread once the mount answers."""
    read_fd, write_fd = os.pipe()
    args.ready_fd = write_fd

    def guide_when_ready() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline().decode().strip()
        if line == daemon.READY:
            print(demo_guide(mp), flush=True)

    threading.Thread(target=guide_when_ready, name="nbiafs-demo-guide", daemon=True).start()
    return _run_child(args, emulator_data=data_dir)


def demo_guide(mp: str) -> str:
    """What is mounted (first levels), an example series, how to read it and how to unmount."""
    lines = [f"nbiafs demo: the sample archive is mounted on {mp}",
             "(read-only; listings and files are fetched from the bundled emulator on demand and cached on disk)",
             "", f"$ ls {mp}/*"]
    for coll in sorted(os.listdir(mp)):
        lines.append(f"{coll}:  " + "  ".join(sorted(os.listdir(os.path.join(mp, coll)))))
    series_dir = _example_series(mp)
    if series_dir is not None:
        files = sorted(os.listdir(series_dir))
        lines += ["", f"$ ls -l '{series_dir}' | head -4"]
        lines += _ls_l(series_dir)[:4]
        lines.append(f"... ({len(files)} files)")
        if files:
            example = os.path.join(series_dir, files[0])
            lines += ["", "Read a file with pydicom:",
                      f"$ python -c \"import pydicom; ds = pydicom.dcmread('{example}'); "
                      "print(ds.Modality, ds.PatientID, ds.Rows, ds.Columns)\"",
                      "", "Convert the whole series to NIfTI:",
                      f"$ dcm2niix -o /tmp '{series_dir}'"]
    lines += ["", "Unmount (this also stops the emulator):", f"$ nbiafs unmount {mp}"]
    return "\n".join(lines)


def _ls_l(path: str) -> list[str]:
    try:
        done = subprocess.run(["ls", "-l", path], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def _example_series(mp: str) -> str | None:
    """The series with the most files among the first collection's first few patients."""
    best: tuple[int, str] | None = None
    try:
        coll = os.path.join(mp, sorted(os.listdir(mp))[0])
        for patient in sorted(os.listdir(coll))[:3]:
            for study in sorted(os.listdir(os.path.join(coll, patient))):
                for series in sorted(os.listdir(os.path.join(coll, patient, study))):
                    path = os.path.join(coll, patient, study, series)
                    count = len(os.listdir(path))
                    if best is None or count > best[0]:
                        best = (count, path)
    except (OSError, IndexError):
        return best[1] if best else None
    return best[1] if best else None
