"""What tests/test_slurm_e2e.py checks for the CLI path only, with ``"access": "pyslurm"``: real
``pvw-hpc serve``, the local SLURM cluster, the wslink demo app in real jobs.

The scenarios every scheduler passes (through Apache, failure before ready, outside cancel, held
job, a kill -9 with one ready session) run for pyslurm in tests/test_batch_e2e.py. Here: a
launcher killed while one job runs and another is held, so its pyslurm worker must die with it
and the restarted process must start another, find both jobs with one ``Jobs.load()`` and follow
the held one to ready; and a controller that does not answer, where launches get 503 while the
API keeps answering (pyslurm's GIL-holding wait is the worker's).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc.batch.slurm_pyslurm.client import WORKER_PATH
from tests.conftest import SLURM_DEMO_APP, LauncherFactory, pid_alive, wait_for
from tests.support.schedulers import BACKENDS
from tests.support.wslink_client import connect_and_call
from tests.test_pyslurm_adapter import closed_port_conf

pytestmark = [pytest.mark.pyslurm, pytest.mark.slurm]

DEMO: dict[str, Any] = {**SLURM_DEMO_APP, "cluster": "pyslurm"}


def workers_of(parent: int) -> list[int]:
    """The pids of the pyslurm workers ``parent`` started (its children running worker.py)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == parent and WORKER_PATH.encode() in argv and pid_alive(int(name)):
            found.append(int(name))
    return found


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
    assert live.proc is not None
    (worker,) = workers_of(live.proc.pid)  # one per launcher, whatever it did so far
    live.kill9()
    wait_for(lambda: not pid_alive(worker), 5, "the killed launcher's pyslurm worker to end (PR_SET_PDEATHSIG)")
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


@pytest.mark.slow  # waits out the worker's 3 s deadline twice
def test_a_controller_that_does_not_answer_gets_503s_while_the_api_keeps_answering(launcher: LauncherFactory,
                                                                                  tmp_path: Path) -> None:
    """slurm.conf pointing at a closed port, MessageTimeout 20: libslurm would wait 19 s holding the GIL."""
    conf = closed_port_conf(tmp_path, 20)
    live = launcher(clusters={"pyslurm": {"scheduler": "slurm", "access": "pyslurm", "command_timeout_s": 3}},
                    apps={"demo": DEMO}, extra_env={"SLURM_CONF": str(conf)})
    slowest: list[float] = []
    done = threading.Event()

    def ask_the_api() -> None:
        while not done.is_set():
            started = time.monotonic()
            live.sessions()
            slowest.append(time.monotonic() - started)
            time.sleep(0.05)

    asking = threading.Thread(target=ask_the_api, daemon=True)
    started = time.monotonic()
    asking.start()
    try:
        first = live.post({"application": "demo"})  # its submit waits for the worker: 3 s, then killed
        first_took = time.monotonic() - started
        started = time.monotonic()
        second = live.post({"application": "demo"})  # the cluster is known not to answer now
        second_took = time.monotonic() - started
    finally:
        done.set()
        asking.join(timeout=30)
    assert first.status_code == 503 and "did not answer in 3 s" in first.text, first.text
    assert 2.5 < first_took < 15
    assert second.status_code == 503, second.text
    # at once from the service's mark, or after the worker's deadline again when the poller cleared the
    # mark first: it may tick between the failed submit and its session's move to FAILED, poll no ids
    # and count that as an answer (pvw_hpc/poller.py, not this adapter) -- never longer than the deadline
    if "is not answering" in second.text:
        assert second_took < 1.0
    else:
        assert "did not answer in 3 s" in second.text and second_took < 5, second.text
    assert len(slowest) >= 20 and max(slowest) < 1.0  # the API answered all along
