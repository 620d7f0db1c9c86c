#!/usr/bin/env python3
"""Rewrite the options table of docs/usage.md from nbiafs/options.py (tests/test_options.py checks it)."""

from __future__ import annotations

import sys
from pathlib import Path

from nbiafs import options

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def main() -> int:
    text = USAGE.read_text()
    begin = text.index(options.MARKDOWN_BEGIN)
    end = text.index(options.MARKDOWN_END) + len(options.MARKDOWN_END)
    USAGE.write_text(text[:begin] + options.markdown_table() + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
