"""SLURM launch overhead: pvw-hpc's POST -> 200 vs the same app submitted with plain ``sbatch``.

Why this exists: on a batch cluster most of a launch is the scheduler's own
work (``sbatch``, the controller placing the job, ``slurmd`` starting it) and
the app's start-up. None of that is pvw-hpc's to win, so the useful question is
how much pvw-hpc *adds* on top of it: its job files, the job side that wraps
the app on the node, the callback, and its answer. The issue sets the target
"median POST -> 200 over >= 10 launches <= 1.05 x floor + 100 ms", where the
floor is the same app submitted by hand:

* floor: a minimal batch script written here (the same ``#SBATCH`` resources
  pvw-hpc's template renders: partition, time, 1 node, 1 task, 1 CPU, no
  requeue) that ``exec``-s the demo app with the same argv pvw-hpc renders
  (``--host 127.0.0.1 --port <free port> --authKeyFile <file> --timeout 300``)
  and sends its output to a file. Timed from just before the ``sbatch`` call
  until ``wslink: Starting factory`` appears in that file, which is read every
  ~5 ms; then the job is cancelled;
* pvw-hpc: ``pvw-hpc serve`` on a temp config with one SLURM cluster
  (``callback_url: "auto"``), ``POST {"application": "demo"}`` timed to its 200;
  then DELETE (untimed).

After each launch the bench waits until the job has left the RUNNING and
COMPLETING states and the app's port is closed, so that no launch queues
behind the previous one's allocation. Launches are interleaved, one floor and
one pvw-hpc per round, alternating which goes first, so drift of the machine or
of the shared cluster hits both series alike.

slurmctld starts a submitted job on its next scheduling pass (about once a
second here, see "sched: Allocate" in slurmctld.log), so "submit -> job start"
is close to uniform over 0..1 s whoever submits. That is the scheduler's, not
pvw-hpc's, and at n=10 it moves each median by +-150 ms from run to run, so the
headline verdict can flip on its own. Two things keep the result readable:

* a random pause (0..``--jitter-s``) before every launch, so neither series
  locks onto a phase of that pass (the bench's own rhythm would otherwise
  submit at a similar phase every time);
* a split of each launch at the job's start, seen as slurmstepd creating the
  job's output file (the floor's ``--output``, pvw-hpc's ``job.log``, which
  pvw-hpc itself does not create), plus the submission time (the floor's
  ``sbatch`` alone; pvw-hpc's POST -> its session's ``queued`` time). pvw-hpc's
  own additions are then its extra submission time plus its extra
  "job start -> ready" (job script, job side, callback, answer), and the bench
  also prints the target's verdict for "floor median + those additions".

The result is reported, not asserted: the exit code is 0 whether or not the
target is met, 1 when something broke (a launch not answering 200, a job not
starting, ...) and 130 when interrupted (Ctrl-C, SIGTERM, SIGHUP).

Other people use the same cluster, so cleanup only ever touches what this run
made: every job id it submitted or that its launcher recorded is cancelled by
id, plus any job still carrying this run's unique job name (an ``sbatch``
interrupted before it printed its id). The launcher's process group and any
process carrying this run's environment marker are killed, and the temp dir
is removed.

Usage::

    .venv/bin/python bench/slurm_overhead.py [--n 10] [--warmup 1] [--jitter-s 1.0] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import random
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pvw_hpc.procs import pids_with_env

REPO = Path(__file__).resolve().parent.parent
DEMO_APP = REPO / "examples" / "demo" / "app.py"
PVW_HPC = Path(sys.executable).parent / "pvw-hpc"
HOST = "127.0.0.1"
ENDPOINT = "paraview"
CLUSTER = "bench-slurm"
READY_LINE = b"Starting factory"
APP_IDLE_TIMEOUT_S = "300"
PARTITION = "debug"
JOB_TIME = "00:10:00"
LAUNCH_TIMEOUT_S = 60.0  # a launch that takes longer than this is broken, not slow
HTTP_TIMEOUT_S = LAUNCH_TIMEOUT_S + 15.0
FILE_POLL_S = 0.005
MARKER_ENV = "PVW_HPC_BENCH_MARKER"
TARGET_FACTOR = 1.05
TARGET_SLACK_MS = 100.0
BUSY_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"})
SERIES = ("floor", "ours")
LABELS = {"floor": "floor (plain sbatch)", "ours": "pvw-hpc serve"}


class BenchError(Exception):
    """Something broke: the run cannot produce a trustworthy number."""


# -- small helpers -----------------------------------------------------------------------


def free_port() -> int:
    """A port free right now on this host, which is also the cluster's only node."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_listening(port: int) -> bool:
    """True when something accepts TCP connections on ``HOST:port``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.02) -> None:
    """Poll ``check`` until true; BenchError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


