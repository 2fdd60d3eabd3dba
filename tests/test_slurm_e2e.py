"""What only SLURM does, end to end with real parts: `pvw-hpc serve`, the local SLURM cluster that
`schedulers/slurm/up` starts, the wslink demo app run by real jobs, a real WebSocket client.

The scenario every scheduler passes (through Apache, failure before ready, outside cancel,
held job) is tests/test_batch_e2e.py; here: the marker line without callbacks, the queued
503 and its cookie, 202, the callback token, restarts, a slurmctld outage, requeue, walltime,
render, limits and idle sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    DEMO_APP,
    SLURM_DEMO_APP,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    slurm_reason,
    wait_for,
)
from tests.support.wslink_client import WslinkClient, connect_and_call

PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(slurm_reason() is not None, reason=str(slurm_reason()))]

DEMO = SLURM_DEMO_APP


def squeue(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-O", "State:|"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().rstrip("|")


@pytest.fixture(scope="module")
def slurm_launcher(module_launcher: LauncherFactory) -> Launcher:
    return module_launcher(
        session_url="ws://USE_HOST/proxy?sessionId=${id}&path=ws",
        timeout=30,
        clusters={
            "slurm": {"scheduler": "slurm", "poll_fast_s": 0.5, "poll_slow_s": 2,
                      "defaults": {"partition": "debug", "time": "00:10:00", "cpus": 1}},
            "slurm-nocb": {"scheduler": "slurm", "callback_url": None, "poll_fast_s": 0.3, "poll_slow_s": 2},
        },
        apps={
            "demo": DEMO,
            "marker-only": {**DEMO, "cluster": "slurm-nocb"},
            "missing": {**DEMO, "cmd": ["/nonexistent/pvw-hpc/app", "--port", "${port}"]},
            "held": {**DEMO, "timeout": 2, "resources": {"extra_directives": ["--hold"]}},
        },
    )


def launch_via(url: str, body: dict[str, Any], session: requests.Session | None = None) -> requests.Response:
    http = session or requests
    return http.post(url, data=json.dumps(body), headers={"Content-Type": TEXT_PLAIN}, timeout=60)


def test_marker_line_makes_it_ready_when_the_node_cannot_call_back(slurm_launcher: Launcher) -> None:
    response = slurm_launcher.post({"application": "marker-only"})
    assert response.status_code == 200, response.text
    body = response.json()
    info = slurm_launcher.get(body["id"]).json()
    spec = json.loads((slurm_launcher.root / "jobs" / "slurm-nocb" / body["id"] / "spec.json").read_text())
    assert spec["callback_url"] is None
    result = connect_and_call(f"ws://{info['host']}:{info['port']}/ws", body["secret"], [("demo.add", [4, 4])])
    assert result["results"] == [8]
    slurm_launcher.delete(body["id"])


# the app that exits with an error is in tests/test_batch_e2e.py, for every scheduler
@pytest.mark.parametrize(("app", "needles"), [("missing", ["cannot start", "/nonexistent/pvw-hpc/app"])])
def test_job_failing_before_ready_is_503_with_the_log_tail(slurm_launcher: Launcher, app: str,
                                                          needles: list[str]) -> None:
    started = time.monotonic()
    response = slurm_launcher.post({"application": app})
    assert response.status_code == 503
    body = response.json()
    assert body["state"] == "failed"
    for needle in needles:
        assert needle in body["error"]
    assert time.monotonic() - started < 20  # at once, not after the 30 s timeout
    assert slurm_launcher.get(body["id"]).json()["state"] == "failed"


def test_queued_503_sets_a_cookie_and_the_retry_waits_for_the_same_job(slurm_launcher: Launcher) -> None:
    http = requests.Session()
    first = launch_via(slurm_launcher.endpoint + "/", {"application": "held", "launcherRetry": [100]}, http)
    assert first.status_code == 503
    body = first.json()
    assert body["state"] == "queued" and "queued" in body["error"] and "JobHeldUser" in body["error"]
    assert http.cookies.get("pvw_hpc_pending", "").startswith(body["id"] + ".")
    job_id = slurm_launcher.get(body["id"]).json()["job_id"]
    subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
    retried = launch_via(slurm_launcher.endpoint + "/", {"application": "held", "launcherRetry": [100]}, http)
    deadline = time.monotonic() + 30
    while retried.status_code == 503 and time.monotonic() < deadline:  # as launcherRetry would
        retried = launch_via(slurm_launcher.endpoint + "/", {"application": "held"}, http)
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] == body["id"]
    held_jobs = [s for s in slurm_launcher.sessions() if s["application"] == "held"]
    assert len(held_jobs) == 1  # the retry did not submit a second job
    slurm_launcher.delete(body["id"])


def test_wait_false_answers_202_and_get_follows_it(slurm_launcher: Launcher) -> None:
    response = slurm_launcher.post({"application": "demo", "wait": False})
    assert response.status_code == 202
    body = response.json()
    assert body["state"] in ("queued", "starting") and body["job_id"] and len(body["secret"]) == 32
    wait_for(lambda: slurm_launcher.state(body["id"]) == "ready", 30, "the session to become ready")
    slurm_launcher.delete(body["id"])


def test_callback_needs_the_sessions_own_token(slurm_launcher: Launcher) -> None:
    body = slurm_launcher.post({"application": "held", "wait": False}).json()
    url = f"{slurm_launcher.endpoint}/{body['id']}/ready"
    wrong = requests.post(url, json={"host": "127.0.0.1", "port": 1234}, timeout=10,
                          headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and "token" in wrong.json()["error"]
    none = requests.post(url, json={"host": "127.0.0.1", "port": 1234}, timeout=10)
    assert none.status_code == 403
    assert slurm_launcher.state(body["id"]) == "queued"
    token = (slurm_launcher.root / "jobs" / "slurm" / body["id"] / "token").read_text().strip()
    evil = requests.post(url, json={"host": "evil host\nx", "port": 1234}, timeout=10,
                         headers={"Authorization": f"Bearer {token}"})
    assert evil.status_code == 400
    assert slurm_launcher.state(body["id"]) == "queued"
    slurm_launcher.delete(body["id"])


def test_launcher_killed_while_jobs_queue_and_run_tracks_them_after_restart(launcher: LauncherFactory) -> None:
    live = launcher(clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3}},
                    apps={"demo": DEMO, "held": {**DEMO, "resources": {"extra_directives": ["--hold"]}}})
    running = live.post({"application": "demo"}).json()
    queued = live.post({"application": "held", "wait": False}).json()
    map_before = live.map_lines()
    live.kill9()
    live.restart()
    assert live.state(running["id"]) == "ready"
    assert live.map_lines() == map_before
    assert live.state(queued["id"]) == "queued"
    subprocess.run(["scontrol", "release", live.get(queued["id"]).json()["job_id"]], check=True, timeout=30)
    wait_for(lambda: live.state(queued["id"]) == "ready", 30, "the released job to become ready after restart")
    assert len(live.map_lines()) == 2
    info = live.get(running["id"]).json()
    result = connect_and_call(f"ws://{info['host']}:{info['port']}/ws", running["secret"], [("demo.add", [1, 2])])
    assert result["results"] == [3]


@pytest.mark.skipif(os.geteuid() != 0, reason="stopping slurmctld needs root")
@pytest.mark.slow
def test_slurmctld_down_for_60_s_keeps_sessions_refuses_launches_at_once_and_recovers(
        launcher: LauncherFactory) -> None:
    live = launcher(clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3, "poll_slow_s": 0.5,
                                        "command_timeout_s": 5}},
                    apps={"demo": DEMO, "held": {**DEMO, "resources": {"extra_directives": ["--hold"]}}})
    ready = live.post({"application": "demo"}).json()
    queued = live.post({"application": "held", "wait": False}).json()
    pid_file = Path(os.environ.get("SLURM_CI_ROOT", "/tmp/slurm-ci")) / "run" / "slurmctld.pid"
    down_at = time.monotonic()
    os.kill(int(pid_file.read_text().strip()), 15)
    try:
        wait_for(lambda: "not answering" in live.post({"application": "demo"}).json().get("error", ""), 60,
                 "launches to be refused while slurmctld is down")
        while time.monotonic() - down_at < 60:  # the whole minute: nothing ends, nothing hangs
            started = time.monotonic()
            refused = live.post({"application": "demo"})
            assert refused.status_code == 503 and "not answering" in refused.json()["error"]
            assert time.monotonic() - started < 2
            assert live.state(ready["id"]) == "ready"  # a failed query never ends a session
            assert live.state(queued["id"]) == "queued"
            assert any(line.startswith(ready["id"]) for line in live.map_lines())
            time.sleep(5)
        failures = (live.log_dir / "launcher.log").read_text().count("scheduler query failed")
        assert 1 <= failures <= 10, f"{failures} failed polls in 60 s: the poller did not back off"
    finally:
        subprocess.run([str(Path(__file__).resolve().parents[1] / "schedulers/slurm/up")], check=True,
                       capture_output=True, timeout=120, env={**os.environ, "SLURM_CI_SMOKE": "0"})
    wait_for(lambda: live.post({"application": "demo", "wait": False}).status_code == 202, 60,
             "launches to work again without any step on the launcher")
    assert live.state(ready["id"]) == "ready" and live.state(queued["id"]) == "queued"


@pytest.mark.slow
def test_a_requeued_job_goes_back_to_queued_and_is_routed_only_on_its_new_port(launcher: LauncherFactory) -> None:
    live = launcher(clusters={"slurm": {"scheduler": "slurm", "requeue": True, "poll_fast_s": 0.3}},
                    apps={"demo": DEMO})
    body = live.post({"application": "demo"}).json()
    first = live.get(body["id"]).json()
    script = (live.root / "jobs" / "slurm" / body["id"] / "job.sh").read_text()
    assert "--no-requeue" not in script
    subprocess.run(["scontrol", "requeue", first["job_id"]], check=True, timeout=30)
    wait_for(lambda: live.state(body["id"]) in ("queued", "starting"), 20, "the requeued session to leave ready")
    wait_for(lambda: not any(line.startswith(body["id"]) for line in live.map_lines()), 5, "its map line to go")
    # Slurm holds a requeued job back for about two minutes (Reason=BeginTime) until the old job
    # credential expires; forcing StartTime=now makes it fail with "Job credential revoked"
    wait_for(lambda: squeue(first["job_id"]) == "PENDING", 20, "the job to be pending again")
    assert live.state(body["id"]) == "queued"
    wait_for(lambda: live.state(body["id"]) == "ready", 200, "the requeued job to be ready again", interval=1)
    again = live.get(body["id"]).json()
    assert again["job_id"] == first["job_id"]
    assert live.map_lines() == [f"{body['id']} {again['host']}:{again['port']}"]
    result = connect_and_call(f"ws://{again['host']}:{again['port']}/ws", body["secret"], [("demo.add", [5, 5])])
    assert result["results"] == [10]


@pytest.mark.slow
def test_walltime_expiry_ends_the_session(launcher: LauncherFactory) -> None:
    """Slurm checks limits about every 30 s, so a 1-minute job ends 60-90 s in."""
    live = launcher(clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.5, "poll_slow_s": 1}},
                    apps={"short": {**DEMO, "resources": {"time": 1}}})
    body = live.post({"application": "short"}).json()
    wait_for(lambda: live.state(body["id"]) in ("ended", "failed"), 150, "the walltime to expire", interval=1)
    final = live.get(body["id"]).json()
    assert "TIMEOUT" in final.get("reason", "") + final.get("error", "")
    assert live.map_lines() == []


def test_render_prints_the_exact_script_and_it_is_valid_bash(slurm_launcher: Launcher) -> None:
    out = subprocess.run([PVW_HPC, "render", "demo", "--config", str(slurm_launcher.config_path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("#!/bin/bash\n#SBATCH --job-name=pvw-")
    assert "#SBATCH --no-requeue" in out and "#SBATCH --partition=debug" in out
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)
    assert str(DEMO_APP) not in out  # the app's argv travels in spec.json, not in the script


def test_walltime_over_the_limit_is_refused_before_any_job_is_submitted(launcher: LauncherFactory) -> None:
    live = launcher(clusters={"slurm": {"scheduler": "slurm"}}, apps={"demo": DEMO},
                    configuration={"limits": {"max_walltime": "00:30:00"}})
    refused = live.post({"application": "demo", "walltime": "02:00:00"})
    assert refused.status_code == 429
    assert refused.json()["limit"] == "max_walltime" and "120 min" in refused.json()["error"]
    assert live.db_rows() == [] and live.job_ids() == []
    allowed = live.post({"application": "demo", "walltime": "00:20:00", "wait": False})
    assert allowed.status_code == 202
    job_id = allowed.json()["job_id"]
    limit = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-O", "TimeLimit:|"], capture_output=True,
                           text=True, timeout=30).stdout.strip().rstrip("|")
    assert limit == "20:00"
    bad = live.post({"application": "demo", "walltime": "soon"})
    assert bad.status_code == 400


@pytest.mark.slow  # waits out the job side's idle timeout
def test_an_idle_batch_session_is_stopped_by_its_job_side(launcher: LauncherFactory) -> None:
    live = launcher(clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3, "poll_slow_s": 0.5}},
                    apps={"demo": {**DEMO, "idle_timeout": 3}})
    body = live.post({"application": "demo"}).json()
    info = live.get(body["id"]).json()
    with WslinkClient.open(f"ws://{info['host']}:{info['port']}/ws", body["secret"]) as client:
        for _ in range(5):  # connected for longer than the idle timeout: it stays
            assert client.call("demo.add", [2, 2]) == 4
            time.sleep(1)
    assert live.state(body["id"]) == "ready"
    wait_for(lambda: live.state(body["id"]) in ("ended", "failed"), 30, "the idle job to stop", interval=0.3)
    final = live.get(body["id"]).json()
    assert "idle" in final.get("reason", "") + final.get("error", ""), final
    assert live.map_lines() == []
