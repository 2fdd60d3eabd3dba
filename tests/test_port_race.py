"""A port taken between its choice and the app's bind does not cost the session its start.

The race is provoked, not waited for: the local backend's ``before_start`` hook and the
job side's ``PVW_HPC_TEST_OCCUPY_FIRST_PORT`` (set through the cluster's
``resources.environment``) hold the chosen port with a listening socket just before the
app binds it, as an outgoing connection taking that ephemeral port would. The app is the
real wslink demo, which then exits with "[Errno 98] ... address already in use"; the
session must still reach ready on another port, with its map line on that port, and
each retry must show in the log and in the session's ``port_retries``. The local cases
drive an in-process ``Runtime`` (the composition root ``serve`` uses) so the hook can be
set; the SLURM cases run real jobs through a real ``pvw-hpc serve``, with and without
callbacks (the marker lines are the other way a retry is learned).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pvw_hpc import ephemeral, port_retries
from pvw_hpc.config import load_dict
from pvw_hpc.errors import Unavailable
from pvw_hpc.runtime import Runtime
from tests.conftest import (
    DEMO_APP,
    SLURM_DEMO_APP,
    Launcher,
    LauncherFactory,
    demo_app_config,
    free_port_range,
    slurm_reason,
)

REPO = Path(__file__).resolve().parents[1]


def _jobside() -> ModuleType:
    """The job side as the node runs it (a standard-library script), imported for its pure helpers."""
    spec = importlib.util.spec_from_file_location("jobside", REPO / "jobscripts" / "_common" / "jobside.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the pure parts --------------------------------------------------------------------------------


def test_the_job_side_tries_ports_outside_the_ephemeral_range_first() -> None:
    jobside = _jobside()
    order = list(jobside.port_order((20000, 20099), (20050, 60999)))
    assert sorted(order) == list(range(20000, 20100))
    assert all(p < 20050 for p in order[:50]) and all(p >= 20050 for p in order[50:])
    assert 20003 not in list(jobside.port_order((20000, 20009), None, avoid=[20003]))


@pytest.mark.parametrize(("output", "in_use"), [
    (b"demo app: [Errno 98] error while attempting to bind on address ('127.0.0.1', 1): address already in use", True),
    (b"Error: listen EADDRINUSE: address already in use :::8080", True),
    (b"OSError: [Errno 13] Permission denied", False),
    (b"Traceback ... ImportError: no module named vtk", False),
])
def test_what_counts_as_a_taken_port(output: bytes, in_use: bool) -> None:
    assert _jobside().said_in_use(output) is in_use


def test_reported_retries_are_checked_and_merged_once_per_try() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    earliest = now - dt.timedelta(minutes=5)
    reported = [{"try": 2, "port": 20001, "next_port": 20002, "at": now.timestamp() - 1},
                {"try": 3, "port": 20002, "next_port": 99999},  # not a port: dropped
                {"try": True, "port": 1, "next_port": 2},  # a bool is not a try number
                "junk", {"try": 4, "port": 20003, "next_port": 20004, "at": 1.0}]  # before the session: now
    kept = port_retries.checked(reported, earliest, now)
    assert [(e["try"], e["port"], e["next_port"]) for e in kept] == [(2, 20001, 20002), (4, 20003, 20004)]
    assert kept[1]["at"] == now.isoformat()
    assert port_retries.checked({"try": 2}, earliest, now) == []
    again = port_retries.merged(kept, port_retries.checked(reported[:1], earliest, now))
    assert again == kept  # the same retry read twice (marker, then callback) is kept once


def test_check_warns_about_ranges_inside_the_ephemeral_ports(tmp_path: Path) -> None:
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview",
                             "proxy_file": str(tmp_path / "proxy.txt"), "sessionURL": "ws://x/${id}",
                             "log_dir": str(tmp_path / "logs")},
           "resources": [{"host": "127.0.0.1", "port_range": [9100, 9200]},
                         {"host": "127.0.0.1", "port_range": [40000, 40010]}],
           "clusters": {"hpc": {"scheduler": "slurm", "job_dir": str(tmp_path / "jobs")},
                        "edge": {"scheduler": "slurm", "job_dir": str(tmp_path / "j2"), "port_range": [61000, 61100]}},
           "apps": {"demo": {"cmd": ["true"]}}}
    config = load_dict(raw, source="test")
    found = dict(ephemeral.warnings(config, ephemeral.LINUX_DEFAULT))
    assert set(found) == {"$.resources[1]"}  # the default port_range (20000-32767) is below Linux's range
    assert "40000-40010" in found["$.resources[1]"]
    wide = dict(ephemeral.warnings(config, (1024, 65535)))  # this machine's range: everything overlaps
    assert set(wide) == {"$.resources[0]", "$.resources[1]", "$.clusters.hpc.port_range", "$.clusters.edge.port_range"}
    assert ephemeral.warnings(config, None) == []


def test_pvw_hpc_check_prints_the_warning_and_still_passes(tmp_path: Path) -> None:
    import subprocess

    lo = ephemeral.local_range()
    if lo is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range here")
    config = tmp_path / "launcher.json"
    config.write_text('{"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", '
                      f'"proxy_file": "{tmp_path}/proxy.txt", "sessionURL": "ws://x/${{id}}", '
                      f'"log_dir": "{tmp_path}/logs"}}, "resources": [{{"host": "127.0.0.1", '
                      f'"port_range": [{lo[0]}, {lo[0] + 10}]}}], "apps": {{"demo": {{"cmd": ["true"]}}}}}}')
    out = subprocess.run([str(Path(sys.executable).parent / "pvw-hpc"), "check", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"warning: $.resources[0]: ports {lo[0]}-{lo[0] + 10} of 127.0.0.1 are inside" in out.stdout


# -- the local backend -----------------------------------------------------------------------------


class Occupier:
    """``before_start`` that takes the first ``count`` chosen ports with a listening socket."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.taken: list[int] = []
        self.sockets: list[socket.socket] = []

    def __call__(self, host: str, port: int) -> None:
        if len(self.taken) >= self.count:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, port))
        sock.listen(1)
        self.sockets.append(sock)
        self.taken.append(port)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Runtime]:
    lo, hi = free_port_range(6)
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "timeout": 20,
                             "proxy_file": str(tmp_path / "proxy.txt"), "log_dir": str(tmp_path / "logs"),
                             "sessionURL": "ws://${host}:${port}/ws", "fields": ["host", "port"]},
           "resources": [{"host": "127.0.0.1", "port_range": [lo, hi]}],
           "properties": {"python_exec": sys.executable, "demo_app": str(DEMO_APP)},
           "apps": {"demo": demo_app_config()}}
    with Runtime(load_dict(raw, source="tests/test_port_race.py")).start() as runtime:
        yield runtime


