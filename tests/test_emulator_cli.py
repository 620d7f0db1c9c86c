"""``nbiafs emulator`` as a process: announces its URL, serves, obeys control endpoints, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from nbiafs.emulator.command import default_data_dir

REPO = Path(__file__).resolve().parents[1]


def _start(archive_dir: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "emulator", "--port", "0", "--data", str(archive_dir),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not line or not line[0].startswith("NBIA emulator serving "):
        proc.kill()
        proc.wait(10)
        pytest.fail(f"no URL announced: {line!r} {proc.stderr.read()}")
    return proc, line[0].split()[-1]


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_cli_announces_its_url_serves_and_exits_cleanly_on_sigterm(archive_dir: Path) -> None:
    proc, url = _start(archive_dir)
    try:
        r = requests.get(url + "/nbia-api/services/v4/getCollectionValues", timeout=10)
        assert r.status_code == 200 and {"Collection": "Edge-Cases"} in r.json()
        assert requests.get(url + "/emulator/stats", timeout=10).json() == {"getCollectionValues": 1}
        requests.post(url + "/emulator/faults", json={"endpoint": "getCollectionValues", "status": 503}, timeout=10)
        assert requests.get(url + "/nbia-api/services/v4/getCollectionValues", timeout=10).status_code == 503
    finally:
        assert _stop(proc) == 0


def test_cli_password_comes_from_the_environment_override(archive_dir: Path) -> None:
    proc, url = _start(archive_dir, "--refuse-refresh", env={"NBIAFS_EMULATOR_PASSWORD": "s3cret-from-env"})
    try:
        form = {"username": "nbiafs_test", "client_id": "NBIA", "grant_type": "password"}
        assert requests.post(url + "/nbia-api/oauth/token", data={**form, "password": "nbiafs-test-password"},
                             timeout=10).status_code == 401
        reply = requests.post(url + "/nbia-api/oauth/token", data={**form, "password": "s3cret-from-env"},
                              timeout=10)
        assert reply.status_code == 200
        refresh = requests.post(url + "/nbia-api/oauth/token", timeout=10, data={
            "client_id": "NBIA", "grant_type": "refresh_token", "refresh_token": reply.json()["refresh_token"]})
        assert refresh.status_code == 401  # --refuse-refresh
    finally:
        assert _stop(proc) == 0


def test_default_data_dir_is_under_the_user_data_dir() -> None:
    path = default_data_dir()
    assert path.name == "emulator-archive" and path.parent.name == "nbiafs"


def test_cli_reports_a_busy_port_clearly(archive_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "nbiafs", "emulator", "--port", str(port), "--data",
                               str(archive_dir)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


def test_cli_shapes_a_server_without_logins_with_a_profile_and_caps(tmp_path: Path) -> None:
    proc, url = _start(tmp_path / "tiny", "--profile", "synthetic:patients=1,series=2,instances=2,rows=8",
                       "--no-oauth", "--conn-rate", "50M", "--latency", "0")
    try:
        assert requests.get(url + "/nbia-api/services/v4/getCollectionValues", timeout=10).json() == [
            {"Collection": "Synthetic"}]
        form = {"username": "nbia_guest", "password": "", "client_id": "NBIA", "grant_type": "password"}
        assert requests.post(url + "/nbia-api/oauth/token", data=form, timeout=10).status_code == 404
        assert requests.get(url + "/emulator/shaping", timeout=10).json()["per_connection"] == 50_000_000
    finally:
        assert _stop(proc) == 0


def test_cli_without_v4_and_datacite(archive_dir: Path) -> None:
    proc, url = _start(archive_dir, "--no-v4", "--no-datacite")
    try:
        assert requests.get(url + "/nbia-api/services/v4/getCollectionValues", timeout=10).status_code == 404
        assert requests.get(url + "/dois/10.0000/NBIAFS.DEMO-HEAD-MR", timeout=10).status_code == 404
    finally:
        assert _stop(proc) == 0


def test_cli_refuses_a_folder_holding_another_profile_and_bad_flags(archive_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nbiafs", "emulator", "--port", "0", "--data", str(archive_dir),
                           "--profile", "wide:patients=1"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and "holds profile 'sample'" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "nbiafs", "emulator", "--port", "0", "--data", str(archive_dir),
                           "--no-oauth", "--no-v4"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "nbiafs", "emulator", "--conn-rate", "fast"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "bad rate" in done.stderr


def test_default_data_dir_is_one_folder_per_profile() -> None:
    assert default_data_dir("sample") == default_data_dir() == default_data_dir(None)
    ct = default_data_dir("ct200")
    assert ct.parent == default_data_dir().parent and ct != default_data_dir()
    assert default_data_dir("ct200:rows=512") == ct  # the same canonical spec, the same folder
    assert default_data_dir("ct200:rows=64") != ct
