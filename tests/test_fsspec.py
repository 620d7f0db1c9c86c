"""The fsspec file system (``nbia://``) against the emu, without any mount: the archive's tree,
sizes and bytes, random access, pydicom, errors that are never absences, options from the table,
and layers shared and closed soundly (threads, fork, pickling, exit)."""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pydicom
import pytest
from conftest import visible_walk, wait_until

from nbiafs import naming
from nbiafs.fsspec_nbia import FSSPEC_OPTIONS, NbiaFileSystem, settings_from

#: Short client timeouts: errors must surface within seconds (the mount tests use the same).
FAST = {"deadline": "20", "retries": "3", "backoff": "0.05", "connect_timeout": "3", "read_timeout": "15"}


@pytest.fixture
def emu(make_emulator: Callable[..., Any]) -> Any:
    """An emulator of the test's own: these tests download, and the session's emulator is left to tests
    that count its downloads."""
    return make_emulator()


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the machine's config file nor NBIAFS_* variables leak into these tests."""
    monkeypatch.setenv("NBIAFS_CONFIG", str(tmp_path / "no-config.toml"))
    for name in list(os.environ):
        if name.startswith("NBIAFS_") and name != "NBIAFS_CONFIG":
            monkeypatch.delenv(name)


@pytest.fixture
def make_fs(tmp_path: Path) -> Iterator[Callable[..., NbiaFileSystem]]:
    """``make_fs(emu, **options)``: a file system on its own cache dir (closed after the test)."""
    made: list[NbiaFileSystem] = []

    def make(emu: Any = None, **kwargs: Any) -> NbiaFileSystem:
        options = {**FAST, "cache_dir": str(tmp_path / "cache"), **kwargs}
        if emu is not None:
            options.setdefault("server", emu.url)
        fs = fsspec.filesystem("nbia", **options)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def public_instances(archive: Any) -> dict[str, Any]:
    """uid-layout path -> archive instance, for what an anonymous reader sees."""
    out = {}
    for coll in archive.public_collections():
        for study in archive.studies_of(coll.name):
            for series in archive.series_of_study(study.uid):
                for inst in archive.instances_of(series.uid):
                    path = "/".join([naming.collection_dirname(coll.name, "uid"),
                                     naming.patient_dirname(study.patient_id, "uid"),
                                     study.uid, series.uid, f"{inst.sop_uid}.dcm"])
                    out[path] = inst
    return out


