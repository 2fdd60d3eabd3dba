"""Launch latency on every batch scheduler: POST -> 200 for the demo app on SLURM, PBS and HTCondor.

Why this exists: a portal user waits for the scheduler more than for anything
of ours, and the three schedulers differ a lot in how fast they start a job
(SLURM's scheduling pass, the Torque wrappers' extra Perl and sbatch, an
HTCondor negotiation cycle). This prints, for each scheduler that runs here,
the median and spread of POST -> 200 through one ``pvw-hpc serve`` holding
all three clusters (as ``tests/test_batch_e2e.py`` does), and the part of each
launch that is pvw-hpc's own: POST -> the job is submitted (session
``queued``). The issue sets no target for these; they are reported so that a
change that slows a backend shows. Launches run one at a time, round robin over
the schedulers, each DELETEd before the next.

Needs the schedulers up (``schedulers/slurm/up``, ``schedulers/pbs/up``,
``schedulers/htcondor/up``); a scheduler that does not answer is left out and
said so. Exit 0 when it ran, 1 when something broke, 130 when interrupted.

Usage::

    .venv/bin/python bench/batch_launch.py [--n 5] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pvw_hpc.batch.htcondor.adapter import bindings  # CONDOR_CONFIG set before the import, as the adapter does

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or not, _common is found
from _common import (  # noqa: E402
    PVW_HPC,
    BenchError,
    ProcessTracker,
    cleaned_tempdir,
    configuration_section,
    decode_json,
    delete_session,
    http_call,
    print_stats_table,
    run_bench,
    serving_port,
    spawn_serve,
    summarize,
    wait_healthy,
    write_launcher_config,
)

DEMO_APP = Path(__file__).resolve().parents[1] / "examples" / "demo" / "app.py"
CONDOR_CONFIG = str(Path(os.environ.get("HTCONDOR_STATE", "/tmp/pvw-htcondor")) / "condor_config")
CONDOR_PYTHON = os.environ.get("HTCONDOR_PYTHON", "/opt/pvw-venv/bin/python")  # inside the pool's chroot
TIMEOUT_S = 60


def cluster_configs(root: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Scheduler -> (cluster config, the python with wslink where its jobs run), for those that answer here."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    common = {"callback_url": "auto", "python": "/usr/bin/python3", "poll_fast_s": 0.2, "poll_slow_s": 2,
              "allow_loopback": True,  # the local clusters' nodes are this machine
              "defaults": {"time": "00:10:00", "cpus": 1}}
    if shutil.which("sinfo") and _ok(["sinfo", "-h", "-o", "%T"]):
        out["slurm"] = ({"scheduler": "slurm", **common, "job_dir": str(root / "jobs" / "slurm")}, sys.executable)
    if shutil.which("qstat") and _rc(["qstat", "-f", "999999999"]) == 153:
        out["pbs"] = ({"scheduler": "pbs", "flavor": "torque", **common, "job_dir": str(root / "jobs" / "pbs")},
                      sys.executable)
    if Path(CONDOR_CONFIG).exists() and _condor_answers():
        out["htcondor"] = ({"scheduler": "htcondor", **common, "condor_config": CONDOR_CONFIG, "job_user": "pvwcondor",
                            "job_dir": str(root / "jobs" / "htcondor")}, CONDOR_PYTHON)
    return out


def _rc(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def _ok(argv: list[str]) -> bool:
    return _rc(argv) == 0


def _condor_answers() -> bool:
    try:
        bindings(CONDOR_CONFIG).Schedd().query("false", projection=["ClusterId"])
    except Exception:
        return False
    return True


def launch_once(port: int, scheduler: str, diagnostics: Any) -> tuple[float, float]:
    """One POST -> 200 and the time to the session's ``queued`` transition (both in seconds)."""
    body = json.dumps({"application": f"demo-{scheduler}"}).encode()
    started = time.time()
    t0 = time.perf_counter()
    status, raw = http_call(port, "POST", "/paraview/", body, {"Content-Type": "application/json"},
                            timeout_s=TIMEOUT_S + 30)
    took = time.perf_counter() - t0
    answer = decode_json(raw)
    if status != 200:
        raise BenchError(f"{scheduler}: POST answered {status} {answer}{diagnostics()}")
    status, raw = http_call(port, "GET", f"/paraview/{answer['id']}", headers={"X-Session-Secret": answer["secret"]},
                            timeout_s=10)
    queued_at = decode_json(raw).get("transitions", {}).get("queued")
    submitted = (dt.datetime.fromisoformat(queued_at).timestamp() - started) if queued_at else float("nan")
    delete_session(port, answer["id"], scheduler, diagnostics, 30, secret=answer["secret"])
    return took, submitted


