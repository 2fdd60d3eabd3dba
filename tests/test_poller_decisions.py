"""Every decision the poller makes, driven by a scripted scheduler in milliseconds.

The scheduler is tests/support/fake_scheduler.py (a fake, say so: the real schedulers'
end-to-end suites are tests/test_slurm_e2e.py and tests/test_batch_e2e.py); the rest is
real: an in-process :class:`Service` on a SQLite file, real job folders, the real map
file writer, real sockets for the reachability probe.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc.batch.base import JobId
from pvw_hpc.config import load_dict
from pvw_hpc.errors import Unavailable
from pvw_hpc.poller import Poller
from pvw_hpc.runtime import Runtime
from pvw_hpc.service import Service
from pvw_hpc.states import SessionState
from tests.support.fake_scheduler import (
    ABSENT,
    COMPLETED,
    NODE_FAIL,
    QUERY_FAILED,
    QUEUED,
    RUNNING,
    ScriptedScheduler,
)


@pytest.fixture
def world() -> Iterator[tuple[Service, Poller, ScriptedScheduler]]:
    root = Path(tempfile.mkdtemp(prefix="pvw-test-decisions-", dir="/tmp"))
    root.chmod(0o755)
    raw: dict[str, Any] = {
        "configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "proxy_file": str(root / "proxy.txt"),
                          "sessionURL": "ws://x/proxy?sessionId=${id}", "log_dir": str(root / "logs"), "timeout": 5},
        "resources": [],
        "clusters": {"fake": {"scheduler": "slurm", "job_dir": str(root / "jobs"), "allow_loopback": True,
                              "probe_every_s": 1, "unreachable_after_s": 1}},
        "apps": {"viz": {"cluster": "fake", "cmd": ["app", "--port", "${port}"], "ready_line": "ready"}},
    }
    fake = ScriptedScheduler()  # the one substitution: no real scheduler behind this cluster
    runtime = Runtime(load_dict(raw, source="tests/test_poller_decisions.py"), adapters={"fake": fake})
    runtime.service.config.log_dir.mkdir(parents=True, exist_ok=True)
    try:  # the threads are not started: each test drives the poller's cycles itself
        yield runtime.service, runtime.poller, fake
    finally:
        runtime.close()
        shutil.rmtree(root, ignore_errors=True)


def launch(service: Service) -> tuple[str, JobId]:
    result = service.launch({"application": "viz"}, wait=False)
    assert result.status == 202, result.record
    record = service.store.get(result.session_id)
    assert record is not None and record.job_id
    return record.id, JobId(record.job_id)


def state(service: Service, session_id: str) -> SessionState:
    record = service.store.get(session_id)
    assert record is not None
    return record.state


def marker(service: Service, session_id: str, host: str, port: int) -> None:
    record = service.store.get(session_id)
    assert record is not None and record.log_path
    with open(record.log_path, "a") as log:
        log.write(f"app output\nPVW-HPC-READY {session_id} {host}:{port}\n")


def listen_in_port_range() -> tuple[socket.socket, int]:
    """A listening socket on a port of the cluster's default port_range (where a job side would pick)."""
    for port in range(24000, 24200):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock, port
    raise RuntimeError("no free port in 24000-24199")


def test_queued_running_marker_ready_then_completed(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, QUEUED, RUNNING, RUNNING, COMPLETED)
    poller.tick()
    assert state(service, sid) == SessionState.QUEUED
    poller.tick()
    assert state(service, sid) == SessionState.STARTING
    marker(service, sid, "127.0.0.1", 20500)
    poller.tick()
    assert state(service, sid) == SessionState.READY
    service.map.wait_pending()
    assert service.config.proxy_file.read_text() == f"{sid} 127.0.0.1:20500\n"
    poller.tick()
    record = service.store.get(sid)
    assert record is not None and record.state == SessionState.ENDED and "COMPLETED" in str(record.end_reason)
    service.map.wait_pending()
    assert service.config.proxy_file.read_text() == ""


@pytest.mark.parametrize("before", ["queued", "starting", "ready"])
def test_a_failed_query_changes_nothing_and_launches_get_503_at_once(
        world: tuple[Service, Poller, ScriptedScheduler], before: str) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    steps = {"queued": [QUEUED], "starting": [QUEUED, RUNNING], "ready": [QUEUED, RUNNING, RUNNING]}[before]
    fake.script(job, *steps, QUERY_FAILED)
    for _ in steps:
        poller.tick()
        if before == "ready" and state(service, sid) == SessionState.STARTING:
            marker(service, sid, "127.0.0.1", 20501)
    assert state(service, sid).value == before
    for _ in range(3):
        poller.tick()
        assert state(service, sid).value == before  # "unknown", never "gone"
    assert "fake" in service.unreachable
    with pytest.raises(Unavailable, match="not answering"):
        service.launch({"application": "viz"}, wait=False)
    assert len(fake.submitted) == 1  # nothing was submitted to a scheduler that does not answer


