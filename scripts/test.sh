#!/usr/bin/env bash
# One command to run the whole test suite from a fresh checkout: installs system packages
# (fuse3 and libfuse2, dcmtk, dcm2niix, nginx, strace, attr, systemd for its unit checkers), a .venv with nbiafs and its test extra, checks the code
# with ruff and mypy, then runs pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k naming).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" --test
cd "$NBIAFS_ROOT"
say "checking the code (ruff, mypy)"
ruff check nbiafs tests scripts
mypy
say "running the tests"
exec python -m pytest -q -p no:cacheprovider "$@"
