#!/usr/bin/env bash
# Set up everything nbiafs needs on a Debian/Ubuntu machine, idempotently:
#   - system packages through apt (fuse3; with --test also dcmtk and dcm2niix for the reader tests)
#   - a virtual environment in .venv with nbiafs installed in editable mode (with --test: its test extra)
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail

NBIAFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NBIAFS_VENV:-$NBIAFS_ROOT/.venv}"
WANT_TEST=0
for arg in "$@"; do
  [[ "$arg" == "--test" ]] && WANT_TEST=1
done

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_packages=(fuse3)
[[ $WANT_TEST -eq 1 ]] && apt_packages+=(dcmtk dcm2niix)
python_ok() { python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
python_ok || apt_packages+=(python3 python3-venv python3-pip)

missing=()
for pkg in "${apt_packages[@]}"; do
  # fuse3 may be present without dpkg knowing (another distro, a container image): trust the binary.
  [[ "$pkg" == fuse3 ]] && command -v fusermount3 >/dev/null && continue
  [[ "$pkg" == dcmtk ]] && command -v dcmdump >/dev/null && continue
  [[ "$pkg" == dcm2niix ]] && command -v dcm2niix >/dev/null && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "not a Debian/Ubuntu machine: please install ${missing[*]} yourself"
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
extra=""
[[ $WANT_TEST -eq 1 ]] && extra="[test]"
stamp="$VENV/.nbiafs-installed$extra"
if [[ ! -f "$stamp" || "$NBIAFS_ROOT/pyproject.toml" -nt "$stamp" ]]; then
  say "installing nbiafs$extra into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$NBIAFS_ROOT$extra"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