def test_absent_is_kept_until_confirmed(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, QUEUED, RUNNING, ABSENT)
    poller.tick()
    poller.tick()
    poller.tick()  # gone from the queue, no exit code, no history: kept
    assert state(service, sid) == SessionState.STARTING
    record = service.store.get(sid)
    assert record is not None and record.job_dir
    (Path(record.job_dir) / "exit_code").write_text("3\n")
    poller.tick()
    record = service.store.get(sid)
    assert record is not None and record.state == SessionState.FAILED and record.exit_code == 3


def test_requeue_goes_back_to_queued_and_loses_its_route(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, RUNNING, RUNNING, QUEUED)
    poller.tick()
    marker(service, sid, "127.0.0.1", 20502)
    poller.tick()
    assert state(service, sid) == SessionState.READY
    poller.tick()
    record = service.store.get(sid)
    assert record is not None and record.state == SessionState.QUEUED and record.host is None
    service.map.wait_pending()
    assert service.config.proxy_file.read_text() == ""


def test_node_fail_fails_with_the_schedulers_reason(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, RUNNING, NODE_FAIL)
    poller.tick()
    poller.tick()
    record = service.store.get(sid)
    assert record is not None and record.state == SessionState.FAILED
    assert "NODE_FAIL (NodeDown)" in str(record.error)


def test_a_marker_for_another_node_is_refused(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, RUNNING)
    poller.tick()
    marker(service, sid, "203.0.113.7", 20503)  # not the job's node (localhost)
    poller.tick()
    marker(service, sid, "127.0.0.1", 80)  # outside port_range
    poller.tick()
    assert state(service, sid) == SessionState.STARTING


def test_a_silent_app_is_lost_after_unreachable_after_s(world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    service, poller, fake = world
    sid, job = launch(service)
    fake.script(job, RUNNING)
    listener, port = listen_in_port_range()
    poller.tick()
    marker(service, sid, "127.0.0.1", port)
    poller.tick()
    assert state(service, sid) == SessionState.READY
    poller._reach.clear()
    poller.tick()  # the probe: it answers
    listener.close()  # the app goes silent while the scheduler still says RUNNING
    deadline = time.monotonic() + 5
    while state(service, sid) == SessionState.READY and time.monotonic() < deadline:
        poller._reach["fake"].last_probe = float("-inf")
        poller.tick()
        time.sleep(0.2)
    record = service.store.get(sid)
    assert record is not None and record.state == SessionState.FAILED and "did not answer" in str(record.error)
    assert job in fake.cancelled


@pytest.mark.parametrize("unreachable", [False, True])
def test_a_refused_submit_is_not_an_unreachable_scheduler(world: tuple[Service, Poller, ScriptedScheduler],
                                                          unreachable: bool) -> None:
    """The adapter says which it is (BatchError.unreachable): the service matches no scheduler's words."""
    service, _poller, fake = world
    fake.refuse_submit, fake.unreachable = "sbatch: error: invalid partition specified: nope", unreachable
    with pytest.raises(Unavailable, match="invalid partition"):
        service.launch({"application": "viz"}, wait=False)
    assert ("fake" in service.unreachable) is unreachable
    fake.refuse_submit = None
    if unreachable:  # until the poller sees the scheduler answer again: 503 at once, nothing submitted
        with pytest.raises(Unavailable, match="not answering"):
            service.launch({"application": "viz"}, wait=False)
        assert fake.submitted == []
    else:
        assert service.launch({"application": "viz"}, wait=False).status == 202


def test_a_session_without_a_job_id_is_no_evidence_the_scheduler_is_back(
        world: tuple[Service, Poller, ScriptedScheduler]) -> None:
    """A launch mid-submit (its row has no job id yet) when the poller ticks: polling no ids answers nothing.

    The race was real: a failed submit marks the cluster unreachable and wakes the poller before its
    session is failed; a tick in between polled an empty set, took the empty answer for the scheduler's
    and cleared the mark, so the next launch submitted again instead of getting 503 at once.
    """
    service, poller, fake = world
    service.unreachable["fake"] = "Unable to contact slurm controller"
    service.store.create(id=str(uuid.uuid4()), application="viz", backend="fake", secret="s", argv=["app"],
                         session_url="ws://x", public={}, log_path=None)
    fake.script(JobId("0"), QUERY_FAILED)  # the probe the poller sends when it has no job to ask about
    poller.tick()
    assert "fake" in service.unreachable and {JobId("0")} in fake.polls
    fake.script(JobId("0"), ABSENT)  # the scheduler answers again
    poller.tick()
    assert "fake" not in service.unreachable
