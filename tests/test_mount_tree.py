"""Through a real mount of the emulator: the tree, names, sizes and bytes match the archive; API call counts."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from conftest import ls, visible_walk

pytestmark = pytest.mark.fuse

TOKEN_ENDPOINTS = {"token", "logout"}


def api_calls(stats) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k not in TOKEN_ENDPOINTS and v}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def walk(root: Path) -> dict[str, os.stat_result]:
    """Relative path -> lstat of everything under root (stat only, never opens a file)."""
    out = {}
    for dirpath, dirnames, filenames in visible_walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.lstat()
    return out


def expected_series_files(archive, user: str | None = None) -> dict[tuple[str, str, str, str], list]:
    """(collection, patient, study uid, series uid) -> instances sorted by instance number."""
    out = {}
    for coll in archive.visible_collections(user):
        for study in archive.studies_of(coll.name):
            for series in archive.series_of_study(study.uid):
                out[(coll.name, study.patient_id, study.uid, series.uid)] = sorted(
                    archive.instances_of(series.uid), key=lambda i: (i.instance_number, i.sop_uid))
    return out


def retriever_name(*parts: object, uid: str) -> str:
    """The Data Retriever's descriptive name for plain metadata (the test's own, independent version)."""
    kept = [str(p).replace("/", "-").replace("\\", "-").strip() for p in parts if p not in (None, "")]
    return "-".join([*kept, uid[-5:]])


def test_tree_sizes_and_bytes_match_the_archive_in_the_descriptive_layout(emulator, archive, mounter) -> None:
    m = mounter(emulator)
    emulator.reset_stats()  # the session's emulator: other tests' calls are not this mount's
    tree = walk(m.path)
    # every file's size is exact before anything was opened
    assert emulator.stats()["getSingleImage"] == 0
    expected = expected_series_files(archive, "nbia_guest")
    assert ls(m.path) == sorted(c.name for c in archive.visible_collections("nbia_guest"))
    series_dirs = [p for p in tree if p.count(os.sep) == 3]
    assert len(series_dirs) == len(expected)
    seen = set()
    for (coll, patient, study_uid, series_uid), instances in expected.items():
        study_dir = next(p for p in tree if p.count(os.sep) == 2 and p.startswith(f"{coll}/{patient}/")
                         and p.endswith(study_uid[-5:]))
        series_dir = next(p for p in series_dirs if p.startswith(study_dir + "/") and p.endswith(series_uid[-5:]))
        seen.add(series_dir)
        names = sorted(n for n in ls(m.path / series_dir))
        width = max(3, len(str(len(instances))))
        assert names == [f"1-{i:0{width}d}.dcm" for i in range(1, len(instances) + 1)]
        for name, inst in zip(names, instances):
            st = tree[f"{series_dir}/{name}"]
            assert st.st_size == inst.size
            assert (m.path / series_dir / name).read_bytes() == inst.path.read_bytes()
    assert len(seen) == len(expected)  # one folder per series, even with duplicate numbers/descriptions


def test_descriptive_names_follow_the_data_retriever(emulator, archive, mounter) -> None:
    m = mounter(emulator)
    study = next(s for s in archive.studies_of("Demo-Chest-CT", "DCC-0001"))
    series = next(s for s in archive.series_of_study(study.uid) if s.description == "Scout/Localizer")
    study_name = retriever_name(study.date.strftime("%m-%d-%Y"), study.study_id, study.description, uid=study.uid)
    series_name = retriever_name(series.number, series.description, uid=series.uid)
    assert study_name == f"12-12-2003-1001-CT CHEST W-O CONTRAST-{study.uid[-5:]}"
    assert ls(m.path / "Demo-Chest-CT" / "DCC-0001" / study_name / series_name) == [
        "1-001.dcm", "1-002.dcm", "1-003.dcm"]


def test_uid_layout_uses_raw_uids(emulator, archive, mounter) -> None:
    m = mounter(emulator, layout="uid")
    expected = expected_series_files(archive, "nbia_guest")
    for (coll, patient, study_uid, series_uid), instances in list(expected.items())[:4]:
        folder = m.path / coll / patient / study_uid / series_uid
        assert ls(folder) == sorted(f"{i.sop_uid}.dcm" for i in instances)
        inst = instances[0]
        assert (folder / f"{inst.sop_uid}.dcm").stat().st_size == inst.size


def test_names_are_visible_unique_and_stable_across_remounts(emulator, mounter, tmp_path) -> None:
    first = mounter(emulator, cache_dir=tmp_path / "c1")
    listing1 = {p: (st.st_ino, st.st_mtime_ns, st.st_size) for p, st in walk(first.path).items()}
    first.unmount()
    second = mounter(emulator, cache_dir=tmp_path / "c2")  # a fresh cache: names come from the server again
    listing2 = {p: (st.st_ino, st.st_mtime_ns, st.st_size) for p, st in walk(second.path).items()}
    assert listing1 == listing2
    for rel in listing1:
        for part in rel.split(os.sep):
            assert not part.startswith(".") and part.strip() == part and part
    # unique: os.walk would have merged duplicates; compare with the directory entry counts
    for _dirpath, dirnames, filenames in visible_walk(second.path):
        names = dirnames + filenames
        assert len(names) == len(set(names))


def test_each_level_costs_one_metadata_call_and_stat_costs_none(emulator, archive, mounter) -> None:
    m = mounter(emulator, extra=("--no-prefetch", "--no-walk-ahead"))  # each level alone
    emulator.reset_stats()
    ls(m.path)
    assert sum(api_calls(emulator.stats()).values()) == 1
    levels = [m.path / "Demo-Chest-CT", m.path / "Demo-Chest-CT" / "DCC-0001"]
    for level in levels:
        emulator.reset_stats()
        ls(level)
        assert sum(api_calls(emulator.stats()).values()) == 1, api_calls(emulator.stats())
    study = levels[-1] / ls(levels[-1])[0]
    emulator.reset_stats()
    ls(study)
    assert sum(api_calls(emulator.stats()).values()) == 1, api_calls(emulator.stats())
    series = study / ls(study)[0]
    emulator.reset_stats()
    files = ls(series)
    assert sum(api_calls(emulator.stats()).values()) <= 2, api_calls(emulator.stats())
    emulator.reset_stats()
    for name in files:
        os.stat(series / name)
    assert api_calls(emulator.stats()) == {}
    # first read of a file: one getSingleImage; reading it again: nothing
    data = (series / files[0]).read_bytes()
    assert api_calls(emulator.stats()) == {"getSingleImage": 1}
    emulator.reset_stats()
    assert (series / files[0]).read_bytes() == data
    assert api_calls(emulator.stats()) == {}


def test_unknown_names_are_enoent_without_repeated_calls(emulator, mounter) -> None:
    m = mounter(emulator)
    ls(m.path / "Demo-Chest-CT")
    emulator.reset_stats()
    for _ in range(3):
        for missing in (m.path / "No-Such-Collection", m.path / "Demo-Chest-CT" / "NOPE-0001",
                        m.path / "Demo-Chest-CT" / ".hidden"):
            with pytest.raises(FileNotFoundError):
                os.stat(missing)
    assert api_calls(emulator.stats()) == {}


def test_remount_with_the_same_cache_needs_no_api_calls(emulator, mounter, tmp_path) -> None:
    cache = tmp_path / "shared-cache"
    first = mounter(emulator, cache_dir=cache)
    hashes = {p: sha((first.path / p).read_bytes()) for p, st in walk(first.path).items()
              if not os.path.isdir(first.path / p)}
    first.unmount()
    second = mounter(emulator, cache_dir=cache)
    emulator.reset_stats()
    again = {p: sha((second.path / p).read_bytes()) for p, st in walk(second.path).items()
             if not os.path.isdir(second.path / p)}
    assert again == hashes
    assert api_calls(emulator.stats()) == {}


def test_read_ahead_follows_a_reader_walking_a_series_and_the_cache_outlives_the_mount(
        emulator, mounter, tmp_path) -> None:
    import json

    cache = tmp_path / "prefetch-cache"
    m = mounter(emulator, cache_dir=cache)
    series = m.path / "Demo-Head-MR" / "DHM-0001"
    series = series / ls(series)[0]
    series = next(series / d for d in ls(series) if d.startswith("5-"))
    names = ls(series)
    emulator.reset_stats()
    (series / names[0]).read_bytes()
    assert emulator.stats()["getSingleImage"] == 1  # the first open of a series fetches that file only
    for name in names[1:]:  # a reader walking in order: the files ahead of it are fetched before it asks
        (series / name).read_bytes()
    assert emulator.stats()["getSingleImage"] == len(names)  # each once, read-ahead and opens together
    stats = json.loads((m.path / ".nbiafs" / "stats.json").read_text())
    assert stats["prefetches"] > 0 and stats["fetches"] == len(names)
    m.unmount()
    again = mounter(emulator, cache_dir=cache, extra=("--no-prefetch",))
    emulator.reset_stats()
    rel = series.relative_to(m.path)
    for name in names:
        (again.path / rel / name).read_bytes()
    assert emulator.stats()["getSingleImage"] == 0


def test_opening_a_missing_name_is_enoent(emulator, mounter) -> None:
    m = mounter(emulator)
    with pytest.raises(OSError) as e:
        os.open(m.path / "nope", os.O_RDONLY)
    assert e.value.errno == errno.ENOENT


def test_cp_r_reads_a_series_in_its_reading_order_so_the_read_ahead_follows_it(
        make_emulator, archive, mounter, tmp_path) -> None:
    """cp -r copies a folder's files in inode order (coreutils sorts them so for the disk): the files of
    a series are numbered in name order, so it reads them as a reader walking the series would."""
    import json
    import shutil
    import subprocess

    emu = make_emulator()
    m = mounter(emu)
    series = m.path / "Demo-Head-MR" / "DHM-0001"
    series = series / ls(series)[0]
    series = next(series / d for d in ls(series) if d.startswith("5-"))
    names = ls(series)
    by_inode = sorted((e for e in os.scandir(series) if not e.name.startswith(".")), key=lambda e: e.inode())
    assert [e.name for e in by_inode] == names
    if shutil.which("cp") is None:
        pytest.skip("no cp")
    done = subprocess.run(["cp", "-r", str(series), str(tmp_path / "copy")], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "copy").iterdir() if not p.name.startswith(".")) == names
    stats = json.loads((m.path / ".nbiafs" / "stats.json").read_text())
    assert stats["prefetches"] > 0  # files came ahead of cp: it walked the series in order