def tail(path: Path, lines: int = 15) -> str:
    """The end of a text file, indented, for error messages (empty if unreadable)."""
    try:
        text = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: always one of the measured values."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(pct / 100.0 * len(ordered))) - 1]


def run_quiet(argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command, capturing its output; never raises for a non-zero exit."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


def job_state(job_id: str) -> str:
    """The job's SLURM state word (``""`` once the controller has purged it)."""
    out = run_quiet(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"])
    return out.stdout.strip().split("\n")[0] if out.returncode == 0 else ""


def wait_job_released(job_id: str, what: str) -> None:
    """Wait until the job no longer holds (or waits for) an allocation."""
    wait_until(lambda: job_state(job_id) not in BUSY_STATES, 30, f"{what}: job {job_id} to leave RUNNING", 0.05)


def slurm_problem() -> str | None:
    """Why the local SLURM cluster cannot be used, or None when it answers."""
    for tool in ("sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run schedulers/slurm/up)"
    probe = run_quiet(["sinfo", "-h", "-p", PARTITION, "-o", "%T"])
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"partition {PARTITION!r} does not answer (run schedulers/slurm/up): {probe.stderr.strip()}"
    return None


# -- HTTP ------------------------------------------------------------------------------------


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
    """One request on a fresh connection (like a browser's first XHR); returns status and body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def decode_json(raw: bytes) -> dict[str, Any]:
    """A JSON object from a response body, or ``{"raw": text}`` when it is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {"raw": raw.decode("utf-8", "replace")[:500]}
    return value if isinstance(value, dict) else {"raw": value}


# -- what this run owns ----------------------------------------------------------------------


@dataclass
class Tracker:
    """Every process and SLURM job this run started, so that nothing outlives it."""

    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    groups: list[subprocess.Popen[bytes]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    databases: list[Path] = field(default_factory=list)  # launcher databases whose jobs are ours too

    @property
    def floor_job_name(self) -> str:
        """A job name no one else uses: the last-resort handle on our floor jobs."""
        return f"pvw-bench-floor-{self.marker[:12]}"

    def env(self) -> dict[str, str]:
        """The environment for a child (sbatch exports it into the job): ours plus the marker.

        ``WSLINK_READY_MSG`` would change the ready line and ``PVW_HPC_CONFIG`` the config: both are dropped.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("WSLINK_READY_MSG", "PVW_HPC_CONFIG")}
        return {**env, MARKER_ENV: self.marker}

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the leader of a new process group and remember it."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self.groups.append(proc)
        return proc

    def add_job(self, job_id: str) -> None:
        if job_id and job_id not in self.job_ids:
            self.job_ids.append(job_id)

    def cancel(self, job_id: str) -> None:
        """scancel one of our jobs (an id SLURM no longer knows is fine)."""
        run_quiet(["scancel", job_id])

    def _launcher_job_ids(self) -> list[str]:
        found: list[str] = []
        for db in self.databases:
            if not db.exists():
                continue
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
                with contextlib.suppress(sqlite3.Error):
                    found += [r[0] for r in conn.execute("SELECT job_id FROM sessions WHERE job_id IS NOT NULL")]
        return found

    def _named_job_ids(self) -> list[str]:
        out = run_quiet(["squeue", "-h", "-n", self.floor_job_name, "-o", "%i"])
        return out.stdout.split() if out.returncode == 0 else []

    def cleanup(self) -> list[str]:
        """Cancel our jobs, stop our processes; returns problems worth printing."""
        problems: list[str] = []
        with contextlib.suppress(Exception):
            for job_id in self._launcher_job_ids():
                self.add_job(job_id)
        with contextlib.suppress(Exception):
            for job_id in self._named_job_ids():
                self.add_job(job_id)
        for start in range(0, len(self.job_ids), 200):
            batch = self.job_ids[start:start + 200]
            try:
                done = run_quiet(["scancel", *batch])
                if done.returncode != 0:
                    problems.append(f"scancel {' '.join(batch)}: {done.stderr.strip()}")
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"scancel {' '.join(batch)}: {exc}")
        for proc in list(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in list(self.groups):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.groups.clear()
        time.sleep(0.3)  # give slurmd a moment to signal the cancelled jobs' processes
        stragglers: list[int] = []
        for _ in range(3):
            pids = [pid for pid in pids_with_env(MARKER_ENV, self.marker) if pid != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in stragglers:
                    stragglers.append(pid)
            time.sleep(0.1)
        if stragglers:
            problems.append(f"killed {len(stragglers)} leftover process(es): {stragglers}")
        return problems


# -- the floor: plain sbatch -----------------------------------------------------------------


def write_floor_script(root: Path, tracker: Tracker) -> tuple[Path, Path]:
    """The hand-written batch script and the secret file it passes to the app.

    The port is the script's first argument, so one script serves every launch.
    ``exec`` leaves the app as the job's only process, as a hand-written script would.
    """
    root.mkdir(parents=True)
    secret = root / "secret"
    secret.write_text(uuid.uuid4().hex + "\n")
    secret.chmod(0o600)
    script = root / "floor.sh"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={tracker.floor_job_name}",
        f"#SBATCH --chdir={shlex.quote(str(root))}",
        "#SBATCH --no-requeue",
        f"#SBATCH --partition={PARTITION}",
        f"#SBATCH --time={JOB_TIME}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(DEMO_APP))} --host {HOST} --port "$1" '
        f"--authKeyFile {shlex.quote(str(secret))} --timeout {APP_IDLE_TIMEOUT_S}",
        "",
    ]
    script.write_text("\n".join(lines))
    script.chmod(0o700)
    return script, secret


@dataclass
class Launch:
    """One timed launch: seconds to ready, and to the job's output file appearing (its start)."""

    total_s: float
    start_s: float | None  # None: the job's start was not seen before it was ready
    submit_s: float | None = None  # until the job was submitted: sbatch alone / POST -> sbatch returned


@dataclass
class Floor:
    """Launches of the demo app through a plain ``sbatch``."""

    tracker: Tracker
    root: Path
    script: Path
    count: int = 0
    detect_lags: list[float] = field(default_factory=list)

    def launch(self) -> Launch:
        """From the sbatch call to the ready line in the job's output file (and to the file's creation)."""
        self.count += 1
        out_path = self.root / f"floor-{self.count}.out"
        port = free_port()
        argv = ["sbatch", "--parsable", f"--output={out_path}", str(self.script), str(port)]
        t0 = time.perf_counter()
        submitted = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=self.tracker.env(),
                                   check=False)
        submit_s = time.perf_counter() - t0
        if submitted.returncode != 0:
            raise BenchError(f"floor: sbatch failed ({submitted.returncode}): {submitted.stderr.strip()}")
        job_id = submitted.stdout.strip().split(";")[0]
        self.tracker.add_job(job_id)
        try:
            result = self._wait_ready_line(out_path, job_id, t0)
            result.submit_s = submit_s
            with contextlib.suppress(OSError):
                lag = time.time_ns() - out_path.stat().st_mtime_ns
                self.detect_lags.append(lag / 1e9)
        finally:
            self.tracker.cancel(job_id)
        wait_job_released(job_id, "floor")
        wait_until(lambda: not port_listening(port), 15, f"floor: app port {port} to close")
        return result

    def _wait_ready_line(self, out_path: Path, job_id: str, t0: float) -> Launch:
        started: float | None = None
        offset = 0
        window = b""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        checked_at = time.monotonic()
        while True:
            try:
                with open(out_path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                data = None
            if data is not None and started is None:  # slurmstepd creates the file as the job starts
                started = time.perf_counter() - t0
            if data:
                offset += len(data)
                window = window[-len(READY_LINE):] + data
                if READY_LINE in window:
                    return Launch(time.perf_counter() - t0, started)
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"floor: no ready line from job {job_id} in {LAUNCH_TIMEOUT_S:.0f} s "
                                 f"(state {job_state(job_id) or 'gone'}); output:\n{tail(out_path)}")
            if now - checked_at > 2.0:  # a job that died will never print it: fail fast
                checked_at = now
                state = job_state(job_id)
                if state and state not in BUSY_STATES:
                    raise BenchError(f"floor: job {job_id} is {state} before its ready line; "
                                     f"output:\n{tail(out_path)}")
            time.sleep(FILE_POLL_S)


# -- ours: pvw-hpc serve ---------------------------------------------------------------------


def write_config(root: Path) -> Path:
    """A launcher config with one SLURM cluster and the demo app on it."""
    log_dir = root / "logs"
    log_dir.mkdir(parents=True)
    config = {
        "configuration": {
            "host": HOST,
            "port": 0,
            "endpoint": ENDPOINT,
            "proxy_file": str(root / "proxy.txt"),
            "sessionURL": "ws://${host}:${port}/ws",
            "timeout": LAUNCH_TIMEOUT_S,
            "log_dir": str(log_dir),
            "fields": ["host", "port"],
        },
        "resources": [],
        "properties": {"python_exec": sys.executable, "demo_app": str(DEMO_APP)},
        "clusters": {
            CLUSTER: {
                "scheduler": "slurm",
                "access": "cli",
                "job_dir": str(root / "jobs"),
                "callback_url": "auto",
                # the job side needs only the standard library: an absolute system python starts fastest
                "python": "/usr/bin/python3",
                "defaults": {"partition": PARTITION, "time": JOB_TIME, "cpus": 1},
            },
        },
        "apps": {
            "demo": {
                "cluster": CLUSTER,
                "cmd": ["${python_exec}", "${demo_app}", "--host", "${host}", "--port", "${port}",
                        "--authKeyFile", "${secret_file}", "--timeout", APP_IDLE_TIMEOUT_S],
                "ready_line": READY_LINE.decode(),
            },
        },
    }
    path = root / "launcher.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


class StartWatcher(threading.Thread):
    """Notes when a new session folder's ``job.log`` appears: slurmstepd creates it as the job starts.

    pvw-hpc itself writes only job.sh, spec.json, secret and token there, so
    the log's appearance is the job's start, seen the way the floor's is.
    """

    def __init__(self, jobs_dir: Path) -> None:
        super().__init__(name="start-watcher", daemon=True)
        self.jobs_dir = jobs_dir
        self.known = set(self._listing())
        self.seen_at: float | None = None
        self._stop_event = threading.Event()

    def _listing(self) -> list[str]:
        try:
            return os.listdir(self.jobs_dir)
        except FileNotFoundError:
            return []

    def run(self) -> None:
        new: list[str] = []
        while not self._stop_event.is_set():
            if not new:
                new = [name for name in self._listing() if name not in self.known]
            if any(os.path.exists(self.jobs_dir / name / "job.log") for name in new):
                self.seen_at = time.perf_counter()
                return
            self._stop_event.wait(FILE_POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@dataclass
class Ours:
    """A running ``pvw-hpc serve`` with a SLURM cluster."""

    tracker: Tracker
    root: Path
    proc: subprocess.Popen[bytes]
    port: int = 0
    marker_to_200: list[float] = field(default_factory=list)

    @property
    def stderr_path(self) -> Path:
        return self.root / "stderr.txt"

    def launch(self) -> Launch:
        """POST -> 200 (and POST -> the job log's creation); then DELETE and wait until the job released its CPU."""
        body = json.dumps({"application": "demo"}).encode()
        headers = {"Content-Type": "text/plain;charset=UTF-8"}
        watcher = StartWatcher(self.root / "jobs")
        t0_wall = time.time()
        t0 = time.perf_counter()
        watcher.start()
        try:
            status, raw = http_call(self.port, "POST", f"/{ENDPOINT}/", body, headers)
        except OSError as exc:
            raise BenchError(f"pvw-hpc: POST failed: {exc}{self.diagnostics()}") from exc
        finally:
            watcher.stop()
        elapsed = time.perf_counter() - t0
        started = watcher.seen_at - t0 if watcher.seen_at is not None else None
        answered_ns = time.time_ns()
        answer = decode_json(raw)
        session_id = str(answer.get("id", ""))
        info = self._session(session_id) if session_id else {}
        job_id = str(info.get("job_id") or "")
        queued_at = info.get("transitions", {}).get("queued")
        submit_s = dt.datetime.fromisoformat(queued_at).timestamp() - t0_wall if queued_at else None
        self.tracker.add_job(job_id)
        if status != 200 or not {"id", "sessionURL", "port"} <= answer.keys():
            raise BenchError(f"pvw-hpc: POST answered {status} {answer}{self.diagnostics(session_id)}")
        log_path = self.root / "jobs" / session_id / "job.log"
        with contextlib.suppress(OSError):  # the job side's ready marker is the log's last write
            self.marker_to_200.append((answered_ns - log_path.stat().st_mtime_ns) / 1e9)
        try:
            status, raw = http_call(self.port, "DELETE", f"/{ENDPOINT}/{session_id}")
        except OSError as exc:
            raise BenchError(f"pvw-hpc: DELETE failed: {exc}{self.diagnostics(session_id)}") from exc
        if status != 200:
            raise BenchError(f"pvw-hpc: DELETE {session_id} answered {status} {decode_json(raw)}")
        if job_id:
            wait_job_released(job_id, "pvw-hpc")
        app_port = int(answer["port"])
        wait_until(lambda: not port_listening(app_port), 15, f"pvw-hpc: app port {app_port} to close")
        return Launch(elapsed, started, submit_s)

    def _session(self, session_id: str) -> dict[str, Any]:
        """GET the session (job id, transition times); empty when it cannot be read."""
        with contextlib.suppress(OSError):
            status, raw = http_call(self.port, "GET", f"/{ENDPOINT}/{session_id}", timeout_s=10)
            if status == 200:
                return decode_json(raw)
        return {}

    def diagnostics(self, session_id: str = "") -> str:
        text = f"\n  launcher stderr ({self.stderr_path}):\n{tail(self.stderr_path)}"
        if session_id:
            log_path = self.root / "jobs" / session_id / "job.log"
            text += f"\n  job log ({log_path}):\n{tail(log_path)}"
        return text


def start_ours(tracker: Tracker, root: Path) -> Ours:
    """``pvw-hpc serve`` with port 0: read the port from its ``pvw-hpc: serving`` line."""
    if not PVW_HPC.exists():
        raise BenchError(f"{PVW_HPC} not found: run this with the venv's python (pvw-hpc installed)")
    config = write_config(root)
    tracker.databases.append(root / "logs" / "pvw-hpc.sqlite")
    with open(root / "stderr.txt", "wb") as err:
        proc = tracker.spawn([str(PVW_HPC), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=err, cwd=root, env=tracker.env())
    ours = Ours(tracker, root, proc)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode("utf-8", "replace").strip() if readable else ""
    prefix = f"pvw-hpc: serving http://{HOST}:"
    if not line.startswith(prefix):
        raise BenchError(f"pvw-hpc: expected '{prefix}PORT/{ENDPOINT}/' on stdout, got {line!r} "
                         f"(exit {proc.poll()}){ours.diagnostics()}")
    ours.port = int(line[len(prefix):].split("/", 1)[0])

    def healthy() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"pvw-hpc: exited with {proc.returncode}{ours.diagnostics()}")
        try:
            return http_call(ours.port, "GET", "/health", timeout_s=2)[0] == 200
        except OSError:
            return False

    wait_until(healthy, 30, "pvw-hpc to answer GET /health")
    return ours


# -- report ----------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """median/p90/min/max in ms, plus the raw samples for anyone re-analysing."""
    ms = [s * 1000.0 for s in samples]
    if not ms:
        return {"median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None, "samples_ms": []}
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
        "samples_ms": [round(v, 1) for v in ms],
    }


def report(results: dict[str, list[Launch]], floor: Floor, ours: Ours, args: argparse.Namespace) -> dict[str, Any]:
    """Print the table, the ratio and the verdict, then the split at the job's start; return the JSON summary."""
    stats = {name: summarize([r.total_s for r in results[name]]) for name in SERIES}
    to_start = {name: summarize([r.start_s for r in results[name] if r.start_s is not None]) for name in SERIES}
    after_start = {name: summarize([r.total_s - r.start_s for r in results[name] if r.start_s is not None])
                   for name in SERIES}
    floor_ms, ours_ms = stats["floor"]["median_ms"], stats["ours"]["median_ms"]
    ratio = ours_ms / floor_ms
    limit_ms = TARGET_FACTOR * floor_ms + TARGET_SLACK_MS
    meets = ours_ms <= limit_ms
    marker = summarize(ours.marker_to_200)
    lag = summarize(floor.detect_lags)
    print(f"SLURM launch overhead: n={args.n} per series (+{args.warmup} untimed warm-up), interleaved, "
          f"random 0-{args.jitter_s:g} s pause before each launch; demo app {DEMO_APP.relative_to(REPO)}, "
          f"partition {PARTITION}")
    print(f"{'submit -> ready':24}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}   ms")
    for name in SERIES:
        s = stats[name]
        print(f"{LABELS[name]:24}{s['median_ms']:9.1f}{s['p90_ms']:9.1f}{s['min_ms']:9.1f}{s['max_ms']:9.1f}")
    print(f"ratio ours/floor (medians): {ratio:.3f}   overhead {ours_ms - floor_ms:+.1f} ms")
    print(f"target ours <= {TARGET_FACTOR:g} x floor + {TARGET_SLACK_MS:.0f} ms = {limit_ms:.1f} ms: "
          f"{'met' if meets else 'NOT met'}")
    print("split at the job's start (slurmstepd creating its output file), median / p90 / max ms:")
    print(f"{'':24}{'submit -> job start':>26}{'job start -> ready':>26}")
    for name in SERIES:
        a, b = to_start[name], after_start[name]
        if a["median_ms"] is None:
            print(f"{LABELS[name]:24}{'(start not seen)':>26}")
            continue
        print(f"{LABELS[name]:24}{a['median_ms']:10.1f} /{a['p90_ms']:7.1f} /{a['max_ms']:7.1f}"
              f"{b['median_ms']:10.1f} /{b['p90_ms']:7.1f} /{b['max_ms']:7.1f}")
    submit = {name: summarize([r.submit_s for r in results[name] if r.submit_s is not None]) for name in SERIES}
    print(f"submitting (median / max ms): floor sbatch {submit['floor']['median_ms']} / {submit['floor']['max_ms']}, "
          f"pvw-hpc POST -> session queued (sbatch returned) {submit['ours']['median_ms']} / {submit['ours']['max_ms']}")
    start_overhead = own_ms = estimate_meets = None
    if after_start["floor"]["median_ms"] is not None and after_start["ours"]["median_ms"] is not None:
        start_overhead = round(after_start["ours"]["median_ms"] - after_start["floor"]["median_ms"], 1)
        print(f"job start -> ready, pvw-hpc minus floor (medians): {start_overhead:+.1f} ms "
              "(job script + job side + callback + answer)")
        if submit["floor"]["median_ms"] is not None and submit["ours"]["median_ms"] is not None:
            own_ms = round(start_overhead + submit["ours"]["median_ms"] - submit["floor"]["median_ms"], 1)
            estimate_meets = floor_ms + own_ms <= limit_ms
            print(f"pvw-hpc's own additions (submitting + after the job's start, the scheduler's start delay "
                  f"left out): {own_ms:+.1f} ms;\n  floor median + that = {floor_ms + own_ms:.1f} ms vs the "
                  f"target's {limit_ms:.1f} ms: {'met' if estimate_meets else 'NOT met'}")
    if marker["median_ms"] is not None:
        print(f"paired: job side's ready marker in the job log -> 200 (median / p90 / max): "
              f"{marker['median_ms']:.1f} / {marker['p90_ms']:.1f} / {marker['max_ms']:.1f} ms")
    if lag["median_ms"] is not None:
        print(f"floor detection lag, output file written -> ready line seen (median / max): "
              f"{lag['median_ms']:.1f} / {lag['max_ms']:.1f} ms")
    if args.n < 10:
        print(f"note: n={args.n} is below the 10 launches the issue asks for")
    return {
        "n": args.n,
        "warmup": args.warmup,
        "jitter_s": args.jitter_s,
        "app": str(DEMO_APP.relative_to(REPO)),
        "floor": stats["floor"],
        "ours": stats["ours"],
        "ratio": round(ratio, 4),
        "overhead_ms": round(ours_ms - floor_ms, 1),
        "target": {"factor": TARGET_FACTOR, "slack_ms": TARGET_SLACK_MS, "limit_ms": round(limit_ms, 1)},
        "ours_meets_target": meets,
        "submit_to_job_start": to_start,
        "job_start_to_ready": after_start,
        "job_start_to_ready_overhead_ms": start_overhead,
        "submitting": submit,
        "own_overhead_ms": own_ms,
        "estimate_without_scheduler_delay_meets_target": estimate_meets,
        "marker_to_200": marker,
        "floor_detect_lag": lag,
    }


# -- main ------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so the ``finally`` cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def run_environment() -> Iterator[tuple[Tracker, Path]]:
    """A tracker and a temp dir that are cleaned up however the run ends."""
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    tracker = Tracker()
    root = Path(tempfile.mkdtemp(prefix="pvw-hpc-bench-slurm-", dir="/tmp"))
    try:
        yield tracker, root
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for problem in tracker.cleanup():
                print(f"cleanup: {problem}", file=sys.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            for sig, handler in old.items():
                signal.signal(sig, handler)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--n", type=int, default=10, help="timed launches per series (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed launches per series first (default 1)")
    parser.add_argument("--jitter-s", type=float, default=1.0,
                        help="random pause of 0..this many seconds before each launch (default 1.0; 0: none)")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.jitter_s < 0:
        parser.error("--n must be >= 1, --warmup and --jitter-s >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = slurm_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        with run_environment() as (tracker, root):
            script, _secret = write_floor_script(root / "floor", tracker)
            floor = Floor(tracker, root / "floor", script)
            ours = start_ours(tracker, root / "ours")
            measure: dict[str, Callable[[], Launch]] = {"floor": floor.launch, "ours": ours.launch}
            rng = random.Random()

            def timed(name: str) -> Launch:
                time.sleep(rng.uniform(0.0, args.jitter_s))  # a random phase against slurmctld's scheduling pass
                return measure[name]()

            for _ in range(args.warmup):
                for name in SERIES:
                    timed(name)
            floor.detect_lags.clear()
            ours.marker_to_200.clear()
            results: dict[str, list[Launch]] = {name: [] for name in SERIES}
            for i in range(args.n):
                order = SERIES if i % 2 == 0 else SERIES[::-1]  # alternate so neither always goes first
                for name in order:
                    results[name].append(timed(name))
            summary = report(results, floor, ours, args)
            if args.json:
                print(json.dumps(summary, indent=2))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
