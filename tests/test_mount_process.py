"""Through a real mount: the mount process itself (its secrets, finding it, stopping it while it works,
who may read it) and waits that end by the deadline."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TEST_ENV,
    first_series,
    ls,
    nbiafs_cli,
    require_tool,
    series_of_count,
    teardown_mount,
    wait_until,
)

from nbiafs import control, daemon, fs
from nbiafs.emulator import TEST_PASSWORD, TEST_USER

pytestmark = pytest.mark.fuse

NOBODY = 65534


def errno_of(action) -> int:
    with pytest.raises(OSError) as info:
        action()
    return info.value.errno


# ---------------------------------------------------------------------------------- secrets
def test_the_password_reaches_the_mount_process_neither_by_its_environment_nor_its_command_line(
        emulator, mounter) -> None:
    m = mounter(emulator, user=TEST_USER, password=TEST_PASSWORD)
    assert "Restricted-Demo" in " ".join(ls(m.path))  # the account works
    secret = TEST_PASSWORD.encode()
    for pid in m.pids:
        assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"NBIA_PASSWORD" not in Path(f"/proc/{pid}/environ").read_bytes()


def test_a_refused_password_stops_the_refresher_and_later_calls_are_eacces(make_emulator, archive, mounter) -> None:
    emu = make_emulator(token_ttl=2, refuse_refresh=True)
    m = mounter(emu, user=TEST_USER, password=TEST_PASSWORD, extra=("--no-prefetch",))
    collections = ls(m.path)
    log = Path(m.args[m.args.index("--log-file") + 1])
    emu.change_password(TEST_USER, "changed-elsewhere")  # the refresher's next password grant is refused
    assert wait_until(lambda: "refused the password" in log.read_text(), 20)
    tried = emu.stats()["token"]
    assert errno_of(lambda: ls(m.path / collections[-1])) == errno.EACCES
    # Time passing is what is tested here: a locked-out account is not retried every few seconds.
    threading.Event().wait(4)  # two token lifetimes and the refresher's first backoffs
    assert emu.stats()["token"] == tried
    assert "ERROR" in log.read_text() and "with the right password" in log.read_text()


# ---------------------------------------------------------------------------------- the process
def test_a_foreground_mount_with_options_before_the_mount_point_is_found_and_unmounted(emulator, tmp_path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "mount", "--server", emulator.url, "--foreground",
                             "--cache-dir", str(tmp_path / "c"), str(mp)], cwd=REPO,
                            env={**os.environ, **TEST_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: daemon.mount_entry(mp) is not None and daemon.mount_processes(mp), 30)
        assert daemon.mount_processes(mp) == [proc.pid]
        assert ls(mp)
        done = nbiafs_cli("unmount", str(mp))
        assert done.returncode == 0, done.stderr
        assert proc.wait(timeout=30) == 0
        assert daemon.mount_processes(mp) == []  # its run record went with it
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        teardown_mount(mp, [])


@pytest.mark.parametrize("way", ["singles", "zip"])
def test_unmount_during_a_running_prefetch_returns_within_ten_seconds_and_the_process_ends(
        make_emulator, mounter, way) -> None:
    emu = make_emulator(latency=0.3)  # a distant server: reading ahead takes a while
    m = mounter(emu, extra=("--no-series-zip",) if way == "singles" else ())
    series = series_of_count(m.path, "Demo-Chest-CT", "DCC-0001", 120)
    names = ls(series)
    if way == "zip":
        emu.set_shaping(per_connection=100_000)  # the series zip streams for a minute
    for name in names[:4]:  # a reader walking the series in order: the store reads ahead
        (series / name).read_bytes()
    # every fetch that has not got its answer yet stalls, the prefetches in flight among them
    emu.inject_fault("getSingleImage", delay=120, count=10_000)
    if way == "zip":
        assert emu.stats()["getImage"] == 1, "no zip ran"
    else:
        assert emu.stats()["getSingleImage"] > 4, "no prefetch ran"
    started = time.monotonic()
    done = nbiafs_cli("unmount", str(m.path))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert all(daemon.wait_for_exit(pid, 0) for pid in m.pids)
    emu.clear_faults()


# ---------------------------------------------------------------------------------- who may read
def test_uid_gid_and_umask_are_what_stat_shows(emulator, mounter) -> None:
    m = mounter(emulator, extra=("--uid", "1234", "--gid", "2345", "--umask", "027"))
    series = first_series(m.path)
    file = series / ls(series)[0]
    for path, mode in ((m.path, 0o550), (series, 0o550), (file, 0o440)):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, mode), path


def test_other_users_read_only_with_allow_other(emulator, tmp_path) -> None:
    # pytest's temporary folders are private to root: mount where nobody can walk to the mount points
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="nbiafs-allow-other-"))
    top.chmod(0o755)
    mounts: list[tuple[Path, list[int]]] = []
    try:
        for name, extra in (("private", ()), ("shared", ("--allow-other",))):
            mp = top / name
            mp.mkdir()
            done = nbiafs_cli("mount", str(mp), "--server", emulator.url, "--cache-dir", str(tmp_path / name), *extra)
            assert done.returncode == 0, done.stderr
            mounts.append((mp, daemon.mount_processes(mp)))
        options = {line.split()[4]: line for line in Path("/proc/self/mountinfo").read_text().splitlines()}
        assert "allow_other" in options[str(top / "shared")] and "allow_other" not in options[str(top / "private")]
        for mp, _ in mounts:
            series = first_series(mp)
            file = series / ls(series)[0]
            done = subprocess.run(["cat", str(file)], capture_output=True, timeout=60,
                                  preexec_fn=lambda: (os.setgid(NOBODY), os.setuid(NOBODY)))
            if mp.name == "shared":
                assert done.returncode == 0 and done.stdout == file.read_bytes(), done.stderr
            else:
                assert done.returncode != 0 and b"Permission denied" in done.stderr, done.stderr
    finally:
        for mp, pids in mounts:
            teardown_mount(mp, pids)
        for child in top.iterdir():
            child.rmdir()
        top.rmdir()


def test_allow_other_without_user_allow_other_is_a_clear_error_for_a_non_root_user(tmp_path, monkeypatch) -> None:
    from nbiafs.config import Settings
    from nbiafs.errors import ConfigError
    from nbiafs.mountcmd import check_allow_other

    conf = tmp_path / "fuse.conf"
    conf.write_text("# mount_max = 1000\n#user_allow_other\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # root may always; the rule is for everyone else
    with pytest.raises(ConfigError, match="user_allow_other"):
        check_allow_other(Settings(allow_other=True), fuse_conf=str(conf))
    conf.write_text("user_allow_other\n")
    check_allow_other(Settings(allow_other=True), fuse_conf=str(conf))
    check_allow_other(Settings(allow_other=False), fuse_conf=str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------- deadlines
def test_a_hanging_token_endpoint_holds_an_open_for_the_deadline_not_minutes(make_emulator, mounter) -> None:
    emu = make_emulator()
    m = mounter(emu, extra=("--api", "v2", "--no-prefetch"), env={"NBIAFS_DEADLINE": "3"})
    series = first_series(m.path)
    file = series / ls(series)[0]
    emu.expire_tokens()
    emu.inject_fault("token", delay=120, count=100)  # every login from now on hangs
    started = time.monotonic()
    assert errno_of(file.read_bytes) == errno.EIO
    assert time.monotonic() - started < 3 + 4  # the deadline, plus the kernel's and the mount's own slack


# ---------------------------------------------------------------------------------- threads and the cache database
def test_warm_opens_open_the_cache_database_a_bounded_number_of_times(emulator, mounter, tmp_path) -> None:
    """libfuse gave every callback a fresh Python thread state: thread-local SQLite connections were
    opened again and again (a warm remount opened cache.db 24 times for 120 opens). Counted with strace
    on the real mount process."""
    require_tool("strace", "strace")
    cache = tmp_path / "cache"
    first = mounter(emulator, cache_dir=cache)
    series = series_of_count(first.path, "Demo-Chest-CT", "DCC-0001", 120)
    relative = series.relative_to(first.path)
    for name in ls(series):
        (series / name).read_bytes()
    first.unmount()
    warm = mounter(emulator, cache_dir=cache)
    series = warm.path / relative
    names = ls(series)
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace),
                               "-p", str(warm.pids[0])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: trace.exists() and trace.stat().st_size >= 0 and _attached(warm.pids[0]), 10)
        for name in names:  # 120 warm opens, each on whichever libfuse thread the kernel picks
            with open(series / name, "rb") as fh:
                fh.read(16)
    finally:
        tracer.terminate()
        tracer.wait(30)
    opened = [line for line in trace.read_text().splitlines() if "cache.db" in line and "= -1" not in line]
    assert len(opened) <= 2, f"cache.db opened {len(opened)} times for {len(names)} warm opens"


def test_libfuse_threads_keep_their_python_thread_state_from_one_request_to_the_next(emulator, mounter) -> None:
    """Each request on a libfuse thread used to build a Python thread state and delete it again (most
    of a warm open's cost, see nbiafs.threadstate). Kept, a later request on the same thread finds
    its state; were it built again, no request would (every one would keep a new one, up to the bound)."""
    m = mounter(emulator, extra=("--no-prefetch",))
    series = first_series(m.path)
    file = series / ls(series)[0]
    file.read_bytes()
    for _ in range(200):  # 200 requests (an open is not one where the kernel opens files itself)
        os.getxattr(file, "user.nbia.uid")
    counts = control.request(daemon.control_socket_path(m.path), {"op": "stats"}, timeout=30)["thread_states"]
    assert 1 <= counts["kept"] <= fs.MAX_THREADS
    assert counts["reused"] >= 200 - counts["kept"]


def _attached(pid: int) -> bool:
    """True once a tracer is attached to ``pid`` (its TracerPid is set)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in status.splitlines())


def test_the_background_process_has_the_settings_of_the_config_file_given_not_the_default_ones(
        emulator, mounter, tmp_path) -> None:
    """The default config file turns metadata files off, the one given with --config does not: the
    mount process must show them (a default is passed on as no flag at all)."""
    home = tmp_path / "xdg"
    (home / "nbiafs").mkdir(parents=True)
    (home / "nbiafs" / "config.toml").write_text("metadata-files = false\n")
    given = tmp_path / "given.toml"
    given.write_text("layout = \"descriptive\"\n")
    env = {"XDG_CONFIG_HOME": str(home)}
    m = mounter(emulator, extra=("--config", str(given)), env=env)
    assert ".nbiafs" in os.listdir(m.path)
    plain = mounter(emulator, env=env)  # and the default file is read when none is given
    assert ".nbiafs" not in os.listdir(plain.path)
