"""nbiafs prefetch through the real command: a manifest or PATHs inside a live mount, the mount then reading
without a fetch, output on and off a terminal, dry runs and the too-big refusal, corrupt bodies of the
right length, and Ctrl-C then a re-run."""

from __future__ import annotations

import io
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cmdlib import cached, cart, instances, interruptible, part_files, true_bytes, write_manifest
from conftest import REPO, TEST_ENV, nbiafs_cli, visible_walk, wait_until

from nbiafs.progress import Progress


def prefetch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return nbiafs_cli("prefetch", *args, env=env)


def read_tree(root: Path) -> int:
    """Read every visible file under ``root``; how many."""
    count = 0
    for dirpath, _dirs, files in visible_walk(root):
        for name in files:
            Path(dirpath, name).read_bytes()
            count += 1
    return count


@pytest.mark.fuse
def test_a_manifest_prefetch_fills_the_cache_that_a_mount_then_reads_without_fetching(
        emulator, archive, mounter, tmp_path) -> None:
    series = cart(archive)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache = tmp_path / "cache"
    emulator.reset_stats()
    done = prefetch("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prefetched {len(series)} series, {len(files)} files")
    assert f"{len(files)} fetched" in lines[0] and "verified" in lines[0]
    calls = emulator.stats()
    assert calls["getSingleImage"] == len(files)  # each once
    assert cached(cache, emulator.url, files) == {i.sop_uid: true_bytes(i) for i in files}

    emulator.reset_stats()
    again = prefetch("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache))
    assert again.returncode == 0 and f"0 fetched, {len(files)} already cached" in again.stdout
    assert emulator.stats()["getSingleImage"] == 0 and emulator.stats()["getMD5HashForImage"] == 0

    m = mounter(emulator, cache_dir=cache, extra=("--manifest", str(manifest)))
    emulator.reset_stats()
    assert read_tree(m.path) == len(files)
    assert emulator.stats()["getSingleImage"] == 0  # everything the mount read was cached


@pytest.mark.fuse
def test_a_path_inside_a_mount_fills_that_mounts_cache(emulator, archive, mounter, tmp_path) -> None:
    m = mounter(emulator, extra=("--cache-size", "64M"))
    folder = m.path / "Demo-Head-MR"
    wanted = instances(archive, [s for s in archive.series if s.collection == "Demo-Head-MR"])
    emulator.reset_stats()
    done = prefetch(str(folder))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("prefetched 3 series, ") and done.stderr == ""
    assert emulator.stats()["getSingleImage"] == len(wanted)
    assert all(cached(m.cache_dir, emulator.url, wanted).values())  # the mount's cache dir: from its run record
    emulator.reset_stats()
    assert read_tree(folder) == len(wanted)
    assert emulator.stats()["getSingleImage"] == 0

    # one file and a study folder of another collection in one go; names as the mount shows them
    one = next(p for p in sorted((m.path / "Edge-Cases").rglob("*.dcm")))
    done = prefetch(str(one))
    assert done.returncode == 0 and "1 files" in done.stdout, done.stdout


@pytest.mark.fuse
def test_paths_that_cannot_be_prefetched_are_one_clear_line(emulator, mounter, tmp_path) -> None:
    m = mounter(emulator)
    series_dir = next(Path(d) for d, _dirs, files in visible_walk(m.path / "Demo-Head-MR") if files)
    cases = [
        ((str(tmp_path),), "not inside an nbiafs mount"),
        ((str(m.path / "No-Such-Collection"),), "no such file or folder in the mount"),
        ((str(series_dir / ".series.json"),), "metadata file"),
        ((str(series_dir), "--cache-size", "1G"), "--cache-size: a PATH inside a mount uses that mount's"),
        ((str(series_dir), "--manifest", str(tmp_path / "x.tcia")), "not both"),
        ((), "nothing to fetch"),
    ]
    for args, message in cases:
        done = prefetch(*args)
        assert done.returncode == 1, (args, done.stdout)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_bad_manifest_or_a_dead_server_is_one_clear_line(emulator, tmp_path) -> None:
    bad = tmp_path / "bad.tcia"
    bad.write_text("ListOfSeriesToDownload=\n<html>\n")
    done = prefetch("--manifest", str(bad), "--server", emulator.url, "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 1 and "line 2" in done.stderr and "Traceback" not in done.stderr
    good = write_manifest(tmp_path / "good.tcia", ["1.2.3"])
    done = prefetch("--manifest", str(good), "--server", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 1 and "cannot use http://127.0.0.1:9" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_off_a_terminal_the_output_is_one_summary_line_and_one_line_per_failure(make_emulator, archive,
                                                                                 tmp_path) -> None:
    emu = make_emulator()
    series = cart(archive, 2)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series] + ["1.2.3.4.5.404"])
    emu.inject_fault("getSingleImage", status=404, count=1)  # the first file asked (one worker) fails
    done = prefetch("--manifest", str(manifest), "--server", emu.url, "--cache-dir", str(tmp_path / "cache"),
                    "--workers", "1", "--log-level", "ERROR")
    assert done.returncode == 1
    out = done.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith(f"prefetch incomplete: {len(files) - 1} of {len(files)} files")
    assert "1 failed, 1 series not on the server" in out[0]
    err = done.stderr.splitlines()
    assert len(err) == 2 and all(line.startswith("nbiafs: failed: ") for line in err), err
    assert any("series 1.2.3.4.5.404" in line for line in err)
    assert any(".dcm: " in line and "404" in line for line in err)  # names the file as the tree does


def test_on_a_terminal_a_bar_shows_files_bytes_and_rate(make_emulator, archive, tmp_path) -> None:
    emu = make_emulator()
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in cart(archive, 2)])
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "prefetch", "--manifest", str(manifest),
                                 "--server", emu.url, "--cache-dir", str(tmp_path / "cache")],
                                stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True,
                                env={**os.environ, **TEST_ENV}, cwd=REPO)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed (the process ended)
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "prefetch" in screen and re.search(r"\d+/\d+ files", screen), screen
    assert len(out.splitlines()) == 1 and out.startswith("prefetched 2 series")


