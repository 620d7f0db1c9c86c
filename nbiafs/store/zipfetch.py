"""A series read through its zip: one ``getImage`` stream feeding the cache in reading order.

Why. A reader walking a series from its start wants every file, in order. One ``getImage`` answer
carries them all on one connection, compressed (CT compresses about 2:1: on a link that is the
bottleneck, half the bytes), with no round trip per file. Singles on the other connections fetch the
read-ahead window from its far end backwards at the same time (unless the zip was measured faster
alone, :mod:`.zipmode`), and the two meet in the middle: a member already claimed goes by unwritten,
and the zip stops once every file after it is claimed. Near that meeting point a single started for a
file the zip brings sooner, at its pace, would make the reader wait a round trip for what the zip had
ready: the store asks :meth:`ZipFetch.brings_within` and leaves such files to the zip. An opener of a
file the zip is about to bring waits for it (:meth:`ZipFetch.about_to`) rather than fetching it a
second time. The
store starts a zip only for a reader that walks a series from near its start (resending what is
cached would waste the link), never for random access or a header scan (see :mod:`.readahead`).

What it owns: the stream (members are mapped to instances by the SOPInstanceUID in each member's
header, read from its first bytes; a member without one is placed by the zip's InstanceNumber order
only where that order is certain, else skipped: never guessed from the listing's order, which
``--layout uid`` makes another; a member whose instance is cached or being fetched already is
skipped), handing each member to the store as the body of a fetch like any other (readers join it and
wait only for their bytes; a member that breaks off is fetched again alone), back-pressure (the zip
waits at the end of the read-ahead window: the store raises its limit as the window grows), the
``md5hashes.csv`` at the end (each file written from the zip gets the server's md5; a file whose bytes
do not match is dropped), and stopping (the reader went away, the store closed, nothing left to take).
Every member is CRC-checked by the unzip; its length is checked against the metadata's when known.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pydicom

from .. import dicomhead
from ..errors import NbiaError

log = logging.getLogger(__name__)

#: Bytes of a member read before its header must have shown the SOPInstanceUID.
HEADER_BYTES = 64 * 1024
#: An open waits for the zip to bring its file when the file comes within this many members.
SOON = 3
#: A zip that cannot go on (the reader stopped) gives up after this long.
IDLE_AFTER = 30.0
#: The zip's pace is taken from its last PACE_MEMBERS members, when they came in reading order ...
PACE_MEMBERS = 6
#: ... and holds while the next member is no later than this many paces (plus PACE_SLACK seconds).
PACE_LATE = 2.0
PACE_SLACK = 0.05


class _MemberStream:
    """A zip member as a Download's stream: ``length`` and ``chunks()`` (the header bytes first)."""

    def __init__(self, head: bytes, rest: Iterator[bytes], length: int | None) -> None:
        self._head = head
        self._rest = rest
        self.length = length

    def chunks(self) -> Iterator[bytes]:
        if self._head:
            yield self._head
        yield from self._rest

    def close(self) -> None:
        """Read what is left of this member (the zip goes on after it); a broken zip shows at the next one."""
        try:
            for _ in self._rest:
                pass
        except (NbiaError, OSError):
            pass


def _sop_uid_of(head: bytes) -> str | None:
    uid = dicomhead.sop_instance_uid(head)  # 15-30 us; pydicom only for what it cannot walk
    if uid is not None:
        return uid
    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, specific_tags=["SOPInstanceUID"],
                             force=True)
        value = ds.get("SOPInstanceUID")
        return str(value) if value else None
    except Exception:  # noqa: BLE001 - a header cut in the middle: read more, or fall back on the order
        return None


