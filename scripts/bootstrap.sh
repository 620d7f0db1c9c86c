#!/usr/bin/env bash
# Set up everything nbiafs needs on a Debian/Ubuntu machine, idempotently:
#   - system packages through apt (fuse3; with --test also libfuse2, dcmtk, dcm2niix and nginx)
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

# fuse3 is what nbiafs mounts with. The tests also install libfuse2 (and nginx for the shared-cache
# tests): Ubuntu desktops ship libfuse2 for AppImages, and nbiafs must load libfuse3 with both present.
apt_packages=(fuse3)
# systemd only for systemd-analyze and systemd-escape, which check the shipped unit (it need not run).
[[ $WANT_TEST -eq 1 ]] && apt_packages+=(libfuse2 dcmtk dcm2niix nginx strace attr systemd)
python_ok() { python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
python_ok || apt_packages+=(python3 python3-venv python3-pip)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in "${apt_packages[@]}"; do
  # Present without dpkg knowing (another distro, a container image): trust the binary or library.
  case "$pkg" in
    fuse3) command -v fusermount3 >/dev/null && continue ;;
    libfuse2) { installed libfuse2 || installed libfuse2t64 || ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2'; } && continue ;;
    dcmtk) command -v dcmdump >/dev/null && continue ;;
    dcm2niix) command -v dcm2niix >/dev/null && continue ;;
    nginx) command -v nginx >/dev/null && continue ;;
    strace) command -v strace >/dev/null && continue ;;
    attr) command -v getfattr >/dev/null && continue ;;
    systemd) command -v systemd-analyze >/dev/null && command -v systemd-escape >/dev/null && continue ;;
  esac
  installed "$pkg" || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if command -v apt-get >/dev/null; then
    as_root apt-get update -qq
    # Ubuntu 24.04 and Debian 13 renamed libfuse2 to libfuse2t64 (the 64-bit time_t transition).
    for i in "${!missing[@]}"; do
      if [[ "${missing[$i]}" == libfuse2 ]] && apt-cache show libfuse2t64 >/dev/null 2>&1; then
        missing[$i]=libfuse2t64
      fi
    done
    say "installing system packages: ${missing[*]}"
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
