"""Bad input gets the right status and a JSON error naming the cause, and touches nothing else.

One ready session stays live for the whole module. After every rejected
request we check that it is still ready with the very same GET answer, that it
still answers RPC, that the map file is byte for byte unchanged, and that the
SQLite file has no new active row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import Launcher, LauncherFactory, demo_cmd_with, pid_alive, wait_for
from tests.support.wslink_client import WslinkError, connect_and_call

READY = "Starting factory"
MIB = 1 << 20


class Live:
    """The session that must survive everything, and what it looked like at the start."""

    def __init__(self, lau: Launcher, body: dict[str, Any]):
        self.lau = lau
        self.body = body
        self.id: str = body["id"]
        self.view = lau.get(self.id).json()
        self.map_text = lau.map_text()
        out = connect_and_call(body["sessionURL"], body["secret"], [("demo.whoami", [])])
        self.pid: int = out["results"][0]["pid"]


@pytest.fixture(scope="module")
def live(module_launcher: LauncherFactory) -> Live:
    lau = module_launcher(
        apps={
            "witharg": {"cmd": demo_cmd_with("${arg}"), "ready_line": READY},  # no rule: the safe default
            "withfile": {"cmd": demo_cmd_with("${file}"), "ready_line": READY},
            "withmode": {"cmd": demo_cmd_with("${mode}"), "ready_line": READY},
        },
        sanitize={
            # the real rule from the paraviewweb Docker README
            "file": {"type": "regexp", "regexp": "^[-\\w./]+$", "default": "emptyFile"},
            "mode": {"type": "inList", "list": ["fast", "slow", 3], "default": "fast"},
        },
    )
    live = Live(lau, lau.launch())
    assert live.map_text == f"{live.id} 127.0.0.1:{live.body['port']}\n"
    return live


def _assert_untouched(live: Live) -> None:
    """Same GET answer, same map file, no other active row, the app still running."""
    lau = live.lau
    assert lau.get(live.id).json() == live.view
    assert lau.map_text() == live.map_text
    assert lau.active_ids() == {live.id}
    assert pid_alive(live.pid)  # its app still runs (the last test of the module also calls it)


def _rejected(live: Live, body: Any, status: int, *needles: str, content_type: str | None = None) -> str:
    """POST ``body``; insist on ``status`` with a JSON error holding each needle; check no effect."""
    resp = live.lau.post(body) if content_type is None else live.lau.post(body, content_type=content_type)
    if resp.status_code in (200, 202):  # started by mistake: stop it so the next tests stay meaningful
        live.lau.delete(resp.json()["id"])
        wait_for(lambda: live.lau.map_text() == live.map_text, 3, "the wrongly started session's line to go")
    assert resp.status_code == status, f"{resp.status_code}: {resp.text[:500]}"
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in resp.text
    error = resp.json()["error"]
    assert isinstance(error, str) and error
    for needle in needles:
        assert needle.lower() in error.lower(), f"{needle!r} not in {error!r}"
    _assert_untouched(live)
    return error


def _accepted(live: Live, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body``; insist on 200, then stop that session and check the live one is as it was."""
    lau = live.lau
    resp = lau.post(body)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    log = lau.session_log(answer["id"]).read_text()
    assert lau.delete(answer["id"]).status_code == 200
    wait_for(lambda: lau.map_text() == live.map_text, 3, "the map file to be back to the live session only")
    _assert_untouched(live)
    answer["_log"] = log
    return answer


# -- the body itself -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"application=demo", "JSON"),
        (b"{'application': 'demo'}", "JSON"),
        (b'{"application": "demo",}', "JSON"),
        (b'{"application": "demo"', "JSON"),
        (b'[{"application": "demo"}]', "object"),
        (b'"demo"', "object"),
        (b"42", "object"),
        (b"null", "object"),
        (b"", "empty"),
        (b"  \n ", "empty"),
        (b'{"application": "demo\xff"}', "UTF-8"),
        (b"\xfe\xff\x00{", "UTF-8"),
    ],
    ids=["form", "single-quotes", "trailing-comma", "truncated", "array", "string", "number", "null", "empty",
         "blank", "bad-utf8", "utf16-bom"],
)
def test_malformed_body_is_400(live: Live, body: bytes, needle: str) -> None:
    _rejected(live, body, 400, needle)


