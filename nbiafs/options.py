"""The one table of options: every setting's name, default, help and why, and everything derived from it.

What it owns: :data:`OPTIONS`. Command-line flags (:func:`add_flags`), the fields and defaults of
:class:`nbiafs.config.Settings`, the keys of the config file, the ``NBIAFS_<NAME>`` environment
variables and the option table in ``docs/usage.md`` (:func:`markdown_table`) all come from it, and
``tests/test_options.py`` fails when any of them drifts from the table (as rclone builds its flags from
``vfscommon/options.go``). A default written anywhere else is a bug: the client, the token manager and
the retry policy take theirs from here through :func:`default`.

Shape: an option is a frozen record; its ``kind`` says how text becomes a value (``size`` "20G" ->
bytes, ``duration`` "1d" -> seconds, ``octal`` "022" -> int...), so a flag, an environment variable and a
TOML string parse the same way. ``groups`` say which commands take it: ``server`` (anything that talks
to an NBIA server), ``cache`` (anything that uses the cache), ``scope`` (what part of the archive:
a manifest), ``fetch`` (``prefetch`` and ``download``), ``mount`` (the file system), ``admin`` (``cache
clear``), ``log``. An option may be in several groups (``layout``: the mount's and a download's names).
Passwords are never options: they come from the environment, a prompt or a pipe (see :mod:`nbiafs.auth`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

GROUPS = ("server", "cache", "scope", "fetch", "mount", "admin", "log")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its name (a Settings field, a config key, ``--name-with-dashes``), default and why."""

    name: str
    default: Any
    help: str
    why: str
    kind: str = "str"  # str | int | float | size | duration | bool | choice | path | octal
    groups: frozenset[str] = frozenset()
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    short: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: Shown in docs instead of the default's value (for defaults computed at run time).
    shown_default: str | None = None

    @property
    def flag(self) -> str:
        """The command-line flag: ``--cache-size``; ``--no-prefetch`` for a bool that defaults to True."""
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.kind == "bool" and self.default is True else f"--{dashed}"

    @property
    def env(self) -> str:
        """The environment variable that sets it: ``NBIAFS_CACHE_SIZE``."""
        return "NBIAFS_" + self.name.upper()

    def parse(self, value: Any) -> Any:
        """``value`` (text from a flag or the environment, or a TOML value) as this option's type."""
        try:
            parsed = _PARSERS[self.kind](self, value)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name.replace('_', '-')}: bad value {value!r} ({exc})") from None
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            if self.minimum is not None and parsed < self.minimum:
                raise ConfigError(f"{self.name.replace('_', '-')} must be at least {self.minimum:g}, not {value!r}")
            if self.maximum is not None and parsed > self.maximum:
                raise ConfigError(f"{self.name.replace('_', '-')} must be at most {self.maximum:g}, not {value!r}")
        return parsed

    def show(self, value: Any) -> str:
        """``value`` written as a user would type it (``10G``, ``1d``, ``022``)."""
        if value is None:
            return ""
        if self.kind == "size":
            return format_size(int(value))
        if self.kind == "duration":
            return format_duration(float(value))
        if self.kind == "octal":
            return f"{int(value):03o}"
        if self.kind == "bool":
            return "true" if value else "false"
        return str(value)

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.kind == "bool":
            return "on" if self.default else "off"
        return self.show(self.default) or "none"


# ------------------------------------------------------------------------------------------ parsing
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str | int, *, zero: bool = False) -> int:
    """Parse ``500M``, ``20G``, ``1.5T``, ``123456`` (bytes) into bytes (binary units); 0 only with ``zero``."""
    if isinstance(text, bool):
        raise ConfigError(f"bad size {text!r}")
    if isinstance(text, int):
        if text < 0 or (text == 0 and not zero):
            raise ConfigError("a size must be positive")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value == 0 and zero:
        return 0
    if value < 1:
        raise ConfigError(f"bad size {text!r}: must be at least one byte")
    return int(value)


