"""kill -9 of the launcher with live sessions, then a restart on the same config.

The apps run in their own process groups with their output in files, so they
outlive the launcher; the restarted launcher must find them again from its
SQLite file (pid plus process start time), keep their map lines, notice the
ones that died meanwhile, and still be able to stop the ones it adopted.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.conftest import Launcher, LauncherFactory, pid_alive, wait_for
from tests.support.wslink_client import connect_and_call

TwoSessions = tuple[Launcher, dict[str, Any], dict[str, Any]]


def _whoami(body: dict[str, Any]) -> dict[str, Any]:
    out = connect_and_call(body["sessionURL"], body["secret"], [("demo.add", [20, 22]), ("demo.whoami", [])])
    assert out["results"][0] == 42
    result: dict[str, Any] = out["results"][1]
    return result


def _line(body: dict[str, Any]) -> str:
    return f"{body['id']} 127.0.0.1:{body['port']}"


@pytest.fixture
def two_sessions(launcher: LauncherFactory) -> TwoSessions:
    lau = launcher(ports=4)
    first, second = lau.launch(), lau.launch()
    assert sorted(lau.map_lines()) == sorted([_line(first), _line(second)])
    return lau, first, second


def test_sessions_survive_kill_9_and_restart_and_the_map_is_rebuilt(two_sessions: TwoSessions) -> None:
    lau, first, second = two_sessions
    before = {b["id"]: lau.get(b["id"]).json() for b in (first, second)}
    pids = {b["id"]: _whoami(b)["pid"] for b in (first, second)}
    map_before = lau.map_text()

    lau.kill9()
    assert not lau.running
    assert all(pid_alive(pid) for pid in pids.values())  # the apps outlive the launcher
    assert lau.map_text() == map_before

    lau.start()
    for body in (first, second):
        view = lau.get(body["id"]).json()
        assert view["state"] == "ready"
        assert (view["host"], view["port"]) == ("127.0.0.1", body["port"])
        assert view["transitions"] == before[body["id"]]["transitions"]
        assert _whoami(body)["pid"] == pids[body["id"]]  # the same processes still answer
    listed = {s["id"]: s["state"] for s in lau.sessions()}
    assert listed == {first["id"]: "ready", second["id"]: "ready"}
    assert sorted(lau.map_lines()) == sorted([_line(first), _line(second)])

    # the restarted launcher hands out only the free ports
    third = lau.launch()
    assert third["port"] not in (first["port"], second["port"])

    # a second crash, this time with the map file lost: the restart rebuilds it from the database
    lau.kill9()
    lau.proxy_file.unlink()
    lau.start()
    assert sorted(lau.map_lines()) == sorted([_line(first), _line(second), _line(third)])
    assert lau.proxy_file.stat().st_mode & 0o777 == 0o644  # Apache's www-data must read it
    for body in (first, second, third):
        assert _whoami(body)["port"] == body["port"]


def test_app_dying_while_the_launcher_is_down(two_sessions: TwoSessions) -> None:
    lau, first, second = two_sessions
    dead_pid = _whoami(first)["pid"]
    lau.kill9()
    os.kill(dead_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(dead_pid), 5, "the killed app to die")

    lau.start()
    view = lau.get(first["id"]).json()
    assert view["state"] == "ended"
    assert "ended" in view["transitions"]
    assert lau.state(second["id"]) == "ready"
    assert lau.map_lines() == [_line(second)]
    assert _whoami(second)["port"] == second["port"]


def test_delete_after_restart_stops_an_adopted_session(two_sessions: TwoSessions) -> None:
    lau, first, second = two_sessions
    pid = _whoami(first)["pid"]
    lau.kill9()
    lau.start()

    resp = lau.delete(first["id"])
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "ended"
    wait_for(lambda: not pid_alive(pid), 5, "the adopted app to stop after DELETE")
    assert lau.pids_of(first["id"]) == []
    wait_for(lambda: lau.map_lines() == [_line(second)], 2, "the stopped session's map line to go")
    assert lau.state(second["id"]) == "ready"


def test_adopted_session_exiting_later_is_noticed(launcher: LauncherFactory) -> None:
    """After a restart the app is no longer our child: its exit must still end the session."""
    lau = launcher(ports=2)
    body = lau.launch()
    pid = _whoami(body)["pid"]
    lau.kill9()
    lau.start()
    assert lau.state(body["id"]) == "ready"

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: lau.state(body["id"]) == "ended", 5, "the adopted session to end")
    wait_for(lambda: lau.map_text() == "", 2, "its map line to go")


def test_graceful_stop_also_keeps_sessions(launcher: LauncherFactory) -> None:
    """SIGTERM stops the launcher, not the sessions (documented in pvw_hpc.serve)."""
    lau = launcher(ports=2)
    body = lau.launch()
    pid = _whoami(body)["pid"]
    lau.stop()
    assert lau.proc is not None and lau.proc.returncode == 0
    assert pid_alive(pid)
    lau.start()
    assert lau.state(body["id"]) == "ready"
    assert lau.map_lines() == [_line(body)]


SLOW_DEMO = ("import runpy, sys, time; time.sleep(1.5); sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_session_starting_during_the_crash_becomes_ready_after_restart(launcher: LauncherFactory) -> None:
    """kill -9 while the app is still starting: the restarted launcher sees it through to ready."""
    cmd = ["${python_exec}", "-c", SLOW_DEMO, "${demo_app}", "--host", "${host}", "--port", "${port}",
           "--authKey", "${secret}", "--timeout", "300"]
    lau = launcher(ports=2, apps={"slow": {"cmd": cmd, "ready_line": "Starting factory"}})
    resp = lau.post({"application": "slow", "wait": False})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert lau.state(body["id"]) == "starting"
    lau.kill9()
    lau.start()

    wait_for(lambda: lau.state(body["id"]) == "ready", 20, "the session to become ready after the restart")
    view = lau.get(body["id"]).json()
    wait_for(lambda: lau.map_lines() == [f"{body['id']} 127.0.0.1:{view['port']}"], 2, "its map line")
    out = connect_and_call(view["sessionURL"], body["secret"], [("demo.add", [1, 1])])
    assert out["results"] == [2]
