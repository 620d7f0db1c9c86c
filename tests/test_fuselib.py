"""nbiafs binds libfuse3 whatever else is installed, and passes only options the loaded libfuse knows."""

from __future__ import annotations

import ctypes.util
import glob
import os
import subprocess
import sys

import pytest
from conftest import on_ci

from nbiafs import fuselib


def _libfuse2() -> str | None:
    found = ctypes.util.find_library("fuse")
    if found and fuselib.library_version(found) and fuselib.library_version(found)[0] == 2:
        return found
    for path in glob.glob("/lib/*/libfuse.so.2*") + glob.glob("/usr/lib/*/libfuse.so.2*"):
        return path
    return None


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_libfuse2_is_installed_beside_libfuse3_where_the_tests_run() -> None:
    # scripts/test.sh installs both, so CI proves every mount test with both present (as on Ubuntu).
    if _libfuse2() is None or fuselib.find_libfuse3() is None:
        if on_ci():
            pytest.fail("CI must have libfuse2 and libfuse3 installed (scripts/test.sh installs both)")
        pytest.skip("libfuse2 or libfuse3 missing here")


def test_mfusepy_binds_libfuse3_even_when_libfuse2_is_found_first() -> None:
    if fuselib.find_libfuse3() is None:
        pytest.skip("no libfuse3")
    # mfusepy on its own takes libfuse2 when it is installed: nbiafs must not let it.
    done = _run("from nbiafs import fuselib; m = fuselib.load(); import os; "
                "print(fuselib.loaded_version(m)[0], os.environ.get('FUSE_LIBRARY_PATH'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "None"]  # and the environment is left as it was


def test_a_user_fuse_library_path_naming_libfuse2_is_ignored_for_libfuse3() -> None:
    two = _libfuse2()
    if two is None or fuselib.find_libfuse3() is None:
        pytest.skip("needs libfuse2 and libfuse3")
    done = _run("from nbiafs import fuselib; m = fuselib.load(); import os; "
                "print(fuselib.loaded_version(m)[0], os.environ['FUSE_LIBRARY_PATH'])",
                env={"FUSE_LIBRARY_PATH": two})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", two]


def test_mfusepy_already_bound_to_libfuse2_is_refused_with_the_package_to_install() -> None:
    two = _libfuse2()
    if two is None:
        pytest.skip("needs libfuse2")
    done = _run("import mfusepy\nfrom nbiafs import fuselib\ntry:\n    fuselib.load()\n"
                "except fuselib.FuseUnavailableError as e:\n    print(e)\n",
                env={"FUSE_LIBRARY_PATH": two})
    assert done.returncode == 0, done.stderr
    assert "libfuse 2." in done.stdout and "apt install fuse3" in done.stdout


def test_no_libfuse3_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuselib, "find_libfuse3", lambda: None)
    monkeypatch.delitem(sys.modules, "mfusepy", raising=False)
    with pytest.raises(fuselib.FuseUnavailableError, match="apt install fuse3"):
        fuselib.load()


def test_options_are_checked_against_the_loaded_version() -> None:
    options = {"ro": True, "max_threads": 64, "max_idle_threads": 16}
    assert fuselib.check_options(options, (3, 14)) == options
    assert fuselib.check_options(options, (3, 10)) == {"ro": True, "max_idle_threads": 16}  # Ubuntu 22.04
    with pytest.raises(fuselib.FuseUnavailableError):
        fuselib.check_options(options, (2, 9))


def test_mount_options_follow_the_version() -> None:
    from nbiafs import fs

    assert "max_threads" in fs.mount_options(60.0, version=(3, 14))
    assert "max_threads" not in fs.mount_options(60.0, version=(3, 10))
    assert fs.mount_options(60.0)["ro"] is True  # the loaded libfuse (3.x here)