def format_size(value: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def parse_duration(text: str | float) -> float:
    """Seconds from ``90``, ``1.5s``, ``250ms``, ``30m``, ``12h``, ``1d``."""
    if isinstance(text, bool):
        raise ConfigError(f"bad duration {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _DURATION_RE.match(str(text))
        if not match:
            raise ConfigError(f"bad duration {text!r}: use seconds or a number with ms, s, m, h or d")
        value = float(match.group(1)) * _SECONDS[(match.group(2) or "").lower()]
    if value < 0:
        raise ConfigError(f"bad duration {text!r}: cannot be negative")
    return value


def format_duration(value: float) -> str:
    for unit in ("d", "h", "m"):
        scale = _SECONDS[unit]
        if value >= scale and value % scale == 0:
            return f"{int(value // scale)}{unit}"
    return f"{value:g}s" if value else "0"


def _bool(option: Option, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _choice(option: Option, value: Any) -> str:
    text = str(value)
    if text not in option.choices:
        raise ConfigError(f"{option.name.replace('_', '-')}: {text!r} is not one of {', '.join(option.choices)}")
    return text


def _octal(option: Option, value: Any) -> int:
    number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 8)
    if not 0 <= number <= 0o777:
        raise ValueError("an octal mode between 000 and 777")
    return number


def _int(option: Option, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not a number")
    return int(value)


def _float(option: Option, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    return float(value)


_PARSERS: dict[str, Callable[[Option, Any], Any]] = {
    "str": lambda o, v: str(v),
    "int": _int,
    "float": _float,
    "size": lambda o, v: parse_size(v, zero=o.minimum == 0),
    "duration": lambda o, v: parse_duration(v),
    "bool": _bool,
    "choice": _choice,
    "path": lambda o, v: Path(str(v)).expanduser(),
    "octal": _octal,
}


# ------------------------------------------------------------------------------------------ the table
def _opt(name: str, default: Any, help: str, why: str, kind: str, groups: str, **extra: Any) -> Option:
    return Option(name, default, help, why, kind, frozenset(groups.split()), **extra)


OPTIONS: tuple[Option, ...] = (
    # -- the server ------------------------------------------------------------------------------
    _opt("server", "public", "public, nlst, or a base URL before /nbia-api (e.g. http://127.0.0.1:8080)",
         "public is the host TCIA's own client (tcia_utils 3.x) uses today; NLST lives on its own server",
         "str", "server", metavar="SERVER"),
    _opt("user", None, "NBIA account; its password comes from NBIA_PASSWORD or a prompt, never the command line",
         "public TCIA data needs no account since 2025; other NBIA servers keep restricted collections behind one",
         "str", "server", metavar="NAME", shown_default="anonymous"),
    _opt("api", "auto", "search API: auto (anonymous v4, or v2 with a token for --user or a server without v4), "
         "v2 (always a token) or v4 (always anonymous)",
         "auto needs no login on today's TCIA and still works against older NBIA servers",
         "choice", "server", choices=("auto", "v2", "v4")),
    _opt("drilldown", True, "use the drill-down calls for exact sizes before any download",
         "dcm2niix and DCMTK need st_size exact before open; without the drill-down sizes are learned by fetching",
         "bool", "server"),
    _opt("datacite_url", "https://api.datacite.org", "DataCite REST API, for how to cite a collection "
         "(.collection.json); empty: no citations", "TCIA's data usage policy asks users to cite every "
         "collection by its DOI, which DataCite registered", "str", "server", metavar="URL"),
    _opt("workers", 8, "parallel downloads ahead of readers (read-ahead, prefetch, download)",
         "enough to keep the connections busy while each waits its round trip", "int", "server", metavar="N",
         minimum=1, maximum=256),
    _opt("connections", 8, "at most this many requests to the server at once",
         "the TCIA Data Retriever's politeness: 8 connections per host; more rarely helps and burdens a shared "
         "server", "int", "server", metavar="N", minimum=1, maximum=64),
    _opt("connect_timeout", 10.0, "seconds to connect to the server", "a dead host fails fast instead of hanging a reader",
         "duration", "server", metavar="SECONDS"),
    _opt("read_timeout", 60.0, "seconds without a byte from the server before a request fails",
         "a stalled transfer fails with EIO instead of hanging, however long the whole transfer is",
         "duration", "server", metavar="SECONDS", minimum=0.001),
    _opt("retries", 4, "retries of a failed request (429, 5xx, resets, cut-short bodies)",
         "a busy server recovers within a few attempts; more only delays the error",
         "int", "server", metavar="N", minimum=0, maximum=50),
    _opt("backoff", 0.5, "first wait before a retry, in seconds (doubles each time, with jitter)",
         "short enough for a blip, doubling so a struggling server is not hammered", "duration", "server",
         metavar="SECONDS"),
    _opt("deadline", 120.0, "seconds one call may take in all: retries, token renewal and waits for other threads included",
         "no reader waits past it, whatever fails underneath", "duration", "server", metavar="SECONDS",
         minimum=0.001),
    # -- the cache -------------------------------------------------------------------------------
    _opt("cache_dir", None, "where metadata and instance bytes are cached",
         "the per-user cache directory survives remounts; share it between mounts of one server",
         "path", "cache", metavar="DIR", shown_default="~/.cache/nbiafs"),
    _opt("cache_size", 10 * 1024**3, "bound of the instance cache, e.g. 500M, 20G, 1.5T (least recently used evicted)",
         "10 GiB holds a few hundred typical CT series and fits most laptops", "size", "cache", metavar="SIZE"),
    _opt("metadata_ttl", 24 * 3600.0, "how long collection, patient and study listings are kept (in memory and on "
         "disk) before they are asked again; a series' files are kept for good",
         "collections gain patients and series; a published series never changes (nbiafs refresh asks at once)",
         "duration", "cache", metavar="SECONDS"),
    _opt("offline", False, "serve only what is cached; never call the server",
         "read cached data on a plane or while the server is down", "bool", "cache"),
    # -- what part of the archive -------------------------------------------------------------------
    _opt("manifest", None, "a TCIA manifest (.tcia, the portal's cart): show or fetch only its series and the "
         "folders above them", "work on a cart without the rest of the archive in the way", "path", "scope",
         metavar="FILE"),
    # -- prefetch and download -------------------------------------------------------------------
    _opt("dry_run", False, "print the series, files and bytes that would be fetched, and whether they fit "
         "the cache (or DEST); fetch nothing", "see what a cart costs before spending the bandwidth and the disk",
         "bool", "fetch"),
    _opt("verify_md5", True, "check every instance against the server's MD5 (a mismatch is fetched again, "
         "never kept)", "a body of the right length can still be the wrong bytes; the Data Retriever checks "
         "MD5s too", "bool", "fetch"),
    # -- the mount -------------------------------------------------------------------------------
    _opt("layout", "descriptive", "folder names: the NBIA Data Retriever's descriptive layout, or raw UIDs",
         "scripts written for Data Retriever downloads then work on the mount", "choice", "mount fetch",
         choices=("descriptive", "uid")),
    _opt("foreground", False, "stay in the foreground (Ctrl-C unmounts)", "for debugging and service managers",
         "bool", "mount", short="-f"),
    _opt("prefetch", True, "fetch ahead of a reader that walks a series", "latency, not bandwidth, limits "
         "one-file-at-a-time reads", "bool", "mount"),
    _opt("series_zip", True, "also fetch a series read from its start through its getImage zip (in reading "
         "order; single images fill the read-ahead window from its end where measured faster so)",
         "one stream, compressed, without a round trip per file: a cold sequential read is faster than the "
         "bulk downloaders (docs/performance.md)", "bool", "mount"),
    _opt("metadata_files", True, "show .collection.json, .series.json and .nbiafs/stats.json beside the images",
         "metadata without another API client; dot-files, so DICOM readers still see only DICOM files",
         "bool", "mount"),
    _opt("walk_ahead", True, "list the folders below a folder that a program walks (find, du, ls -R) ahead of it, "
         "in parallel", "a cold walk is otherwise one round trip after another", "bool", "mount"),
    _opt("allow_other", False, "let other users (and containers' users) read the mount; needs user_allow_other "
         "in /etc/fuse.conf unless run as root", "Docker bind mounts and JupyterHub serve the mount to other uids",
         "bool", "mount"),
    _opt("uid", None, "owner shown for every file and folder (default: the mounting user)",
         "match the uid a container or notebook server runs as", "int", "mount", metavar="UID", minimum=0,
         shown_default="your uid"),
    _opt("gid", None, "group shown for every file and folder (default: the mounting user's group)",
         "match the gid a container or notebook server runs as", "int", "mount", metavar="GID", minimum=0,
         shown_default="your gid"),
    _opt("umask", 0o022, "permission bits taken away from r-xr-xr-x (folders) and r--r--r-- (files)",
         "077 keeps the data to the owner on a shared machine", "octal", "mount", metavar="MASK"),
    _opt("kernel_timeout", 24 * 3600.0, "how long the kernel may cache names and attributes",
         "instances never change, so the kernel need not ask again", "duration", "mount", metavar="SECONDS"),
    _opt("kernel_read_ahead", 1 << 20, "how much the kernel may ask of a file in one read (the mount's "
         "read_ahead_kb; set when run as root; 0: the kernel's own, 128 KiB)",
         "each read is a round trip into nbiafs: a 525 KB CT slice then costs one read request, not four "
         "(warm cp -r after a remount 2.11x -> 1.93x native, docs/performance.md)", "size", "mount",
         metavar="SIZE", minimum=0),
    _opt("kernel_opens", True, "let the kernel open files itself where it can (FUSE no_open, Linux 4.19+): it "
         "keeps their pages between opens, so a re-read never reaches nbiafs; an error then shows at the first "
         "read, not at open", "each open and close is otherwise a request into Python: a re-read of a cached "
         "series took about 2x a local disk's time with them, 1.15x without (docs/performance.md)", "bool",
         "mount"),
    _opt("negative_timeout", 60.0, "how long the kernel may remember that a name does not exist",
         "only names missing from a successful listing are cached as absent; short, as collections grow",
         "duration", "mount", metavar="SECONDS"),
    _opt("ready_timeout", 60.0, "how long mount waits for the background mount process to be ready",
         "covers a slow first answer from the server; a healthy mount is ready in about a second",
         "duration", "mount", metavar="SECONDS", minimum=0.1),
    # -- cache maintenance ------------------------------------------------------------------------
    _opt("force", False, "nbiafs cache clear: empty the cache even while a live mount uses it",
         "a mount fetches again what it loses, so clearing under it is safe, only slow for its readers",
         "bool", "admin"),
    # -- logging ---------------------------------------------------------------------------------
    _opt("log_file", None, "write the log to this file (default: standard error; nothing once in the background)",
         "a background mount has no terminal", "path", "log", metavar="FILE"),
    _opt("log_level", "WARNING", "how much to log", "WARNING says what went wrong without noise", "choice", "log",
         choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    return BY_NAME[name]


def default(name: str) -> Any:
    """The default of option ``name``: the one place other modules take their defaults from."""
    return BY_NAME[name].default


def in_groups(groups: Iterable[str]) -> list[Option]:
    wanted = set(groups)
    return [o for o in OPTIONS if o.groups & wanted]


# ------------------------------------------------------------------------------------------ derived
def add_flags(parser: argparse.ArgumentParser, groups: Iterable[str]) -> None:
    """Add the flags of every option in ``groups``. Every flag defaults to None: "not given"."""
    for opt in in_groups(groups):
        _add_flag(parser, opt)


def add_named_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add the flags of the options ``names`` (a command that takes a few options of a group)."""
    for name in names:
        _add_flag(parser, BY_NAME[name])


def _add_flag(parser: argparse.ArgumentParser, opt: Option) -> None:
    names = [opt.flag] + ([opt.short] if opt.short else [])
    if opt.kind == "bool":
        text = f"do not {opt.help}" if opt.default else opt.help
        parser.add_argument(*names, dest=opt.name, action="store_const", const=not opt.default,
                            default=None, help=text)
    else:
        text = f"{opt.help} (default: {opt.default_text()})"
        upper: dict[str, Any] = {"type": str.upper} if opt.name == "log_level" else {}
        parser.add_argument(*names, dest=opt.name, default=None,
                            metavar=None if opt.choices else (opt.metavar or opt.name.upper()),
                            help=text, choices=opt.choices or None, **upper)


def given_flags(args: argparse.Namespace, groups: Iterable[str]) -> dict[str, Any]:
    """The options given on the command line (raw values), by option name."""
    return {o.name: getattr(args, o.name) for o in in_groups(groups) if getattr(args, o.name, None) is not None}


def to_flags(values: Mapping[str, Any]) -> list[str]:
    """Command-line flags that set ``values`` (option name -> typed value) again, e.g. for a child process."""
    out: list[str] = []
    for name, value in values.items():
        opt = BY_NAME[name]
        if value is None:
            continue
        if opt.kind == "bool":
            if value != opt.default:
                out.append(opt.flag)
            continue
        out += [opt.flag, opt.show(value)]
    return out


MARKDOWN_BEGIN = "<!-- options table: generated from nbiafs/options.py; tests/test_options.py keeps it equal -->"
MARKDOWN_END = "<!-- end of options table -->"


def markdown_table() -> str:
    """The option table of docs/usage.md."""
    lines = [MARKDOWN_BEGIN, "", "| option | default | what it does | why |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        if opt.choices:
            flag = opt.flag + " " + "\\|".join(opt.choices)
        elif opt.kind != "bool" and opt.metavar:
            flag = f"{opt.flag} {opt.metavar}"
        else:
            flag = opt.flag
        if opt.short:
            flag += f", {opt.short}"
        what = opt.help.replace("|", "\\|")
        lines.append(f"| `{flag}` | {opt.default_text()} | {what} | {opt.why} |")
    lines += ["", MARKDOWN_END]
    return "\n".join(lines)
