"""A corpus of hostile requests, each aimed at one target, is refused with a 4xx and changes nothing.

Targets, and what could go wrong if a value got through:

* the **map file** (Apache's ``RewriteMap``: one ``<id> <host>:<port>`` line per
  session): a newline, space or ``#`` in a value would split, extend or comment a
  line and route another session's WebSocket elsewhere. Aimed at a client key
  that reaches ``sessionURL`` and at the host and port a batch job reports in its
  ready callback (with the session's real token, so validation is what stops it);
* **job scripts and commands**: ``$(...)``, backticks, ``;``, ``|``, ``&&`` and
  quotes in a client value that reaches a batch job's argv, in ``walltime`` (it
  becomes an ``#SBATCH`` line) and in the ``user`` a token launches for (it
  reaches ``sudo -u``). Each payload would create a marker file if a shell ever
  ran it; the marker must never exist;
* **log paths**: ``../`` in values, and in the session id of GET, DELETE and the
  ready callback, raw and percent-encoded once or twice;
* **the launcher's own settings**: a client key naming a property;
* **the parser**: a 2 MiB body, 100000-deep nesting inside a value, invalid
  UTF-8 (overlong, surrogate, truncated), NUL bytes, huge numbers, and the
  Unicode line separators U+2028/U+2029/U+0085.

(``tests/test_bad_input.py`` covers the plain cases on a local app's command key;
this corpus covers the other targets and encodings.)

One local session is ready and one batch session is queued (a real SLURM job,
held) for the whole module. A
hostile callback with a real token goes to a fresh queued batch session of its
own, which must still be queued, without host and port, afterwards (then it is
stopped). After every request, and again after the whole corpus: both module
sessions answer GET exactly as before, the map file is byte for byte the same,
the database has no new row (active or not) but those fresh targets, all
stopped, and the launcher's folder holds exactly the files it held, apart from
the targets' job folders (so nothing was written outside ``log_dir``, and
``log_dir`` gained nothing).

Requests go out through ``http.client`` so paths and bytes reach the server as
written (``requests`` would normalise ``../`` and encode bodies its own way).

The corpus found five server bugs when it was written (a newline or an IPv6 scope
id in a callback host, huge integers, NaN/Infinity, a non-string callback token);
they are fixed and their cases now pass like the others.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ADMIN_HEADERS,
    SLURM_DEMO_APP,
    Launcher,
    LauncherFactory,
    demo_cmd_with,
    pid_alive,
    slurm_reason,
    wait_for,
)
from tests.support.wslink_client import connect_and_call

READY = "Starting factory"
MIB = 1 << 20
MARK = f"/tmp/pvw-hpc-injected-{uuid.uuid4().hex}"  # created only if a shell ever ran a payload
TOUCH = f"touch {MARK}"
SHELL_PAYLOADS: dict[str, str] = {
    "subshell": f"$({TOUCH})",
    "backticks": f"`{TOUCH}`",
    "semicolon": f"x;{TOUCH}",
    "pipe": f"x|{TOUCH}",
    "and-and": f"x&&{TOUCH}",
    "single-quotes": f"x';{TOUCH};'",
    "double-quotes": f'x";{TOUCH};"',
    "newline": f"x\n{TOUCH}",
    "brace-expansion": f"${{IFS}}{TOUCH}",
}

@dataclass(frozen=True)
class Req:
    """One raw HTTP request: the path and body bytes are sent exactly as given."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    fresh: str | None = None  # a batch session made for this request: it must stay queued, then it is stopped


@dataclass
class World:
    """The module's launcher, its two sessions, and a snapshot of everything a request must not change."""

    lau: Launcher
    live: dict[str, Any]  # the local session's launch answer (ready)
    live_view: dict[str, Any]
    live_pid: int
    batch_id: str  # the queued batch session
    batch_view: dict[str, Any]
    token: str  # the batch session's callback token, read from its job folder
    map_bytes: bytes
    rows: set[str]
    files: set[str]  # every file under the launcher's folder, relative
    log_names: set[str]
    own: set[str] = field(default_factory=set)  # rows this module made on purpose (fresh targets), then stopped

    @property
    def live_id(self) -> str:
        return str(self.live["id"])


