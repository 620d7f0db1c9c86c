"""Settings: the typed values of the options in :mod:`nbiafs.options`, and where each value came from.

What it owns: the :class:`Settings` record (one field per option, default from the table), server
names, and :func:`resolve`, which layers the sources: defaults < config file < ``NBIAFS_<NAME>``
environment variables < command-line flags, remembering the source of every value for
``nbiafs config``. The config file is TOML (``~/.config/nbiafs/config.toml`` by platformdirs, or
``$NBIAFS_CONFIG``) with option names as keys (``cache-size = "50G"`` or ``cache_size = "50G"``); an
unknown key is an error, so a typo never silently does nothing. Nothing here reads the password.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from .errors import ConfigError
from .options import BY_NAME, OPTIONS, default, format_size, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SERVERS", "GUEST_USER", "CLIENT_ID", "Settings", "Resolved", "resolve", "resolve_server",
           "parse_size", "format_size", "default_cache_dir", "default_config_path"]

#: Named servers. ``public`` is the host tcia_utils 3.x calls (anonymous v4); the token endpoint and v2
#: also answer there. NLST lives on its own server (the main one answers 400 for NLST series).
SERVERS: dict[str, str] = {
    "public": "https://nbia.cancerimagingarchive.net",
    "nlst": "https://nlst.cancerimagingarchive.net",
}

GUEST_USER = "nbia_guest"
CLIENT_ID = "NBIA"
CONFIG_ENV = "NBIAFS_CONFIG"


def resolve_server(server: str) -> str:
    """Turn ``public``, ``nlst`` or a base URL (the part before ``/nbia-api``) into a base URL."""
    if server in SERVERS:
        return SERVERS[server]
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"unknown server {server!r}: use public, nlst or a URL like http://host:8080")
    base = server.rstrip("/")
    if base.endswith("/nbia-api"):
        base = base[: -len("/nbia-api")]
    return base


def default_cache_dir() -> Path:
    """The per-user cache directory (``~/.cache/nbiafs`` on Linux)."""
    return Path(platformdirs.user_cache_dir("nbiafs", appauthor=False))


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    return Path(platformdirs.user_config_dir("nbiafs", appauthor=False)) / "config.toml"


def _d(name: str) -> Any:
    return field(default=default(name))


@dataclass(slots=True)
class Settings:
    """All settings of one mount or command. One field per option of :data:`nbiafs.options.OPTIONS`."""

    server: str = _d("server")
    user: str | None = _d("user")
    api: str = _d("api")
    drilldown: bool = _d("drilldown")
    datacite_url: str = _d("datacite_url")
    workers: int = _d("workers")
    connections: int = _d("connections")
    connect_timeout: float = _d("connect_timeout")
    read_timeout: float = _d("read_timeout")
    retries: int = _d("retries")
    backoff: float = _d("backoff")
    deadline: float = _d("deadline")
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = _d("cache_size")
    metadata_ttl: float = _d("metadata_ttl")
    offline: bool = _d("offline")
    manifest: Path | None = _d("manifest")
    dry_run: bool = _d("dry_run")
    verify_md5: bool = _d("verify_md5")
    layout: str = _d("layout")
    foreground: bool = _d("foreground")
    prefetch: bool = _d("prefetch")
    series_zip: bool = _d("series_zip")
    metadata_files: bool = _d("metadata_files")
    walk_ahead: bool = _d("walk_ahead")
    allow_other: bool = _d("allow_other")
    uid: int | None = _d("uid")
    gid: int | None = _d("gid")
    umask: int = _d("umask")
    kernel_timeout: float = _d("kernel_timeout")
    kernel_read_ahead: int = _d("kernel_read_ahead")
    kernel_opens: bool = _d("kernel_opens")
    negative_timeout: float = _d("negative_timeout")
    ready_timeout: float = _d("ready_timeout")
    force: bool = _d("force")
    log_file: Path | None = _d("log_file")
    log_level: str = _d("log_level")

    @property
    def base_url(self) -> str:
        return resolve_server(self.server)

    @property
    def account(self) -> str:
        """The account name: the named user, or the guest for anonymous use."""
        return self.user or GUEST_USER

    @property
    def namespace(self) -> str:
        """Cache keys' namespace: server and account (anonymous v4 and the guest see the same data)."""
        return f"{self.base_url}|{self.account}"

    @property
    def timeouts(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        for opt in OPTIONS:  # every value within what its option allows (choices, bounds, types)
            value = getattr(self, opt.name)
            if value is not None and opt.kind != "path":
                opt.parse(value)
        resolve_server(self.server)
        if self.user == "":
            raise ConfigError("--user needs an account name")


@dataclass(frozen=True, slots=True)
class Resolved:
    """Settings and, for each option name, where its value came from."""

    settings: Settings
    sources: dict[str, str]
    config_path: Path | None


def load_config_file(path: Path) -> dict[str, Any]:
    """The options set in the TOML file at ``path`` (typed), ``{}`` when there is no such file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        opt = BY_NAME.get(name)
        if opt is None:
            raise ConfigError(f"config file {path}: unknown option {key!r} (see nbiafs config --help)")
        try:
            values[name] = opt.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    return values


def resolve(flags: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
            config_path: Path | None = None, use_config: bool = True,
            only: Iterable[str] | None = None) -> Resolved:
    """Settings from defaults < config file < environment < ``flags`` (option name -> raw value).

    ``only`` restricts the environment and config file to those option names (a command's groups).
    """
    env = os.environ if environ is None else environ
    allowed = set(only) if only is not None else set(BY_NAME)
    settings = Settings()
    sources = {opt.name: "default" for opt in OPTIONS}
    path = config_path if config_path is not None else default_config_path(env)
    if use_config:
        for name, value in load_config_file(path).items():
            if name in allowed:
                setattr(settings, name, value)
                sources[name] = f"config file {path}"
    for opt in OPTIONS:
        if opt.name in allowed and env.get(opt.env):
            setattr(settings, opt.name, _parse(opt, env[opt.env], f"environment variable {opt.env}"))
            sources[opt.name] = f"environment {opt.env}"
    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        opt = BY_NAME[name]
        setattr(settings, name, _parse(opt, raw, opt.flag))
        sources[name] = "command line"
    if settings.cache_dir is not None:
        settings.cache_dir = Path(settings.cache_dir).expanduser().resolve()
    if settings.log_file is not None:
        settings.log_file = Path(settings.log_file).expanduser().resolve()
    if settings.manifest is not None:
        settings.manifest = Path(settings.manifest).expanduser().resolve()
    settings.validate()
    return Resolved(settings, sources, path if use_config else None)


def _parse(opt: Any, raw: Any, where: str) -> Any:
    try:
        return opt.parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
