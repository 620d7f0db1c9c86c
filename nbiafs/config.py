"""Settings in one place: server names, defaults (and why), size parsing, default paths.

Everything configurable lives in :class:`Settings`; the CLI fills it from flags and the environment,
tests build it directly. Nothing here reads the password: see :mod:`nbiafs.auth`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from .errors import ConfigError

#: Named servers. NLST lives on its own server (the main one answers 400 for NLST series).
SERVERS: dict[str, str] = {
    "public": "https://services.cancerimagingarchive.net",
    "nlst": "https://nlst.cancerimagingarchive.net",
}

GUEST_USER = "nbia_guest"
CLIENT_ID = "NBIA"

#: Default instance-cache bound: 10 GiB holds a few hundred typical CT series and fits most laptops.
DEFAULT_CACHE_SIZE = 10 * 1024**3


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


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_size(text: str | int) -> int:
    """Parse ``500M``, ``20G``, ``1.5T``, ``123456`` (bytes) into bytes (binary units)."""
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError("a size must be positive")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise ConfigError(f"bad size {text!r}: must be at least one byte")
    return int(value)


def default_cache_dir() -> Path:
    """The per-user cache directory (``~/.cache/nbiafs`` on Linux)."""
    return Path(platformdirs.user_cache_dir("nbiafs", appauthor=False))


@dataclass
class Settings:
    """All settings of one mount (or one client session)."""

    server: str = "public"
    user: str = GUEST_USER
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = DEFAULT_CACHE_SIZE
    layout: str = "descriptive"  # or "uid"
    offline: bool = False
    foreground: bool = False
    log_file: Path | None = None
    log_level: str = "WARNING"
    #: Seconds for one HTTP request (connect, read). Instances are <1 MB; a minute is generous.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: Bounded retries with exponential backoff for 429/5xx/resets, all within ``deadline``.
    retries: int = 4
    backoff: float = 0.5
    deadline: float = 120.0
    #: Parallel fetches of instance bytes; also the HTTP connection pool size.
    workers: int = 8
    #: Metadata in memory lives this long (seconds); TCIA data is immutable once published.
    metadata_ttl: float = 24 * 3600.0
    #: Kernel entry/attribute cache timeout (seconds): files never change.
    kernel_timeout: float = 24 * 3600.0
    #: Use the advanced drill-down endpoints for exact sizes and instance numbers.
    use_drilldown: bool = True

    @property
    def base_url(self) -> str:
        return resolve_server(self.server)

    def validate(self) -> None:
        if self.layout not in ("descriptive", "uid"):
            raise ConfigError(f"unknown layout {self.layout!r}: use descriptive or uid")
        resolve_server(self.server)
        if self.cache_size <= 0:
            raise ConfigError("cache size must be positive")
