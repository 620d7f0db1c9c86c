"""Listings that carry their entries' attributes (nbiafs.readdirplus): the callback without a kernel,
then through a real mount, where a stat of a listed file must not reach the file system at all."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import first_series

from nbiafs import control, daemon, readdirplus
from nbiafs import fs as fsmod

mfusepy = fsmod.fuse
PlusFUSE = readdirplus.fuse_class(mfusepy)

ENTRIES = [
    (".", {"st_mode": stat.S_IFDIR | 0o555, "st_ino": 5}, False),
    ("..", {"st_mode": stat.S_IFDIR | 0o555}, False),
    (".series.json", {"st_mode": stat.S_IFREG | 0o444, "st_ino": 9}, False),
    *((f"1-00{i}.dcm", {"st_mode": stat.S_IFREG | 0o444, "st_ino": 10 + i, "st_size": 1000 + i, "st_nlink": 1,
                        "st_mtime": 1_100_000_000_250_000_000}, True) for i in range(1, 6)),
]


class Source:
    use_ns = True

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, bool]] = []

    def readdir_entries(self, path: str, offset: int, plus: bool) -> Any:
        self.asked.append((path, offset, plus))
        return iter(ENTRIES[offset:])


def callback(source: Source) -> Any:
    """A PlusFUSE that never mounted: only what its readdir callback uses."""
    plus_fuse = object.__new__(PlusFUSE)
    plus_fuse.operations, plus_fuse.encoding, plus_fuse.errors, plus_fuse.use_ns = source, "utf-8", "strict", True
    return plus_fuse


def chunk(plus_fuse: Any, offset: int, flags: int, room: int) -> list[dict[str, Any]]:
    """One request: what the filler got, until ``room`` entries filled the kernel's buffer."""
    got: list[dict[str, Any]] = []

    def filler(buf: Any, name: bytes, st: Any, off: int, fill: int) -> int:
        if len(got) == room:
            return 1  # full: this entry goes into the next request
        got.append({"name": name.decode(), "off": off, "fill": fill, "mode": st.st_mode, "ino": st.st_ino,
                    "size": st.st_size, "mtime": (st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec)})
        return 0

    assert plus_fuse.readdir_fuse_3(b"/C/P/S/SE", None, filler, offset, None, flags) == 0
    return got


def test_a_readdirplus_hands_libfuse_full_attributes_where_the_file_system_gave_them() -> None:
    got = chunk(callback(Source()), 0, readdirplus.FUSE_READDIR_PLUS, room=100)
    assert [e["name"] for e in got] == [name for name, _, _ in ENTRIES]
    assert [e["off"] for e in got] == list(range(1, len(ENTRIES) + 1))  # entry i resumes at i + 1: never 0
    by_name = {e["name"]: e for e in got}
    first = by_name["1-001.dcm"]
    assert first["fill"] == readdirplus.FUSE_FILL_DIR_PLUS
    assert (first["size"], first["ino"], first["mtime"]) == (1001, 11, (1_100_000_000, 250_000_000))
    meta = by_name[".series.json"]
    assert (meta["fill"], meta["size"], meta["ino"], meta["mode"]) == (0, 0, 9, stat.S_IFREG | 0o444)


def test_a_plain_readdir_hands_on_modes_and_inodes_only() -> None:
    got = chunk(callback(Source()), 0, 0, room=100)
    assert {e["fill"] for e in got} == {0}
    assert {e["size"] for e in got} == {0}
    assert [e["ino"] for e in got][2:] == [9, 11, 12, 13, 14, 15]


def test_a_full_buffer_ends_the_request_and_the_next_one_resumes_where_it_stopped() -> None:
    source = Source()
    plus_fuse = callback(source)
    first = chunk(plus_fuse, 0, readdirplus.FUSE_READDIR_PLUS, room=3)
    second = chunk(plus_fuse, first[-1]["off"], readdirplus.FUSE_READDIR_PLUS, room=100)
    assert [e["name"] for e in first + second] == [name for name, _, _ in ENTRIES]
    assert [offset for _, offset, _ in source.asked] == [0, 3]


@pytest.mark.parametrize(("capable", "expected"), [
    (readdirplus.FUSE_CAP_READDIRPLUS | readdirplus.FUSE_CAP_READDIRPLUS_AUTO, True),
    (0, False),
])
def test_init_asks_for_readdirplus_on_every_chunk_where_the_kernel_offers_it(capable: int, expected: bool) -> None:
    auto = readdirplus.FUSE_CAP_READDIRPLUS | readdirplus.FUSE_CAP_READDIRPLUS_AUTO
    conn = SimpleNamespace(capable=capable, want=(auto & capable) | 1)
    assert readdirplus.want_readdirplus_always(conn) is expected
    if expected:
        assert conn.want == readdirplus.FUSE_CAP_READDIRPLUS | 1  # auto off, the other wishes kept
    else:
        assert conn.want == 1


@pytest.mark.fuse
def test_stat_of_files_just_listed_is_answered_by_the_kernel_with_the_exact_sizes(emulator, mounter) -> None:
    """`ls -l`, `find -ls`, `cp -r`: after a listing, the stat (and open) of each listed DICOM file used to
    be one LOOKUP into the mount; the listing now brings the attributes along. The metadata file beside
    them is still looked up: the counter counts, and its size comes from its content."""
    m = mounter(emulator, extra=("--no-prefetch", "--no-walk-ahead"))
    series = first_series(m.path)
    names = sorted(os.listdir(series))
    dicom = [n for n in names if n.endswith(".dcm")]
    assert len(dicom) >= 3 and ".series.json" in names
    sock = daemon.control_socket_path(m.path)
    before = control.request(sock, {"op": "stats"}, timeout=30)["getattr_calls"]
    sizes = {n: os.stat(series / n).st_size for n in dicom}
    after = control.request(sock, {"op": "stats"}, timeout=30)["getattr_calls"]
    assert after == before, f"{after - before} attribute requests for {len(dicom)} files just listed"
    os.stat(series / ".series.json")
    assert control.request(sock, {"op": "stats"}, timeout=30)["getattr_calls"] == after + 1
    for name in (dicom[0], dicom[-1]):  # and the sizes the kernel kept are the true ones
        assert sizes[name] == len((series / name).read_bytes())
