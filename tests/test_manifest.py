"""TCIA manifests: parsing, where their series live (v4 and v2 servers), and a manifest mount."""

from __future__ import annotations

from pathlib import Path

import pytest
from cmdlib import HEADER
from conftest import ls, visible_walk

from nbiafs.client import NbiaClient
from nbiafs.errors import ConfigError
from nbiafs.manifest import parse_manifest, read_manifest, resolve_scope


def write_manifest(path: Path, uids: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "\n".join(uids) + "\n")
    return path


def test_a_portal_manifest_parses_to_its_header_and_series() -> None:
    m = parse_manifest("\ufeff" + HEADER.replace("\n", "\r\n") + "1.2.3\r\n\r\n  1.2.4  \r\n1.2.3\r\n")
    assert m.series == ("1.2.3", "1.2.4")  # in file order, each once
    assert m.header["manifestVersion"] == "3.0"
    assert m.server_hint == "https://nbia.cancerimagingarchive.net"


def test_a_bare_list_of_uids_is_a_manifest_too() -> None:
    assert parse_manifest("1.2.3\n1.2.4\n").series == ("1.2.3", "1.2.4")


@pytest.mark.parametrize(("text", "message"), [
    (HEADER + "1.2.3\n<html>oops\n", "line 8"),
    (HEADER, "no series"),
    ("just some words\n", "not a SeriesInstanceUID"),
    (HEADER + "1.2.3\n1.2." + "3" * 70 + "\n", "line 8"),
])
def test_anything_that_is_not_a_manifest_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(text)


def test_a_missing_or_binary_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "absent.tcia")
    (tmp_path / "bin.tcia").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a text file"):
        read_manifest(tmp_path / "bin.tcia")


def _some_series(archive, count: int = 3) -> list:
    public = {c.name for c in archive.visible_collections("nbia_guest")}
    return [s for s in archive.series if s.collection in public][:: max(1, len(archive.series) // 8)][:count]


@pytest.mark.parametrize("shape", [{}, {"v4": False}], ids=["v4", "v2 only"])
def test_series_are_placed_by_asking_the_server(make_emulator, archive, shape) -> None:
    emu = make_emulator(**shape)
    chosen = _some_series(archive)
    client = NbiaClient(emu.url, retries=1, backoff=0.01, deadline=20)
    try:
        scope = resolve_scope(client, [s.uid for s in chosen] + ["1.2.3.4.5.404"])
    finally:
        client.close()
    assert scope.missing == ["1.2.3.4.5.404"]
    for s in chosen:
        place = scope.series[s.uid]
        assert (place.collection, place.patient_id, place.study_uid) == (s.collection, s.patient_id, s.study_uid)
    calls = emu.stats()
    if shape.get("v4", True):
        assert calls["getSeriesMetadata"] == 1 and calls["getSeries"] == 0  # one call for the whole cart
    else:
        assert calls["getSeries"] == len(chosen) + 1


@pytest.mark.fuse
def test_a_manifest_mount_shows_only_its_series_and_their_parents(emulator, archive, mounter, tmp_path) -> None:
    chosen = _some_series(archive)
    manifest = write_manifest(tmp_path / "cart.tcia", [s.uid for s in chosen])
    full = mounter(emulator, extra=("--layout", "uid"))
    cart = mounter(emulator, extra=("--layout", "uid", "--manifest", str(manifest)))
    shown = set()
    for dirpath, dirnames, _files in visible_walk(cart.path):
        for name in dirnames:
            shown.add(str(Path(dirpath, name).relative_to(cart.path)))
    series_dirs = {p for p in shown if p.count("/") == 3}
    assert series_dirs == {f"{s.collection}/{s.patient_id}/{s.study_uid}/{s.uid}" for s in chosen}
    assert {p.split("/")[0] for p in shown} == {s.collection for s in chosen}
    for rel in series_dirs:  # the same files, names and sizes as the full mount
        assert ls(cart.path / rel) == ls(full.path / rel)
        name = ls(cart.path / rel)[0]
        assert (cart.path / rel / name).read_bytes() == (full.path / rel / name).read_bytes()


def test_a_bad_manifest_fails_the_mount_with_one_line(emulator, tmp_path) -> None:
    from conftest import nbiafs_cli

    bad = tmp_path / "bad.tcia"
    bad.write_text(HEADER + "not a uid\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--manifest", str(bad))
    assert done.returncode == 1 and "line 7" in done.stderr and len(done.stderr.strip().splitlines()) == 1
