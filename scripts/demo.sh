#!/usr/bin/env bash
# One command from a fresh checkout to a mounted demo archive:
# installs what is needed (scripts/bootstrap.sh), then `nbiafs demo` starts the bundled NBIA
# emulator, mounts its sample archive on MOUNTPOINT (default ~/nbiafs-demo) and shows it,
# and finally reads one file of the mount with pydicom to show that ordinary programs just work.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
MOUNTPOINT="${1:-$HOME/nbiafs-demo}"
mkdir -p "$MOUNTPOINT"
if mountpoint -q "$MOUNTPOINT"; then
  say "$MOUNTPOINT is already mounted; unmounting the old demo first"
  nbiafs unmount "$MOUNTPOINT" || fusermount3 -uz "$MOUNTPOINT"
fi
nbiafs demo "$MOUNTPOINT"

say "reading the mount with ordinary tools"
first=$(find "$MOUNTPOINT" -name '1-001.dcm' -print -quit)
echo "\$ du -sh $MOUNTPOINT/*"
du -sh "$MOUNTPOINT"/*
echo "\$ python -c 'import pydicom; ds = pydicom.dcmread(\"$first\"); ...'"
python - "$first" <<'PY'
import sys
import pydicom
ds = pydicom.dcmread(sys.argv[1])
print(f"{ds.Modality} {ds.PatientID} {ds.Rows}x{ds.Columns} InstanceNumber={ds.InstanceNumber} "
      f"SeriesDescription={ds.get('SeriesDescription', '')!r}")
PY
echo
echo "nbiafs is installed in $VENV: run 'source $VENV/bin/activate' to use it, e.g."
echo "  nbiafs unmount $MOUNTPOINT"
