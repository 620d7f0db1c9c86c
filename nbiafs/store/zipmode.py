"""Whether singles should run beside a series zip, decided by measuring both, once per zip.

Why. The zip brings a series compressed (CT about 2:1) on one connection; single images bring files
uncompressed, in parallel on the other connections. Which is faster depends on a network the mount
cannot see. Where each connection is bound on its own (a server's or a proxy's per-connection limit,
a far server's round trips, a server whose one zip stream is CPU-bound), singles beside the zip add
their connections' throughput. Where every connection shares one bottleneck (the user's own link, a
VPN), singles take their share of that link from the zip and bring fewer files per byte: the zip
alone is then up to twice as fast. Guessing wrong either way costs about half the speed.

How. A :class:`Trial` in two phases at the start of each zip, on the bytes of the series' files
arriving (what the reader gets, whichever way they come):

* ALONE: the singles of the series are held back from the zip's start; measured from the zip's first
  byte for ``span`` seconds;
* MIXED: the singles are let go; measured for ``mixed_span`` seconds once they all run (``settle_sources``
  of them brought bytes, or ``span`` after the first one did): a far server's round trip before them
  is not held against them, and the moment the zip still had the link to itself is not counted for
  them (measured from their first byte, a shared link looked as fast with singles as without).

The faster wins for the rest of that zip; a tie (within ``margin``) goes to MIXED, which does not
rest on one connection. A clear loss ends MIXED early: once it has run ``early_span`` (and seen
``min_bytes``), zip and singles bringing less than ``early_ratio`` of what the zip alone brought
means one shared bottleneck (on a 200 Mbps link they bring about half), and every further moment of
uncompressed singles on it costs the reader; a gain or a near tie is always looked at for the
whole span, as singles come and go between their round trips. A phase ends only once it saw
``min_bytes`` (a slow link gets a longer look), or after ten times its span whatever it saw. Opens
of the reader are never held: only read-ahead is. The store keeps a verdict for the zips that start
within five minutes after it (the network seldom changes between two series of one reading): they
start decided, without the trial's cost. Pure (no threads, no clock of its own): fed with (time,
bytes, how they came), tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Seconds the zip alone is measured (the singles wait meanwhile: where they help, this costs) ...
SPAN = 0.15
#: ... and zip and singles together (longer: singles come and go between their round trips, so a
#: short look is noisy; where the zip alone is faster, this is what it costs).
MIXED_SPAN = 0.3
#: MIXED ends early, for the zip alone, once it ran this long and brought less than EARLY_RATIO of
#: the zip alone's rate: a clear loss needs no longer look.
EARLY_SPAN = 0.1
EARLY_RATIO = 0.75
#: Bytes each phase must see before it ends (unless it ran 10 x SPAN).
MIN_BYTES = 1 << 20
#: The zip alone must be this much faster than zip and singles together to be kept alone.
MARGIN = 0.05
#: MIXED is timed once this many singles brought bytes (the store passes its workers less one: the
#: zip takes one of the connections).
SETTLE_SOURCES = 7

ALONE = "alone"
MIXED = "mixed"
ZIP_ONLY = "zip only"
BOTH = "zip and singles"


@dataclass(slots=True)
class Trial:
    """The measurement of one zip's two ways (see the module docstring). Not thread-safe: one lock
    of the caller's around :meth:`add`."""

    span: float = SPAN
    mixed_span: float = MIXED_SPAN
    min_bytes: int = MIN_BYTES
    margin: float = MARGIN
    early_span: float = EARLY_SPAN
    early_ratio: float = EARLY_RATIO
    settle_sources: int = SETTLE_SOURCES
    phase: str = ALONE
    #: when the current phase's measurement began (None: waiting for its first byte)
    since: float | None = None
    counted: int = 0
    alone_rate: float = 0.0
    mixed_rate: float = 0.0
    #: the singles seen since MIXED began, and when the first of them brought a byte
    _sources: set[object] = field(default_factory=set)
    _first_single: float | None = None

    @property
    def singles_allowed(self) -> bool:
        """Whether the series' singles may run now."""
        return self.phase in (MIXED, BOTH)

    @property
    def decided(self) -> bool:
        return self.phase in (ZIP_ONLY, BOTH)

    def abandon(self) -> None:
        """Stop measuring and run zip and singles (the zip stalled, or the measurement broke)."""
        self.phase = BOTH

    def add(self, now: float, nbytes: int, *, via_zip: bool, source: object = None) -> bool:
        """Bytes of a file of the series arrived at ``now`` (``via_zip``: from the zip; ``source``: which
        fetch). Returns True when this moved the trial on (the caller then applies
        :attr:`singles_allowed`)."""
        if self.decided:
            return False
        if self.since is None:
            if self.phase == ALONE:  # timed from the zip's first byte
                if via_zip:
                    self.since = now
            elif not via_zip:  # timed once the singles all run
                self._sources.add(source)
                if self._first_single is None:
                    self._first_single = now
                if len(self._sources) >= self.settle_sources or now - self._first_single >= self.span:
                    self.since = now
            return False
        self.counted += nbytes
        elapsed = now - self.since
        span = self.span if self.phase == ALONE else self.mixed_span
        rate = self.counted / elapsed if elapsed > 0 else 0.0
        clear_loss = (self.phase == MIXED and elapsed >= self.early_span and self.counted >= self.min_bytes
                      and rate < self.alone_rate * self.early_ratio)
        if not clear_loss and (elapsed < span or (self.counted < self.min_bytes and elapsed < 10 * span)):
            return False
        self.since, self.counted = None, 0
        if self.phase == ALONE:
            self.alone_rate = rate
            self.phase = MIXED
        else:
            self.mixed_rate = rate
            zip_faster = clear_loss or self.alone_rate > self.mixed_rate * (1.0 + self.margin)
            self.phase = ZIP_ONLY if zip_faster else BOTH
        return True

    def describe(self) -> str:
        return (f"zip alone {self.alone_rate / 1e6:.1f} MB/s, zip and singles {self.mixed_rate / 1e6:.1f} MB/s: "
                f"{self.phase}")
