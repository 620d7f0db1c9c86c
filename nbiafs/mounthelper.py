"""``mount.fuse.nbiafs`` / ``mount.nbiafs``: the helpers mount(8) runs for ``mount -t fuse.nbiafs`` and fstab.

What it owns: turning mount(8)'s helper call into an ordinary ``nbiafs mount`` (:mod:`nbiafs.mountcmd`,
background, returning once the mount is ready) and nothing else. util-linux's libmount runs
``/sbin/mount.<type>`` (also ``/sbin/fs.d``, ``/sbin/fs``) as ``HELPER SOURCE MOUNTPOINT [-s] [-f] [-n]
[-v] [-o OPTIONS] [-t TYPE] [-N NAMESPACE]``, with ``-t`` only when the helper's name does not end
with the type; it has already removed ``noauto``/``auto`` and the ``x-*`` options, and passes ``ro`` or
``rw`` first (``rw`` for an fstab line that does not say ``ro``). It looks for
``mount.fuse.nbiafs`` before falling back to fuse3's generic ``mount.fuse``, which would run a program
called ``nbiafs`` with a source and a mount point: not nbiafs's command line, hence this helper.

Shape of the options (``-o a,b=c``): every name of the options table (:mod:`nbiafs.options`) in the
``server``, ``cache``, ``mount`` and ``log`` groups, spelled with ``_`` or ``-``, parsed by the table's
own parsers (``cache_size=20G``, ``umask=077``); a bare boolean name sets it (``allow_other``,
``offline``), ``name=false`` or ``no<name>`` clears it (``noprefetch``); ``config=FILE`` names the
config file (as ``--config``, passed to the mount process through ``NBIAFS_CONFIG``). The generic
options of mount(8), fuse and systemd (:data:`GENERIC`: ``ro``, ``rw``, ``defaults``, ``nofail``,
``_netdev``, ``user``, ``nosuid``, ``x-systemd.*``, ...) are accepted and ignored: they were meant for
mount(8) or systemd, and the mount is read-only whatever they say. Anything else is refused with
the list of names, unless ``-s`` (sloppy) was given. SOURCE is the server: ``public``, ``nlst``, a URL,
or ``nbiafs``/``none`` for "whatever the config says" (``public`` by default).

Passwords never travel in fstab or argv: a named account (``user=NAME``) takes its password from
``NBIA_PASSWORD`` in the helper's environment (at boot: ``EnvironmentFile=`` in a drop-in of the
mount unit systemd makes from the fstab line), which ``nbiafs mount`` hands to the mount process on a
pipe and removes from every environment it passes on.

Exit codes are mount(8)'s: 0 mounted, 1 bad usage or options, 32 the mount failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import options
from .config import CONFIG_ENV
from .errors import ConfigError, NbiaError

log = logging.getLogger(__name__)

#: mount(8) exit codes (see mount(8), "RETURN CODES").
EXIT_USAGE = 1
EXIT_FAILURE = 32
#: Option groups a mount takes (as ``nbiafs mount``).
GROUPS = ("server", "cache", "scope", "mount", "log")
#: Sources that mean "the configured server" (the config file, NBIAFS_SERVER, else public).
DEFAULT_SOURCES = frozenset({"", "nbiafs", "none", "default"})
#: Options for mount(8), the kernel, fuse or systemd rather than for nbiafs: accepted, ignored.
GENERIC = frozenset({
    "ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
    "nofail", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync", "async", "dirsync",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "silent", "loud", "mand", "nomand", "iversion",
    "noiversion", "bind", "rbind", "private", "slave", "shared", "unbindable", "remount",
})
#: Prefixes of generic options with a value (``x-systemd.automount``, ``comment=systemd.x``...).
GENERIC_PREFIXES = ("x-", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=")
#: Options only this helper knows (beside the table).
CONFIG_OPTION = "config"


@dataclass(slots=True)
class HelperCall:
    """What mount(8) asked for, sorted out."""

    source: str
    mountpoint: str
    values: dict[str, Any] = field(default_factory=dict)  # option name -> raw text or True/False
    config: str | None = None
    ignored: list[str] = field(default_factory=list)
    fake: bool = False
    verbose: bool = False


def split_options(text: str) -> list[str]:
    """``a,b=c,d="x,y"`` -> ``["a", "b=c", 'd=x,y']`` (double quotes protect commas, as libmount's)."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise ConfigError(f"unbalanced quote in mount options {text!r}")
    out.append("".join(current))
    return [item for item in (o.strip() for o in out) if item]


def _generic(item: str) -> bool:
    return item in GENERIC or item.startswith(GENERIC_PREFIXES)


def parse_options(items: Sequence[str], *, sloppy: bool = False) -> tuple[dict[str, Any], str | None, list[str]]:
    """Mount options -> (option values by table name, config file, ignored items).

    Values are checked with the table's parsers here, so a bad value fails before anything starts.
    """
    allowed = {o.name: o for o in options.in_groups(GROUPS)}
    values: dict[str, Any] = {}
    config: str | None = None
    ignored: list[str] = []
    unknown: list[str] = []
    for item in items:
        name, has_value, raw = item.partition("=")
        key = name.strip().replace("-", "_")
        if key == CONFIG_OPTION and has_value:
            config = raw
            continue
        if not has_value and item in GENERIC:  # bare "user" is fstab's, "user=NAME" the account
            ignored.append(item)
            continue
        opt = allowed.get(key)
        if opt is None and not has_value:
            for prefix in ("no_", "no"):  # noprefetch, no_prefetch
                negated = allowed.get(key[len(prefix):]) if key.startswith(prefix) else None
                if negated is not None and negated.kind == "bool":
                    values[negated.name] = False
                    break
            else:
                negated = None
            if negated is not None:
                continue
        if opt is None:
            if _generic(item):
                ignored.append(item)
            elif sloppy:
                log.warning("ignoring the unknown mount option %r (sloppy mount)", item)
                ignored.append(item)
            else:
                unknown.append(item)
            continue
        if not has_value:
            if opt.kind != "bool":
                raise ConfigError(f"mount option {opt.name} needs a value ({opt.name}={opt.metavar or 'VALUE'})")
            values[opt.name] = True
            continue
        try:
            opt.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"mount option {item!r}: {exc}") from None
        values[opt.name] = raw
    if unknown:
        names = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown mount option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(nbiafs takes: {names}, config=FILE; and mount(8)'s generic ones)")
    return values, config, ignored


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="mount(8) helper for nbiafs: mount -t fuse.nbiafs SOURCE MOUNTPOINT -o OPTIONS")
    parser.add_argument("source", help="public, nlst, a server URL, or nbiafs/none for the configured server")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated options: the names of nbiafs's options table, and mount(8)'s")
    parser.add_argument("-t", dest="type", default=None, help="file system type (fuse.nbiafs or nbiafs)")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    parser.add_argument("-f", dest="fake", action="store_true", help="check everything, mount nothing")
    parser.add_argument("-n", dest="nomtab", action="store_true", help="accepted (nbiafs writes no mtab)")
    parser.add_argument("-v", dest="verbose", action="store_true", help="say what happens")
    parser.add_argument("-N", dest="namespace", default=None, help="not supported")
    return parser