def dead_server() -> str:
    """The URL of a port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------- registration
def test_the_nbia_protocol_is_registered_through_the_entry_point(emu, tmp_path: Path) -> None:
    assert fsspec.get_filesystem_class("nbia") is NbiaFileSystem
    fs, path = fsspec.core.url_to_fs("nbia://Demo-Chest-CT/", server=emu.url, cache_dir=str(tmp_path))
    try:
        assert isinstance(fs, NbiaFileSystem)
        assert path == "Demo-Chest-CT"
        assert fs.unstrip_protocol(path) == "nbia://Demo-Chest-CT"
    finally:
        fs.close()


@pytest.mark.parametrize(("given", "stripped"), [
    ("nbia://A/B/", "A/B"), ("nbia:///A//B", "A/B"), ("/A/B", "A/B"), ("A", "A"), ("nbia://", ""), ("", ""),
    ("nbia::A/b c.dcm", "A/b c.dcm"),
])
def test_paths_are_relative_to_the_root(given: str, stripped: str) -> None:
    assert NbiaFileSystem._strip_protocol(given) == stripped


# ---------------------------------------------------------------------------------- the tree
def test_the_tree_names_and_sizes_are_the_archives(emu, archive, make_fs) -> None:
    fs = make_fs(emu, layout="uid")
    expected = public_instances(archive)
    found = fs.find("", detail=True)
    assert {name: info["size"] for name, info in found.items()} == {p: i.size for p, i in expected.items()}
    assert all(info["type"] == "file" for info in found.values())
    dirs = {name for name, info in fs.find("", withdirs=True, detail=True).items() if info["type"] == "directory"}
    assert dirs == {p.rsplit("/", k)[0] for p in expected for k in (1, 2, 3, 4)}
    assert sorted(fs.ls("", detail=False)) == sorted(naming.collection_dirname(c.name) for c in
                                                        archive.public_collections())


def test_info_carries_the_uids_and_stable_times(emu, archive, make_fs) -> None:
    fs = make_fs(emu, layout="uid")
    path, inst = next(iter(public_instances(archive).items()))
    info = fs.info("nbia://" + path)
    assert info["name"] == path and info["type"] == "file" and info["size"] == inst.size
    assert (info["sop_uid"], info["series_uid"], info["study_uid"]) == (inst.sop_uid, inst.series_uid, inst.study_uid)
    assert info["instance_number"] == inst.instance_number
    series = fs.info(path.rsplit("/", 1)[0])
    assert series["type"] == "directory" and series["kind"] == "series" and series["size"] == 0
    assert fs.ls(path) == [info]  # ls of a file: the file
    assert fs.modified(path).timestamp() == info["mtime"] == fs.info(path)["mtime"]
    assert fs.isfile(path) and not fs.isdir(path) and fs.isdir(path.rsplit("/", 1)[0]) and fs.exists(path)


# ---------------------------------------------------------------------------------- bytes
def test_bytes_ranges_and_random_access_equal_the_archive(emu, archive, make_fs) -> None:
    fs = make_fs(emu, layout="uid", prefetch=False)
    items = list(public_instances(archive).items())
    for path, inst in items[:: max(1, len(items) // 6)]:
        data = inst.path.read_bytes()
        assert fs.cat_file(path) == data
        assert fs.cat_file(path, 100, 164) == data[100:164]
        assert fs.cat_file(path, -16) == data[-16:]
        assert fs.cat_file(path, 10, -10) == data[10:-10]
        assert fs.cat_file(path, len(data) + 5) == b""
        with fs.open(path, "rb") as f:
            assert f.size == len(data) and f.seekable()
            assert f.read(132) == data[:132]
            f.seek(len(data) // 2)
            assert f.read(1000) == data[len(data) // 2:len(data) // 2 + 1000]
            f.seek(-7, io.SEEK_END)
            assert f.read() == data[-7:] and f.read() == b""
            f.seek(3)
            buf = bytearray(29)
            assert f.readinto(buf) == 29 and bytes(buf) == data[3:32] and f.tell() == 32
        assert f.closed
    assert fs.cat([p for p, _ in items[:3]]) == {p: i.path.read_bytes() for p, i in items[:3]}


def test_closing_files_releases_their_store_handles(emu, archive, make_fs) -> None:
    fs = make_fs(emu, layout="uid", prefetch=False)
    path = next(iter(public_instances(archive)))
    store = fs.layers.store
    before = len(store._handles)
    files = [fs.open(path) for _ in range(3)]
    assert len(store._handles) == before + 3
    for f in files:
        f.read(10)
        f.close()
    assert len(store._handles) == before
    fs.cat_file(path)
    assert len(store._handles) == before


def test_pydicom_reads_through_it(emu, archive, make_fs) -> None:
    fs = make_fs(emu, layout="uid")
    path, inst = next((p, i) for p, i in public_instances(archive).items() if i.size > 10_000)
    with fs.open(path) as f:
        ds = pydicom.dcmread(f)
    assert ds.SOPInstanceUID == inst.sop_uid and ds.SeriesInstanceUID == inst.series_uid
    expected = pydicom.dcmread(inst.path)
    assert (ds.pixel_array == expected.pixel_array).all()
    with fsspec.open(f"nbia://{path}", server=emu.url, cache_dir=fs.settings.cache_dir, layout="uid",
                     **FAST) as f:
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == inst.sop_uid


def test_the_descriptive_tree_equals_a_mounts(emu, make_fs, mounter, tmp_path: Path) -> None:
    """The acceptance check: names, sizes and bytes as a real mount of the same server shows them."""
    m = mounter(emu, cache_dir=tmp_path / "mount-cache")
    mounted: dict[str, int] = {}
    mounted_dirs: set[str] = set()
    for root, dirs, files in visible_walk(m.path):
        rel = os.path.relpath(root, m.path)
        mounted_dirs.update(os.path.normpath(os.path.join(rel, d)) for d in dirs)
        for name in files:
            mounted[os.path.normpath(os.path.join(rel, name))] = os.stat(os.path.join(root, name)).st_size
    fs = make_fs(emu)  # its own cache dir: nothing comes from the mount's
    found = fs.find("", withdirs=True, detail=True)
    assert {n: i["size"] for n, i in found.items() if i["type"] == "file"} == mounted
    assert {n for n, i in found.items() if i["type"] == "directory"} == mounted_dirs
    for name in sorted(mounted)[:: max(1, len(mounted) // 5)]:
        assert fs.cat_file(name) == (m.path / name).read_bytes()


def test_a_file_fetched_by_either_is_cached_for_the_other(make_emulator, make_fs, mounter, tmp_path: Path) -> None:
    emu = make_emulator()
    cache = tmp_path / "shared-cache"
    fs = make_fs(emu, cache_dir=str(cache), prefetch=False)
    files = sorted(fs.find("Demo-Chest-CT"))
    first, second = files[0], files[-1]
    emu.reset_stats()
    data = fs.cat_file(first)
    assert emu.stats()["getSingleImage"] == 1
    m = mounter(emu, cache_dir=cache, extra=("--no-prefetch",))
    emu.reset_stats()
    assert (m.path / first).read_bytes() == data  # fetched by fsspec: a cache hit for the mount
    assert emu.stats()["getSingleImage"] == 0
    mounted = (m.path / second).read_bytes()  # fetched by the mount ...
    assert emu.stats()["getSingleImage"] == 1
    # (a reader has every byte a moment before the mount's checks rename its part file into place)
    assert wait_until(lambda: len(list(cache.rglob("*.dcm"))) == 2, 30)
    assert fs.cat_file(second) == mounted  # ... a cache hit for fsspec
    assert emu.stats()["getSingleImage"] == 1


# ---------------------------------------------------------------------------------- errors
def test_a_missing_name_is_file_not_found(emu, make_fs) -> None:
    fs = make_fs(emu)
    for path in ("No-Such-Collection", "Demo-Chest-CT/nobody", "Demo-Chest-CT/nobody/x/y/1-001.dcm"):
        with pytest.raises(FileNotFoundError):
            fs.info(path)
        with pytest.raises(FileNotFoundError):
            fs.open(path)
        assert not fs.exists(path) and not fs.isdir(path) and not fs.isfile(path)
    with pytest.raises(FileNotFoundError):
        fs.ls("No-Such-Collection")


def test_a_dead_server_is_an_io_error_never_an_absence(make_fs) -> None:
    fs = make_fs(server=dead_server(), retries="0", deadline="5", connect_timeout="1")
    for call in (lambda: fs.ls(""), lambda: fs.info("Demo-Chest-CT"), lambda: fs.exists("Demo-Chest-CT"),
                 lambda: fs.isdir("Demo-Chest-CT"), lambda: fs.find(""), lambda: fs.open("A/B/C/D/1-001.dcm"),
                 lambda: fs.cat_file("A/B/C/D/1-001.dcm")):
        with pytest.raises(OSError) as caught:
            call()
        assert not isinstance(caught.value, FileNotFoundError), caught.value
        assert caught.value.errno == errno.EIO


def test_a_failing_download_of_a_listed_file_is_an_io_error(make_emulator, make_fs) -> None:
    emu = make_emulator()
    fs = make_fs(emu, prefetch=False, retries="1")
    path = sorted(fs.find("Demo-Head-MR"))[0]
    emu.inject_fault("getSingleImage", status=500, count=100)
    try:
        with pytest.raises(OSError) as caught:
            fs.open(path)
        assert not isinstance(caught.value, FileNotFoundError) and caught.value.errno == errno.EIO
    finally:
        emu.clear_faults()
    assert len(fs.cat_file(path)) == fs.info(path)["size"]  # nothing wrong was cached


def test_it_is_read_only(emu, make_fs) -> None:
    fs = make_fs(emu)
    name = sorted(fs.find("Demo-Head-MR"))[0]
    for mode in ("wb", "ab"):
        with pytest.raises(OSError) as caught:
            fs.open(name, mode)
        assert caught.value.errno == errno.EROFS
    for call in (lambda: fs.rm(name), lambda: fs.mkdir("x"), lambda: fs.pipe_file("x", b"1"),
                 lambda: fs.mv(name, "x")):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.EROFS
    with pytest.raises(IsADirectoryError):
        fs.open("Demo-Head-MR")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("Demo-Head-MR")


# ---------------------------------------------------------------------------------- options
def test_keyword_arguments_are_the_option_tables(tmp_path: Path) -> None:
    settings = settings_from({"server": "nlst", "cache_dir": str(tmp_path), "cache_size": "20G", "workers": 3,
                              "layout": "uid", "prefetch": "false", "offline": True, "deadline": "1m"})
    assert settings.base_url == "https://nlst.cancerimagingarchive.net"
    assert (settings.cache_size, settings.workers, settings.layout, settings.prefetch, settings.offline,
            settings.deadline) == (20 * 1024**3, 3, "uid", False, True, 60.0)
    assert settings.cache_dir == tmp_path.resolve()
    assert {"server", "user", "cache_dir", "cache_size", "layout", "prefetch", "series_zip", "offline"} <= FSSPEC_OPTIONS
    with pytest.raises(TypeError, match="cache_sise"):
        settings_from({"cache_sise": "1G"})
    with pytest.raises(TypeError, match="allow_other is a mount option"):
        settings_from({"allow_other": True})
    with pytest.raises(ValueError, match="cache-size"):
        settings_from({"cache_size": "lots"})
    with pytest.raises(ValueError, match="layout"):
        fsspec.filesystem("nbia", layout="flat", cache_dir=str(tmp_path))


def test_config_file_and_environment_apply_as_for_the_mount(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "nbiafs.toml"
    config.write_text('layout = "uid"\ncache-size = "2G"\nuid = 5\n')
    settings = settings_from({"config": str(config)})
    assert settings.layout == "uid" and settings.cache_size == 2 * 1024**3  # a mount option there: ignored
    monkeypatch.setenv("NBIAFS_CACHE_SIZE", "3G")
    assert settings_from({"config": str(config)}).cache_size == 3 * 1024**3
    assert settings_from({"config": str(config), "cache_size": "4G"}).cache_size == 4 * 1024**3


def test_a_named_account_takes_its_password_from_the_environment(emu, make_fs, monkeypatch) -> None:
    from nbiafs.emulator import TEST_PASSWORD, TEST_USER

    monkeypatch.setenv("NBIA_PASSWORD", TEST_PASSWORD)
    fs = make_fs(emu, user=TEST_USER, api="v2")
    assert "Restricted" in " ".join(fs.ls("", detail=False)) or len(fs.ls("")) > 3
    assert TEST_PASSWORD not in repr(fs.storage_options) and TEST_PASSWORD not in pickle.dumps(fs).decode("latin-1")


# ---------------------------------------------------------------------------------- lifetime
def test_equal_settings_share_one_set_of_layers_across_threads(emu, make_fs) -> None:
    fs = make_fs(emu)
    others: list[NbiaFileSystem] = []
    thread = threading.Thread(target=lambda: others.append(make_fs(emu)))
    thread.start()
    thread.join()
    other = others[0]
    assert other is not fs  # fsspec caches instances per thread ...
    assert other.layers is fs.layers  # ... the layers are shared
    layers = fs.layers
    fs.close()
    assert other.ls("") and other.layers is layers  # the other user keeps them open
    other.close()
    assert fs.ls("") and fs.layers is not layers  # closed with the last user; built again on use


def test_a_pickled_file_system_and_file_work_in_a_spawned_process(emu, archive, make_fs) -> None:
    import multiprocessing

    fs = make_fs(emu, layout="uid")
    path, inst = next(iter(public_instances(archive).items()))
    fs.ls("")  # layers live in this process: the child must build its own
    with fs.open(path) as f:
        f.seek(100)
        pickled_file = pickle.dumps(f)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        data, tail = pool.apply(_read_in_child, (pickle.dumps(fs), path, pickled_file), {})
    assert data == inst.path.read_bytes()
    assert tail == inst.path.read_bytes()[100:150]


def _read_in_child(pickled_fs: bytes, path: str, pickled_file: bytes) -> tuple[bytes, bytes]:
    fs = pickle.loads(pickled_fs)
    f = pickle.loads(pickled_file)
    with f:
        tail = f.read(50)
    return fs.cat_file(path), tail


def test_a_forked_child_builds_its_own_layers(emu, archive, make_fs) -> None:
    import multiprocessing

    fs = make_fs(emu, layout="uid")
    path, inst = next(iter(public_instances(archive).items()))
    fs.cat_file(path)  # threads, sockets and SQLite connections now exist in the parent ...
    f = fs.open(path)  # ... and a prefetch of the rest of the series is writing to the cache
    f.seek(20)
    before = fs.layers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(fs, f, path, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0, result
    assert result == (True, inst.path.read_bytes(), inst.path.read_bytes()[20:40])
    assert f.read(20) == inst.path.read_bytes()[20:40]  # the parent's open file still reads ...
    assert fs.layers is not before  # ... through layers built after the fork
    f.close()


def _forked_child(fs: NbiaFileSystem, f: Any, path: str, queue: Any) -> None:
    nothing_inherited = NbiaFileSystem._shared.active() == 0
    queue.put((nothing_inherited, fs.cat_file(path), f.read(20)))


EXIT_SCRIPT = r"""
import sys, fsspec
fs = fsspec.filesystem("nbia", server=sys.argv[1], cache_dir=sys.argv[2], offline=sys.argv[3] == "offline")
names = fs.find("", detail=False)
if sys.argv[3] != "offline":
    with fs.open(names[0]) as f:  # starts the prefetch of the rest of its series
        f.read(10)