@pytest.mark.parametrize("depth", [100_000, 2_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_400_without_traceback(live: Live, depth: int, opener: str) -> None:
    _rejected(live, (opener * depth).encode(), 400)


def test_application_json_content_type_is_parsed_the_same(live: Live) -> None:
    _rejected(live, b"not json", 400, "JSON", content_type="application/json")
    _rejected(live, {"application": "nope"}, 400, "nope", content_type="application/json")


def test_missing_application_is_400(live: Live) -> None:
    _rejected(live, {"useUrl": True, "sessionManagerURL": live.lau.url}, 400, "application")


@pytest.mark.parametrize("name", ["nope", "Demo", "demo ", "../demo", ""])
def test_unknown_application_is_400_naming_it(live: Live, name: str) -> None:
    error = _rejected(live, {"application": name}, 400, "unknown application")
    assert repr(name) in error
    assert "demo" in error  # and lists what this launcher has


@pytest.mark.parametrize("name", [["demo"], {"name": "demo"}, 7, True])
def test_non_string_application_is_400(live: Live, name: Any) -> None:
    _rejected(live, {"application": name}, 400, "application")


def test_wait_must_be_a_boolean(live: Live) -> None:
    _rejected(live, {"application": "demo", "wait": "no"}, 400, "wait")


def test_body_over_1_mib_is_413(live: Live) -> None:
    body = {"application": "demo", "pad": "x" * MIB}
    _rejected(live, body, 413, "larger")


def test_chunked_body_over_1_mib_is_413(live: Live) -> None:
    """No Content-Length: the limit must hold while reading, too."""

    def chunks() -> Any:
        yield b'{"application": "demo", "pad": "'
        for _ in range(33):
            yield b"y" * 32768
        yield b'"}'

    resp = requests.post(live.lau.url, data=chunks(), headers={"Content-Type": "text/plain;charset=UTF-8"}, timeout=30)
    assert resp.status_code == 413, resp.text[:300]
    assert "error" in resp.json()
    _assert_untouched(live)


def test_body_just_under_1_mib_is_accepted(live: Live) -> None:
    prefix = '{"application": "demo", "pad": "'
    body = prefix + "z" * (MIB - len(prefix) - 2) + '"}'
    assert len(body.encode()) == MIB
    _accepted(live, json.loads(body))


# -- values that would reach the command -----------------------------------------------------------


def test_client_key_naming_a_property_is_400(live: Live) -> None:
    _rejected(live, {"application": "demo", "python_exec": "/bin/sh"}, 400, "python_exec", "property")
    _rejected(live, {"application": "demo", "demo_app": "/tmp/evil.py"}, 400, "demo_app")


BAD_VALUES = {
    "newline": "data\nrm -rf /",
    "trailing-newline": "data\n",
    "carriage-return": "data\r",
    "nul": "data\x00",
    "tab": "a\tb",
    "space": "a b",
    "double-quote": 'a"b',
    "single-quote": "a'b",
    "semicolon": "a;reboot",
    "ampersand": "a&&reboot",
    "pipe": "a|cat",
    "dollar-paren": "$(id)",
    "dollar-brace": "${secret}",
    "backtick": "`id`",
    "hash": "a#b",
    "redirect": "a>b",
    "leading-dash": "-rf",
    "leading-double-dash": "--authKey=x",
    "dot-dot-slash": "../etc/passwd",
    "inner-dot-dot": "data/../../etc/passwd",
    "backslash": "a\\b",
    "glob": "*",
    "empty-looking-unicode": "\u200b",
}


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_unsafe_value_for_a_command_key_is_400(live: Live, value: str) -> None:
    _rejected(live, {"application": "witharg", "arg": value}, 400, "'arg'")


@pytest.mark.parametrize("value", [["a"], {"a": "b"}, True, False, None], ids=["list", "dict", "true", "false", "null"])
def test_non_string_value_for_a_command_key_is_400(live: Live, value: Any) -> None:
    _rejected(live, {"application": "witharg", "arg": value}, 400, "'arg'", "string or a number")


@pytest.mark.parametrize(("value", "received"), [(42, "42"), (1.5, "1.5"), ("data/can.vtk", "data/can.vtk"),
                                                 ("a-b_c.d:e@f+g=h,i", "a-b_c.d:e@f+g=h,i")])
def test_safe_value_and_numbers_reach_the_command(live: Live, value: Any, received: str) -> None:
    answer = _accepted(live, {"application": "witharg", "arg": value})
    assert f"received: {received!r}" in answer["_log"]


def test_keys_no_template_uses_are_ignored_whatever_their_value(live: Live) -> None:
    """trame sends every page-URL parameter; those never reach a command, so they are not checked."""
    answer = _accepted(live, {"application": "witharg", "arg": "ok", "note": "a b; $(id)", "nested": {"x": [1]}})
    assert "received: 'ok'" in answer["_log"]
    assert "$(id)" not in answer["_log"]


# -- sanitize rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "received"), [("fast", "fast"), ("slow", "slow"), (3, "3")])
def test_inlist_rule_accepts_listed_values(live: Live, value: Any, received: str) -> None:
    answer = _accepted(live, {"application": "withmode", "mode": value})
    assert f"received: {received!r}" in answer["_log"]


@pytest.mark.parametrize("value", ["evil", "FAST", "fast;reboot", "fast\n", 4, ["fast"]])
def test_inlist_rule_rejects_other_values(live: Live, value: Any) -> None:
    _rejected(live, {"application": "withmode", "mode": value}, 400, "'mode'")


@pytest.mark.parametrize(("value", "received"), [("data/can.vtk", "data/can.vtk"), (5, "5"), ("-x", "-x")])
def test_regexp_rule_accepts_matching_values(live: Live, value: Any, received: str) -> None:
    # the admin's rule allows a leading '-' (it is the real-world rule); the rule, not the default, decides
    answer = _accepted(live, {"application": "withfile", "file": value})
    assert f"received: {received!r}" in answer["_log"]


@pytest.mark.parametrize("value", ["can vtk", "x;reboot", "$(id)", "a'b", "", "data.vtk\n", "data.vtk\nreboot"],
                         ids=["space", "semicolon", "subshell", "quote", "empty", "trailing-newline", "newline"])
def test_regexp_rule_rejects_other_values(live: Live, value: str) -> None:
    error = _rejected(live, {"application": "withfile", "file": value}, 400, "'file'")
    if "\n" not in value:  # a newline may be refused before the rule is even tried
        assert "sanitize" in error and "regexp" in error


# -- keys the launcher sets itself -----------------------------------------------------------------


def test_client_secret_id_host_port_are_ignored(live: Live) -> None:
    lau = live.lau
    resp = lau.post({"application": "demo", "secret": "client-chosen-secret", "id": "client-id",
                     "host": "evil.example.com", "port": 1, "sessionURL": "ws://evil.example.com/ws"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    try:
        assert body["secret"] != "client-chosen-secret"
        assert body["id"] != "client-id"
        assert body["host"] == "127.0.0.1"
        lo, hi = lau.config["resources"][0]["port_range"]
        assert lo <= body["port"] <= hi
        assert body["sessionURL"] == f"ws://127.0.0.1:{body['port']}/ws"
        assert f"{body['id']} 127.0.0.1:{body['port']}" in lau.map_lines()
        assert "evil" not in lau.map_text()
        out = connect_and_call(body["sessionURL"], body["secret"], [("demo.add", [2, 2])])
        assert out["results"] == [4]
        with pytest.raises(WslinkError):
            connect_and_call(body["sessionURL"], "client-chosen-secret", [("demo.add", [2, 2])])
    finally:
        lau.delete(body["id"])
    wait_for(lambda: lau.map_text() == live.map_text, 3, "the map file to be back to the live session only")
    _assert_untouched(live)


def test_the_live_session_is_still_served(live: Live) -> None:
    """Last check of the module: after all of the above, the first session still works."""
    out = connect_and_call(live.body["sessionURL"], live.body["secret"], [("demo.whoami", [])])
    assert out["results"][0]["port"] == live.body["port"]
    assert out["results"][0]["pid"] == live.pid  # the same process as at the start
    assert live.lau.pids_of(live.id) == [live.pid]
    _assert_untouched(live)
