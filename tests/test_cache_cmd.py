"""nbiafs cache info|verify|clear through the real command: what a cache dir holds (every namespace), a
cached file altered or cut short on disk found and dropped, and clear refused while a mount uses the dir."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from cmdlib import cache_view, cached, cart, instances, ref, true_bytes, write_manifest
from conftest import nbiafs_cli, visible_walk

from nbiafs import options
from nbiafs.cli import build_parser


def fill(emulator, archive, tmp_path: Path, count: int = 2) -> tuple[Path, list]:
    series = cart(archive, count)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache = tmp_path / "cache"
    done = nbiafs_cli("prefetch", "--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    return cache, series


def fields(stdout: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(": ")
        out.setdefault(key, []).append(value)
    return out


def test_the_flags_of_the_cache_actions_come_from_the_table() -> None:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["cache"]
    actions = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    table = {o.flag for o in options.OPTIONS}
    assert set(actions) == {"info", "verify", "clear"}
    for name, sub in actions.items():
        flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
        assert flags - table - {"--help", "--config"} == set(), name
        assert "--cache-dir" in flags
    assert "--force" in {s for a in actions["clear"]._actions for s in a.option_strings}


def test_info_prints_instances_series_bytes_the_bound_and_the_namespaces(emulator, archive, tmp_path) -> None:
    cache, series = fill(emulator, archive, tmp_path)
    files = instances(archive, series)
    done = nbiafs_cli("cache", "info", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    got = fields(done.stdout)
    assert got["cache"] == [str(cache)]
    assert got["instances"][0].startswith(f"{len(files)} in {len(series)} series, ")
    assert got["namespace"] == [f"{emulator.url} as nbia_guest: {len(files)} instances"]
    assert got["bound"] == ["10.0 GiB (default)"]
    done = nbiafs_cli("cache", "info", "--cache-dir", str(cache), "--cache-size", "20G")
    assert fields(done.stdout)["bound"] == ["20.0 GiB (command line)"]
    nowhere = nbiafs_cli("cache", "info", "--cache-dir", str(tmp_path / "none"))
    assert nowhere.returncode == 0 and "does not exist" in nowhere.stdout
    assert not (tmp_path / "none").exists()  # looking creates nothing


def test_verify_drops_files_altered_or_cut_short_on_disk_and_exits_non_zero(emulator, archive, tmp_path) -> None:
    cache, series = fill(emulator, archive, tmp_path)
    files = instances(archive, series)
    altered, cut = files[0], files[-1]
    with cache_view(cache, emulator.url) as view:
        altered_path, cut_path = view.cached_path(ref(altered)), view.cached_path(ref(cut))
    data = bytearray(altered_path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # same length
    altered_path.write_bytes(bytes(data))
    with open(cut_path, "r+b") as fh:
        fh.truncate(100)

    done = nbiafs_cli("cache", "verify", "--cache-dir", str(cache))
    assert done.returncode == 1
    dropped = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("dropped ")]
    assert sorted(dropped) == sorted([str(altered_path), str(cut_path)])
    assert f"checked {len(files)} instances" in done.stdout and "2 dropped" in done.stdout
    now = cached(cache, emulator.url, files)
    assert now[altered.sop_uid] is None and now[cut.sop_uid] is None
    assert all(now[i.sop_uid] == true_bytes(i) for i in files if i not in (altered, cut))

    again = nbiafs_cli("cache", "verify", "--cache-dir", str(cache))
    assert again.returncode == 0 and f"verified {len(files) - 2} instances" in again.stdout and "all good" in again.stdout


@pytest.mark.fuse
def test_clear_is_refused_while_a_mount_uses_the_cache_unless_forced(emulator, archive, mounter, tmp_path) -> None:
    cache, series = fill(emulator, archive, tmp_path)
    files = instances(archive, series)
    m = mounter(emulator, cache_dir=cache)
    done = nbiafs_cli("cache", "clear", "--cache-dir", str(cache), env={"NBIAFS_FORCE": "1"})  # a flag only
    assert done.returncode == 1
    assert str(m.path) in done.stderr and "--force" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert all(cached(cache, emulator.url, files).values())  # nothing removed

    info = nbiafs_cli("cache", "info", "--cache-dir", str(cache))
    assert f"used by: {m.path}" in info.stdout and f"(the mount on {m.path})" in info.stdout

    done = nbiafs_cli("cache", "clear", "--cache-dir", str(cache), "--force")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cleared {cache}: {len(files)} instances") and "listings" in done.stdout
    assert not any(cached(cache, emulator.url, files).values())
    emulator.reset_stats()
    for dirpath, _dirs, names in visible_walk(m.path / series[0].collection):  # the mount fetches again
        for name in names:
            Path(dirpath, name).read_bytes()
    assert emulator.stats()["getSingleImage"] > 0

    m.unmount()
    done = nbiafs_cli("cache", "clear", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    assert fields(nbiafs_cli("cache", "info", "--cache-dir", str(cache)).stdout)["instances"][0].startswith("0 in 0")
