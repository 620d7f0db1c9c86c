"""metadata.csv as the NBIA Data Retriever writes it, and picking series under paths of the tree."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

from fakes import FakeNbiaClient, build_archive

from nbiafs import metacsv
from nbiafs.catalog import Catalog
from nbiafs.metacache import MetadataCache
from nbiafs.selection import pick, totals


def test_rows_have_the_retrievers_columns_and_values(tmp_path: Path) -> None:
    series_dir = tmp_path / "Coll" / "P1" / "study" / "series"
    series_dir.mkdir(parents=True)
    files = []
    for n in range(3):
        f = series_dir / f"1-00{n + 1}.dcm"
        f.write_bytes(b"x" * 1_000_000)
        files.append(f)
    server = {"Series Instance UID": "1.2.3", "Project": "Coll", "Patient ID": "P1", "Study Instance UID": "1.2",
              "Study Date": "12-31-2003", "Study Description": "chest, with contrast", "Modality": "CT",
              "Collection URI": "https://doi.org/10.1/x", "Third Party Analysis": "NO"}
    r = metacsv.row(server, dest=tmp_path, series_dir=series_dir, files=files, when=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert tuple(r) == metacsv.COLUMNS
    assert r["Subject ID"] == "P1" and r["Collection"] == "Coll" and r["Data Description URI"] == "https://doi.org/10.1/x"
    assert r["Number of Images"] == "3" and r["File Size"] == "3.00 MB"
    assert r["File Location"] == "./Coll/P1/study/series" and r["Download Timestamp"] == "2026-01-02T03:04:05.000"
    path = metacsv.write(tmp_path, [r])
    again = dict(r, **{"Download Timestamp": "later"})
    metacsv.write(tmp_path, [again])  # a resumed download: one row per series, the newest
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["Download Timestamp"] == "later"
    assert rows[0]["Study Description"] == "chest, with contrast"


def test_picking_a_folder_takes_every_series_below_and_a_file_only_itself() -> None:
    fake = FakeNbiaClient(build_archive())
    cat = Catalog(fake, MetadataCache(None, "ns", ttl=60))
    collection = cat.children("/")[0]
    everything = pick(cat, [collection.path])
    assert everything and all(p.series.kind == "series" and p.files for p in everything)
    one_series = everything[0]
    one_file = one_series.files[1]
    picked = pick(cat, [one_file.path])
    assert len(picked) == 1 and picked[0].files == [one_file]
    both = pick(cat, [one_file.path, one_series.series.path])  # the whole series wins, each series once
    assert len(both) == 1 and len(both[0].files) == len(one_series.files)
    series, files, size = totals(everything)
    assert series == len(everything) and files == sum(len(p.files) for p in everything) and size > 0
