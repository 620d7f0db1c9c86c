"""Streamed zips: members fed in chunks come out progressively, deflated at the level asked for, readable
by zipfile and by a streaming reader."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib

from stream_unzip import stream_unzip

from nbiafs.emulator.zipstream import iter_zip


def _content(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(0, 16) for _ in range(n))  # compressible, not trivially


def _raw_member(data: bytes, info: zipfile.ZipInfo) -> bytes:
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return data[start:start + info.compress_size]


def test_members_given_in_chunks_stream_out_in_pieces_and_read_back() -> None:
    big = _content(300_000, 1)
    chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    pieces = list(iter_zip([("a.bin", lambda: iter(chunks)), ("b.txt", lambda: (b"hello",))]))
    assert len(pieces) > 2  # not one blob per member
    data = b"".join(pieces)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None and zf.read("a.bin") == big and zf.read("b.txt") == b"hello"
    streamed = {name.decode(): b"".join(body) for name, _, body in stream_unzip([data])}
    assert streamed == {"a.bin": big, "b.txt": b"hello"}


def test_members_are_deflated_at_the_level_asked_for() -> None:
    payload = _content(200_000, 2)
    for level in (1, 9):
        data = b"".join(iter_zip([("x", lambda: (payload,))], compresslevel=level))
        info = zipfile.ZipFile(io.BytesIO(data)).getinfo("x")
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        assert _raw_member(data, info) == compressor.compress(payload) + compressor.flush()
