"""The launcher REST API end to end: a real ``pvw-hpc serve``, the real demo app, a real client.

Requests are replayed as the stock clients send them (reference launcher-api.md
section 4): the wslink JS ``ProcessLauncher`` posts ``JSON.stringify(config)``
with no Content-Type, so the browser labels it ``text/plain;charset=UTF-8``;
trame adds ``useUrl``, ``launcherRetry`` and every page-URL parameter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    ADMIN_HEADERS,
    DEMO_APP,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    demo_app_config,
    pid_alive,
    wait_for,
)
from tests.support.wslink_client import WslinkError, connect_and_call

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

BOOM_CMD = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]


@pytest.fixture(scope="module")
def api(module_launcher: LauncherFactory) -> Launcher:
    """One launcher for the tests that only need the demo app and failing apps."""
    return module_launcher(
        apps={
            "boom": {"cmd": BOOM_CMD, "ready_line": "Starting factory"},
            "missing": {"cmd": ["/nonexistent/pvw-hpc-test/no-such-app", "--port", "${port}"],
                        "ready_line": "Starting factory"},
        },
        # stock `fields`: launcher values, a sessionData key and a client key are echoed
        fields=["host", "port", "label", "ui"],
        session_data={"label": "demo at ${host}:${port} for ${id}"},
        ports=40,  # room for the ~20 sessions of this module even while stopped ones' ports sit in TIME_WAIT
    )


@pytest.fixture(autouse=True)
def _stop_sessions_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """Leave the shared launcher empty after each test, so map-file checks can be exact."""
    yield
    if "api" in request.fixturenames:
        api: Launcher = request.getfixturevalue("api")
        for session_id in api.active_ids():
            api.delete(session_id)


def _rpc(session_url: str, secret: str) -> dict[str, Any]:
    return connect_and_call(session_url, secret, [("demo.add", [2, 3]), ("demo.whoami", [])])


def _get_json(url: str) -> Any:
    resp = requests.get(url, timeout=30, headers=ADMIN_HEADERS)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json()


def _no_secret_or_command(text: str, secret: str) -> None:
    """GET/list/DELETE must never show the secret or the command line."""
    assert secret not in text
    assert "authKey" not in text
    assert str(DEMO_APP) not in text
    assert sys.executable not in text
    for key in ("secret", "cmd", "argv"):
        assert f'"{key}"' not in text


# -- (a) the requests real clients send ------------------------------------------------------------


def _wslink_js(url: str) -> dict[str, Any]:
    # SmartConnect's config as an app builds it: application plus sessionManagerURL
    return {"application": "demo", "sessionManagerURL": url}


def _trame(url: str) -> dict[str, Any]:
    # trame vue3: application, useUrl, launcherRetry, sessionManagerURL, then every page-URL
    # query parameter, type-converted (?ui=main&dev&n=3&files=[a,b])
    return {"application": "demo", "useUrl": True, "launcherRetry": [250, 500, 1000], "sessionManagerURL": url,
            "ui": "main", "dev": True, "n": 3, "files": ["a", "b"]}


@pytest.mark.parametrize("client", [_wslink_js, _trame], ids=["wslink-js", "trame"])
@pytest.mark.parametrize("slash", [True, False], ids=["slash", "no-slash"])
def test_client_request_launches_a_reachable_session(api: Launcher, client: Any, slash: bool) -> None:
    url = api.endpoint + ("/" if slash else "")
    request = client(url)
    resp = api.post(json.dumps(request, separators=(",", ":")), content_type=TEXT_PLAIN, url=url)

    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert not body.get("error")  # the JS success test: status 200 and no 'error'
    session_id = body["id"]
    assert UUID_RE.match(session_id) and session_id == session_id.lower()
    port = body["port"]
    assert body["host"] == "127.0.0.1"
    lo, hi = api.config["resources"][0]["port_range"]
    assert lo <= port <= hi
    assert body["sessionURL"] == f"ws://127.0.0.1:{port}/ws"
    assert body["sessionManagerURL"] == url
    secret = body["secret"]
    assert isinstance(secret, str) and len(secret) >= 16
    assert body["label"] == f"demo at 127.0.0.1:{port} for {session_id}"  # sessionData, listed in fields
    if client is _trame:
        assert body["ui"] == "main"  # a client key listed in fields is echoed, as stock does
    else:
        assert "ui" not in body
    # other client keys are not echoed (only id, sessionURL, secret, manager URL, fields)
    for key in ("useUrl", "launcherRetry", "files", "application", "dev"):
        assert key not in body

    assert api.map_lines() == [f"{session_id} 127.0.0.1:{port}"]

    out = _rpc(body["sessionURL"], secret)
    assert out["results"][0] == 5
    assert out["results"][1]["port"] == port

    with pytest.raises(WslinkError) as info:
        _rpc(body["sessionURL"], "not-" + secret)
    assert info.value.code == -32000


def test_application_json_content_type_works_too(api: Launcher) -> None:
    resp = api.post({"application": "demo"}, content_type="application/json")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "sessionManagerURL" not in body  # only echoed when sent
    assert _rpc(body["sessionURL"], body["secret"])["results"][0] == 5


def test_two_sessions_get_distinct_ids_ports_and_secrets(api: Launcher) -> None:
    first, second = api.launch(), api.launch()
    assert first["id"] != second["id"]
    assert first["port"] != second["port"]
    assert first["secret"] != second["secret"]
    assert sorted(api.map_lines()) == sorted(f"{b['id']} 127.0.0.1:{b['port']}" for b in (first, second))
    # each secret opens its own session only
    with pytest.raises(WslinkError):
        _rpc(second["sessionURL"], first["secret"])
    assert _rpc(second["sessionURL"], second["secret"])["results"][1]["port"] == second["port"]


def test_concurrent_launches_get_distinct_ports(api: Launcher) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        bodies = list(pool.map(lambda _: api.launch(), range(6)))
    ports = {b["port"] for b in bodies}
    assert len(ports) == 6
    assert len({b["id"] for b in bodies}) == 6
    assert sorted(api.map_lines()) == sorted(f"{b['id']} 127.0.0.1:{b['port']}" for b in bodies)
    for body in bodies:
        assert connect_and_call(body["sessionURL"], body["secret"], [("demo.whoami", [])])["results"][0]["port"] == \
            body["port"]


# -- (b) GET, list, health -------------------------------------------------------------------------


def test_get_and_list_show_the_session_without_secret_or_command(api: Launcher) -> None:
    body = api.launch(sessionManagerURL=api.url)
    session_id, secret = body["id"], body["secret"]

    resp = api.get(session_id)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    view = resp.json()
    assert view["id"] == session_id
    assert view["state"] == "ready"
    assert view["application"] == "demo"
    assert view["host"] == "127.0.0.1"
    assert view["port"] == body["port"]
    assert view["sessionURL"] == body["sessionURL"]
    assert view["label"] == body["label"]  # the configured fields, as the POST answered them
    assert view["sessionManagerURL"] == api.url
    transitions = view["transitions"]
    assert list(transitions) == ["submitted", "starting", "ready"]
    times = list(transitions.values())
    assert times == sorted(times)
    _no_secret_or_command(resp.text, secret)

    listed = _get_json(api.endpoint)
    mine = [s for s in listed["sessions"] if s["id"] == session_id]
    assert len(mine) == 1 and mine[0]["state"] == "ready" and mine[0]["port"] == body["port"]
    _no_secret_or_command(json.dumps(listed), secret)
    assert _get_json(api.endpoint + "/") == listed


def test_health_answers(api: Launcher) -> None:
    body = api.launch()
    health = _get_json(api.base + "/health")
    assert health["status"] == "ok"
    assert health["active_sessions"].get("ready", 0) >= 1
    _no_secret_or_command(json.dumps(health), body["secret"])


# -- (c) DELETE ------------------------------------------------------------------------------------


def test_delete_stops_the_session(api: Launcher) -> None:
    body = api.launch()
    session_id = body["id"]
    pid = _rpc(body["sessionURL"], body["secret"])["results"][1]["pid"]
    assert pid_alive(pid)
    assert api.pids_of(session_id) == [pid]

    resp = api.delete(session_id)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "ended"
    _no_secret_or_command(resp.text, body["secret"])

    wait_for(lambda: not pid_alive(pid), 5, "the app process to be gone after DELETE")
    view = api.get(session_id).json()
    assert view["state"] == "ended"
    assert "ended" in view["transitions"]
    wait_for(lambda: not any(session_id in line for line in api.map_lines()), 2, "the map line to go")
    with pytest.raises(OSError):
        _rpc(body["sessionURL"], body["secret"])

    again = api.delete(session_id)  # stopping an ended session changes nothing
    assert again.status_code == 200 and again.json()["state"] == "ended"


def test_delete_frees_the_port_of_a_session_that_had_a_client(launcher: LauncherFactory) -> None:
    """The usual life: a client connects, then the session is stopped; its port must be usable again."""
    lau = launcher(ports=1)
    body = lau.launch()
    assert _rpc(body["sessionURL"], body["secret"])["results"][0] == 5
    assert lau.delete(body["id"]).status_code == 200

    resp = lau.post({"application": "demo"})
    assert resp.status_code == 200, f"the stopped session's port was not handed out again: {resp.text}"
    assert resp.json()["port"] == body["port"]


@pytest.mark.parametrize("session_id", [str(uuid.uuid4()), "not-a-session", "ABCDEF"])
def test_unknown_ids_are_404_json(api: Launcher, session_id: str) -> None:
    for resp in (api.get(session_id), api.delete(session_id)):
        assert resp.status_code == 404
        assert resp.headers["Content-Type"].startswith("application/json")
        assert session_id in resp.json()["error"]


def test_other_routes_and_methods_answer_json(api: Launcher) -> None:
    for method, url, status in [("PUT", api.url, 405), ("PATCH", f"{api.endpoint}/{uuid.uuid4()}", 405),
                                ("GET", api.base + "/nope", 404), ("POST", api.base + "/paraview/x/y", 404)]:
        resp = requests.request(method, url, data=b"{}", timeout=30)
        assert resp.status_code == status, (method, url, resp.text)
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.json()["error"]


# -- (d) apps that fail to start -------------------------------------------------------------------


def test_app_exiting_before_ready_is_503_at_once_with_code_and_log(api: Launcher) -> None:
    started = time.monotonic()
    resp = api.post({"application": "boom"})
    elapsed = time.monotonic() - started

    assert resp.status_code == 503, resp.text
    assert elapsed < 3, f"503 came after {elapsed:.1f} s: the exit was not noticed at once (timeout is 20 s)"
    body = resp.json()
    error = body["error"]
    assert "code 3" in error
    assert "boom" in error  # the log's last lines
    session_id = body["id"]
    log_path = api.session_log(session_id)
    assert str(log_path) in error
    assert "boom" in log_path.read_text()
    view = api.get(session_id).json()
    assert view["state"] == "failed"
    assert view["exit_code"] == 3
    assert session_id not in api.map_text()


def test_missing_executable_is_503_json(api: Launcher) -> None:
    resp = api.post({"application": "missing"})
    assert resp.status_code == 503
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert "did not start" in error
    assert "no-such-app" in error or "No such file" in error
    assert api.map_text() == ""
    assert api.get(resp.json()["id"]).json()["state"] == "failed"


def test_app_never_ready_is_503_naming_the_timeout_and_log(launcher: LauncherFactory) -> None:
    hang = [sys.executable, "-c", "import time; print('still thinking', flush=True); time.sleep(120)"]
    lau = launcher(timeout=2, ports=3, apps={"hang": {"cmd": hang, "ready_line": "Starting factory"}})
    started = time.monotonic()
    resp = lau.post({"application": "hang"})
    elapsed = time.monotonic() - started

    assert resp.status_code == 503, resp.text
    assert 1.5 <= elapsed < 10
    body = resp.json()
    assert "timeout" in body["error"]
    session_id = body["id"]
    assert str(lau.session_log(session_id)) in body["error"]
    assert "still thinking" in lau.session_log(session_id).read_text()
    wait_for(lambda: not lau.pids_of(session_id), 5, "the timed-out app to be stopped")
    assert lau.get(session_id).json()["state"] == "failed"
    assert lau.map_text() == ""


# -- (e) an app that exits later -------------------------------------------------------------------


def _ended_and_unmapped(lau: Launcher, session_id: str) -> None:
    wait_for(lambda: lau.state(session_id) == "ended", 10, "the session to be ended")
    wait_for(lambda: session_id not in lau.map_text(), 2, "its map line to go")


def test_app_exiting_on_its_own_ends_the_session_and_frees_its_port(launcher: LauncherFactory) -> None:
    lau = launcher(ports=3, apps={"idle": demo_app_config(idle_timeout=1)})
    body = lau.launch("idle")  # wslink stops itself after 1 s without a client
    assert lau.map_lines() == [f"{body['id']} 127.0.0.1:{body['port']}"]

    _ended_and_unmapped(lau, body["id"])
    view = lau.get(body["id"]).json()
    assert view["exit_code"] == 0
    assert lau.map_text() == ""

    again = lau.launch()
    assert again["port"] == body["port"]  # the lowest port is free again
    assert lau.map_lines() == [f"{again['id']} 127.0.0.1:{again['port']}"]


def test_killed_app_ends_the_session_and_frees_its_port(launcher: LauncherFactory) -> None:
    """A session that had a client: its port is left in TIME_WAIT, which an app can still bind."""
    lau = launcher(ports=2)
    body = lau.launch()
    other = lau.launch()
    pid = _rpc(body["sessionURL"], body["secret"])["results"][1]["pid"]

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: body["id"] not in lau.map_text(), 2, "the killed app's map line to go")
    assert lau.state(body["id"]) == "ended"
    assert lau.get(body["id"]).json()["exit_code"] == -signal.SIGKILL
    assert lau.map_lines() == [f"{other['id']} 127.0.0.1:{other['port']}"]
    assert lau.state(other["id"]) == "ready"

    resp = lau.post({"application": "demo"})  # the killed session's port is the only free one
    assert resp.status_code == 200, f"its port was not handed out again: {resp.status_code} {resp.text}"
    again = resp.json()
    assert again["port"] == body["port"]
    assert _rpc(again["sessionURL"], again["secret"])["results"][0] == 5


# -- (f) no free port ------------------------------------------------------------------------------


def test_no_free_port_is_503_json_and_failures_do_not_leak_the_port(launcher: LauncherFactory) -> None:
    lau = launcher(ports=1, apps={
        "boom": {"cmd": BOOM_CMD, "ready_line": "Starting factory"},
        "missing": {"cmd": ["/nonexistent/pvw-hpc-test/no-such-app"], "ready_line": "Starting factory"},
    })
    # failed starts first: each must give its one port back
    assert lau.post({"application": "missing"}).status_code == 503
    assert lau.post({"application": "boom"}).status_code == 503

    first = lau.launch()
    resp = lau.post({"application": "demo"})
    assert resp.status_code == 503
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "resources" in resp.json()["error"]
    assert lau.map_lines() == [f"{first['id']} 127.0.0.1:{first['port']}"]
    assert lau.state(first["id"]) == "ready"

    assert lau.delete(first["id"]).status_code == 200
    second = lau.launch()
    assert second["port"] == first["port"]


# -- (g) wait: false -------------------------------------------------------------------------------


def test_wait_false_answers_202_then_becomes_ready(api: Launcher) -> None:
    resp = api.post({"application": "demo", "wait": False})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    session_id = body["id"]
    assert UUID_RE.match(session_id)
    assert body["state"] in ("submitted", "starting", "ready")

    wait_for(lambda: api.state(session_id) == "ready", 20, "the session to become ready")
    view = api.get(session_id).json()
    line = f"{session_id} 127.0.0.1:{view['port']}"
    wait_for(lambda: line in api.map_lines(), 2, "its map line")
    assert _rpc(view["sessionURL"], body["secret"])["results"][0] == 5


# -- (h) the seed's custom-script form -------------------------------------------------------------


CUSTOM_SCRIPT = """#!/bin/bash
# customScript.sh HOST USER PORT APP DATADIR, as in the seed's third example, without the ssh hop
hostname=$1
username=$2
port=$3
app=$4
datadir=$5
echo "customScript: user=$username host=$hostname port=$port datadir=$datadir"
cd "$datadir" || exit 9
exec "{python}" "$app" --host "$hostname" --port "$port" --timeout 300
"""


def test_custom_script_form(launcher: LauncherFactory, tmp_path: Path) -> None:
    script = tmp_path / "customScript.sh"
    script.write_text(CUSTOM_SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    lau = launcher(
        properties={"custom_script": str(script), "dataDir": str(tmp_path)},
        apps={"visualizer": {
            "cmd": ["${custom_script}", "${host}", "pvw-user", "${port}", "${demo_app}", "${dataDir}"],
            "ready_line": "Starting factory",
        }},
    )
    body = lau.launch("visualizer")
    assert "secret" not in body  # stock: only returned when the secret is a whole cmd element
    port = body["port"]
    log = lau.session_log(body["id"]).read_text()
    assert f"customScript: user=pvw-user host=127.0.0.1 port={port} datadir={tmp_path}" in log
    # no secret given to the app: the client falls back to wslink's default, as the JS client does
    out = _rpc(body["sessionURL"], "wslink-secret")
    assert out["results"][1]["port"] == port

    pids = lau.pids_of(body["id"])
    assert pids
    assert lau.delete(body["id"]).status_code == 200
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "the script's app to stop")


def test_a_configured_field_cannot_shadow_what_the_launcher_reports(launcher: LauncherFactory) -> None:
    """`fields` echoes client keys (stock); a client key named like a launcher key must not win in GET."""
    lau = launcher(fields=["state", "application", "label"])
    body = lau.launch("demo", state="ended", label="mine")
    view = lau.get(body["id"]).json()
    assert view["state"] == "ready" and view["label"] == "mine"
    listed = {s["id"]: s for s in lau.sessions()}
    assert listed[body["id"]]["state"] == "ready"