def test_a_local_app_whose_port_was_taken_starts_again_on_another(local: Runtime, tmp_path: Path) -> None:
    occupy = Occupier(1)
    local.service.local.before_start = occupy
    try:
        result = local.service.launch({"application": "demo"})
        assert result.status == 200, result.record
        record = local.service.store.get(result.session_id)
        assert record is not None and record.port is not None
        assert record.port != occupy.taken[0]
        assert record.port_retries and [(e["try"], e["port"], e["next_port"]) for e in record.port_retries] == \
               [(2, occupy.taken[0], record.port)]
        assert f"ws://127.0.0.1:{record.port}/ws" == record.session_url  # rendered again for the new port
        assert (tmp_path / "proxy.txt").read_text() == f"{record.id} 127.0.0.1:{record.port}\n"
        text = Path(str(record.log_path)).read_text()
        assert "address already in use" in text
        assert f"port {occupy.taken[0]} was taken before the app could bind it" in text and "(try 2 of 4)" in text
        with socket.create_connection(("127.0.0.1", record.port), timeout=5):
            pass  # the app really listens there
    finally:
        occupy.close()


def test_a_local_app_gives_up_after_the_bounded_tries_with_a_clear_error(local: Runtime) -> None:
    occupy = Occupier(10)  # every start finds its port taken
    local.service.local.before_start = occupy
    try:
        with pytest.raises(Unavailable) as failed:
            local.service.launch({"application": "demo"})
        assert len(occupy.taken) == 4  # the first start and three retries, no more
        assert "address already in use" in failed.value.message
        record = local.service.store.get(str(failed.value.extra["id"]))
        assert record is not None and record.state.value == "failed" and not record.holds_port
        assert [e["try"] for e in record.port_retries or []] == [2, 3, 4]
    finally:
        occupy.close()


