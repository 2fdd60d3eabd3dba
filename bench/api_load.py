"""API load: a burst of 100 concurrent launches, then GET throughput and tail latency at 50 clients.

Why this exists: a launcher sits behind every "open a visualisation" button of
a site, so two things must hold under load. First, a burst of launches (a
class starting their sessions at 9:00) must give every POST its own session:
no duplicate ids, no two sessions on one port, every row in the database, a
line per session in the proxy map file, and no "database is locked" errors
from SQLite while 100 threads write at once. Second, the cheap reads (the
browser's ``GET /<endpoint>/<id>`` and a load balancer's ``GET /health``) must
stay fast while sessions run. The issue sets: 100 concurrent POSTs -> 100
sessions, 0 duplicates, 0 database-lock errors; and on this 2-core machine,
>= 1000 GET/s with p99 <= 20 ms at 50 concurrent keep-alive clients, against
the production server (``pvw-hpc serve``: Flask under waitress).

What it does:

* Phase 1 (per ``--launch`` mode, each on a fresh ``pvw-hpc serve`` and port range):
  ``wait``: 100 threads POST ``{"application": "demo"}`` at once (a barrier
  releases them together); each POST blocks until its app is ready, so
  ``configuration.threads`` must be >= 100 (``--threads``, default 128).
  ``nowait``: the same burst with ``"wait": false`` (202 at once), then
  ``GET /<endpoint>`` is polled until every session is ready.
  Then it checks: all answered 200/202, 100 distinct ids and ports, 100 rows in
  the SQLite file (read directly with sqlite3), all ready, 100 map file lines
  naming exactly those ids, and ``launcher.log`` has 0 "database is locked".
  The ``wait`` launcher is cleaned up (DELETE all, stop) before ``nowait``
  starts; the last launcher keeps its sessions for phase 2.
  Also reported: the CPU the apps spent starting (on 2 cores the burst cannot
  end sooner than that / 2), and waitress's "connection limit" warnings.
* Phase 2: ``wrk`` (one C thread by default, keep-alive, a Lua script spreading
  requests over the 100 ids) runs ``--duration`` seconds at ``--clients``
  connections against ``GET /<endpoint>/<id>`` and then ``GET /health``, each
  after an untimed ``--warmup``; then ``GET /<endpoint>/<id>`` once more with
  each client pausing ``clients / --paced-rps`` seconds before each request
  (about 1000 req/s offered, like browsers polling) for the p99 at the target
  rate. Without ``wrk`` (``apt-get install -y wrk``), an asyncio/aiohttp client
  in a separate process does the same, less efficiently. Launches are
  anonymous (the stock browser flow); reads and DELETEs carry an admin bearer
  token made up for the run. The CPU used by the server, by the load generator
  and by everything else on the machine is reported, so that it is visible
  whether the generator, or a neighbour, could have been the bottleneck.

Reading the numbers: with closed-loop clients (each sends its next request
when the last is answered) Little's law ties the two targets together: mean
latency = clients / throughput, so p99 <= 20 ms at 50 clients needs well over
2500 req/s, not just 1000. The paced run is the one that measures the p99 at
about the target rate.

The numbers are reported, not asserted: the exit code is 0 whether or not the
targets are met, 1 when something broke (the launcher did not start, no
session became ready, the load generator failed), 130 when interrupted.
Whatever happens (also Ctrl-C, SIGTERM), every session is DELETEd, the
launchers are stopped, any process carrying the run's marker or one of its
session ids (``PVW_HPC_SESSION_ID``) is killed, and the temp dir is removed.

Usage::

    .venv/bin/python bench/api_load.py [--sessions 100] [--clients 50] [--duration 10] [--warmup 2]
                                       [--launch wait|nowait|both] [--threads 128] [--paced-rps 1000]
                                       [--wrk-threads 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or not, _common is found
from _common import (  # noqa: E402
    ENDPOINT,
    HOST,
    SERVING_PREFIX,
    BenchError,
    ProcessTracker,
    cleaned_tempdir,
    decode_json,
    find_port_range,
    http_call,
    local_demo_config,
    percentile,
    run_bench,
    serving_port,
    spawn_serve,
    tail,
    wait_healthy,
    write_launcher_config,
)

from pvw_hpc.auth import hash_token
from pvw_hpc.procs import pids_with_env  # noqa: E402

SESSION_ENV = "PVW_HPC_SESSION_ID"  # what pvw-hpc puts in every app's environment
APP_TIMEOUT_S = 240  # configuration.timeout: 100 Python apps starting at once on 2 cores take a while
POST_TIMEOUT_S = APP_TIMEOUT_S + 30.0
LOCKED = "database is locked"
CONNECTION_LIMIT = "reached the connection limit"  # waitress stops accepting (its connection_limit, default 100)
TARGET_RPS = 1000.0
TARGET_P99_MS = 20.0
CLIENT_FLAG = "--_load-client"  # internal: this script as the aiohttp load generator process
# launches are anonymous (the stock browser flow); reads, lists and DELETEs use an admin token, as a portal would
ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Tracker(ProcessTracker):
    """Our children must not inherit a ready-message override or another config."""

    drop_env = ("WSLINK_READY_MSG", "PVW_HPC_CONFIG")


# -- small helpers -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from ``/proc/<pid>/stat`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (``/proc/stat``), to see who else was busy."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def settle(ids: set[str], limit_s: float = 30.0, idle_cores: float = 0.05) -> float:
    """Wait until the apps of ``ids`` use less than ``idle_cores`` of CPU together; returns the seconds waited.

    Right after a burst, the last apps may still be finishing their start-up;
    a GET load measured then would measure them too.
    """
    t0 = time.monotonic()
    pids = session_pids(ids)
    while time.monotonic() - t0 < limit_s:
        before = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        time.sleep(1.0)
        if sum(cpu_seconds(pid) or 0.0 for pid in pids) - before < idle_cores:
            break
    return time.monotonic() - t0


def session_pids(ids: set[str]) -> list[int]:
    """Pids whose ``PVW_HPC_SESSION_ID`` is one of ``ids`` (one scan of /proc for all of them)."""
    return pids_with_env(SESSION_ENV, ids)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# -- one launcher --------------------------------------------------------------------------


@dataclass
class Launcher:
    """A running ``pvw-hpc serve`` on its own temp folder, config and port range."""

    name: str
    root: Path
    proc: subprocess.Popen[bytes]
    port: int = 0
    ids: set[str] = field(default_factory=set)  # every session id it answered, for the cleanup

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def db_path(self) -> Path:
        return self.log_dir / "pvw-hpc.sqlite"

    @property
    def map_path(self) -> Path:
        return self.root / "proxy.txt"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name}: pvw-hpc serve exited with {self.proc.returncode}{self.diagnostics()}")

    def diagnostics(self) -> str:
        return f"\n  launcher stderr ({self.root / 'stderr.txt'}):\n{tail(self.root / 'stderr.txt')}"

    def db_ids(self) -> set[str]:
        """Every session id in the SQLite file (empty when it cannot be read)."""
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
            try:
                return {row[0] for row in conn.execute("SELECT id FROM sessions")}
            finally:
                conn.close()
        return set()

    def state(self, session_id: str) -> str:
        """The session's state as ``GET /<endpoint>/<id>`` answers it (``HTTP <status>`` otherwise)."""
        status, raw = http_call(self.port, "GET", f"/{ENDPOINT}/{session_id}", headers=ADMIN_HEADERS, timeout_s=30)
        return str(decode_json(raw).get("state")) if status == 200 else f"HTTP {status}"

    def log_count(self, needle: str) -> int:
        try:
            return self.log_dir.joinpath("launcher.log").read_text(errors="replace").count(needle)
        except OSError:
            return 0