class ZipFetch:
    """One series' zip being read into the cache (see the module docstring)."""

    def __init__(self, *, series_uid: str, files: Sequence[Any], open_zip: Callable[[], Any],
                 skip: Callable[[Any], bool], deliver: Callable[[Any, _MemberStream], bool | None],
                 record_md5: Callable[[Any, str], None], clock: Callable[[], float] = time.monotonic) -> None:
        """``files``: the series' instances in the zip's order (InstanceNumber); ``skip(node)``: whether
        ``node`` is cached or being fetched already; ``deliver(node, stream)`` fetches ``node`` from the
        member ``stream`` through the store (None when it was claimed meanwhile, else whether it
        succeeded); ``record_md5(node, md5)`` gives the server's md5 of a delivered file."""
        self.series_uid = series_uid
        self._files = list(files)
        self._by_uid = {str(f.sop_uid): f for f in files}
        self._position_of = {str(f.sop_uid): i for i, f in enumerate(self._files)}
        self._zip_order = _zip_order(self._files)
        self._open_zip = open_zip
        self._skip = skip
        self._deliver = deliver
        self._record_md5 = record_md5
        self._cond = threading.Condition()
        self._limit = 0  # the zip may deliver members up to this position (exclusive)
        self._position = 0  # the next member's position
        self._last_seen = -1  # the reading-order position of the last member the zip brought or passed
        self._stopped = False
        self._waiting = False  # at the end of the window, waiting for the reader
        self._distrusted = False  # an opener waited for it in vain: openers fetch their files alone
        # (when, reading-order position) of the last members: the zip's pace (brings_within)
        self._paces: collections.deque[tuple[float, int]] = collections.deque(maxlen=PACE_MEMBERS)
        self._clock = clock
        self._written: dict[str, Any] = {}  # member name -> node, for the md5 list at the end
        self.delivered = 0
        self.skipped = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ the store's side
    def allow(self, limit: int) -> None:
        """Let the zip deliver files up to position ``limit``."""
        with self._cond:
            if limit > self._limit:
                self._limit = limit
                self._cond.notify_all()

    def position_of(self, sop_uid: str) -> int | None:
        """Where the instance ``sop_uid`` comes in the zip (None: not in it)."""
        return self._position_of.get(sop_uid)

    def about_to(self, position: int) -> bool:
        """Whether the zip is about to bring the file at reading-order ``position``: it comes within
        :data:`SOON` after the last member the zip brought or passed (the zip's order is InstanceNumber,
        which is the reading order of the descriptive layout; where it is not, as with ``--layout uid``,
        the last member jumps about and openers rarely wait, each at most until the next member)."""
        with self._cond:
            return self._going() and self._last_seen <= position <= self._last_seen + SOON

    def _going(self) -> bool:
        """Whether the zip still runs and is trusted (lock held): what about_to and brings_within need."""
        return not (self._stopped or self._distrusted or self.done.is_set())

    def brings_within(self, position: int, seconds: float, now: float) -> bool:
        """Whether the zip, at the pace of its last members, brings reading-order ``position`` within
        ``seconds`` from ``now``. False whenever that is not known: too few members yet, members that
        did not come in reading order (``--layout uid``), a zip late for its next member, one that
        waits at the end of its window, stopped, ended or is distrusted, or a position it may not
        bring yet."""
        with self._cond:
            if not self._going() or self._waiting or position >= self._limit or len(self._paces) < PACE_MEMBERS:
                return False
            paces = list(self._paces)
        if any(b[1] != a[1] + 1 for a, b in zip(paces, paces[1:])):
            return False
        (first_at, _), (last_at, last) = paces[0], paces[-1]
        pace = (last_at - first_at) / (len(paces) - 1)
        if position <= last or now - last_at > PACE_LATE * pace + PACE_SLACK:
            return False
        return (position - last) * pace - (now - last_at) <= seconds

    def distrust(self) -> None:
        """An opener waited for this zip in vain (it stalls): nobody waits for it again."""
        with self._cond:
            self._distrusted = True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the zip ended or waits at the end of its window; False when ``timeout`` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done.is_set() or self._waiting, timeout)

    # ------------------------------------------------------------------ the zip's thread
    def run(self) -> None:
        try:
            self._read()
        except BaseException as exc:
            self.error = exc
            if isinstance(exc, (NbiaError, OSError)):
                log.info("zip of series %s ended early: %s", self.series_uid, exc)
            else:
                log.warning("zip of series %s failed", self.series_uid, exc_info=True)
        finally:
            with self._cond:
                self.done.set()
                self._cond.notify_all()

    def _read(self) -> None:
        members = self._open_zip()
        try:
            for member, chunks in members:
                name = member.name.rsplit("/", 1)[-1]
                if name == "md5hashes.csv":
                    self._check_md5s(b"".join(chunks))
                    continue
                if not name.lower().endswith(".dcm"):
                    continue  # LICENSE
                if self._all_claimed(self._position):
                    log.debug("zip of series %s: the rest is claimed, stopping", self.series_uid)
                    return
                if not self._wait_for_room():
                    return
                position = self._position
                with self._cond:
                    self._position += 1
                head, rest = _head(iter(chunks))
                uid = _sop_uid_of(head)
                if uid:
                    node = self._by_uid.get(uid)
                else:  # no header to read: the zip's order (InstanceNumber) tells, when it is certain
                    order = self._zip_order
                    node = order[position] if order is not None and position < len(order) else None
                if node is None:
                    log.info("zip of series %s holds %s, %s: skipped", self.series_uid, uid or name,
                             "not listed" if uid else "without a SOPInstanceUID to read")
                    continue
                with self._cond:
                    self._last_seen = self._position_of.get(str(node.sop_uid), position)
                    self._paces.append((self._clock(), self._last_seen))
                if self._skip(node):  # cached, or fetched already: its bytes go by
                    self.skipped += 1
                    continue
                size = member.size if member.size is not None and member.size >= 0 else None
                stream = _MemberStream(head, rest, size)
                try:
                    delivered = self._deliver(node, stream)
                finally:
                    stream.close()
                if delivered is None:
                    self.skipped += 1
                elif delivered:
                    self.delivered += 1
                    self._written[name] = node
        finally:
            close = getattr(members, "close", None)
            if close is not None:
                close()

    def _wait_for_room(self) -> bool:
        """Wait while the zip is ``limit`` files ahead (or stop); False when it should end."""
        with self._cond:
            if not self._stopped and self._position >= self._limit:
                self._waiting = True
                self._cond.notify_all()
                try:
                    self._cond.wait_for(lambda: self._stopped or self._position < self._limit, IDLE_AFTER)
                finally:
                    self._waiting = False
            return not self._stopped and self._position < self._limit

    def _all_claimed(self, start: int) -> bool:
        """Whether every file from position ``start`` on is cached or being fetched (the first one that
        is not ends the scan: it is usually the next)."""
        return all(self._skip(f) for f in itertools.islice(self._files, start, None))

    def _check_md5s(self, data: bytes) -> None:
        try:
            rows = list(csv.reader(io.StringIO(data.decode("utf-8", "replace"))))
        except csv.Error:
            return
        for row in rows[1:]:
            if len(row) >= 2 and row[0].rsplit("/", 1)[-1] in self._written:
                self._record_md5(self._written[row[0].rsplit("/", 1)[-1]], row[1].strip().lower())


def _zip_order(files: Sequence[Any]) -> list[Any] | None:
    """The series' files in the zip's order (the server sorts by InstanceNumber), or None when that order
    is not certain (a number missing or twice): a member is then never placed by its position."""
    numbers = [getattr(f, "instance_number", None) for f in files]
    if not all(isinstance(n, int) for n in numbers) or len(set(numbers)) != len(numbers):
        return None
    return sorted(files, key=lambda f: f.instance_number)


def _head(chunks: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """The first bytes of a member (up to HEADER_BYTES, enough for its header) and the rest."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size >= HEADER_BYTES:
            break
    return b"".join(parts), chunks
