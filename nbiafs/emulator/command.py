"""``nbiafs emulator``: run the emulator in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """Where the CLI keeps the sample archive when ``--data`` is not given."""
    return Path(platformdirs.user_data_dir("nbiafs", appauthor=False)) / "emulator-archive"


def run_emulator(args: argparse.Namespace) -> int:
    """Build the archive if needed, serve, print ``NBIA emulator serving <URL>``, stop on a signal."""
    from .server import Emulator

    data = Path(args.data) if args.data else default_data_dir()
    emu = Emulator(data, host=args.host, port=args.port, token_ttl=args.token_ttl, refresh_ttl=args.refresh_ttl,
                   refuse_refresh=args.refuse_refresh, latency=args.latency)
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
