"""CSV as the NBIA server writes it (``FormatOutput.toCsvQuoted``): a header row, every field quoted.

Quoting every field is what lets hostile descriptions (commas, quotes, newlines, ``<MPR Range[1]>``)
survive a round trip through any CSV reader. Lines end with CRLF (RFC 4180).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if value is None else str(value) for value in row])
    return out.getvalue()
