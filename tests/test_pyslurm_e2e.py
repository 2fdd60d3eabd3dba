"""What tests/test_slurm_e2e.py checks for the CLI path only, with ``"access": "pyslurm"``: real
``pvw-hpc serve``, the local SLURM cluster, the wslink demo app in real jobs.

The scenarios every scheduler passes (through Apache, failure before ready, outside cancel, held
job, a kill -9 with one ready session) run for pyslurm in tests/test_batch_e2e.py. Here: a
launcher killed while one job runs and another is held, so the restarted process must import
pyslurm again, find both jobs with one ``Jobs.load()`` and follow the held one to ready.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.conftest import SLURM_DEMO_APP, LauncherFactory, wait_for
from tests.support.schedulers import BACKENDS
from tests.support.wslink_client import connect_and_call

pytestmark = [pytest.mark.pyslurm, pytest.mark.slurm]

DEMO: dict[str, Any] = {**SLURM_DEMO_APP, "cluster": "pyslurm"}


@pytest.fixture(autouse=True)
def _pyslurm_answers() -> None:
    reason = BACKENDS["pyslurm"].skip_reason()  # under CI a failure, not a skip
    if reason:
        pytest.skip(reason)


def test_launcher_killed_while_jobs_queue_and_run_tracks_them_after_restart(launcher: LauncherFactory) -> None:
    live = launcher(clusters={"pyslurm": {"scheduler": "slurm", "access": "pyslurm", "poll_fast_s": 0.3}},
                    apps={"demo": DEMO, "held": {**DEMO, "resources": {"extra_directives": ["--hold"]}}})
    running = live.post({"application": "demo"}).json()
    queued = live.post({"application": "held", "wait": False}).json()
    assert live.state(running["id"]) == "ready", running
    map_before = live.map_lines()
    live.kill9()
    live.restart()
    assert live.state(running["id"]) == "ready"
    assert live.map_lines() == map_before
    assert live.state(queued["id"]) == "queued"
    held = live.get(queued["id"]).json()
    wait_for(lambda: live.get(queued["id"]).json()["scheduler_reason"] == "JobHeldUser", 10,
             "the restarted launcher's poll to read the held job's reason")
    subprocess.run(["scontrol", "release", held["job_id"]], check=True, timeout=30)
    wait_for(lambda: live.state(queued["id"]) == "ready", 30, "the released job to become ready after restart")
    assert len(live.map_lines()) == 2
    info = live.get(running["id"]).json()
    result = connect_and_call(f"ws://{info['host']}:{info['port']}/ws", running["secret"], [("demo.add", [1, 2])])
    assert result["results"] == [3]
    for body in (running, queued):
        assert live.delete(body["id"]).status_code == 200