def _files(root: Path, ignore: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Relative paths of every file under ``root``; SQLite's WAL/SHM files come and go, so they are left out."""
    out = set()
    for path in root.rglob("*"):
        rel = str(path.relative_to(root))
        if path.is_dir() or rel.endswith(("-wal", "-shm", "-journal")) or any(i in rel for i in ignore):
            continue
        out.add(rel)
    return out


def _send(lau: Launcher, req: Req) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", lau.port, timeout=60)
    try:
        headers = {"Content-Type": "text/plain;charset=UTF-8", **req.headers}
        if req.body is not None:
            headers["Content-Length"] = str(len(req.body))
        conn.request(req.method, req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _json(value: Any) -> bytes:
    """JSON as UTF-8 bytes with non-ASCII characters raw (U+2028 as its 3 bytes, not an escape)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def world(module_launcher: LauncherFactory) -> Iterator[World]:
    if slurm_reason() is not None:
        pytest.skip(str(slurm_reason()))
    batch_cmd = [*SLURM_DEMO_APP["cmd"], "--data", "${data}"]  # a client value in the job's argv
    lau = module_launcher(
        apps={
            "witharg": {"cmd": demo_cmd_with("${arg}"), "ready_line": READY},  # the safe default rule
            # a real SLURM job, held so that it stays queued for the whole corpus
            "batch": {**SLURM_DEMO_APP, "cmd": batch_cmd, "resources": {"extra_directives": ["--hold"]}},
        },
        session_url="ws://${host}:${port}/ws?view=${view}",  # a client key in sessionURL (every app)
        clusters={"slurm": {"scheduler": "slurm"}},
    )
    live = lau.launch("demo", view="main")
    resp = lau.post({"application": "batch", "wait": False, "view": "main", "data": "can.vtk"})
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    # the poller's first look sets the scheduler fields; after that the view is stable

    def pending_view() -> dict[str, Any] | None:
        view: dict[str, Any] = lau.get(batch_id).json()
        return view if view.get("scheduler_state") == "PENDING" else None

    batch_view = wait_for(pending_view, 20, "the poller to see the batch job pending")
    assert batch_view["state"] == "queued" and batch_view["job_id"]
    token = (lau.root / "jobs" / "slurm" / batch_id / "token").read_text().strip()
    live_pid = next(pid for sid, _, pid in lau.db_rows() if sid == live["id"])
    assert live_pid is not None
    w = World(
        lau=lau, live=live, live_view=lau.get(live["id"]).json(), live_pid=live_pid, batch_id=batch_id,
        batch_view=batch_view, token=token, map_bytes=lau.proxy_file.read_bytes(),
        rows={sid for sid, _, _ in lau.db_rows()}, files=_files(lau.root), log_names=_files(lau.log_dir),
    )
    assert w.map_bytes == f"{w.live_id} 127.0.0.1:{live['port']}\n".encode()
    assert w.log_names >= {f"{w.live_id}.txt", "launcher.log", "pvw-hpc.sqlite"}
    yield w
    assert not Path(MARK).exists()


def _assert_untouched(w: World) -> None:
    """Both sessions as they were, the same map bytes, rows and files, no marker, the app alive."""
    lau = w.lau
    assert lau.get(w.live_id).json() == w.live_view
    assert lau.get(w.batch_id).json() == w.batch_view
    assert lau.proxy_file.read_bytes() == w.map_bytes
    assert lau.active_ids() == {w.live_id, w.batch_id}
    assert {sid for sid, _, _ in lau.db_rows()} == w.rows | w.own
    assert _files(lau.root, w.own) == w.files
    assert _files(lau.log_dir, w.own) == w.log_names
    assert not Path(MARK).exists(), "a shell ran an injected payload"
    assert pid_alive(w.live_pid)


def _fresh_batch(w: World) -> tuple[str, str]:
    """A new queued batch session and its callback token: the target of one hostile callback."""
    resp = w.lau.post({"application": "batch", "wait": False, "view": "main", "data": "x"})
    assert resp.status_code == 202, resp.text
    sid: str = resp.json()["id"]
    w.own.add(sid)
    return sid, (w.lau.root / "jobs" / "slurm" / sid / "token").read_text().strip()


def _stop(w: World, sid: str) -> None:
    w.own.add(sid)
    w.lau.delete(sid)
    wait_for(lambda: w.lau.proxy_file.read_bytes() == w.map_bytes, 5, "the map file to be as it was")


def _started_id(status: int, body: bytes) -> str | None:
    """The id of a session a launch that should have been refused started anyway."""
    if status not in (200, 202):
        return None
    try:
        return str(json.loads(body, parse_constant=lambda c: None)["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _refused(w: World, req: Req, expected: int) -> None:
    """Send ``req``; insist on ``expected`` with a JSON error; then check that nothing changed.

    Whatever goes wrong, a session the request started (or made ready) is
    stopped first, so one failing case cannot spoil the next ones.
    """
    fresh_view: dict[str, Any] | None = None
    map_after: bytes | None = None
    status, headers, body = 0, {}, b""
    try:
        status, headers, body = _send(w.lau, req)
        if req.fresh is not None:
            fresh_view = w.lau.get(req.fresh).json()  # GET of a ready session waits for its map line
            map_after = w.lau.proxy_file.read_bytes()
    finally:
        started = req.fresh or (_started_id(status, body) if req.path.rstrip("/") == "/paraview" else None)
        if started is not None:
            _stop(w, started)
    assert status == expected, f"{req.method} {req.path[:80]}: {status} {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    answer = json.loads(body)  # an error body has no NaN to be lenient about
    assert isinstance(answer.get("error"), str) and answer["error"], answer
    assert b"Traceback" not in body
    if fresh_view is not None:
        assert (fresh_view["state"], fresh_view["host"], fresh_view["port"]) == ("queued", None, None), fresh_view
        assert map_after == w.map_bytes, f"the map file was changed: {map_after!r}"
    _assert_untouched(w)


# -- the corpus ------------------------------------------------------------------------------------

Build = Callable[[World], Req]


def launch(value: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> Build:
    body = value if isinstance(value, bytes) else _json(value)
    return lambda w: Req("POST", "/paraview", body, headers or {})


def ready(value: dict[str, Any] | bytes, token: str | None = "real", target: str = "fresh") -> Build:
    """The job callback: by default on a fresh queued batch session with its real token.

    ``target="batch"`` aims at the module's batch session, ``"live"`` at the local
    one (which has no token at all); ``token`` None sends none, another string that.
    """

    def build(w: World) -> Req:
        body = value if isinstance(value, bytes) else _json(value)
        fresh = None
        if target == "fresh":
            fresh, real = _fresh_batch(w)
        sid = fresh or (w.batch_id if target == "batch" else w.live_id)
        real_token = real if fresh else w.token
        headers = {} if token is None else {"Authorization": f"Bearer {real_token if token == 'real' else token}"}
        return Req("POST", f"/paraview/{sid}/ready", body, headers, fresh)

    return build


def path(method: str, template: str, admin: bool = False, body: bytes | None = None) -> Build:
    """``template`` may name ``{live}``/``{LIVE}``; it is sent as written (no normalisation, no encoding)."""
    return lambda w: Req(method, template.format(live=w.live_id, LIVE=w.live_id.upper()), body,
                         dict(ADMIN_HEADERS) if admin else {})


def deep(prefix: bytes, depth: int = 100_000) -> bytes:
    return prefix + b"[" * depth + b"]" * depth + b"}"


CORPUS: list[Any] = []  # pytest.param(build, expected status, id=target/what)


def case(name: str, build: Build, expected: int = 400, bug: str | None = None) -> None:
    """Add one hostile request; ``bug`` names the server bug that lets it through today (strict xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=f"server bug: {bug}")] if bug else []
    CORPUS.append(pytest.param(build, expected, id=name, marks=marks))


# map file: a client key in sessionURL
for tag, value in {"newline-route": "main\n00000000-0000-4000-8000-000000000000 evil.example:80",
                   "space": "main evil.example:80", "hash": "main#", "crlf": "main\r\n", "tab": "main\tx",
                   "u2028": "main\u2028evil", "u2029": "main\u2029evil", "nel": "main\u0085evil",
                   "percent-newline": "main%0Aevil", "query-splice": "main&view=evil#"}.items():
    case(f"map/sessionURL-key/{tag}", launch({"application": "demo", "view": value}))
# map file: the host and port a job reports (its real token: only validation stands in the way)
for tag, host in {"newline": "node1\n00000000-0000-4000-8000-000000000000 evil.example", "space": "node1 evil",
                  "hash": "node1#", "nul": "node1\x00", "u2028": "node1\u2028x", "empty": "",
                  "leading-dash": "-node1", "slash": "node1/../x", "colon-port": "node1:80", "bracketed": "[::1]",
                  "too-long": "a" * 300, "unicode-dot": "node1\u3002example", "list": ["node1"], "number": 10,
                  "ipv4-scope": "10.0.0.1%eth0"}.items():
    case(f"map/callback-host/{tag}", ready({"host": host, "port": 8080}))
for tag, host in {"trailing-newline": "node1\n", "ipv4-trailing-newline": "10.0.0.1\n"}.items():
    case(f"map/callback-host/{tag}", ready({"host": host, "port": 8080}))
for tag, host in {"ipv6-scope-newline-route": "fe80::1%x\n00000000-0000-4000-8000-000000000000 10.9.9.9:9000\n#",
                  "ipv6-scope-space": "fe80::1%eth0 evil", "ipv6-scope-hash": "fe80::1%#"}.items():
    case(f"map/callback-host/{tag}", ready({"host": host, "port": 8080}))
for tag, port in {"zero": 0, "too-big": 65536, "negative": -1, "string": "8080", "float": 8080.0, "bool": True,
                  "null": None, "huge": 10**30, "string-newline": "8080\nx"}.items():
    case(f"map/callback-port/{tag}", ready({"host": "node1", "port": port}))
case("map/callback-no-token", ready({"host": "node1\nx", "port": 1}, token=None), 403)
case("map/callback-wrong-token", ready({"host": "node1", "port": 8080}, token="guessed", target="batch"), 403)
case("map/callback-local-session", ready({"host": "node1", "port": 8080}, token="guessed", target="live"), 403)
case("map/callback-invalid-utf8", ready(b'{"host": "node1\xc0\xaf", "port": 8080}'))
case("map/callback-deep", ready(deep(b'{"port": 8080, "host": ')))
case("map/callback-2mib", ready(b'{"port": 8080, "host": "' + b"a" * (2 * MIB) + b'"}'), 413)
for tag, body in {"number": b'{"host": "node1", "port": 8080, "token": 5}',
                  "list": b'{"host": "node1", "port": 8080, "token": ["x"]}',
                  "lone-surrogate": b'{"host": "node1", "port": 8080, "token": "\\ud800"}'}.items():
    case(f"map/callback-body-token-{tag}", ready(body, token=None), 403)

# job scripts: a client value in the batch job's argv, walltime (an #SBATCH line), user (sudo -u)
for tag, value in SHELL_PAYLOADS.items():
    case(f"job/argv/{tag}", launch({"application": "batch", "wait": False, "view": "main", "data": value}))
    case(f"job/walltime/{tag}", launch({"application": "batch", "wait": False, "view": "main", "walltime": value}))
    case(f"job/user/{tag}", launch({"application": "batch", "wait": False, "view": "main", "user": value},
                                   headers=dict(ADMIN_HEADERS)))
case("job/walltime/sbatch-directive", launch({"application": "batch", "wait": False, "walltime": "60\n#SBATCH --uid=0"}))
case("job/walltime/option", launch({"application": "batch", "wait": False, "walltime": "60 --wrap=id"}))
case("job/walltime/list", launch({"application": "batch", "wait": False, "walltime": ["60"]}))
case("job/argv/env-reference", launch({"application": "batch", "wait": False, "view": "main", "data": "$HOME"}))
case("job/argv/option", launch({"application": "batch", "wait": False, "view": "main", "data": "--authKey=x"}))
case("job/argv/u2028", launch({"application": "batch", "wait": False, "view": "main", "data": "a\u2028b"}))
case("job/user/dotdot", launch({"application": "batch", "wait": False, "user": "../../root"},
                               headers=dict(ADMIN_HEADERS)))
case("job/user/upper", launch({"application": "batch", "wait": False, "user": "Root"}, headers=dict(ADMIN_HEADERS)))
case("job/local-argv/template", launch({"application": "witharg", "view": "main", "arg": "${python_exec}"}))
case("job/local-argv/dollar-name", launch({"application": "witharg", "view": "main", "arg": "$python_exec"}))

# log paths: '../' in values, and in the ids of GET, DELETE and the callback
for tag, value in {"relative": "../../etc/passwd", "dot-dot": "..", "trailing": "logs/..",
                   "encoded": "..%2F..%2Fetc%2Fpasswd", "backslash": "..\\..\\etc\\passwd"}.items():
    case(f"log/value/{tag}", launch({"application": "batch", "wait": False, "view": "main", "data": value}))
IDS = {"raw": "../../etc/passwd", "encoded": "..%2F..%2Fetc%2Fpasswd", "dots-encoded": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
       "double-encoded": "%252e%252e%252fetc%252fpasswd", "backslash": "..%5C..%5Cetc%5Cpasswd", "dot-dot": "%2e%2e",
       "id-then-up": "{live}/../{live}", "id-nul": "{live}%00", "id-newline": "{live}%0A", "id-upper": "{LIVE}",
       "id-space": "{live}%20", "id-u2028": "{live}%E2%80%A8", "id-bad-utf8": "{live}%C0%AF"}
for tag, id_path in IDS.items():
    case(f"log/get-id/{tag}", path("GET", f"/paraview/{id_path}"), 404)
    case(f"log/delete-id/{tag}", path("DELETE", f"/paraview/{id_path}", admin=True), 404)
    case(f"log/ready-id/{tag}", path("POST", f"/paraview/{id_path}/ready", body=b'{"host": "a", "port": 1}'), 404)

# a client key naming a property
case("property/python_exec-batch", launch({"application": "batch", "wait": False, "python_exec": "/bin/sh"}))
case("property/escaped-key", launch(b'{"application": "demo", "python\\u005fexec": "/bin/sh"}'))
case("property/non-string", launch({"application": "demo", "demo_app": ["/tmp/evil.py"]}))
case("property/with-token", launch({"application": "demo", "demo_app": "/tmp/evil.py"}, headers=dict(ADMIN_HEADERS)))

# the parser
case("parse/2mib-value", launch(b'{"application": "demo", "view": "' + b"m" * (2 * MIB) + b'"}'), 413)
case("parse/deep-in-value", launch(deep(b'{"application": "witharg", "arg": ')))
case("parse/deep-objects-in-value", launch(b'{"application": "demo", "x": ' + b'{"a":' * 100_000 + b"1"
                                           + b"}" * 100_000 + b"}"))
for tag, raw in {"overlong-slash": b"\xc0\xaf", "utf8-surrogate": b"\xed\xa0\x80", "truncated": b"\xe2\x80",
                 "latin1": b"\xe9", "over-max": b"\xf4\x90\x80\x80"}.items():
    case(f"parse/invalid-utf8/{tag}", launch(b'{"application": "witharg", "view": "main", "arg": "a' + raw + b'"}'))
case("parse/invalid-utf8-in-key", launch(b'{"application": "demo", "\xff": 1}'))
case("parse/raw-nul-byte", launch(b'{"application": "witharg", "arg": "a\x00b"}'))
case("parse/escaped-nul-value", launch({"application": "witharg", "view": "main", "arg": "a\x00b"}))
case("parse/escaped-nul-app", launch({"application": "demo\x00"}))
case("parse/nul-view", launch({"application": "demo", "view": "main\x00"}))
case("parse/huge-float-wait", launch(b'{"application": "demo", "wait": 1e999}'))
case("parse/huge-float-application", launch(b'{"application": 1e999}'))
case("parse/huge-negative-arg", launch({"application": "witharg", "view": "main", "arg": -1e308}))
case("parse/lone-surrogate-arg", launch(b'{"application": "witharg", "view": "main", "arg": "a\\ud800"}'))
BIGINT = b"9" * 5000  # over Python's 4300-digit limit for int(str)
case("parse/huge-int-ignored-key", launch(b'{"application": "demo", "x": ' + BIGINT + b"}"))
case("parse/huge-int-application", launch(b'{"application": ' + BIGINT + b"}"))
case("parse/huge-int-port", ready(b'{"host": "node1", "port": ' + BIGINT + b"}"))
for tag, body in {"nan-echoed": b'{"application": "batch", "wait": false, "view": "main", "sessionManagerURL": NaN}',
                  "infinity-echoed": b'{"application": "batch", "wait": false, "view": "main", '
                                     b'"sessionManagerURL": -Infinity}',
                  "overflow-in-argv": b'{"application": "batch", "wait": false, "view": "main", "data": 1e999}'}.items():
    case(f"parse/non-finite/{tag}", launch(body))


@pytest.mark.parametrize(("build", "expected"), CORPUS)
def test_hostile_request_is_refused_and_changes_nothing(world: World, build: Build, expected: int) -> None:
    _refused(world, build(world), expected)


def test_after_the_whole_corpus_nothing_changed(world: World) -> None:
    """Last of the module: the same sessions, map, rows and files; the live app still answers RPC."""
    _assert_untouched(world)
    out = connect_and_call(world.live["sessionURL"], world.live["secret"], [("demo.whoami", [])])
    assert out["results"][0]["pid"] == world.live_pid
    # the rows this module added are the fresh callback targets and known-bug launches, all stopped
    rows = {sid: state for sid, state, _ in world.lau.db_rows()}
    assert set(rows) == world.rows | world.own
    assert all(rows[sid] in ("ended", "failed") for sid in world.own), {sid: rows[sid] for sid in world.own}
    # session logs are the only per-session files in log_dir, and only for rows that exist
    for name in os.listdir(world.lau.log_dir):
        if name.endswith(".txt"):
            assert name[:-4] in rows, name
