"""What ``nbiafs prefetch`` and ``nbiafs download`` share: where their settings come from, what they work
on, and how the store's bulk job runs so that Ctrl-C stops it cleanly.

What it owns:

* :func:`resolve_command`: a command's settings (flags > environment > config file > defaults), with
  ``--dry-run`` and ``--force`` taken from the command line only (a config file that says ``dry-run``
  must not silently turn every download into a dry run).
* :func:`open_targets`: PATHs inside live mounts, or a manifest, turned into :class:`Target` records,
  each the layers (:func:`nbiafs.app.build_layers`) of one server, account and cache dir plus the series
  and files picked (:func:`nbiafs.selection.pick`). A PATH run takes the mount's facts from its run
  record (server, account, API, cache dir and bound, layout, manifest), so it fills the cache that
  mount reads and names files as the mount does; the mount process itself is not involved (it need
  not answer, and FUSE is never touched: only the mount table is read). A manifest run needs no
  mount at all. Paths in several mounts make several targets.
* :func:`run_stoppable`: runs the work in a thread while the main thread waits for Ctrl-C (or
  SIGTERM): then the stop event is set and the HTTP clients are closed, which cuts the transfers in
  flight, so the work ends within moments and a part file is all a transfer leaves (never a file
  that looks complete; the store removes part files). A re-run fetches only what is missing.
* :func:`ensure_healing`: the store's ``ensure`` plus one more pass for the files whose cached copy
  went away under the store's index while ``ensure`` was reading it (another process evicted it
  between the store's check and its MD5 read, or a command dropped a copy it found bad): ``ensure``
  reports those as failures ("No such file or directory"); a lost file is then opened once (which
  fetches it and fixes the index) and ensured again. (A copy already gone or cut when ``ensure``
  looks is fetched again by ``ensure`` itself.)

Why it is shaped so: both commands need exactly this, in the same order (settings, a server check,
the layers, the pick, the job), and differ only in what they do with each finished file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from . import daemon, options
from .app import Layers, build_layers
from .config import Resolved, Settings, resolve
from .errors import ConfigError, NbiaError, NotFoundError
from .selection import Pick, pick

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The option groups of prefetch and download (see nbiafs.options).
FETCH_GROUPS = ("server", "cache", "scope", "fetch", "log")
#: Options only ever taken from the command line (never the environment or a config file).
FLAG_ONLY = frozenset({"dry_run", "force"})
#: The settings a PATH run takes from the mount's run record; giving one of them is an error there.
FROM_MOUNT = ("server", "user", "api", "cache_dir", "cache_size", "layout", "manifest")
#: Passes of ensure after the first, for files the cache lost under the store's index.
HEAL_PASSES = 1
#: Exit statuses of an interrupted run (as a shell reports a process killed by SIGINT / SIGTERM).
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
#: Seconds between the main thread's looks for a signal while the work runs. The kernel may deliver
#: Ctrl-C to any thread; Python then only flags it, and a main thread blocked in an untimed wait
#: would never run the handler (the stop would be lost). A timed wait returns to the interpreter.
SIGNAL_POLL = 0.2


def resolve_command(args: argparse.Namespace, groups: Sequence[str]) -> Resolved:
    """Settings of a command taking the options of ``groups`` (see the module docstring)."""
    config = getattr(args, "config", None)
    names = {o.name for o in options.in_groups(groups)} - FLAG_ONLY
    return resolve(options.given_flags(args, groups), config_path=Path(config).expanduser() if config else None,
                   only=names)


def mounts_using(cache_dir: Path) -> list[dict[str, Any]]:
    """The run records of the live mounts whose cache dir is ``cache_dir``."""
    wanted = _real(cache_dir)
    return [r for r in daemon.live_mounts() if r.get("cache_dir") and _real(Path(r["cache_dir"])) == wanted]


def _real(path: Path) -> str:
    try:
        return str(path.expanduser().resolve())
    except OSError:
        return str(path.expanduser().absolute())


# ---------------------------------------------------------------------------------- targets
@dataclass(slots=True, eq=False)
class Target:
    """One server, account and cache dir, and what is asked of it (compared by identity)."""

    layers: Layers
    picks: list[Pick]
    mountpoint: str | None = None  # the mount holding the PATHs (None: a manifest)
    missing: list[str] = field(default_factory=list)  # manifest series the server did not place
    notes: list[str] = field(default_factory=list)  # for the user, before the work starts

    @property
    def settings(self) -> Settings:
        return self.layers.settings

    def label(self, node: Any) -> str:
        """How the user names ``node``: its path in the mount, or its path in the tree of the manifest."""
        path = str(node.path)
        return self.mountpoint.rstrip("/") + path if self.mountpoint else path.lstrip("/")

    def nodes(self) -> list[Any]:
        return [f for p in self.picks for f in p.files]


@contextmanager
def open_targets(args: argparse.Namespace, paths: Sequence[str], resolved: Resolved) -> Iterator[list[Target]]:
    """The targets of ``paths`` (inside live mounts) or of the manifest in ``resolved``; closed on exit."""
    settings = resolved.settings
    given = set(options.given_flags(args, FETCH_GROUPS))
    if paths and "manifest" in given:
        raise ConfigError("give PATHs inside a mount or --manifest FILE, not both")
    targets: list[Target] = []
    try:
        if paths:
            for target in _path_targets(paths, settings, given):
                targets.append(target)
        elif settings.manifest is not None:
            targets.append(_manifest_target(resolved))
        else:
            raise ConfigError("nothing to fetch: give PATHs inside an nbiafs mount, or --manifest FILE.tcia")
        yield targets
    finally:
        for target in targets:
            target.layers.close()


def _path_targets(paths: Sequence[str], base: Settings, given: set[str]) -> Iterator[Target]:
    by_mount: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        mountpoint, inside = daemon.mount_containing(path)
        by_mount.setdefault(mountpoint, []).append((path, inside))
    for mountpoint, items in by_mount.items():
        clash = [n for n in FROM_MOUNT if n in given]
        if clash:
            flags = ", ".join(options.option(n).flag for n in clash)
            raise ConfigError(f"{flags}: a PATH inside a mount uses that mount's server, account, cache and names "
                              f"(those of {mountpoint}); leave {flags} out, or use --manifest")
        record = daemon.mount_record(mountpoint)
        if record is None:
            raise NbiaError(f"the mount on {mountpoint} has no live nbiafs process (stale?): "
                            f"clean it up with nbiafs unmount {mountpoint}, then mount again")
        settings = _settings_of_mount(base, record, mountpoint)
        layers = _build(settings)
        try:
            for path, inside in items:
                try:
                    node = layers.catalog.lookup(inside)
                except NotFoundError:
                    raise NotFoundError(f"{path}: no such file or folder in the mount on {mountpoint}") from None
                if node.kind in ("meta", "metadir"):
                    raise NotFoundError(f"{path}: a metadata file of nbiafs, not DICOM data")
            picks = pick(layers.catalog, [inside for _path, inside in items])
        except BaseException:
            layers.close()
            raise
        yield Target(layers, picks, mountpoint=mountpoint)


def _settings_of_mount(base: Settings, record: dict[str, Any], mountpoint: str) -> Settings:
    try:
        facts: dict[str, Any] = {
            "server": str(record["server"]), "user": record.get("user") or None,
            "api": record.get("api") or "auto", "cache_dir": Path(record["cache_dir"]),
            "cache_size": int(record["cache_size"]), "layout": record.get("layout") or base.layout,
            "manifest": Path(record["manifest"]) if record.get("manifest") else None,
        }
    except (KeyError, TypeError, ValueError):
        raise NbiaError(f"the mount on {mountpoint} was started by another version of nbiafs: "
                        "remount it to prefetch or download from it") from None
    settings = dataclasses.replace(base, **facts)
    settings.validate()
    return settings


def _manifest_target(resolved: Resolved) -> Target:
    from .manifest import read_manifest
    from .mountcmd import check_server

    settings = dataclasses.replace(resolved.settings)
    assert settings.manifest is not None
    read_manifest(settings.manifest)  # a bad manifest is one clear line before anything is asked
    notes = _bound_of_mounts(settings, resolved.sources.get("cache_size", "default"))
    password = _password(settings)
    if not settings.offline:
        settings.api = check_server(settings, password)
    layers = _build(settings, password)
    try:
        picks = pick(layers.catalog, ["/"])
        missing = list(layers.catalog.scope.missing) if layers.catalog.scope is not None else []
    except BaseException:
        layers.close()
        raise
    return Target(layers, picks, missing=missing, notes=notes)


def _bound_of_mounts(settings: Settings, source: str) -> list[str]:
    """A live mount shares this cache dir: a bound left at its default becomes the mount's (else this
    run would evict the mount's files down to 10 GiB); a smaller one given on purpose is kept, with a note."""
    users = mounts_using(settings.cache_dir)
    if not users:
        return []
    biggest = max(int(r.get("cache_size") or 0) for r in users)
    where = ", ".join(str(r.get("mountpoint")) for r in users)
    if source == "default":
        settings.cache_size = max(biggest, settings.cache_size)
        return []
    if settings.cache_size < biggest:
        from .progress import human_bytes

        return [f"nbiafs: note: the mount on {where} bounds this cache at {human_bytes(biggest)}; "
                f"--cache-size {human_bytes(settings.cache_size)} evicts its files down to that"]
    return []


