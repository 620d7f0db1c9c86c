"""What a long command (prefetch, download, cache verify) shows while it works and when it ends.

What it owns: the one progress display of the bulk commands, and the byte and rate figures they print.
On a terminal (the progress stream is a TTY) a tqdm bar on standard error counts bytes (with the
rate and the time left) and files; failures are written above it as they happen. Anywhere else (a
headless job, a pipe, a log file) nothing is drawn: a failure is one line on standard error when it
happens, and the command prints exactly one summary line on standard output at the end. So a cron job's
log holds one line per failure and one line of result, and a person at a terminal sees the bar.

Why it is shaped so: the store calls back from its worker threads, so :class:`Progress` takes a lock
around its counters and the bar; the commands decide what the summary says (they know what "done"
means for them) and hand the finished line to :meth:`Progress.close`. Nothing here knows about NBIA.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Progress", "Tally", "human_bytes", "human_rate", "human_seconds"]


def human_bytes(count: float) -> str:
    """``4.0 MiB``, ``512 B``: binary units, as the cache size options take them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def human_rate(count: float, seconds: float) -> str:
    return f"{human_bytes(count / seconds)}/s" if seconds > 0 else "-"


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass(slots=True)
class Tally:
    """Counters of one run: files and bytes done (each in one of three ways) and failures."""

    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0  # were there already (a prefetch: in the cache; a download: in DEST or the cache)
    cached_bytes: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.fetched + self.cached


class Progress:
    """Progress of ``files`` files of ``nbytes`` bytes in all (see the module docstring). Thread-safe.

    ``tty``: draw a bar (default: whether ``stream`` is a terminal). ``stream`` gets the bar and the
    failure lines (standard error), ``out`` the summary (standard output).
    """

    def __init__(self, what: str, files: int, nbytes: int, *, stream: TextIO | None = None,
                 out: TextIO | None = None, tty: bool | None = None, unit: str = "files") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.files = files
        self.unit = unit
        self.tally = Tally()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            # A terminal that reports no size (a bare pty, `script`) gets a fixed one: tqdm draws nothing there.
            size: dict[str, Any] = {"dynamic_ncols": True} if _sized(self.stream) else {
                "ncols": DEFAULT_COLUMNS, "nrows": DEFAULT_ROWS}
            self._bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                             file=self.stream, leave=False, smoothing=0.1, postfix=self._files_text(), **size)

    def _files_text(self) -> str:
        return f"{self.tally.done + self.tally.failed}/{self.files} {self.unit}"

    def add(self, size: int, *, fetched: bool) -> None:
        """One file is done: ``fetched`` (it cost a transfer) or it was there already."""
        with self._lock:
            if fetched:
                self.tally.fetched += 1
                self.tally.fetched_bytes += size
            else:
                self.tally.cached += 1
                self.tally.cached_bytes += size
            self._advance(size)

    def fail(self, label: str, error: str, size: int = 0) -> None:
        """One file failed: a line now (above the bar on a terminal)."""
        line = f"nbiafs: failed: {label}: {error}"
        with self._lock:
            self.tally.failed += 1
            if self._bar is not None:
                self._advance(size)
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def note(self, line: str) -> None:
        """A line for the user while the work goes on (above the bar on a terminal)."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def _advance(self, size: int) -> None:
        if self._bar is not None:
            self._bar.update(size)
            self._bar.set_postfix_str(self._files_text(), refresh=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def close(self, summary: str | None = None) -> None:
        """Take the bar away and print the one summary line (if any)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if summary:
            print(summary, file=self.out, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The size of a terminal that does not say how big it is.
DEFAULT_COLUMNS = 100
DEFAULT_ROWS = 24


def _sized(stream: TextIO) -> bool:
    """Whether the terminal behind ``stream`` knows its size."""
    import os

    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False
    return size.columns > 0 and size.lines > 0


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
