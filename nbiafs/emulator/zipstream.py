"""Zip archives generated incrementally, for the streamed ``getImage`` answers.

Written as Java's ``ZipOutputStream`` (what the real server uses) writes them: deflated entries whose
local headers carry no sizes, each followed by a data descriptor, then the central directory. A
member's content comes as an iterable of chunks (a file read 64 KiB at a time), and compressed
output is yielded as it is produced, so a 200 MB instance never sits in memory whole. The CRC is
computed over the bytes actually given, so a member corrupted on its way in is a well-formed entry
whose CRC matches the corrupted bytes (as a server with a bad file on disk sends it).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator

#: A zip member: its name and a function returning its content's chunks (called when it is written).
#: What yields one member's bytes, and a member: its name and that.
Reader = Callable[[], Iterable[bytes]]
Member = tuple[str, Reader]

_DATE_TIME = (2020, 1, 1, 0, 0, 0)  # fixed, so the same series always gives the same zip


class _Sink:
    """A write-only, unseekable file object that collects what zipfile writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def iter_zip(members: Iterable[Member], compresslevel: int = 1) -> Iterator[bytes]:
    """Yield the bytes of a zip holding ``members``, one piece per member plus the directory."""
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[call-overload]
                         compresslevel=compresslevel) as zf:
        for name, read in members:
            info = zipfile.ZipInfo(name, date_time=_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            # ZipFile(compresslevel=) is not applied to open(ZipInfo, "w"): without this every member
            # was deflated at zlib's default level 6, about 7x slower than level 1 on CT pixels
            if hasattr(info, "compress_level"):  # Python 3.13+
                info.compress_level = compresslevel
            else:
                info._compresslevel = compresslevel  # type: ignore[attr-defined]
            info.external_attr = 0o644 << 16
            with zf.open(info, mode="w") as dest:
                for chunk in read():
                    dest.write(chunk)
                    piece = sink.take()
                    if piece:
                        yield piece
            piece = sink.take()
            if piece:
                yield piece
    tail = sink.take()
    if tail:
        yield tail
