"""``nbiafs cache info|verify|clear [--cache-dir D]``: what a cache directory holds, check it, empty it.

What it owns: the three maintenance actions over one cache directory, whatever servers and accounts
filled it (every namespace): ``info`` (bytes, instances, series, the bound, the namespaces held, the
live mounts using it), ``verify`` (every cached instance re-read: its length and MD5 against what was
recorded when it was fetched, and the server's MD5 where known; what fails is dropped, listed, and
the exit status is 1) and ``clear`` (every instance and the cached listings removed; refused while a
live mount uses the directory unless ``--force``: the mount would survive, fetching again what it
reads, but a user who forgot it is running deserves to be told first).

Why it is shaped so: the store (:class:`nbiafs.store.InstanceStore`) does the work through its public
bulk jobs (``info``, ``verify_all``, ``clear``), opened without a client (nothing here talks to a
server) and with no bound (a maintenance command must never evict: a bound smaller than the one a
mount uses would throw away that mount's files). The bound shown is the one in effect: the live
mounts' own, else ``--cache-size`` (flag, environment, config file or default). The store needs a
namespace to open; the configured one is used, which at most creates that namespace's empty folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

#: action -> (help, the options it takes)
ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "info": ("print what the cache holds: bytes, instances, series, its bound, the servers and accounts",
             ("cache_dir", "cache_size", "log_level", "log_file")),
    "verify": ("re-check every cached instance (length and MD5), drop what fails, exit 1 if anything did",
               ("cache_dir", "log_level", "log_file")),
    "clear": ("empty the cache (refused while a live mount uses it, unless --force)",
              ("cache_dir", "force", "log_level", "log_file")),
}
#: What the settings of these commands may take from the environment and the config file.
_FROM_CONFIG = frozenset({"cache_dir", "cache_size", "server", "user", "log_level", "log_file"})
#: Where the metadata cache lives below the cache dir (as nbiafs.app builds it).
METADATA_DIR = "metadata"


def cache(args: argparse.Namespace) -> int:
    from . import options
    from .config import resolve

    config = getattr(args, "config", None)
    resolved = resolve(options.given_flags(args, options.GROUPS),
                       config_path=Path(config).expanduser() if config else None, only=_FROM_CONFIG)
    settings = resolved.settings
    action = {"info": info, "verify": verify, "clear": clear}[args.cache_action]
    return action(settings, resolved.sources)


def _open_store(settings: Any) -> Any:
    from .fetchjob import open_cache

    return open_cache(settings.cache_dir, settings.namespace)


def _namespace_text(namespace: str) -> str:
    server, _, account = namespace.rpartition("|")
    return f"{server} as {account}" if server else namespace


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def info(settings: Any, sources: dict[str, str]) -> int:
    from .fetchjob import mounts_using
    from .progress import human_bytes

    directory = settings.cache_dir
    users = mounts_using(directory)
    print(f"cache: {directory}")
    if not directory.exists():
        print("instances: none (the directory does not exist yet)")
    else:
        with _open_store(settings) as store:
            found = store.info()
        print(f"instances: {found.instances} in {found.series} series, {human_bytes(found.bytes)}")
        listings = directory / METADATA_DIR
        if listings.is_dir():
            print(f"listings: {human_bytes(_dir_bytes(listings))} (collections, patients, studies and series "
                  "as the servers listed them)")
        for namespace, count in sorted(found.namespaces.items()):
            print(f"namespace: {_namespace_text(namespace)}: {count} instances")
    if users:
        for record in users:
            print(f"bound: {human_bytes(int(record.get('cache_size') or 0))} (the mount on {record.get('mountpoint')})")
    else:
        print(f"bound: {human_bytes(settings.cache_size)} ({sources.get('cache_size', 'default')})")
    for record in users:
        who = record.get("user") or "anonymous"
        print(f"used by: {record.get('mountpoint')} ({record.get('server')}, {who}, pid {record.get('pid')})")
    return 0


def verify(settings: Any, sources: dict[str, str]) -> int:
    from .progress import Progress, human_bytes, human_seconds

    directory = settings.cache_dir
    if not directory.exists():
        print(f"verified 0 instances in {directory}: the directory does not exist")
        return 0
    dropped: list[str] = []
    with _open_store(settings) as store:
        before = store.info()
        progress = Progress("verify", before.instances, before.bytes, unit="instances")

        def on_file(path: str, ok: bool) -> None:
            if ok:
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = 0
                progress.add(size, fetched=False)
            else:
                dropped.append(path)
                progress.tally.failed += 1

        try:
            report = store.verify_all(on_file=on_file)
        finally:
            progress.close()
    for path in report.dropped:
        print(f"dropped {path}")
    took = human_seconds(progress.elapsed)
    if report.dropped:
        print(f"checked {report.checked} instances ({human_bytes(report.bytes)}) in {directory}: "
              f"{len(report.dropped)} dropped (not the bytes fetched; a mount or a prefetch fetches them again), "
              f"in {took}")
        return 1
    print(f"verified {report.checked} instances ({human_bytes(report.bytes)}) in {directory}: all good, in {took}")
    return 0


def clear(settings: Any, sources: dict[str, str]) -> int:
    from .errors import NbiaError
    from .fetchjob import mounts_using
    from .progress import human_bytes

    directory = settings.cache_dir
    users = mounts_using(directory)
    if users and not settings.force:
        where = ", ".join(str(r.get("mountpoint")) for r in users)
        first = users[0].get("mountpoint")
        raise NbiaError(f"the mount on {where} uses the cache {directory}: unmount it first (nbiafs unmount {first}), "
                        "or clear it anyway with --force (the mount then fetches again what it reads)")
    if not directory.exists():
        print(f"nothing to clear: {directory} does not exist")
        return 0
    with _open_store(settings) as store:
        found = store.info()
        removed = store.clear()
    listings = _clear_listings(directory / METADATA_DIR)
    also = " and the cached listings" if listings else ""
    print(f"cleared {directory}: {removed} instances ({human_bytes(found.bytes)}){also}")
    if users:
        print(f"nbiafs: note: the mount on {', '.join(str(r.get('mountpoint')) for r in users)} fetches again what it "
              "reads", file=sys.stderr)
    return 0


def _clear_listings(path: Path) -> bool:
    """Empty the metadata cache at ``path`` (in place, so a mount that has it open keeps working)."""
    if not path.is_dir():
        return False
    import diskcache

    from .errors import NbiaError

    try:
        with diskcache.Cache(str(path)) as listings:
            listings.clear()
    except Exception as exc:  # noqa: BLE001 - sqlite and OS errors alike: one clear line
        raise NbiaError(f"cannot clear the cached listings in {path}: {exc}") from None
    return True
