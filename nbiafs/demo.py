"""The ``demo`` command: the bundled NBIA emulator and its sample archive, mounted, with a short guide.

The emulator runs inside the mount process (so ``nbiafs unmount`` stops both) on a free port of
127.0.0.1; the archive is built once under the user data directory. Everything else is an ordinary
mount (:mod:`nbiafs.mountcmd`), with its cache under the user cache directory's ``demo`` folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import platformdirs

from . import daemon
from .config import Settings, default_cache_dir
from .mountcmd import (
    check_allow_other,
    check_fuse,
    check_mountpoint,
    password_for,
    resolve_args,
    run_child,
    run_mount,
    start_background,
)

log = logging.getLogger(__name__)


def demo_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("nbiafs", appauthor=False)) / "demo-archive"


def _demo_settings(args: argparse.Namespace) -> Settings:
    resolved = resolve_args(args)
    settings = resolved.settings
    if resolved.sources["cache_dir"] == "default":  # the demo's cache stays apart from real servers'
        settings.cache_dir = (default_cache_dir() / "demo").resolve()
    return settings


def demo(args: argparse.Namespace) -> int:
    """``nbiafs demo``: the bundled emulator and its sample archive, mounted, with a short guide."""
    data_dir = demo_data_dir()
    if args.ready_fd is not None:
        return run_child(args, serve=lambda settings, mp, password, reporter: _serve_demo(
            settings, mp, password, reporter, data_dir))
    settings = _demo_settings(args)
    mp = check_mountpoint(args.mountpoint)
    check_fuse()
    check_allow_other(settings)
    password = password_for(settings)
    from .emulator import ensure_archive

    print(f"nbiafs demo: preparing the sample archive in {data_dir} ...", file=sys.stderr, flush=True)
    ensure_archive(data_dir)
    if settings.foreground:
        return _demo_foreground(settings, mp, password, data_dir)
    start_background("demo", mp, settings, password)
    print(demo_guide(mp))
    return 0


def _serve_demo(settings: Settings, mp: str, password: str, reporter: daemon.ReadyReporter | None,
                data_dir: Path) -> int:
    from .emulator.server import Emulator

    with ExitStack() as stack:
        emu = Emulator(data_dir, port=0)
        emu.start()
        stack.callback(emu.stop)
        log.info("emulator serving %s on %s", data_dir, emu.url)
        served = dataclasses.replace(settings, server=str(emu.url))
        return run_mount(served, mp, password, reporter=reporter)


def _demo_foreground(settings: Settings, mp: str, password: str, data_dir: Path) -> int:
    """Foreground demo: serve here; print the guide from a thread once the mount answers."""
    read_fd, write_fd = os.pipe()

    def guide_when_ready() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline().decode().strip()
        if line == daemon.READY:
            print(demo_guide(mp), flush=True)

    threading.Thread(target=guide_when_ready, name="nbiafs-demo-guide", daemon=True).start()
    return _serve_demo(settings, mp, password, daemon.ReadyReporter(write_fd), data_dir)


def demo_guide(mp: str) -> str:
    """What is mounted (first levels), an example series, how to read it and how to unmount."""
    lines = [f"nbiafs demo: the sample archive is mounted on {mp}",
             "(read-only; listings and files are fetched from the bundled emulator on demand and cached on disk)",
             "", f"$ ls {mp}/*"]
    for coll in _visible(mp):
        lines.append(f"{coll}:  " + "  ".join(_visible(os.path.join(mp, coll))))
    series_dir = _example_series(mp)
    if series_dir is not None:
        files = _visible(series_dir)
        lines += ["", f"$ ls -l '{series_dir}' | head -4"]
        lines += _ls_l(series_dir)[:4]
        lines.append(f"... ({len(files)} files)")
        if files:
            example = os.path.join(series_dir, files[0])
            lines += ["", "Read a file with pydicom:",
                      f"$ python -c \"import pydicom; ds = pydicom.dcmread('{example}'); "
                      "print(ds.Modality, ds.PatientID, ds.Rows, ds.Columns)\"",
                      "", "Convert the whole series to NIfTI:",
                      f"$ dcm2niix -o /tmp '{series_dir}'"]
    lines += ["", "Unmount (this also stops the emulator):", f"$ nbiafs unmount {mp}"]
    return "\n".join(lines)


def _visible(path: str) -> list[str]:
    """A folder's entries without the dot-files (nbiafs's metadata beside the images), sorted."""
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def _ls_l(path: str) -> list[str]:
    try:
        done = subprocess.run(["ls", "-l", path], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def _example_series(mp: str) -> str | None:
    """The series with the most files among the first collection's first few patients."""
    best: tuple[int, str] | None = None
    try:
        coll = os.path.join(mp, _visible(mp)[0])
        for patient in _visible(coll)[:3]:
            for study in _visible(os.path.join(coll, patient)):
                for series in _visible(os.path.join(coll, patient, study)):
                    path = os.path.join(coll, patient, study, series)
                    count = len(_visible(path))
                    if best is None or count > best[0]:
                        best = (count, path)
    except (OSError, IndexError):
        return best[1] if best else None
    return best[1] if best else None