def parse_call(argv: Sequence[str], prog: str = "mount.fuse.nbiafs") -> HelperCall:
    """mount(8)'s arguments -> a :class:`HelperCall` (ConfigError for anything nbiafs cannot do)."""
    args = build_parser(prog).parse_args(list(argv))
    if args.namespace is not None:
        raise ConfigError("mounting into another mount namespace (-N) is not supported by nbiafs")
    if args.type is not None and args.type not in ("nbiafs", "fuse.nbiafs"):
        raise ConfigError(f"this helper mounts nbiafs, not {args.type!r}")
    items = [item for text in args.options for item in split_options(text)]
    values, config, ignored = parse_options(items, sloppy=args.sloppy)
    source = source_name(args.source)
    if source.lower() not in DEFAULT_SOURCES:
        given = values.get("server")
        if given is not None and given != source:
            raise ConfigError(f"two servers: {source!r} as the source and server={given} among the options")
        values["server"] = source
    return HelperCall(source, args.mountpoint, values, config, ignored, fake=args.fake, verbose=args.verbose)


def source_name(source: str) -> str:
    """The server named by mount(8)'s SOURCE.

    For a type it does not know (``-t nbiafs``, not ``fuse.nbiafs``) mount(8) treats the source as a
    path and makes it absolute when a file of that name is in its working directory: ``nbiafs`` run
    from a folder holding ``nbiafs/`` arrives as ``/that/folder/nbiafs``. A server is never a local
    path, so such a source is read as its last component when that is a server name (``public``,
    ``nlst``, ``nbiafs``, ``none``).
    """
    from .config import SERVERS

    text = source.strip()
    if text.startswith("/"):
        name = os.path.basename(text.rstrip("/"))
        if name.lower() in DEFAULT_SOURCES or name in SERVERS:
            return name
        raise ConfigError(f"the source {source!r} is a path; nbiafs needs a server: public, nlst, a URL, "
                          "or nbiafs for the configured one")
    return text


def mount_arguments(call: HelperCall) -> argparse.Namespace:
    """The arguments ``nbiafs mount`` would have parsed for ``call`` (every option, None = not given)."""
    namespace = argparse.Namespace(mountpoint=call.mountpoint, config=call.config, ready_fd=None,
                                   password_fd=None)
    for opt in options.in_groups(GROUPS):
        setattr(namespace, opt.name, call.values.get(opt.name))
    return namespace


def run(call: HelperCall) -> int:
    """Mount as ``nbiafs mount`` does (background, back once ready; ``foreground`` serves here)."""
    from . import mountcmd

    if call.config is not None:
        # The config file must reach the mount process too: it re-reads its settings, and the
        # environment is what it inherits (never the password, which goes on a pipe).
        os.environ[CONFIG_ENV] = os.path.abspath(os.path.expanduser(call.config))
    args = mount_arguments(call)
    if call.ignored:
        log.info("ignored mount options meant for mount(8) or systemd: %s", ",".join(call.ignored))
    if call.fake:
        settings = mountcmd.resolve_args(args).settings
        mountcmd.check_mountpoint(call.mountpoint)
        log.info("would mount %s on %s (fake mount: nothing done)", settings.base_url, call.mountpoint)
        return 0
    return mountcmd.mount(args)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s", force=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mount.fuse.nbiafs`` and ``mount.nbiafs``."""
    prog = os.path.basename(sys.argv[0]) or "mount.fuse.nbiafs"
    arguments = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # a program of its own: log to stderr (called as a function, the caller's logging stays)
        _setup_logging("-v" in arguments)
    try:
        call = parse_call(arguments, prog)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help (0) or a usage error (mount(8) says 1 for that)
        return EXIT_USAGE if exc.code else 0
    try:
        return run(call) or 0
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NbiaError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
