"""What the benchmarks in ``bench/`` share, kept in one place so that it cannot drift apart.

Why: the benches measure different things but make the same promises: exit
code 0 / 1 / 130 (reported, broke, interrupted), nothing they start outlives
them (processes, SLURM jobs, the temp dir), even on Ctrl-C or SIGTERM, and
numbers summarised the same way (median, nearest-rank p90, min, max, in ms).
A fix to any of that belongs in every bench at once.

The scripts are run as ``python bench/X.py``; each puts this folder on
``sys.path`` itself and imports this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

from pvw_hpc.procs import pids_with_env

REPO = Path(__file__).resolve().parent.parent
DEMO_APP = REPO / "examples" / "demo" / "app.py"
PVW_HPC = Path(sys.executable).parent / "pvw-hpc"
HOST = "127.0.0.1"
ENDPOINT = "paraview"
READY_LINE = "Starting factory"
APP_IDLE_TIMEOUT_S = "300"  # the app's --timeout, as in examples/local/launcher.json
MARKER_ENV = "PVW_HPC_BENCH_MARKER"
SERVING_PREFIX = f"pvw-hpc: serving http://{HOST}:"
LAUNCH_BODY = json.dumps({"application": "demo"}).encode()  # what the browser POSTs, encoded before any timing
LAUNCH_HEADERS = {"Content-Type": "text/plain;charset=UTF-8"}


class BenchError(Exception):
    """Something broke: the run cannot produce a trustworthy number."""


# -- how a run starts and ends -----------------------------------------------------------


def run_bench(body: Callable[[], None]) -> int:
    """Run ``body`` and turn how it ended into the exit code every bench documents.

    0: it ran (whether or not a target was met); 1: a BenchError, printed as
    ``error: ...``; 130: interrupted (Ctrl-C, or SIGTERM/SIGHUP inside
    :func:`cleaned_tempdir`), after the cleanup has run.
    """
    try:
        body()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    return 0


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so the ``finally`` cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cleaned_tempdir(prefix: str, cleanup: Callable[[], Iterable[str]],
                    ignore_during_cleanup: Sequence[signal.Signals]) -> Iterator[Path]:
    """A fresh temp dir under /tmp; however the run ends, ``cleanup`` runs and the dir is removed.

    While the run is on, SIGTERM and SIGHUP raise KeyboardInterrupt so that a
    killed bench still gets here. During the cleanup the signals in
    ``ignore_during_cleanup`` are ignored (a second Ctrl-C must not cut it
    short); each problem ``cleanup`` returns is printed as ``cleanup: ...``.
    The previous signal handlers are restored at the end.
    """
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        for sig in ignore_during_cleanup:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for problem in cleanup():
                print(f"cleanup: {problem}", file=sys.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            for sig, handler in old.items():
                signal.signal(sig, handler)


# -- processes -------------------------------------------------------------------------------


@dataclass
class ProcessTracker:
    """Every process a run started, so that nothing outlives it.

    Each child is the leader of its own process group and carries a marker in
    its environment: killing the groups stops what we started directly, and a
    ``/proc`` scan for the marker catches what escaped them (apps that run in
    their own sessions, job steps sbatch exported the environment to).
    """

    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    groups: list[subprocess.Popen[bytes]] = field(default_factory=list)
    drop_env: ClassVar[tuple[str, ...]] = ()  # variables a subclass keeps from its children

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a child: ours (less ``drop_env``) plus ``extra`` and the marker the cleanup scans for."""
        inherited = {k: v for k, v in os.environ.items() if k not in self.drop_env}
        return {**inherited, **(extra or {}), MARKER_ENV: self.marker}

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the leader of a new process group and remember it."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self.groups.append(proc)
        return proc

    def marked_pids(self) -> list[int]:
        """Pids whose environment carries this run's marker (our children and theirs)."""
        return [pid for pid in pids_with_env(MARKER_ENV, self.marker) if pid != os.getpid()]

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a group we started and reap its leader (timing runs need no grace)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc in self.groups:
            self.groups.remove(proc)

    def stop_groups(self, grace_s: float = 3.0) -> None:
        """SIGTERM every group, give them ``grace_s`` together to exit, then SIGKILL each group."""
        for proc in list(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in list(self.groups):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in list(self.groups):
            self.kill_group(proc)  # also members that outlived an exited leader

    def kill_marked(self) -> list[str]:
        """SIGKILL whatever still carries the marker; a problem line when there was any, so leaks are visible."""
        stragglers: list[int] = []
        for _ in range(3):  # a dying parent may still have been forking
            pids = self.marked_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in stragglers:
                    stragglers.append(pid)
            time.sleep(0.1)
        return [f"killed {len(stragglers)} leftover process(es): {stragglers}"] if stragglers else []

    def cleanup(self) -> list[str]:
        """Stop everything: groups first, then marked stragglers; returns problems worth printing."""
        self.stop_groups()
        return self.kill_marked()


# -- SLURM -----------------------------------------------------------------------------------


def run_quiet(argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command, capturing its output; never raises for a non-zero exit."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


def require_slurm(partition: str) -> None:
    """BenchError saying why the local SLURM cluster cannot be used; checked before anything is submitted."""
    for tool in ("sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (run schedulers/slurm/up)")
    probe = run_quiet(["sinfo", "-h", "-p", partition, "-o", "%T"])
    if probe.returncode != 0 or not probe.stdout.strip():
        raise BenchError(f"partition {partition!r} does not answer (run schedulers/slurm/up): {probe.stderr.strip()}")


def jobs_named(name: str) -> list[str]:
    """Ids of the jobs called ``name``: the last-resort handle on a job whose ``sbatch`` was cut off before its id."""
    out = run_quiet(["squeue", "-h", "-n", name, "-o", "%i"])
    return out.stdout.split() if out.returncode == 0 else []


def scancel_batches(job_ids: Sequence[str], batch_size: int = 200, timeout_s: float = 30.0,
                    stderr_chars: int | None = None) -> list[tuple[list[str], str]]:
    """``scancel`` our ids only (others share the cluster), a batch per call; returns (batch, error) per failed call.

    The error is scancel's stderr (cut to ``stderr_chars``) or the exception
    that stopped it; the caller words the problem line.
    """
    failures: list[tuple[list[str], str]] = []
    for start in range(0, len(job_ids), batch_size):
        batch = list(job_ids[start:start + batch_size])
        try:
            done = run_quiet(["scancel", *batch], timeout_s=timeout_s)
            if done.returncode != 0:
                failures.append((batch, done.stderr.strip()[:stderr_chars]))
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append((batch, str(exc)))
    return failures


# -- ports, waiting, files -------------------------------------------------------------------


def port_bindable(port: int) -> bool:
    """True when nothing holds ``HOST:port`` (a plain bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def find_port_range(size: int, avoid: Sequence[tuple[int, int]] = ()) -> tuple[int, int]:
    """An inclusive range of ``size`` ports that are all free now.

    Picked below Linux's default ephemeral range (32768+) so outgoing
    connections and our own port-0 binds do not land in it mid-run. Stock
    never checks its ports, so for it a busy port would mean a launch that
    waits the whole timeout; pvw-hpc would skip it, but both get a clean range.
    """
    rng = random.Random()
    for _ in range(500):
        lo = rng.randrange(12000, 32000 - size)
        hi = lo + size - 1
        if any(lo <= b and a <= hi for a, b in avoid):
            continue
        if all(port_bindable(p) for p in range(lo, hi + 1)):
            return lo, hi
    raise BenchError(f"could not find {size} consecutive free ports")


def free_port() -> int:
    """A port the OS considers free right now (bind to 0, read it back, release it)."""
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


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.01) -> None:
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


# -- HTTP and pvw-hpc serve ------------------------------------------------------------------


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, *, timeout_s: float) -> tuple[int, bytes]:
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


def post_launch(port: int, who: str, diagnostics: Callable[[], str], timeout_s: float) -> tuple[int, bytes]:
    """POST a demo launch like the browser does; BenchError (with ``diagnostics()``) when the request fails."""
    try:
        return http_call(port, "POST", f"/{ENDPOINT}/", LAUNCH_BODY, LAUNCH_HEADERS, timeout_s=timeout_s)
    except OSError as exc:
        raise BenchError(f"{who}: POST failed: {exc}{diagnostics()}") from exc


def secret_header(secret: str | None) -> dict[str, str]:
    """pvw-hpc lets the holder of a session's secret read and stop it, as its creator (stock ignores it)."""
    return {"X-Session-Secret": secret} if secret else {}


def delete_session(port: int, session_id: str, who: str, diagnostics: Callable[[], str], timeout_s: float,
                   secret: str | None = None) -> None:
    """DELETE a session; BenchError unless the launcher answers 200."""
    try:
        status, raw = http_call(port, "DELETE", f"/{ENDPOINT}/{session_id}", headers=secret_header(secret),
                                timeout_s=timeout_s)
    except OSError as exc:
        raise BenchError(f"{who}: DELETE failed: {exc}{diagnostics()}") from exc
    if status != 200:
        raise BenchError(f"{who}: DELETE {session_id} answered {status} {decode_json(raw)}")


def spawn_serve(tracker: ProcessTracker, root: Path, config: Path) -> subprocess.Popen[bytes]:
    """Start ``pvw-hpc serve`` on ``config`` in ``root``: stdout piped (see :func:`serving_port`), stderr to a file."""
    if not PVW_HPC.exists():
        raise BenchError(f"{PVW_HPC} not found: run this with the venv's python (pvw-hpc installed)")
    with open(root / "stderr.txt", "wb") as err:
        return tracker.spawn([str(PVW_HPC), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=err, cwd=root, env=tracker.env())


def serving_port(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> tuple[int | None, str]:
    """The port from serve's first stdout line (``SERVING_PREFIX`` PORT/...) and that line; None if it is not one.

    Configs use port 0, so this line is the only way to learn the port.
    """
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().decode("utf-8", "replace").strip() if readable else ""
    if not line.startswith(SERVING_PREFIX):
        return None, line
    return int(line[len(SERVING_PREFIX):].split("/", 1)[0]), line


def wait_healthy(port: int, check_alive: Callable[[], None], step_s: float = 0.01) -> None:
    """Wait until serve answers ``GET /health``; ``check_alive`` raises BenchError once serve has exited."""

    def healthy() -> bool:
        check_alive()
        try:
            return http_call(port, "GET", "/health", timeout_s=2)[0] == 200
        except OSError:
            return False

    wait_until(healthy, 30, "pvw-hpc to answer GET /health", step_s)


# -- launcher configs ------------------------------------------------------------------------


def demo_argv(python: str, app: str, host: str, port: str, auth_flag: str, auth_value: str) -> list[str]:
    """The demo app's argv; one function so that floors and launchers run exactly the same command."""
    return [python, app, "--host", host, "--port", port, auth_flag, auth_value, "--timeout", APP_IDLE_TIMEOUT_S]


def configuration_section(root: Path, port: int, timeout_s: float) -> dict[str, Any]:
    """The ``configuration`` block of every bench config: stock's keys, absolute paths under ``root``."""
    return {
        "host": HOST,
        "port": port,
        "endpoint": ENDPOINT,
        "proxy_file": str(root / "proxy.txt"),
        "sessionURL": "ws://${host}:${port}/ws",
        "timeout": timeout_s,
        "log_dir": str(root / "logs"),
        "fields": ["host", "port"],
    }


def local_demo_config(root: Path, port: int, port_range: tuple[int, int], timeout_s: float,
                      **configuration: Any) -> dict[str, Any]:
    """A stock-style config for the demo app on the local backend; ``configuration`` adds keys."""
    return {
        "configuration": {**configuration_section(root, port, timeout_s), **configuration},
        "resources": [{"host": HOST, "port_range": list(port_range)}],
        "properties": demo_properties(),
        "apps": {
            "demo": {
                "cmd": demo_argv("${python_exec}", "${demo_app}", "${host}", "${port}", "--authKey", "${secret}"),
                "ready_line": READY_LINE,
            }
        },
    }


def demo_properties() -> dict[str, str]:
    """The ``properties`` the demo app's ``cmd`` refers to: this python and the app's absolute path."""
    return {"python_exec": sys.executable, "demo_app": str(DEMO_APP)}


def batch_demo_app(cluster: str) -> dict[str, Any]:
    """The demo app on a batch cluster, as pvw-hpc renders it there (the secret passed as a file)."""
    return {
        "cluster": cluster,
        "cmd": demo_argv("${python_exec}", "${demo_app}", "${host}", "${port}", "--authKeyFile", "${secret_file}"),
        "ready_line": READY_LINE,
    }


def write_launcher_config(root: Path, config: dict[str, Any]) -> Path:
    """Create ``root/logs`` (the log_dir of :func:`configuration_section`) and write ``root/launcher.json``."""
    (root / "logs").mkdir(parents=True)
    path = root / "launcher.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# -- statistics and report -------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: always one of the measured values, no interpolation."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """median/p90/min/max in ms (None when there are no samples), plus the raw samples for anyone re-analysing."""
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


def print_stats_table(title: str, rows: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """One line per series (label, :func:`summarize` result): median, p90, min, max in ms, in aligned columns."""
    print(f"{title:24}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}   ms")
    for label, s in rows:
        print(f"{label:24}{s['median_ms']:9.1f}{s['p90_ms']:9.1f}{s['min_ms']:9.1f}{s['max_ms']:9.1f}")
