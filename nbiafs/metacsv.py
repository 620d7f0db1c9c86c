"""``metadata.csv`` beside a download, as the NBIA Data Retriever writes it.

What it owns: the columns (the Data Retriever's, in its order), one row per downloaded series made
from the server's series metadata (v4 ``getSeriesMetadata``; the ``getSeries`` record on a server
without v4) and from the files written (their count, total size, location, and the SOP class read
from the first file's header), and merging with the rows of an earlier, interrupted run (a resumed
download keeps one row per series, the newest).

The server's column names differ from the retriever's (``Patient ID`` is ``Subject ID``, ``Project`` is
``Collection``...): :data:`FROM_SERVER` maps them. Values are written as the retriever writes them:
dates ``MM-DD-YYYY``, sizes in MB with two decimals, the location relative to the download folder
(``./Collection/Patient/Study/Series``), the timestamp ISO 8601.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = (
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
)
#: The Data Retriever's column <- the v4 getSeriesMetadata column.
FROM_SERVER = {
    "Series UID": "Series Instance UID", "Collection": "Project", "3rd Party Analysis": "Third Party Analysis",
    "Data Description URI": "Collection URI", "Subject ID": "Patient ID", "Study UID": "Study Instance UID",
    "Study Description": "Study Description", "Study Date": "Study Date", "Series Description": "Series Description",
    "Manufacturer": "Manufacturer", "Modality": "Modality",
}
NAME = "metadata.csv"


def server_row(record: Any) -> dict[str, str]:
    """The server's facts of one series from a ``records.Series`` (servers without v4)."""
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, (dt.date, dt.datetime)):
            return value.strftime("%m-%d-%Y")
        return str(value)

    return {"Series Instance UID": text(record.series_uid), "Project": text(record.collection),
            "Patient ID": text(record.patient_id), "Study Instance UID": text(record.study_uid),
            "Series Description": text(record.description), "Manufacturer": text(record.manufacturer),
            "Modality": text(record.modality), "Collection URI": text(record.collection_uri),
            "Series Date": text(record.date)}


def sop_class(first_file: Path) -> tuple[str, str]:
    """(SOP Class Name, SOP Class UID) from a DICOM file's header; blanks when unreadable."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(first_file), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        uid = ds.get("SOPClassUID")
        if uid is None:
            return "", ""
        return str(getattr(uid, "name", "") or ""), str(uid)
    except Exception as exc:  # noqa: BLE001 - a header we cannot read leaves two blank cells
        log.info("no SOP class in %s: %s", first_file, exc)
        return "", ""


def row(server: Mapping[str, str], *, dest: Path, series_dir: Path, files: list[Path],
        when: dt.datetime | None = None) -> dict[str, str]:
    """One metadata.csv row for the series downloaded into ``series_dir`` (its ``files``)."""
    out = {column: str(server.get(source, "") or "") for column, source in FROM_SERVER.items()}
    name, uid = sop_class(files[0]) if files else ("", "")
    size = sum(f.stat().st_size for f in files)
    stamp = (when or dt.datetime.now()).isoformat(timespec="milliseconds")
    location = "./" + series_dir.relative_to(dest).as_posix()
    out.update({"SOP Class Name": name, "SOP Class UID": uid, "Number of Images": str(len(files)),
                "File Size": f"{size / 1e6:.2f} MB", "File Location": location, "Download Timestamp": stamp})
    return {column: out.get(column, "") for column in COLUMNS}


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an existing metadata.csv by Series UID ({} when there is none or it is unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {r["Series UID"]: r for r in csv.DictReader(fh) if r.get("Series UID")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def write(dest: Path, rows: Iterable[Mapping[str, str]]) -> Path:
    """Merge ``rows`` into ``dest/metadata.csv`` (newest row per series wins), written atomically."""
    path = dest / NAME
    merged = read_rows(path)
    for r in rows:
        merged[r["Series UID"]] = dict(r)
    tmp = path.with_name(f".{NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in sorted(merged.values(), key=lambda r: r.get("File Location", "")):
            writer.writerow(r)
    os.replace(tmp, path)
    return path