def test_an_app_failing_for_another_reason_is_not_started_again(tmp_path: Path) -> None:
    boom = {**demo_app_config(), "cmd": [sys.executable, "-c", "import sys; print('no data here'); sys.exit(3)"]}
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "timeout": 20,
                             "proxy_file": str(tmp_path / "p2.txt"), "log_dir": str(tmp_path / "l2"),
                             "sessionURL": "ws://${host}:${port}/ws"},
           "resources": [{"host": "127.0.0.1", "port_range": list(free_port_range(3))}], "apps": {"boom": boom}}
    with Runtime(load_dict(raw, source="tests/test_port_race.py")).start() as runtime:
        with pytest.raises(Unavailable) as failed:
            runtime.service.launch({"application": "boom"})
        record = runtime.service.store.get(str(failed.value.extra["id"]))
        assert record is not None and record.exit_code == 3 and not record.port_retries


# -- a SLURM job -----------------------------------------------------------------------------------

slurm = pytest.mark.skipif(slurm_reason() is not None, reason=str(slurm_reason()))


@pytest.fixture(scope="module")
def slurm_race(module_launcher: LauncherFactory) -> Launcher:
    occupy = {"partition": "debug", "time": "00:10:00", "cpus": 1,
              "environment": {"PVW_HPC_TEST_OCCUPY_FIRST_PORT": "1"}}
    return module_launcher(
        session_url="ws://USE_HOST/proxy?sessionId=${id}&path=ws", timeout=60,
        clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.5, "poll_slow_s": 2, "defaults": occupy},
                  "slurm-nocb": {"scheduler": "slurm", "callback_url": None, "poll_fast_s": 0.3, "poll_slow_s": 2,
                                 "defaults": occupy}},
        apps={"demo": SLURM_DEMO_APP, "marker-only": {**SLURM_DEMO_APP, "cluster": "slurm-nocb"}},
    )


@pytest.mark.slurm
@slurm
@pytest.mark.parametrize("app", ["demo", "marker-only"])
def test_a_slurm_job_whose_port_was_taken_still_gets_ready_on_another(slurm_race: Launcher, app: str) -> None:
    response = slurm_race.post({"application": app})
    assert response.status_code == 200, response.text
    session = slurm_race.get(response.json()["id"]).json()
    retries: list[dict[str, Any]] = session.get("port_retries", [])
    assert [r["try"] for r in retries] == [2], session
    assert retries[0]["next_port"] == session["port"] != retries[0]["port"]
    assert slurm_race.map_text().count(f"{session['id']} 127.0.0.1:{session['port']}\n") == 1
    cluster = "slurm" if app == "demo" else "slurm-nocb"
    log = (slurm_race.root / "jobs" / cluster / session["id"] / "job.log").read_text()
    assert "address already in use" in log and f"starting it again on port {session['port']} (try 2 of 4)" in log
    with socket.create_connection(("127.0.0.1", session["port"]), timeout=5):
        pass
    assert slurm_race.delete(session["id"]).json()["state"] == "ended"