def _password(settings: Settings) -> str:
    from .mountcmd import password_for

    return password_for(settings)


def _build(settings: Settings, password: str | None = None) -> Layers:
    """The layers, not started: the store's scan at start keeps the bound (evicts), which must wait
    until the plan was checked (a refused or dry run changes nothing). See :func:`start`."""
    settings.walk_ahead = False  # nobody walks this tree: no listings ahead
    return build_layers(settings, _password(settings) if password is None else password)


def start(targets: Sequence[Target]) -> None:
    """Start the layers of ``targets`` (token renewal, the store's scan of the cache dir)."""
    for target in targets:
        target.layers.start()


#: The bound of a view of the cache that must never evict (plans, maintenance commands).
NO_BOUND = 1 << 62


def open_cache(cache_dir: Path, namespace: str) -> Any:
    """A view of the instance cache in ``cache_dir`` that never evicts and never fetches (no client)."""
    from .store import InstanceStore

    return InstanceStore(None, cache_dir, size_limit=NO_BOUND, namespace=namespace, offline=True, workers=0)


def cache_usage(settings: Settings) -> Any:
    """``CacheInfo`` of ``settings``' cache dir, read without evicting anything."""
    with open_cache(settings.cache_dir, settings.namespace) as view:
        return view.info()


# ---------------------------------------------------------------------------------- running
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stoppable(work: Callable[[], T], stop: threading.Event,
                  on_stop: Callable[[], None]) -> tuple[T | None, int | None]:
    """Run ``work()`` in a thread until it returns, or until Ctrl-C/SIGTERM: then set ``stop``, call
    ``on_stop`` (close the clients: transfers in flight are cut) and wait for ``work`` to end.

    Returns ``(work's result, None)``, or ``(its result, exit status)`` after an interruption. A
    second Ctrl-C while waiting raises KeyboardInterrupt at once.
    """
    result: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, raised there
            result["error"] = exc
        finally:
            done.set()

    code: int | None = None
    with _sigterm_as_interrupt():
        thread = threading.Thread(target=target, name="nbiafs-job", daemon=True)
        try:
            thread.start()  # inside: a Ctrl-C the moment the job starts must stop it too
            _wait_seeing_signals(done)
        except KeyboardInterrupt as exc:
            code = EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
            stop.set()
            on_stop()
            if thread.ident is not None:  # it started: wait for it to see the stop
                _wait_seeing_signals(done)
    if "error" in result and code is None:
        raise result["error"]
    if "error" in result:
        log.info("after the interruption: %s", result["error"])
    return result.get("value"), code


