#!/usr/bin/env bash
# One command from a fresh checkout to a mounted demo archive:
# installs what is needed (scripts/bootstrap.sh), then `nbiafs demo` starts the bundled NBIA
# emulator, mounts its sample archive on MOUNTPOINT (default ~/nbiafs-demo) and shows it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
MOUNTPOINT="${1:-$HOME/nbiafs-demo}"
mkdir -p "$MOUNTPOINT"
if mountpoint -q "$MOUNTPOINT"; then
  say "$MOUNTPOINT is already mounted; unmounting the old demo first"
  nbiafs unmount "$MOUNTPOINT" || fusermount3 -uz "$MOUNTPOINT"
fi
nbiafs demo "$MOUNTPOINT"
