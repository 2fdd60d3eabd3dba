"""The `pvw-hpc` command run as a real process, in-process mode (no server) and against --url."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvw_hpc import procs
from pvw_hpc.auth import hash_token

REPO = Path(__file__).resolve().parents[1]
PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")
TOKEN = "cli-test-admin-token"  # noqa: S105 - a test credential


def run(*args: str, config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if config is not None:
        env["PVW_HPC_CONFIG"] = str(config)
    return subprocess.run([PVW_HPC, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def config() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="pvw-cli-", dir="/tmp"))
    path = root / "launcher.json"
    path.write_text(json.dumps({
        "configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview",
                          "proxy_file": str(root / "proxy.txt"), "sessionURL": "ws://${host}:${port}/ws",
                          "timeout": 10, "log_dir": str(root / "logs"), "fields": [],
                          "auth": {"anonymous": True, "tokens": [{"name": "ops", "sha256": hash_token(TOKEN),
                                                                   "roles": ["admin"]}]}},
        "resources": [{"host": "127.0.0.1", "port_range": [23100, 23119]}],
        "properties": {"py": sys.executable, "demo": str(REPO / "examples/demo/app.py")},
        "apps": {
            "demo": {"cmd": ["${py}", "${demo}", "--host", "${host}", "--port", "${port}", "--authKey", "${secret}"],
                     "ready_line": "Starting factory"},
            "crash": {"cmd": ["${py}", "-c", "import sys; print('no data dir'); sys.exit(4)"],
                      "ready_line": "never"},
        },
    }))
    yield path
    # stop whatever a failed test left running
    listed = run("list", "--json", config=path)
    if listed.returncode == 0:
        for session in json.loads(listed.stdout):
            if session["state"] not in ("ended", "failed"):
                run("cancel", session["id"], config=path)
    shutil.rmtree(root, ignore_errors=True)


def test_submit_in_process_keep_then_status_list_cancel(config: Path) -> None:
    res = run("submit", "demo", "--keep", config=config)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    shown = [line.split()[1] for line in lines if line.strip().endswith(("submitted", "starting", "ready"))]
    assert shown == ["submitted", "starting", "ready"]
    url_line = next(line for line in lines if line.startswith("sessionURL: "))
    assert url_line.startswith("sessionURL: ws://127.0.0.1:231")
    listed = json.loads(run("list", "--json", config=config).stdout)
    assert len(listed) == 1 and listed[0]["state"] == "ready"
    session_id = listed[0]["id"]
    proxy = config.parent / "proxy.txt"
    assert proxy.read_text() == f"{session_id} 127.0.0.1:{listed[0]['port']}\n"

    status = run("status", session_id, "--json", config=config)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "ready"
    assert "secret" not in status.stdout

    cancelled = run("cancel", session_id, "--json", config=config)
    assert cancelled.returncode == 0
    assert json.loads(cancelled.stdout)["state"] == "ended"
    assert proxy.read_text() == ""
    record_pid = json.loads(run("status", session_id, "--json", config=config).stdout)
    assert record_pid["state"] == "ended"


def test_submit_json_reports_the_failure_with_exit_code_3(config: Path) -> None:
    res = run("submit", "crash", "--json", config=config)
    assert res.returncode == 3
    body = json.loads(res.stdout)
    assert body["state"] == "failed"
    assert "code 4" in body["error"] and "no data dir" in body["error"]


@pytest.mark.parametrize("signum", [2, 15], ids=["ctrl-c", "sigterm"])
def test_submit_without_keep_stops_the_session_on_ctrl_c_or_a_kill(config: Path, signum: int) -> None:
    proc = subprocess.Popen([PVW_HPC, "submit", "demo"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PVW_HPC_CONFIG": str(config)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("running;"):
            break
    listed = json.loads(run("list", "--json", config=config).stdout)
    assert [s["state"] for s in listed] == ["ready"]
    proc.send_signal(signum)  # SIGINT as Ctrl-C, SIGTERM as kill or `timeout`
    assert proc.wait(timeout=20) == 0
    listed = json.loads(run("list", "--json", config=config).stdout)
    assert [s["state"] for s in listed] == ["ended"]


def test_unknown_ids_and_unreachable_launchers_have_their_exit_codes(config: Path) -> None:
    missing = run("status", "00000000-0000-4000-8000-000000000000", config=config)
    assert missing.returncode == 4 and "No session" in missing.stderr
    assert run("cancel", "nope", config=config).returncode == 4
    unreachable = run("list", "--url", "http://127.0.0.1:9/paraview")
    assert unreachable.returncode == 5 and "cannot reach" in unreachable.stderr
    assert run("submit", "nosuchapp", config=config).returncode == 1


def test_flush_map_rebuilds_a_deleted_map_file(config: Path) -> None:
    assert run("submit", "demo", "--keep", config=config).returncode == 0
    proxy = config.parent / "proxy.txt"
    expected = proxy.read_text()
    proxy.unlink()
    res = run("flush-map", config=config)
    assert res.returncode == 0 and "1 route(s)" in res.stdout
    assert proxy.read_text() == expected and expected.count("\n") == 1


def test_submit_against_a_running_launcher(config: Path) -> None:
    server = subprocess.Popen([PVW_HPC, "serve", "--config", str(config)], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("pvw-hpc: serving "), line
        url = line.split()[-1]
        res = run("submit", "demo", "--keep", "--json", "--url", url)
        assert res.returncode == 0, res.stderr
        body = json.loads(res.stdout)
        assert body["state"] == "ready" and len(body["secret"]) == 32
        anonymous = run("list", "--url", url)  # another process, no creator cookie: sees nothing
        assert body["id"] not in anonymous.stdout
        listed = run("list", "--url", url, "--token", TOKEN)
        assert body["id"] in listed.stdout
        assert run("cancel", body["id"], "--url", url).returncode == 1  # 401 without credentials
        stopped = run("cancel", body["id"], "--json", "--url", url, "--token", TOKEN)
        assert json.loads(stopped.stdout)["state"] == "ended"
        deadline = time.monotonic() + 5
        status = json.loads(run("status", body["id"], "--json", "--url", url, "--token", TOKEN).stdout)
        assert status["state"] == "ended" and time.monotonic() < deadline
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_procs_start_time_distinguishes_a_reused_pid() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        start = procs.start_time(proc.pid)
        assert start is not None
        assert procs.is_alive(proc.pid, start)
        assert not procs.is_alive(proc.pid, start + 1)
    finally:
        proc.kill()
        proc.wait()
    assert not procs.is_alive(proc.pid, start)
