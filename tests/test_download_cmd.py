"""nbiafs download through the real command: the mount's names, hard links from the cache (copies when
links are refused), metadata.csv, resuming after a truncated file, a download bigger than the cache,
a cached copy altered on disk, Ctrl-C, and a full disk at DEST."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cmdlib import (
    cache_view,
    cached,
    cart,
    files_under,
    instances,
    interruptible,
    part_files,
    ref,
    true_bytes,
    write_manifest,
)
from conftest import REPO, TEST_ENV, nbiafs_cli, visible_walk, wait_until

from nbiafs import cli, downloadcmd


def download(*args: str) -> subprocess.CompletedProcess[str]:
    return nbiafs_cli("download", *args)


def metadata_rows(dest: Path) -> list[dict[str, str]]:
    with open(dest / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def by_bytes(archive, series) -> dict[bytes, object]:
    return {true_bytes(i): i for i in instances(archive, series)}


@pytest.mark.fuse
def test_a_download_has_the_mounts_names_hard_links_from_the_cache_and_a_metadata_csv(
        emulator, archive, mounter, tmp_path) -> None:
    series = cart(archive)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    done = download("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache), str(dest))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith(f"downloaded {len(series)} series, {len(files)} files")
    assert f"{len(files)} hard-linked, 0 copied" in done.stdout

    m = mounter(emulator, cache_dir=tmp_path / "mount-cache", extra=("--manifest", str(manifest)))
    shown = {}
    for dirpath, _dirs, names in visible_walk(m.path):
        for name in names:
            shown[str(Path(dirpath, name).relative_to(m.path))] = Path(dirpath, name).read_bytes()
    written = files_under(dest)
    assert written == shown  # the same names (Edge-Cases' hostile ones too), the same bytes
    assert sorted(written.values()) == sorted(true_bytes(i) for i in files)

    with cache_view(cache, emulator.url) as view:  # hard links: the cache's own files
        cache_inodes = {os.stat(view.cached_path(ref(i))).st_ino for i in files}
    dest_inodes = {os.stat(dest / rel).st_ino for rel in written}
    assert dest_inodes == cache_inodes

    rows = metadata_rows(dest)
    assert {r["Series UID"] for r in rows} == {s.uid for s in series}
    for r in rows:
        s = next(s for s in series if s.uid == r["Series UID"])
        folder = dest / r["File Location"]
        assert r["File Location"].startswith("./") and folder.is_dir()
        assert r["Number of Images"] == str(s.image_count) == str(len(os.listdir(folder)))
        assert (r["Collection"], r["Subject ID"], r["Study UID"], r["Modality"]) == (
            s.collection, s.patient_id, s.study_uid, s.modality)
        assert r["SOP Class UID"].startswith("1.2.840.10008.") and r["Download Timestamp"]


def test_a_download_resumes_after_a_truncated_file_and_skips_what_is_done(emulator, archive, tmp_path) -> None:
    series = cart(archive, 2)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    args = ("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache), str(dest))
    assert download(*args).returncode == 0
    rels = sorted(files_under(dest))
    cut, gone, kept = dest / rels[0], dest / rels[1], dest / rels[2]
    whole = cut.read_bytes()
    with open(cut, "r+b") as fh:  # as a killed copy or a careless hand would leave it
        fh.truncate(len(whole) // 2)
    gone.unlink()
    stale = kept.parent / f".{kept.name}.nbiafs-part"
    stale.write_bytes(b"half a file")
    inode = os.stat(kept).st_ino
    rows_before = metadata_rows(dest)

    emulator.reset_stats()
    done = download(*args)
    assert done.returncode == 0, done.stderr
    # the truncated file was a hard link: the cache's copy was cut with it, so the download's md5 check of
    # the link finds it bad, drops it from the cache and fetches it again; the deleted one comes from the cache
    assert "2 written (1 fetched, 1 from the cache" in done.stdout
    assert f"{len(files) - 2} already there" in done.stdout
    assert emulator.stats()["getSingleImage"] == 1
    assert cut.read_bytes() == whole and gone.exists()
    assert os.stat(kept).st_ino == inode  # a file that was done is left alone
    assert not stale.exists() and part_files(dest) == []
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in files)
    assert len(metadata_rows(dest)) == len(rows_before) == len(series)  # one row per series, merged


def test_a_download_bigger_than_the_cache_streams_through_it(emulator, archive, tmp_path) -> None:
    series = cart(archive)
    files = instances(archive, series)
    total = sum(i.size for i in files)
    bound = total // 3
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    refused = nbiafs_cli("prefetch", "--manifest", str(manifest), "--server", emulator.url, "--cache-dir",
                         str(cache), "--cache-size", str(bound))
    assert refused.returncode == 1 and "nbiafs download" in refused.stderr
    done = download("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(cache),
                    "--cache-size", str(bound), str(dest))
    assert done.returncode == 0, done.stderr
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in files)
    with cache_view(cache, emulator.url) as view:
        assert view.info().bytes <= bound


def test_a_cached_copy_altered_on_disk_is_fetched_again_not_linked(emulator, archive, tmp_path) -> None:
    series = cart(archive, 1)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    server = ("--server", emulator.url, "--cache-dir", str(cache))
    assert nbiafs_cli("prefetch", "--manifest", str(manifest), *server).returncode == 0  # cached and verified
    victim = files[1]
    with cache_view(cache, emulator.url) as view:
        path = view.cached_path(ref(victim))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same length, another byte
    path.write_bytes(bytes(data))

    emulator.reset_stats()
    done = download("--manifest", str(manifest), *server, str(dest))
    assert done.returncode == 0, done.stderr
    assert emulator.stats()["getSingleImage"] == 1  # that one, again
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in files)
    assert cached(cache, emulator.url, [victim]) == {victim.sop_uid: true_bytes(victim)}  # the cache is fixed too


def test_ctrl_c_leaves_only_complete_files_and_a_rerun_resumes(make_emulator, archive, tmp_path) -> None:
    emu = make_emulator()
    series = cart(archive, 3)
    files = instances(archive, series)
    first = instances(archive, series[:1])
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    server = ("--server", emu.url, "--cache-dir", str(cache))
    whole = write_manifest(tmp_path / "whole.tcia", [s.uid for s in series])
    part = write_manifest(tmp_path / "part.tcia", [series[0].uid])
    assert download("--manifest", str(part), *server, str(dest)).returncode == 0

    emu.inject_fault("getSingleImage", delay=120, count=1000)
    emu.reset_stats()
    proc = interruptible([sys.executable, "-m", "nbiafs", "download", "--manifest", str(whole), *server, str(dest)],
                         env={**os.environ, **TEST_ENV}, cwd=REPO)
    try:
        assert wait_until(lambda: emu.stats()["getSingleImage"] >= 2, 60), "the download never started fetching"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out.startswith("download stopped") and "Traceback" not in err
    assert part_files(dest) == [] and part_files(cache) == []
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in first)
    assert {r["Series UID"] for r in metadata_rows(dest)} == {series[0].uid}

    emu.clear_faults()
    emu.reset_stats()
    done = download("--manifest", str(whole), *server, str(dest))
    assert done.returncode == 0, done.stderr
    assert emu.stats()["getSingleImage"] == len(files) - len(first)
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in files)
    assert {r["Series UID"] for r in metadata_rows(dest)} == {s.uid for s in series}


def _in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["download", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_files_are_copied_when_hard_links_are_refused(emulator, archive, tmp_path, monkeypatch, capsys) -> None:
    series = cart(archive, 1)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])

    def no_link(src, dst, *a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(dst))

    monkeypatch.setattr(downloadcmd.os, "link", no_link)
    code, out, err = _in_process(monkeypatch, capsys, "--manifest", str(manifest), "--server", emulator.url,
                                 "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "dest"))
    assert code == 0, err
    assert f"0 hard-linked, {len(files)} copied" in out
    written = files_under(tmp_path / "dest")
    assert sorted(written.values()) == sorted(true_bytes(i) for i in files)
    assert all(os.stat(tmp_path / "dest" / rel).st_nlink == 1 for rel in written)


def test_a_full_disk_at_dest_is_one_clear_line_and_a_rerun_resumes(emulator, archive, tmp_path, monkeypatch,
                                                                    capsys) -> None:
    series = cart(archive, 2)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    dest = tmp_path / "dest"
    args = ("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(tmp_path / "cache"),
            "--workers", "1", str(dest))
    real_copy = downloadcmd._copy
    copies = []

    def filling_up(src, tmp):
        copies.append(tmp)
        if len(copies) > 3:
            with open(tmp, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real_copy(src, tmp)

    monkeypatch.setattr(downloadcmd.os, "link", lambda *a, **kw: (_ for _ in ()).throw(
        OSError(errno.EXDEV, "Invalid cross-device link")))
    monkeypatch.setattr(downloadcmd, "_copy", filling_up)
    code, out, err = _in_process(monkeypatch, capsys, *args)
    assert code == 1
    assert f"nbiafs: {dest}: No space left on device" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "No space" in line] == [f"nbiafs: {dest}: No space left on device"]
    assert out.startswith(f"download incomplete in {dest}: 3 written")
    assert part_files(dest) == []
    assert len(files_under(dest)) == 3  # complete files only

    monkeypatch.setattr(downloadcmd, "_copy", real_copy)
    code, out, err = _in_process(monkeypatch, capsys, *args)
    assert code == 0, err
    assert f"{len(files) - 3} written" in out and "3 already there" in out
    assert sorted(files_under(dest).values()) == sorted(true_bytes(i) for i in files)


def test_bad_destinations_and_arguments_are_one_clear_line(emulator, archive, tmp_path) -> None:
    manifest = write_manifest(tmp_path / "cart.tcia", [cart(archive, 1)[0].uid])
    server = ("--server", emulator.url, "--cache-dir", str(tmp_path / "cache"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args, message in [
        (("--manifest", str(manifest), *server, str(blocker / "dest")), "cannot create"),
        (("--manifest", str(manifest), *server, str(tmp_path / "x"), str(tmp_path / "dest")), "not both"),
        ((str(tmp_path / "dest"),), "nothing to download"),
    ]:
        done = download(*args)
        assert done.returncode == 1 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_dry_run_writes_nothing_and_says_what_it_would(emulator, archive, tmp_path) -> None:
    series = cart(archive, 2)
    files = instances(archive, series)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in series])
    dest = tmp_path / "dest"
    emulator.reset_stats()
    done = download("--manifest", str(manifest), "--server", emulator.url, "--cache-dir", str(tmp_path / "cache"),
                    "--dry-run", str(dest))
    assert done.returncode == 0, done.stderr
    assert f"would write {len(series)} series, {len(files)} files" in done.stdout and "fits" in done.stdout
    assert not dest.exists() and emulator.stats()["getSingleImage"] == 0
