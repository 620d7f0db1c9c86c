"""Command-line parsing for ``nbiafs``: builds arguments and hands them to the module that owns each command.

Commands: ``mount``, ``unmount`` (:mod:`nbiafs.mountcmd`), ``demo`` (:mod:`nbiafs.demo`), ``refresh``
(:mod:`nbiafs.refreshcmd`), ``prefetch`` (:mod:`nbiafs.prefetchcmd`), ``download``
(:mod:`nbiafs.downloadcmd`), ``cache info|verify|clear`` (:mod:`nbiafs.cachecmd`), ``config`` (the
effective settings and where each came from) and ``emulator`` (:mod:`nbiafs.emulator.command`).
Every option flag comes from the table in :mod:`nbiafs.options`. Nothing here talks to a server or
touches FUSE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__, options
from .errors import NbiaError

log = logging.getLogger(__name__)


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config file (default: ~/.config/nbiafs/config.toml, or $NBIAFS_CONFIG)")


def _add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", help="existing directory to mount on")
    options.add_flags(p, ("server", "cache", "scope", "mount", "log"))
    _add_config_flag(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--password-fd", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbiafs",
        description="Mount The Cancer Imaging Archive (NBIA/TCIA) as a read-only folder.",
    )
    parser.add_argument("--version", action="version", version=f"nbiafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_mount = sub.add_parser("mount", help="mount an NBIA server on a directory")
    _add_mount_arguments(p_mount)

    p_unmount = sub.add_parser("unmount", help="unmount an nbiafs mount")
    p_unmount.add_argument("mountpoint")
    p_unmount.add_argument("--lazy", "-z", action="store_true", help="detach now, clean up when not busy")

    p_demo = sub.add_parser("demo", help="start the bundled emulator and mount its sample archive")
    _add_mount_arguments(p_demo)

    p_refresh = sub.add_parser("refresh", help="list folders of a mount again now (collections gain series)")
    p_refresh.add_argument("paths", nargs="+", metavar="PATH", help="a folder inside a running nbiafs mount")

    from .fetchjob import FETCH_GROUPS

    p_prefetch = sub.add_parser("prefetch", help="fill the cache with folders of a mount or a manifest's series")
    p_prefetch.add_argument("paths", nargs="*", metavar="PATH",
                            help="a collection, patient, study or series folder or a file inside a live mount")
    options.add_flags(p_prefetch, FETCH_GROUPS)
    _add_config_flag(p_prefetch)

    p_download = sub.add_parser("download", help="write folders of a mount or a manifest's series into a folder")
    p_download.add_argument("items", nargs="+", metavar="PATH... DEST",
                            help="folders or files inside a live mount (or none, with --manifest), then the "
                                 "destination folder")
    options.add_flags(p_download, FETCH_GROUPS)
    _add_config_flag(p_download)

    p_cache = sub.add_parser("cache", help="what the cache holds, check it, or empty it")
    cache_sub = p_cache.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    from .cachecmd import ACTIONS

    for action, (text, names) in ACTIONS.items():
        p_action = cache_sub.add_parser(action, help=text)
        options.add_named_flags(p_action, names)
        _add_config_flag(p_action)

    p_config = sub.add_parser("config", help="print the effective settings and where each comes from")
    options.add_flags(p_config, options.GROUPS)
    _add_config_flag(p_config)

    p_emu = sub.add_parser("emulator", help="run the NBIA-compatible emulator with its sample archive")
    from .emulator.command import add_arguments as add_emulator_arguments

    add_emulator_arguments(p_emu)
    return parser


def _setup_logging(level: str, log_file: str | None = None) -> None:
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _logging_from(args: argparse.Namespace) -> tuple[str, str | None]:
    """The log level and file a command asked for (flags and environment; the config file once read)."""
    import os

    level = getattr(args, "log_level", None) or os.environ.get(options.option("log_level").env) or "WARNING"
    log_file = getattr(args, "log_file", None) or os.environ.get(options.option("log_file").env)
    return level.upper(), log_file


def show_config(args: argparse.Namespace) -> int:
    """``nbiafs config``: every option, its effective value and its source."""
    from .mountcmd import resolve_args

    resolved = resolve_args(args, options.GROUPS)
    settings = resolved.settings
    path = resolved.config_path
    exists = path is not None and path.exists()
    print(f"# config file: {path}{'' if exists else ' (not present)'}")
    width = max(len(o.name) for o in options.OPTIONS)
    for opt in options.OPTIONS:
        value = getattr(settings, opt.name)
        shown = opt.show(value) if value is not None else ""
        text = f'"{shown}"' if opt.kind not in ("bool", "int", "float") or value is None else shown
        if value is None:
            text = f"# unset ({opt.default_text()})"
        print(f"{opt.name.replace('_', '-'):<{width}} = {text:<24} # {resolved.sources[opt.name]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(*_logging_from(args))
    try:
        if args.command == "emulator":
            from .emulator.command import run_emulator

            return run_emulator(args)
        if args.command == "config":
            return show_config(args)
        if args.command == "refresh":
            from .refreshcmd import refresh

            return refresh(args)
        if args.command == "prefetch":
            from .prefetchcmd import prefetch

            return prefetch(args)
        if args.command == "download":
            from .downloadcmd import download

            return download(args)
        if args.command == "cache":
            from .cachecmd import cache

            return cache(args)
        if args.command == "demo":
            from .demo import demo

            return demo(args)
        from . import mountcmd

        if args.command == "mount":
            return mountcmd.mount(args)
        if args.command == "unmount":
            return mountcmd.unmount(args)
    except NbiaError as exc:
        print(f"nbiafs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
