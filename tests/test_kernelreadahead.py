"""The kernel's read-ahead of the mount: set through sysfs when allowed, left alone otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbiafs import daemon, kernelreadahead


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "bdi"
    (root / "0:99").mkdir(parents=True)
    (root / "0:99" / "read_ahead_kb").write_text("128\n")
    monkeypatch.setattr(daemon, "mount_device", lambda mp: "0:99" if str(mp) == "/mnt/x" else None)
    return root


def test_the_read_ahead_of_the_mounts_own_device_is_set(sysfs: Path) -> None:
    assert kernelreadahead.set_read_ahead("/mnt/x", 1 << 20, sysfs=sysfs) == 1024
    assert (sysfs / "0:99" / "read_ahead_kb").read_text().strip() == "1024"


def test_zero_leaves_the_kernels_value_and_an_unknown_mount_changes_nothing(sysfs: Path) -> None:
    assert kernelreadahead.set_read_ahead("/mnt/x", 0, sysfs=sysfs) == 128
    assert kernelreadahead.set_read_ahead("/mnt/other", 1 << 20, sysfs=sysfs) is None
    assert (sysfs / "0:99" / "read_ahead_kb").read_text().strip() == "128"


def test_a_refused_write_keeps_the_value_and_says_how_to_raise_it(sysfs: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    def refuse(self: Path, text: str) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    with caplog.at_level("INFO", logger="nbiafs.kernelreadahead"):
        assert kernelreadahead.set_read_ahead("/mnt/x", 1 << 20, sysfs=sysfs) == 128
    assert "echo 1024 >" in caplog.text and "Permission denied" in caplog.text


@pytest.mark.fuse
def test_a_mount_run_as_root_reads_a_mebibyte_at_a_time(emulator, mounter) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may set a device's read-ahead")
    m = mounter(emulator)
    device = daemon.mount_device(m.path)
    assert device is not None
    assert Path("/sys/class/bdi", device, "read_ahead_kb").read_text().strip() == "1024"
    kept = mounter(emulator, extra=("--kernel-read-ahead", "0"))
    assert Path("/sys/class/bdi", daemon.mount_device(kept.path) or "?", "read_ahead_kb").read_text().strip() != "1024"