def _wait_seeing_signals(done: threading.Event) -> None:
    """``done.wait()`` that still raises for a Ctrl-C/SIGTERM the kernel gave another thread (see SIGNAL_POLL)."""
    while not done.wait(SIGNAL_POLL):
        pass


def lost_under_the_store(outcome: Any) -> bool:
    """The store's ensure failed because the cached file was gone under its index (see the module docstring)."""
    return outcome.status == "failed" and "No such file or directory" in str(outcome.error or "")


def heal(store: Any, node: Any) -> None:
    """Open and close ``node`` through the store: a copy it lost is noticed and fetched again."""
    try:
        handle = store.open(node)
    except (NbiaError, OSError) as exc:
        log.info("could not fetch %s again: %s", getattr(node, "path", node), exc)
        return
    store.release(handle)


def ensure_healing(store: Any, nodes: Sequence[Any], *, verify_md5: bool, workers: int, stop: threading.Event,
                   handle: Callable[[Any, bool], bool]) -> None:
    """``store.ensure(nodes)``, calling ``handle(outcome, last)`` for every finished file (from the store's
    workers). ``handle`` returns True when the file must go again (its cached copy was lost or found
    bad); unless ``last``, such files are healed (:func:`heal`) and ensured once more."""
    pending = list(nodes)
    healed: set[int] = set()  # ids of the nodes fetched again by heal(): "cached" for ensure, fetched in truth
    for attempt in range(HEAL_PASSES + 1):
        last = attempt == HEAL_PASSES
        again: list[Any] = []
        lock = threading.Lock()

        def one(outcome: Any, last: bool = last, again: list[Any] = again, lock: threading.Lock = lock) -> None:
            if outcome.status == "cached" and id(outcome.node) in healed:
                outcome = dataclasses.replace(outcome, status="fetched")
            if handle(outcome, last) and not last:
                with lock:
                    again.append(outcome.node)

        store.ensure(pending, verify_md5=verify_md5, workers=workers, on_outcome=one, stop=stop)
        if not again or stop.is_set():
            return
        log.info("%d file(s) left the cache before they could be used: fetching them again", len(again))
        for node in again:
            heal(store, node)
            healed.add(id(node))
        pending = again