def write_config(root: Path, threads: int, port_range: tuple[int, int], pin_cpu: bool = False) -> Path:
    """A stock-style config: the demo app, local backend, port 0, ``threads`` waitress threads."""
    auth = {"anonymous": True, "tokens": [{"name": "bench", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]}
    config = local_demo_config(root, 0, port_range, APP_TIMEOUT_S, threads=threads, pin_cpu=pin_cpu, auth=auth)
    return write_launcher_config(root, config)


def start_launcher(tracker: Tracker, name: str, root: Path, threads: int, port_range: tuple[int, int],
                   pin_cpu: bool = False) -> Launcher:
    """Start ``pvw-hpc serve`` on port 0 and wait until ``/health`` answers."""
    config = write_config(root, threads, port_range, pin_cpu)
    launcher = Launcher(name, root, spawn_serve(tracker, root, config))
    port, line = serving_port(launcher.proc)
    if port is None:
        launcher.check_alive()
        raise BenchError(f"{name}: expected '{SERVING_PREFIX}PORT/{ENDPOINT}/' on stdout, got {line!r}"
                         f"{launcher.diagnostics()}")
    launcher.port = port
    wait_healthy(port, launcher.check_alive)
    return launcher


def stop_launcher(tracker: Tracker, launcher: Launcher) -> list[str]:
    """DELETE every session (16 at a time), SIGTERM serve, kill what is left; returns problems."""
    problems: list[str] = []
    ids = launcher.ids | launcher.db_ids()
    if ids and launcher.alive():

        def delete(session_id: str) -> str | None:
            try:
                status, raw = http_call(launcher.port, "DELETE", f"/{ENDPOINT}/{session_id}", headers=ADMIN_HEADERS,
                                        timeout_s=30)
            except OSError as exc:
                return f"{session_id}: {exc}"
            return None if status == 200 else f"{session_id}: {status} {decode_json(raw)}"

        with ThreadPoolExecutor(max_workers=16) as pool:
            failed = [r for r in pool.map(delete, sorted(ids)) if r]
        if failed:
            problems.append(f"{launcher.name}: {len(failed)} DELETE(s) failed, e.g. {failed[0]}")
    if launcher.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(launcher.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.proc.wait(timeout=10)
    tracker.kill_group(launcher.proc)
    leftovers = session_pids(ids) if ids else []
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if leftovers:
        problems.append(f"{launcher.name}: killed {len(leftovers)} app process(es) that outlived DELETE: {leftovers}")
    return problems


# -- phase 1: the launch burst -------------------------------------------------------------


@dataclass
class PostResult:
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    sent: float = 0.0
    answered: float = 0.0
    error: str = ""


def burst(launcher: Launcher, n: int, wait: bool) -> list[PostResult]:
    """``n`` threads POST a demo launch at the same instant; returns what each got."""
    payload = json.dumps({"application": "demo", **({} if wait else {"wait": False})}).encode()
    headers = {"Content-Type": "text/plain;charset=UTF-8"}
    results = [PostResult() for _ in range(n)]
    barrier = threading.Barrier(n)

    def post(result: PostResult) -> None:
        barrier.wait()
        result.sent = time.perf_counter()
        try:
            result.status, raw = http_call(launcher.port, "POST", f"/{ENDPOINT}/", payload, headers,
                                           timeout_s=POST_TIMEOUT_S)
            result.body = decode_json(raw)
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.answered = time.perf_counter()

    threads = [threading.Thread(target=post, args=(r,), name=f"post-{i}", daemon=True) for i, r in enumerate(results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for r in results:
        if r.body.get("id"):
            launcher.ids.add(str(r.body["id"]))
    return results


def wait_all_ready(launcher: Launcher, ids: set[str], timeout_s: float) -> tuple[float, dict[str, str]]:
    """Poll ``GET /<endpoint>`` until no session of ``ids`` is starting; returns when (perf_counter) and states."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        launcher.check_alive()
        status, raw = http_call(launcher.port, "GET", f"/{ENDPOINT}", headers=ADMIN_HEADERS, timeout_s=30)
        if status == 200:
            states = {str(s["id"]): str(s["state"]) for s in json.loads(raw)["sessions"] if s["id"] in ids}
            if len(states) == len(ids) and all(s in ("ready", "ended", "failed") for s in states.values()):
                return time.perf_counter(), states
        if time.monotonic() > deadline:
            return time.perf_counter(), states
        time.sleep(0.05)


def check_burst(launcher: Launcher, n: int, wait: bool) -> dict[str, Any]:
    """Run one burst and every phase-1 check; prints a block and returns the numbers."""
    mode = "wait" if wait else "nowait"
    expected = 200 if wait else 202
    results = burst(launcher, n, wait)
    t0 = min(r.sent for r in results)
    answered_all = max(r.answered for r in results)
    ids = [str(r.body["id"]) for r in results if r.status == expected and r.body.get("id")]
    ports = [r.body.get("port") for r in results if r.status == expected]
    ready_at = answered_all
    if wait:
        states = {str(r.body["id"]): str(r.body.get("state")) for r in results if r.status == 200}
    else:
        ready_at, states = wait_all_ready(launcher, set(ids), APP_TIMEOUT_S + 30)
    # GET each id once: a ready answer implies its map line is on disk (Service.get syncs the map)
    get_states = {session_id: launcher.state(session_id) for session_id in ids}
    conn = sqlite3.connect(f"file:{launcher.db_path}?mode=ro", uri=True, timeout=10)
    try:
        db_rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM sessions").fetchone()
        db_states = dict(conn.execute("SELECT state, COUNT(*) FROM sessions GROUP BY state").fetchall())
        db_ports = conn.execute("SELECT COUNT(DISTINCT host || ':' || port) FROM sessions WHERE state = 'ready'").fetchone()[0]
    finally:
        conn.close()
    map_lines = launcher.map_path.read_text().splitlines() if launcher.map_path.exists() else []
    map_ids = [line.split(" ", 1)[0] for line in map_lines]
    latencies = [r.answered - r.sent for r in results if not r.error]
    app_cpu = sum(cpu_seconds(pid) or 0.0 for pid in session_pids(set(ids)))  # what starting the apps cost
    bad = [r for r in results if r.status != expected]
    ready_n = sum(1 for s in get_states.values() if s == "ready")
    summary: dict[str, Any] = {
        "mode": mode,
        "posts": n,
        "answered": {str(k): sum(1 for r in results if (r.status or r.error[:40]) == k)
                     for k in {r.status or r.error[:40] for r in results}},
        "distinct_ids": len(set(ids)),
        "distinct_ports": len(set(ports)),
        "db_rows": db_rows[0],
        "db_distinct_ids": db_rows[1],
        "db_states": db_states,
        "db_distinct_ready_host_ports": db_ports,
        "ready": ready_n,
        "map_lines": len(map_lines),
        "map_ids_match": sorted(map_ids) == sorted(ids) and len(set(map_ids)) == len(map_ids),
        "database_locked": launcher.log_count(LOCKED),
        "log_errors": launcher.log_count(" ERROR "),
        "log_tracebacks": launcher.log_count("Traceback"),
        "connection_limit_hits": launcher.log_count(CONNECTION_LIMIT),
        "burst_s": round(answered_all - t0, 2),
        "apps_cpu_s": round(app_cpu, 1),
        "all_ready_s": round(ready_at - t0, 2),
        "post_ms": {"p50": ms(percentile(latencies, 50)), "p90": ms(percentile(latencies, 90)),
                    "max": ms(max(latencies))} if latencies else {},
    }
    checks = {
        f"{n} POSTs answered {expected}": len(bad) == 0,
        f"{n} distinct ids": summary["distinct_ids"] == n,
        f"{n} distinct ports": summary["distinct_ports"] == n,
        f"{n} rows in the database": summary["db_rows"] == n and summary["db_distinct_ids"] == n,
        f"{n} sessions ready (GET each)": ready_n == n and db_states.get("ready") == n,
        f"{n} map file lines, one per id": len(map_lines) == n and summary["map_ids_match"],
        '0 "database is locked" in launcher.log': summary["database_locked"] == 0,
    }
    summary["checks"] = checks
    how = "blocking" if wait else 'with "wait": false, then polling GET /<endpoint>'
    print(f"phase 1 [{mode}]: {n} concurrent POSTs, {how} ({launcher.root.name}, threads={launcher_threads(launcher)})")
    print(f"  answers: {summary['answered']}; POST latency p50 {summary['post_ms'].get('p50')} ms, "
          f"p90 {summary['post_ms'].get('p90')} ms, max {summary['post_ms'].get('max')} ms")
    print(f"  first POST sent -> last answer: {summary['burst_s']:.2f} s; -> all ready: {summary['all_ready_s']:.2f} s; "
          f"the apps used {app_cpu:.1f} CPU-s to start (>= {app_cpu / (os.cpu_count() or 1):.1f} s of all cores)")
    print(f"  ids {summary['distinct_ids']} distinct, ports {summary['distinct_ports']} distinct; "
          f"db rows {db_rows[0]} ({db_rows[1]} distinct ids) states {db_states}, {db_ports} distinct ready host:port; "
          f"map lines {len(map_lines)} (ids match: {summary['map_ids_match']})")
    print(f"  launcher.log: {summary['database_locked']} x \"{LOCKED}\", {summary['log_errors']} ERROR line(s), "
          f"{summary['log_tracebacks']} traceback(s), {summary['connection_limit_hits']} x waitress "
          f"\"{CONNECTION_LIMIT}\"")
    for r in bad[:3]:
        print(f"  e.g. {r.status or r.error}: {r.body}")
    for label, ok in checks.items():
        print(f"  {label:44} {verdict(ok)}")
    if not wait and states and any(s != "ready" for s in states.values()):
        print(f"  not ready after polling: {sorted(set(states.values()))}")
    return summary


def launcher_threads(launcher: Launcher) -> int:
    config = json.loads((launcher.root / "launcher.json").read_text())
    return int(config["configuration"]["threads"])


# -- phase 2: GET load ---------------------------------------------------------------------

WRK_SCRIPT = """\
-- written by bench/api_load.py: round-robin over the paths, one JSON line of results at the end
paths = {%(paths)s}
wrk.headers["Authorization"] = %(authorization)s
local n = #paths
local next_thread = 0
function setup(thread)
  thread:set("first", next_thread * 37)
  next_thread = next_thread + 1
end
function init(args)
  i = first or 0
  requests = {}  -- formatted once: building a request per call costs the generator CPU
  for k, path in ipairs(paths) do
    requests[k] = wrk.format("GET", path)
  end
end
function request()
  i = i + 1
  return requests[(i %% n) + 1]
end
%(delay)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50_us": %%.1f, "p90_us": %%.1f, "p99_us": %%.1f, "max_us": %%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    """One load run, in the units everyone reads: requests/s and ms."""

    label: str
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    tool: str
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    machine_busy_s: float | None = None  # all cores, every process: the rest is someone else's
    think_ms: int = 0  # paced run: each client's pause before each request

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def meets_p99(self) -> bool:
        return self.p99_ms <= TARGET_P99_MS and not any(self.errors.values())

    @property
    def meets(self) -> bool:
        return self.rps >= TARGET_RPS and self.meets_p99

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "tool": self.tool, "requests": self.requests, "duration_s": round(self.duration_s, 2),
                "rps": round(self.rps, 1), "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
                "max_ms": self.max_ms, "errors": self.errors, "server_cpu_s": self.server_cpu_s,
                "client_cpu_s": self.client_cpu_s, "machine_busy_s": self.machine_busy_s, "think_ms": self.think_ms,
                "meets_target": self.meets_p99 if self.think_ms else self.meets}


def run_child(tracker: Tracker, argv: list[str], timeout_s: float, env: dict[str, str]) -> tuple[str, float]:
    """Run a load generator in its own group; returns its stdout and its CPU seconds (from wait4).

    However this ends (timeout, Ctrl-C), a generator still running is killed
    here, before the cleanup DELETEs the sessions it would otherwise keep loading.
    """
    proc = tracker.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=tracker.env(env))
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    cpu = 0.0
    reaped = False
    try:
        while not reaped:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                reaped = True
            elif time.monotonic() > deadline:
                raise BenchError(f"load generator {argv[0]} did not finish in {timeout_s:.0f} s")
            else:
                time.sleep(0.05)
    finally:
        if reaped:
            tracker.groups.remove(proc)  # its pid is free for reuse now: never signal it again
        else:
            tracker.kill_group(proc)
    reader.join(timeout=10)
    text = b"".join(out).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise BenchError(f"load generator {argv[0]} exited with {proc.returncode}:\n{text[-2000:]}")
    return text, cpu


def load(tracker: Tracker, launcher: Launcher, label: str, paths: list[str], clients: int, duration_s: int,
         wrk_threads: int, root: Path, think_ms: int = 0) -> LoadResult:
    """``clients`` keep-alive connections GET ``paths`` round-robin for ``duration_s``.

    With ``think_ms``, each client waits that long before each request (a
    browser polling), so the offered rate is about ``clients / think``; the
    latencies exclude the wait.
    """
    launcher.check_alive()
    wrk = shutil.which("wrk")
    url = f"http://{HOST}:{launcher.port}"
    if wrk:
        script = root / f"wrk-{len(paths)}-{think_ms}.lua"
        script.write_text(WRK_SCRIPT % {
            "paths": ", ".join(json.dumps(p) for p in paths),
            "authorization": json.dumps(ADMIN_HEADERS["Authorization"]),
            "delay": f"function delay() return {think_ms} end" if think_ms else "",
        })
        argv = [wrk, f"-t{wrk_threads}", f"-c{clients}", f"-d{duration_s}s", "--timeout", "10s", "-s", str(script), url]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), CLIENT_FLAG, url, str(clients), str(duration_s), str(think_ms),
                *paths]
        # the token travels in the environment, not on a command line that ps shows
    cpu_before, busy_before = cpu_seconds(launcher.proc.pid), machine_busy_seconds()
    text, client_cpu = run_child(tracker, argv, duration_s + 60, {"PVW_HPC_BENCH_AUTH": ADMIN_HEADERS["Authorization"]})
    cpu_after, busy_after = cpu_seconds(launcher.proc.pid), machine_busy_seconds()
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise BenchError(f"load generator printed no WRK_RESULT line:\n{text[-2000:]}")
    raw = json.loads(line.split(" ", 1)[1])
    return LoadResult(
        label=label, requests=raw["requests"], duration_s=raw["duration_us"] / 1e6,
        p50_ms=round(raw["p50_us"] / 1000, 2), p90_ms=round(raw["p90_us"] / 1000, 2),
        p99_ms=round(raw["p99_us"] / 1000, 2), max_ms=round(raw["max_us"] / 1000, 2),
        errors={k: raw[k] for k in ("connect", "read", "write", "status", "timeout")},
        tool=f"wrk -t{wrk_threads}" if wrk else "aiohttp (separate process)",
        server_cpu_s=round(cpu_after - cpu_before, 2) if cpu_before is not None and cpu_after is not None else None,
        client_cpu_s=round(client_cpu, 2),
        machine_busy_s=round(busy_after - busy_before, 2),
        think_ms=think_ms,
    )


def print_load(result: LoadResult) -> None:
    duration = result.duration_s or 1.0
    cpu = ""
    if result.server_cpu_s is not None and result.machine_busy_s is not None:
        others = result.machine_busy_s - result.server_cpu_s - (result.client_cpu_s or 0.0)
        cpu = (f"; CPU (100 % = one core): server {result.server_cpu_s / duration * 100:.0f} %, "
               f"load generator {(result.client_cpu_s or 0) / duration * 100:.0f} %, "
               f"everything else {max(0.0, others) / duration * 100:.0f} %")
    print(f"  {result.label:28} {result.rps:8.1f} req/s  p50 {result.p50_ms:6.2f}  p90 {result.p90_ms:6.2f}  "
          f"p99 {result.p99_ms:6.2f}  max {result.max_ms:7.2f} ms  errors {sum(result.errors.values())}")
    print(f"  {'':28} {result.requests} requests in {result.duration_s:.1f} s with {result.tool}{cpu}")
    if any(result.errors.values()):
        print(f"  {'':28} errors: {result.errors}")
    if result.think_ms:
        print(f"  {'':28} p99 <= {TARGET_P99_MS:.0f} ms at {result.rps:.0f} req/s, no errors: {verdict(result.meets_p99)}")
    else:
        print(f"  {'':28} target >= {TARGET_RPS:.0f} req/s and p99 <= {TARGET_P99_MS:.0f} ms, no errors: "
              f"{verdict(result.meets)}")


# -- the aiohttp fallback load generator (runs as its own process) ---------------------------


async def _aiohttp_load(url: str, clients: int, duration_s: float, think_ms: int, paths: list[str]) -> dict[str, Any]:
    import aiohttp  # installed with wslink; only needed without wrk

    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    headers = {"Authorization": os.environ.get("PVW_HPC_BENCH_AUTH", "")}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        start = time.perf_counter()
        stop = start + duration_s

        async def client(k: int) -> None:
            i = k * 37
            while time.perf_counter() < stop:
                i += 1
                if think_ms:
                    await asyncio.sleep(think_ms / 1000)
                t0 = time.perf_counter()
                try:
                    async with session.get(url + paths[i % len(paths)]) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors["status"] += 1
                except asyncio.TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    us = [v * 1e6 for v in latencies] or [0.0]
    return {"requests": len(latencies), "duration_us": int(elapsed * 1e6), **errors,
            "p50_us": percentile(us, 50), "p90_us": percentile(us, 90), "p99_us": percentile(us, 99), "max_us": max(us)}


def load_client_main(argv: Sequence[str]) -> int:
    url, clients, duration, think_ms, *paths = argv
    result = asyncio.run(_aiohttp_load(url, int(clients), float(duration), int(think_ms), paths))
    print("WRK_RESULT " + json.dumps(result), flush=True)
    return 0


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=100, help="concurrent POSTs in the burst (default 100)")
    parser.add_argument("--launch", choices=("wait", "nowait", "both"), default="both",
                        help="blocking POSTs, 'wait': false POSTs then polling, or both in turn (default both)")
    parser.add_argument("--threads", type=int, default=128, help="configuration.threads of serve (default 128)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent keep-alive GET clients (default 50)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per GET load run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed seconds of load before each run (default 2)")
    parser.add_argument("--paced-rps", type=int, default=1000,
                        help="also run GET /<endpoint>/<id> with clients pausing between requests so that about this "
                             "many requests/s are offered: the p99 at the target rate (0: skip; default 1000)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: leave the CPU to serve)")
    parser.add_argument("--pin-cpu", action="store_true", help="configuration.pin_cpu: serve's threads on one CPU")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.wrk_threads < 1 \
            or args.paced_rps < 0:
        parser.error("--sessions, --clients, --wrk-threads must be >= 1, --duration > 0, --warmup, --paced-rps >= 0")
    if args.launch in ("wait", "both") and args.threads < args.sessions:
        parser.error(f"blocking POSTs each hold a waitress thread: --threads must be >= --sessions ({args.sessions})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CLIENT_FLAG]:
        return load_client_main(argv[1:])
    args = parse_args(argv)
    return run_bench(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Phase 1 for each launch mode, phase 2 on the last launcher, then the verdicts."""
    tracker = Tracker()
    launchers: list[Launcher] = []

    def cleanup() -> list[str]:
        problems: list[str] = []
        for launcher in launchers:
            problems += stop_launcher(tracker, launcher)
        return problems + tracker.cleanup()

    modes = ["wait", "nowait"] if args.launch == "both" else [args.launch]
    summary: dict[str, Any] = {"cpus": os.cpu_count(), "sessions": args.sessions, "threads": args.threads, "phase1": []}
    print(f"api load: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f} at start; pvw-hpc serve (waitress) "
          f"with threads={args.threads}{', pin_cpu' if args.pin_cpu else ''}; {args.sessions} sessions of the demo app")
    with cleaned_tempdir("pvw-hpc-bench-load-", cleanup, ignore_during_cleanup=[signal.SIGINT]) as root:
        used: list[tuple[int, int]] = []
        launcher: Launcher | None = None
        for k, mode in enumerate(modes):
            if launcher is not None:  # free the CPU and the ports of the previous burst's apps
                for problem in stop_launcher(tracker, launcher):
                    print(f"  cleanup: {problem}")
                launchers.remove(launcher)
            port_range = find_port_range(max(120, args.sessions + 20), avoid=used)
            used.append(port_range)
            launcher = start_launcher(tracker, f"launcher-{mode}", root / f"{k}-{mode}", args.threads, port_range,
                                      args.pin_cpu)
            launchers.append(launcher)
            summary["phase1"].append(check_burst(launcher, args.sessions, wait=mode == "wait"))
        assert launcher is not None
        ready = sorted(sid for sid in launcher.ids if launcher.state(sid) == "ready")
        if not ready:
            raise BenchError(f"no session is ready: nothing to GET{launcher.diagnostics()}")
        random.shuffle(ready)
        waited = settle(launcher.ids)
        print(f"phase 2: GET load, {args.clients} keep-alive clients, {args.duration:g} s each "
              f"(+{args.warmup:g} s untimed warm-up), against {launcher.root.name} with {len(ready)} ready sessions "
              f"(apps idle after {waited:.0f} s); load average {os.getloadavg()[0]:.2f}")
        id_paths = [f"/{ENDPOINT}/{sid}" for sid in ready]
        runs = [(f"GET /{ENDPOINT}/<id> x{len(ready)}", id_paths, 0), ("GET /health", ["/health"], 0)]
        if args.paced_rps:
            think_ms = max(1, round(args.clients * 1000 / args.paced_rps))
            runs.append((f"GET /{ENDPOINT}/<id> paced", id_paths, think_ms))
        results = []
        for label, paths, think_ms in runs:
            if args.warmup > 0:
                load(tracker, launcher, label, paths, args.clients, args.warmup, args.wrk_threads, root, think_ms)
            result = load(tracker, launcher, label, paths, args.clients, args.duration, args.wrk_threads, root, think_ms)
            if think_ms:
                print(f"  paced: each client waits {think_ms} ms before each request (~{args.paced_rps} req/s offered); "
                      "the throughput target does not apply, the p99 one does")
            print_load(result)
            results.append(result)
        summary["phase2"] = [r.as_dict() for r in results]
        locked = sum(launcher.log_count(LOCKED) for launcher in launchers)
        print("targets:")
        for p1 in summary["phase1"]:
            ok = all(p1["checks"].values())
            print(f"  phase 1 [{p1['mode']}]: {args.sessions} sessions, 0 duplicates, 0 database-lock errors: "
                  f"{verdict(ok)}")
        for r in results:
            if r.think_ms:
                print(f"  phase 2 {r.label}: p99 {r.p99_ms:.1f} ms (<= {TARGET_P99_MS:.0f}) at {r.rps:.0f} req/s: "
                      f"{verdict(r.meets_p99)}")
            else:
                print(f"  phase 2 {r.label}: {r.rps:.0f} req/s (>= {TARGET_RPS:.0f}), p99 {r.p99_ms:.1f} ms "
                      f"(<= {TARGET_P99_MS:.0f}): {verdict(r.meets)}")
        if locked:
            print(f"  note: {locked} \"{LOCKED}\" line(s) in launcher.log by the end of the run")
        if args.json:
            print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