print(len(names))
"""


def test_exit_without_close_stops_threads_and_writes_the_caches(make_emulator, tmp_path: Path) -> None:
    """A script that never closes anything exits at once, and what it listed is on disk afterwards."""
    emu = make_emulator(latency=0.05)
    env = {**os.environ, "NBIAFS_CONFIG": str(tmp_path / "none.toml")}
    cache = str(tmp_path / "cache")
    online = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, emu.url, cache, "online"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert online.returncode == 0, online.stderr
    count = int(online.stdout)
    assert count > 100
    offline = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, emu.url, cache, "offline"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert offline.returncode == 0, offline.stderr
    assert int(offline.stdout) == count


NO_FUSE_SCRIPT = r"""
import importlib.abc, sys

class NoFuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("mfusepy", "fuse", "nbiafs.fuselib", "nbiafs.fs"):
            raise ImportError(f"{name} is unavailable here (no libfuse)")
        return None

sys.meta_path.insert(0, NoFuse())
import fsspec, pydicom
fs = fsspec.filesystem("nbia", server=sys.argv[1], cache_dir=sys.argv[2])
name = fs.find("Demo-Head-MR")[0]
with fsspec.open("nbia://" + name, server=sys.argv[1], cache_dir=sys.argv[2]) as f:
    ds = pydicom.dcmread(f)
assert len(fs.cat_file(name)) == fs.info(name)["size"]
loaded = sorted(m for m in sys.modules if "fuse" in m.lower())
print("OK", ds.Modality, loaded)
"""


def test_it_works_where_fuse_cannot_load(emu, tmp_path: Path) -> None:
    env = {**os.environ, "NBIAFS_CONFIG": str(tmp_path / "none.toml"), "FUSE_LIBRARY_PATH": "/nonexistent/libfuse3.so"}
    done = subprocess.run([sys.executable, "-c", NO_FUSE_SCRIPT, emu.url, str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OK MR []"