def run(args: argparse.Namespace) -> None:
    tracker = ProcessTracker()
    config_path: list[Path] = []

    def cleanup() -> list[str]:
        """Stop serve, then end (in-process, as ``pvw-hpc cancel`` does) any session an interruption left."""
        problems = tracker.cleanup()
        for path in config_path:
            listed = subprocess.run([str(PVW_HPC), "list", "--config", str(path), "--json"], capture_output=True,
                                    text=True, timeout=60)
            sessions = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
            for session in sessions:
                if session.get("state") not in ("ended", "failed"):
                    subprocess.run([str(PVW_HPC), "cancel", session["id"], "--config", str(path)],
                                   capture_output=True, timeout=60)
                    problems.append(f"cancelled leftover session {session['id']} ({session.get('cluster')})")
        return problems

    with cleaned_tempdir("pvw-hpc-bench-batch-", cleanup, [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]) as root:
        root.chmod(0o755)  # HTCondor jobs run as their own user and must reach their folders
        clusters = cluster_configs(root)
        if not clusters:
            raise BenchError("no scheduler answers here (schedulers/slurm/up, pbs/up, htcondor/up)")
        missing = sorted({"slurm", "pbs", "htcondor"} - set(clusters))
        config = {
            "configuration": {**configuration_section(root, 0, TIMEOUT_S), "fields": []},
            "resources": [],
            "clusters": {name: cfg for name, (cfg, _python) in clusters.items()},
            "apps": {f"demo-{name}": {"cluster": name, "ready_line": "Starting factory",
                                      "cmd": [python, str(DEMO_APP), "--host", "${host}", "--port", "${port}",
                                              "--authKeyFile", "${secret_file}", "--timeout", "300"]}
                     for name, (_cfg, python) in clusters.items()},
        }
        config_path.append(write_launcher_config(root, config))
        proc = spawn_serve(tracker, root, config_path[0])
        port, line = serving_port(proc)
        if port is None:
            raise BenchError(f"pvw-hpc serve did not start: {line}")

        def diagnostics() -> str:
            return "\n" + (root / "stderr.txt").read_text(errors="replace")[-2000:]

        def alive() -> None:
            if proc.poll() is not None:
                raise BenchError(f"pvw-hpc serve exited {proc.returncode}{diagnostics()}")

        wait_healthy(port, alive)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in clusters}
        for _ in range(args.n):
            for name in clusters:
                results[name].append(launch_once(port, name, diagnostics))
        summary = {name: {"post_to_200": summarize([r[0] for r in rows]),
                          "post_to_submitted": summarize([r[1] for r in rows])} for name, rows in results.items()}
        print(f"batch launch latency, n={args.n} per scheduler, one pvw-hpc serve with {len(clusters)} clusters"
              + (f" (not running here: {', '.join(missing)})" if missing else ""))
        print_stats_table("POST -> 200", [(name, s["post_to_200"]) for name, s in summary.items()])
        print_stats_table("POST -> job submitted", [(name, s["post_to_submitted"]) for name, s in summary.items()])
        if args.json:
            print(json.dumps(summary, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=5, help="launches per scheduler (default 5)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    return run_bench(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
