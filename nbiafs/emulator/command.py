"""``nbiafs emulator``: its flags (:func:`add_arguments`) and the command (:func:`run_emulator`).

The flags live here, beside the emulator they configure, so a new emulator feature brings its
flag along; ``nbiafs.cli`` only calls :func:`add_arguments` on its subparser.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import platformdirs

from ..errors import ConfigError

log = logging.getLogger(__name__)


def default_data_dir(profile: str | None = None) -> Path:
    """Where the CLI keeps an archive when ``--data`` is not given: one folder per profile."""
    base = Path(platformdirs.user_data_dir("nbiafs", appauthor=False))
    if profile is None:
        return base / "emulator-archive"
    from .profiles import parse_profile

    canonical = parse_profile(profile).canonical
    if canonical == "sample":
        return base / "emulator-archive"
    slug = "".join(ch if ch.isalnum() else "-" for ch in canonical).strip("-")
    return base / f"emulator-archive-{slug}"


def _rate(text: str) -> float | None:
    from .shaping import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: bytes/s, e.g. 500k, 12.5M, 1Gi, 0 = unlimited") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nbiafs emulator`` flags."""
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--data", default=None, help="archive directory (built on first start)")
    parser.add_argument("--profile", default=None,
                        help="archive to build: sample (default), ct200, headers, multiframe, wide, or a spec "
                             "like synthetic:patients=10,series=5,instances=60,rows=64 (see docs/usage.md)")
    parser.add_argument("--token-ttl", type=float, default=7200.0, help="access token lifetime in seconds")
    parser.add_argument("--refresh-ttl", type=float, default=None,
                        help="refresh token lifetime in seconds (default: same as --token-ttl)")
    parser.add_argument("--refuse-refresh", action="store_true",
                        help="refuse every refresh grant, as the real identity provider sometimes does")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="extra seconds added to every request (to imitate a distant server)")
    parser.add_argument("--conn-rate", type=_rate, default=None, metavar="BYTES/S",
                        help="bandwidth cap of each connection (e.g. 2M = 2,000,000 bytes/s; default unlimited)")
    parser.add_argument("--link-rate", type=_rate, default=None, metavar="BYTES/S",
                        help="bandwidth cap shared by all connections (default unlimited)")
    parser.add_argument("--no-oauth", action="store_true",
                        help="a server without logins: no token endpoint, no v2 and no advanced API (v4 only)")
    parser.add_argument("--no-v4", action="store_true", help="an old server: no v1/v4 API (v2 + token only)")
    parser.add_argument("--no-datacite", action="store_true", help="do not serve the DataCite /dois/ endpoint")
    parser.add_argument("--log-level", default="INFO", type=str.upper)


def run_emulator(args: argparse.Namespace) -> int:
    """Build the archive if needed, serve, print ``NBIA emulator serving <URL>``, stop on a signal."""
    from .server import Emulator

    profile = getattr(args, "profile", None)
    try:
        data = Path(args.data) if args.data else default_data_dir(profile)
        emu = Emulator(data, host=args.host, port=args.port, token_ttl=args.token_ttl,
                       refresh_ttl=args.refresh_ttl, refuse_refresh=args.refuse_refresh, latency=args.latency,
                       profile=profile, oauth=not getattr(args, "no_oauth", False),
                       v4=not getattr(args, "no_v4", False), datacite=not getattr(args, "no_datacite", False),
                       per_connection=getattr(args, "conn_rate", None), link=getattr(args, "link_rate", None))
    except ValueError as exc:
        raise ConfigError(f"emulator: {exc}") from exc
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            emu.start()
        except OSError as exc:
            print(f"nbiafs emulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        print(f"NBIA emulator serving {emu.url}", flush=True)
        while not done.wait(1.0):
            pass
    finally:
        emu.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
