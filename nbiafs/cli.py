"""Command-line parsing for ``nbiafs``: builds arguments and hands them to the module that owns each command.

Commands: ``mount``, ``unmount``, ``demo`` (see :mod:`nbiafs.mountcmd`) and ``emulator``
(see :mod:`nbiafs.emulator.command`). Nothing here talks to a server or touches FUSE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import NbiaError

log = logging.getLogger(__name__)


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", help="existing directory to mount on")
    p.add_argument("--server", default="public",
                   help="public, nlst, or a base URL before /nbia-api (e.g. http://127.0.0.1:8080)")
    p.add_argument("--user", default=None,
                   help="NBIA account (default: the guest account); password from NBIA_PASSWORD or a prompt")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: the user cache dir)")
    p.add_argument("--cache-size", default=None, help="instance cache bound, e.g. 500M, 20G (default 10G)")
    p.add_argument("--layout", choices=("descriptive", "uid"), default="descriptive",
                   help="folder names: NBIA Data Retriever style (default) or raw UIDs")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--offline", action="store_true", help="serve only what is cached; never call the server")
    p.add_argument("--log-file", default=None, help="write the log here")
    p.add_argument("--log-level", default="WARNING",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--api", choices=("v2", "v4"), default="v2",
                   help="search API: v2 with a token (default) or v4 anonymous")
    p.add_argument("--no-prefetch", action="store_true",
                   help="do not fetch the rest of a series in the background after one file is opened")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbiafs",
        description="Mount The Cancer Imaging Archive (NBIA/TCIA) as a read-only folder.",
    )
    parser.add_argument("--version", action="version", version=f"nbiafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_mount = sub.add_parser("mount", help="mount an NBIA server on a directory")
    _add_mount_options(p_mount)

    p_unmount = sub.add_parser("unmount", help="unmount an nbiafs mount")
    p_unmount.add_argument("mountpoint")
    p_unmount.add_argument("--lazy", "-z", action="store_true", help="detach now, clean up when not busy")

    p_demo = sub.add_parser("demo", help="start the bundled emulator and mount its sample archive")
    _add_mount_options(p_demo)
    p_demo.set_defaults(server=None)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level if hasattr(args, "log_level") else "WARNING",
                   getattr(args, "log_file", None))
    try:
        if args.command == "emulator":
            from .emulator.command import run_emulator

            return run_emulator(args)
        from . import mountcmd

        if args.command == "mount":
            return mountcmd.mount(args)
        if args.command == "unmount":
            return mountcmd.unmount(args)
        if args.command == "demo":
            return mountcmd.demo(args)
    except NbiaError as exc:
        print(f"nbiafs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
