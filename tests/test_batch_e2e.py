"""One end-to-end suite for every batch scheduler (SLURM by its commands and through pyslurm, PBS, HTCondor), each with real jobs.

One ``pvw-hpc serve`` holds one cluster per scheduler at once (one poller
serves them all, one batched query per cluster per cycle) and each test runs
for every scheduler through its own apps: launch through Apache, the job
becomes ready, the WebSocket handshake and an RPC go through Apache's
``RewriteMap``, DELETE ends it and the scheduler no longer runs the job;
a job failing before ready; an outside cancel with the scheduler's own tool;
a held job. The schedulers are the real ones this machine runs:
``schedulers/slurm/up``; Slurm's Torque wrappers (real ``qsub``/``qstat``/``qdel``,
``schedulers/pbs/up``); the HTCondor pool of ``schedulers/htcondor/up``.
Scheduler specifics live in ``tests/support/schedulers.py``.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.exceptions import InvalidStatus

from tests.conftest import ADMIN_HEADERS, TEXT_PLAIN, Launcher, LauncherFactory, wait_for
from tests.support.apache import ApacheInstance
from tests.support.apache import skip_reason as apache_skip_reason
from tests.support.schedulers import BACKENDS, Backend, available
from tests.support.wslink_client import connect_and_call

PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")

pytestmark = [pytest.mark.batch, pytest.mark.apache,
              pytest.mark.skipif(apache_skip_reason() is not None, reason=str(apache_skip_reason()))]


def backend_param(name: str) -> Any:
    return pytest.param(name, id=name, marks=getattr(pytest.mark, name))


SCHEDULERS = [backend_param(name) for name in BACKENDS]


@pytest.fixture(scope="module")
def batch(module_launcher: LauncherFactory) -> Launcher:
    """One launcher, one cluster per scheduler that runs here; apps ``<kind>-<scheduler>``."""
    backends = available()
    clusters = {b.name: b.cluster for b in backends}
    apps: dict[str, Any] = {}
    for b in backends:
        apps.update({f"{kind}-{b.name}": app for kind, app in b.apps().items()})
    return module_launcher(session_url="ws://USE_HOST/proxy?sessionId=${id}&path=ws", timeout=60,
                           clusters=clusters, apps=apps)


@pytest.fixture(scope="module")
def apache(batch: Launcher) -> Iterator[ApacheInstance]:
    probe = ApacheInstance(proxy_file=batch.proxy_file)
    listen = f"127.0.0.1:{probe.port}"
    vhost = subprocess.run([PVW_HPC, "apache-config", "--config", str(batch.config_path), "--listen", listen,
                            "--server-name", "127.0.0.1"], capture_output=True, text=True, check=True).stdout
    vhost = vhost.replace("127.0.0.1:0/", f"127.0.0.1:{batch.port}/")  # serve was started on port 0
    probe.cleanup()
    with ApacheInstance(proxy_file=batch.proxy_file, port=int(listen.rsplit(":", 1)[1]), vhost=vhost) as instance:
        yield instance


def backend_of(name: str) -> Backend:
    backend = BACKENDS[name]
    reason = backend.skip_reason()
    if reason:
        pytest.skip(reason)
    return backend


def post(url: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(url, data=json.dumps(body), headers={"Content-Type": TEXT_PLAIN}, timeout=90)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_session_as_a_job_reached_through_apache_then_deleted(scheduler: str, batch: Launcher,
                                                              apache: ApacheInstance) -> None:
    backend = backend_of(scheduler)
    response = post(f"{apache.url}/paraview/", {"application": f"demo-{scheduler}"})
    assert response.status_code == 200, f"{response.text}\n{batch.stderr_tail()}"
    body = response.json()
    info = batch.get(body["id"], headers=ADMIN_HEADERS).json()
    assert info["state"] == "ready" and info["cluster"] == scheduler
    assert backend.job_running(info["job_id"]), info
    assert f"{body['id']} {info['host']}:{info['port']}" in batch.map_lines()
    job_dir = Path(info["job_dir"]) if "job_dir" in info else batch.root / "jobs" / scheduler / body["id"]
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    for name in ("secret", "token", "spec.json"):
        assert stat.S_IMODE((job_dir / name).stat().st_mode) == 0o600
    assert body["secret"] not in (job_dir / "job.sh").read_text()  # off the script (and argv: --authKeyFile)
    url = body["sessionURL"].replace("USE_HOST", f"127.0.0.1:{apache.port}")
    result = connect_and_call(url, body["secret"], [("demo.add", [2, 3]), ("demo.whoami", [])])
    assert result["results"][0] == 5 and result["results"][1]["port"] == info["port"]

    deleted = requests.delete(f"{apache.url}/paraview/{body['id']}", headers=ADMIN_HEADERS, timeout=30)
    assert deleted.status_code == 200 and deleted.json()["state"] == "ended"
    assert not any(line.startswith(body["id"]) for line in batch.map_lines())
    wait_for(lambda: not backend.job_running(info["job_id"]), 30, f"{scheduler} to stop job {info['job_id']}")
    with pytest.raises(InvalidStatus) as refused:
        connect_and_call(url, body["secret"], [("demo.add", [1, 1])])
    assert refused.value.response.status_code == 400


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_job_failing_before_ready_is_503_with_its_log_tail(scheduler: str, batch: Launcher) -> None:
    backend_of(scheduler)
    started = time.monotonic()
    response = batch.post({"application": f"boom-{scheduler}"})
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["state"] == "failed" and "exit code 3" in body["error"] and "boom: no data" in body["error"]
    assert time.monotonic() - started < 45  # when the job ends, not after the 60 s timeout
    assert not any(line.startswith(body["id"]) for line in batch.map_lines())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_an_outside_cancel_ends_the_session_and_removes_its_route(scheduler: str, batch: Launcher) -> None:
    backend = backend_of(scheduler)
    response = batch.post({"application": f"demo-{scheduler}"})
    assert response.status_code == 200, response.text
    body = response.json()
    job_id = batch.get(body["id"], headers=ADMIN_HEADERS).json()["job_id"]
    assert any(line.startswith(body["id"]) for line in batch.map_lines())
    backend.cancel_outside(job_id)
    wait_for(lambda: batch.state(body["id"]) in ("ended", "failed"), 45, "the session to end")
    assert not any(line.startswith(body["id"]) for line in batch.map_lines())
    final = batch.get(body["id"], headers=ADMIN_HEADERS).json()
    assert job_id in (final.get("reason") or final.get("error") or "")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_held_job(scheduler: str, batch: Launcher) -> None:
    """A held job is not running: the POST answers 503 and says why; what happens next is the scheduler's.

    SLURM and PBS keep a held job queued until someone releases it (the
    session stays queued with the reason); HTCondor holds jobs it cannot run,
    so there the session fails with the HoldReason.
    """
    backend = backend_of(scheduler)
    response = batch.post({"application": f"held-{scheduler}"})
    assert response.status_code == 503, response.text
    body = response.json()
    if backend.held_fails:
        wait_for(lambda: batch.state(body["id"]) == "failed", 60, "the held job's session to fail")
        final = batch.get(body["id"], headers=ADMIN_HEADERS).json()
        assert backend.held_words in final["error"], final
    else:
        assert body["state"] == "queued" and backend.held_words in body["error"], body
        job_id = batch.get(body["id"], headers=ADMIN_HEADERS).json()["job_id"]
        assert batch.delete(body["id"], headers=ADMIN_HEADERS).status_code == 200
        wait_for(lambda: not backend.job_running(job_id, queued_too=True), 30, "the held job to be removed")
    assert batch.state(body["id"]) in ("ended", "failed")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_launcher_killed_and_restarted_keeps_following_its_jobs(scheduler: str, batch: Launcher) -> None:
    """After kill -9 the new process finds the job again (SLURM/PBS by id; HTCondor asks the schedd where
    the job's event log is) and still notices when it ends.

    Last in this file on purpose: the restarted launcher listens on a new port (the config says 0), which
    the module's Apache does not know.
    """
    backend = backend_of(scheduler)
    body = batch.post({"application": f"demo-{scheduler}"}).json()
    job_id = batch.get(body["id"], headers=ADMIN_HEADERS).json()["job_id"]
    batch.kill9()
    batch.start()
    assert batch.state(body["id"]) == "ready"
    assert any(line.startswith(body["id"]) for line in batch.map_lines())
    backend.cancel_outside(job_id)
    wait_for(lambda: batch.state(body["id"]) == "ended", 45, "the restarted launcher to see the job end")
    assert not any(line.startswith(body["id"]) for line in batch.map_lines())