def test_the_progress_bar_counts_files_and_bytes_and_writes_failures_above_it() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen, out = Terminal(), io.StringIO()
    progress = Progress("prefetch", 3, 3000, stream=screen, out=out)
    progress.add(1000, fetched=True)
    progress.add(1000, fetched=False)
    progress.fail("Coll/P/S/1-003.dcm", "server error 503", 1000)
    progress.close("the summary")
    assert "failed: Coll/P/S/1-003.dcm: server error 503" in screen.getvalue()
    assert "3/3 files" in screen.getvalue() and "prefetch" in screen.getvalue()
    assert out.getvalue() == "the summary\n"
    assert (progress.tally.fetched, progress.tally.cached, progress.tally.failed) == (1, 1, 1)


def test_a_dry_run_fetches_nothing_and_a_prefetch_bigger_than_the_cache_is_refused_before_it_starts(
        emulator, archive, tmp_path) -> None:
    series = cart(archive)
    files = instances(archive, series)
    total = sum(i.size for i in files)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    base = ("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(tmp_path / "cache"))
    emulator.reset_stats()
    done = prefetch(*base, "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(1 for line in lines if "files to fetch" in line) == len(series)
    assert f"would fetch {len(series)} series, {len(files)} files" in done.stdout
    assert "fit" in lines[-1] and "NOT" not in lines[-1]
    assert emulator.stats()["getSingleImage"] == 0
    assert not any(cached(tmp_path / "cache", emulator.url, files).values())

    first = write_manifest(tmp_path / "first.tcia", [series[0].uid])
    assert prefetch("--manifest", str(first), *base[2:]).returncode == 0
    done = prefetch(*base, "--dry-run")
    assert done.returncode == 0
    assert f"would fetch {len(series) - 1} series" in done.stdout
    assert f"{series[0].image_count} of {len(files)} files asked for are cached already" in done.stdout

    small = str(total // 2)  # bytes: less than the cart
    done = prefetch(*base, "--cache-size", small, "--dry-run")
    assert done.returncode == 1 and "do NOT fit" in done.stdout
    before = cached(tmp_path / "cache", emulator.url, files)
    emulator.reset_stats()
    done = prefetch(*base, "--cache-size", small)
    assert done.returncode == 1 and "holds at most" in done.stderr and "nbiafs download" in done.stderr
    assert emulator.stats()["getSingleImage"] == 0
    assert cached(tmp_path / "cache", emulator.url, files) == before  # a refused prefetch evicted nothing


def test_a_corrupt_body_of_the_right_length_is_fetched_again_and_never_kept(make_emulator, archive,
                                                                             tmp_path) -> None:
    emu = make_emulator()
    series = cart(archive, 1)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache = tmp_path / "cache"
    args = ("--manifest", str(manifest), "--server", emu.url, "--cache-dir", str(cache), "--workers", "1")
    emu.inject_fault("getSingleImage", corrupt=True, count=1)
    done = prefetch(*args)
    assert done.returncode == 0, done.stderr
    assert emu.stats()["getSingleImage"] == len(files) + 1  # the corrupt one, once more
    assert cached(cache, emu.url, files) == {i.sop_uid: true_bytes(i) for i in files}

    cache2 = tmp_path / "cache2"
    emu.inject_fault("getSingleImage", corrupt=True, count=2)  # the same file twice: it fails
    done = prefetch(*args[:4], "--cache-dir", str(cache2), "--workers", "1")
    assert done.returncode == 1 and "md5" in done.stderr
    got = cached(cache2, emu.url, files)
    bad = [sop for sop, body in got.items() if body is None]
    assert len(bad) == 1  # never kept
    assert all(body == true_bytes(i) for i in files if (body := got[i.sop_uid]) is not None)


def test_ctrl_c_stops_at_once_keeps_nothing_half_written_and_a_rerun_fetches_only_the_rest(
        make_emulator, archive, tmp_path) -> None:
    emu = make_emulator()
    series = cart(archive, 3)
    files = instances(archive, series)
    first = instances(archive, series[:1])
    cache = tmp_path / "cache"
    server = ("--server", emu.url, "--cache-dir", str(cache))
    part = write_manifest(tmp_path / "part.tcia", [series[0].uid])
    whole = write_manifest(tmp_path / "whole.tcia", [s.uid for s in series])
    assert prefetch("--manifest", str(part), *server).returncode == 0

    emu.inject_fault("getSingleImage", delay=120, count=1000)  # every transfer hangs
    emu.reset_stats()
    proc = interruptible([sys.executable, "-m", "nbiafs", "prefetch", "--manifest", str(whole), *server],
                         env={**os.environ, **TEST_ENV}, cwd=REPO)
    try:
        assert wait_until(lambda: emu.stats()["getSingleImage"] >= 2, 60), "the prefetch never started fetching"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # far less than the transfers' 120 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out.startswith("prefetch stopped") and "run it again" in out
    assert "Traceback" not in err
    assert part_files(cache) == []
    now = cached(cache, emu.url, files)
    assert {sop for sop, body in now.items() if body is not None} == {i.sop_uid for i in first}

    emu.clear_faults()
    emu.reset_stats()
    done = prefetch("--manifest", str(whole), *server)
    assert done.returncode == 0, done.stderr
    assert emu.stats()["getSingleImage"] == len(files) - len(first)  # only what was missing
    assert f"{len(first)} already cached" in done.stdout
    assert cached(cache, emu.url, files) == {i.sop_uid: true_bytes(i) for i in files}
