"""Poll cost: scheduler calls and launcher CPU per poll cycle with 1, 100 and 1000 tracked SLURM jobs,
through the command-line tools (``"access": "cli"``) and through pyslurm (``"access": "pyslurm"``).

Why this exists: the poller follows every batch session until it ends, so its
cost grows with the number of sessions a launcher tracks. A site with many
users queued at once must not see one ``squeue`` per job (that hammers the
controller, which every user of the cluster shares) nor a launcher that burns
a core polling. The issue sets the target "1 scheduler call per cycle at every
N, and <= 20 ms launcher CPU per cycle at 1000 tracked jobs".

How: the composition root :class:`pvw_hpc.runtime.Runtime` is built in this
process on a temp config with one SLURM cluster (its SQLite store on disk, as
``serve`` uses), constructed but not started: no map writer, local monitor,
poller or housekeeper thread runs, so the process's CPU time is the cycles'
(``runtime.poller.tick()`` called here). One such runtime per access mode
(``--access cli|pyslurm|both``, both by default) follows the same jobs.
Real held SLURM jobs are submitted (``sbatch -H --wrap 'sleep 1'``: they
never run, so they stay queued and need no CPUs), and one session row per
job is written the way ``Service._launch_batch`` writes it (create, job id,
QUEUED), so the poller tracks them exactly as it would live launches. For each N the bench grows the
set to N sessions, runs one warm-up cycle (it records every new job's
scheduler state and reason: one write per new row, a one-off reported apart)
and then ``--cycles`` measured :meth:`Poller.tick` calls, each timed for:

* scheduler calls: calls of the cluster adapter's command runner, by command;
  for pyslurm, the requests the adapter sends its pyslurm worker process
  (``load``, ``submit``, ``cancel``: each one pyslurm call, one libslurm RPC),
  counted by wrapping the worker client's ``request``;
* subprocesses: every process any code in this process started during the
  cycle (``subprocess.Popen`` is counted while the cycle runs), which also
  catches retries, a restarted pyslurm worker and anything outside the runner;
* launcher CPU: ``time.process_time()`` around the tick (this process only,
  all threads; the child ``squeue``'s CPU and the pyslurm worker's are not in it);
* scheduler time: wall time spent inside the runner (``squeue`` itself and the
  controller answering it) or waiting for the worker's reply, and the
  scheduler side's CPU: the children's from ``getrusage(RUSAGE_CHILDREN)``
  for ``squeue``; for pyslurm the worker's (a child never waited for, so not
  in getrusage), read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on
  the CPU, user and system) before and after the cycle, falling back to
  ``/proc/<pid>/stat`` utime + stime (clock ticks) where there is no schedstat;
* wall time of the whole cycle.

pyslurm's CPU per cycle is the launcher's plus the worker's: its target verdict
is on that sum.

Each table also says how many jobs slurmctld held (every user's, and finished
ones for MinJobAge, so a run right after another holds that one's too): one
``Jobs.load()`` carries all of them into the launcher, whatever N is, and a
``squeue -j`` of many ids loads them all too, in its own process.

Medians over the measured cycles are reported, one table per access mode, then
both side by side. ``--profile`` also runs cProfile around one more cycle at the
largest N and prints where its time goes.

The numbers are reported, not asserted: exit code 0 whether or not a target is
met, 1 when something broke, 130 when interrupted (Ctrl-C, SIGTERM, SIGHUP).

Other people use the same cluster, so cleanup cancels only this run's jobs:
every id it got back from ``sbatch``, plus any job still carrying this run's
unique job name (an ``sbatch`` interrupted before it printed its id), in
batches of ids -- on success, error and Ctrl-C alike. The temp dir is removed.

Usage::

    .venv/bin/python bench/poll_cost.py [--sizes 1,100,1000] [--cycles 5] [--access cli|pyslurm|both]
                                        [--profile] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import os
import pstats
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvw_hpc import jobs
from pvw_hpc.batch.base import BatchError
from pvw_hpc.batch.runner import CommandRunner, Result
from pvw_hpc.batch.slurm_pyslurm.adapter import SlurmPyslurmAdapter
from pvw_hpc.batch.slurm_pyslurm.client import PyslurmWorker, shared_worker
from pvw_hpc.config import load_dict
from pvw_hpc.poller import Poller
from pvw_hpc.runtime import Runtime
from pvw_hpc.service import Service
from pvw_hpc.states import SessionState
from pvw_hpc.substitute import render

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or not, _common is found
from _common import (  # noqa: E402
    BenchError,
    batch_demo_app,
    cleaned_tempdir,
    configuration_section,
    demo_properties,
    jobs_named,
    require_slurm,
    run_bench,
    run_quiet,
    scancel_batches,
)

CLUSTERS = {"cli": "bench-slurm", "pyslurm": "bench-pyslurm"}  # access mode -> its cluster's name
ACCESS_MODES = tuple(CLUSTERS)
PARTITION = "debug"
DEFAULT_SIZES = (1, 100, 1000)
TARGET_CALLS = 1
TARGET_CPU_MS = 20.0
TARGET_CPU_AT = 1000
SUBMIT_THREADS = 8
CANCEL_BATCH = 200


# -- the held jobs ---------------------------------------------------------------------------


@dataclass
class HeldJobs:
    """The held SLURM jobs this run submitted; ``cancel_all`` removes every one of them."""

    name: str = field(default_factory=lambda: f"pvw-bench-poll-{uuid.uuid4().hex[:12]}")
    ids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _submit_one(self) -> str:
        argv = ["sbatch", "--parsable", "-H", "-J", self.name, "-p", PARTITION, "-t", "1", "-n", "1",
                "--no-requeue", "-o", "/dev/null", "--wrap", "sleep 1"]
        done = run_quiet(argv)
        if done.returncode != 0:
            raise BenchError(f"sbatch -H failed ({done.returncode}): {done.stderr.strip()}")
        job_id = done.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise BenchError(f"unexpected sbatch output: {done.stdout!r}")
        with self._lock:
            self.ids.append(job_id)
        return job_id

    def submit(self, count: int) -> float:
        """Submit ``count`` more held jobs (a few sbatch at a time); returns the seconds it took."""
        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=SUBMIT_THREADS)
        try:
            futures = [pool.submit(self._submit_one) for _ in range(count)]
            for future in as_completed(futures):
                future.result()
        finally:  # on an error or Ctrl-C: no new sbatch; the few running ones finish and are recorded
            pool.shutdown(wait=True, cancel_futures=True)
        return time.perf_counter() - started

    def cancel_all(self) -> list[str]:
        """scancel our ids in batches, then any job still named like ours; returns problems."""
        problems: list[str] = []
        with contextlib.suppress(Exception):
            listed = jobs_named(self.name)
            with self._lock:
                known = set(self.ids)
                self.ids.extend(j for j in listed if j not in known)
        with self._lock:
            ids = list(self.ids)
        for batch, error in scancel_batches(ids, CANCEL_BATCH, timeout_s=60.0, stderr_chars=300):
            problems.append(f"scancel of {len(batch)} jobs from {batch[0]}: {error}")
        with contextlib.suppress(Exception):  # what is still waiting after that?
            left = run_quiet(["squeue", "-h", "-n", self.name, "-t", "PENDING,RUNNING", "-o", "%i"])
            if left.stdout.split():
                problems.append(f"{len(left.stdout.split())} job(s) named {self.name} still queued")
        return problems


# -- counting what a cycle does --------------------------------------------------------------


@dataclass
class Meter:
    """Counts scheduler calls (how: the subclass) and every subprocess started during a cycle."""

    calls: Counter[str] = field(default_factory=Counter)
    scheduler_s: float = 0.0
    spawned: int = 0

    def timed(self, name: str, call: Any) -> Any:
        """``call`` counted under ``name``, its wall time added to ``scheduler_s``."""
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.scheduler_s += time.perf_counter() - started
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.scheduler_s = 0.0
        self.spawned = 0

    @contextlib.contextmanager
    def counting_subprocesses(self) -> Iterator[None]:
        """While active, every ``subprocess.Popen`` (``subprocess.run`` uses it) adds one to ``spawned``."""
        original = subprocess.Popen
        meter = self

        class CountedPopen(original):  # type: ignore[valid-type,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                meter.spawned += 1
                super().__init__(*args, **kwargs)

        subprocess.Popen = CountedPopen  # type: ignore[misc]
        try:
            yield
        finally:
            subprocess.Popen = original  # type: ignore[misc]


@dataclass
class CycleMeter(Meter):
    """The command-line path: every command the adapter's runner runs is one scheduler call."""

    runner: CommandRunner = field(default_factory=CommandRunner)

    def install(self) -> None:
        original = self.runner.run

        def counted_run(argv: Sequence[str], **kwargs: Any) -> Result:
            return self.timed(os.path.basename(argv[0]), original)(argv, **kwargs)  # type: ignore[no-any-return]

        self.runner.run = counted_run  # type: ignore[method-assign]


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far; None when it is gone.

    ``/proc/<pid>/task/*/schedstat`` (nanoseconds, every thread) where the kernel has it, else
    ``/proc/<pid>/stat`` utime + stime (clock ticks: 10 ms steps).
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total_ns = 0
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total_ns += int(fh.read().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PyslurmMeter(Meter):
    """The pyslurm path: every request the adapter sends its worker is one scheduler call (one pyslurm call)."""

    adapter: SlurmPyslurmAdapter = field(default_factory=SlurmPyslurmAdapter)

    def install(self) -> None:
        client = self.adapter.worker
        try:
            client.check(30.0)  # the worker starts (and imports pyslurm) here, before any cycle
        except BatchError as exc:
            raise BenchError(f"pyslurm cannot be used here: {exc}") from None
        client.request = self.timed_request(client)  # type: ignore[method-assign]

    def timed_request(self, client: PyslurmWorker) -> Any:
        original = client.request

        def counted(op: str, timeout_s: float, **args: Any) -> Any:
            return self.timed(op, original)(op, timeout_s, **args)
        return counted

    def worker_cpu_s(self) -> float | None:
        pid = self.adapter.worker.pid
        return None if pid is None else process_cpu_s(pid)


@dataclass
class Cycle:
    """What one poll cycle cost."""

    calls: dict[str, int]
    subprocesses: int
    cpu_ms: float
    wall_ms: float
    scheduler_ms: float
    scheduler_cpu_ms: float

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def measure_tick(poller: Poller, meter: Meter) -> Cycle:
    """Run one :meth:`Poller.tick` and meter it."""
    meter.reset()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_before = meter.worker_cpu_s() if isinstance(meter, PyslurmMeter) else None
    with meter.counting_subprocesses():
        cpu0, wall0 = time.process_time(), time.perf_counter()
        poller.tick()
        cpu1, wall1 = time.process_time(), time.perf_counter()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = max(0.0, children_after.ru_utime + children_after.ru_stime  # no -0.00 from float sums
                    - children_before.ru_utime - children_before.ru_stime)
    if isinstance(meter, PyslurmMeter):  # the worker is a child nobody waits for: its CPU from /proc
        worker_after = meter.worker_cpu_s()
        if worker_before is None or worker_after is None:  # the worker was restarted during the cycle
            raise BenchError("the pyslurm worker changed during a cycle: its CPU cannot be measured")
        child_cpu = max(0.0, worker_after - worker_before)
    return Cycle(calls=dict(meter.calls), subprocesses=meter.spawned, cpu_ms=(cpu1 - cpu0) * 1000,
                 wall_ms=(wall1 - wall0) * 1000, scheduler_ms=meter.scheduler_s * 1000,
                 scheduler_cpu_ms=child_cpu * 1000)


# -- the launcher side -----------------------------------------------------------------------


def build_runtime(root: Path, access: str) -> Runtime:
    """The composition root on a temp config with one SLURM cluster of ``access`` and the demo app on it.

    Constructed, not started: no thread of its own runs; the bench drives ``runtime.poller.tick()``.
    """
    cluster = CLUSTERS[access]
    raw = {
        "configuration": configuration_section(root, 0, 30),
        "resources": [],
        "properties": demo_properties(),
        "clusters": {
            cluster: {"scheduler": "slurm", "access": access, "job_dir": str(root / "jobs"),
                      "callback_url": "http://127.0.0.1:9/paraview", "allow_loopback": True,
                      "defaults": {"partition": PARTITION, "time": "00:10:00", "cpus": 1}},
        },
        "apps": {"demo": batch_demo_app(cluster)},
    }
    return Runtime(load_dict(raw, source="bench/poll_cost.py"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def track(service: Service, job_ids: Sequence[str]) -> None:
    """One QUEUED session row per job, written as ``Service._launch_batch`` writes it."""
    app = service.config.apps["demo"]
    (cluster,) = service.config.clusters.values()
    for job_id in job_ids:
        session_id = str(uuid.uuid4())
        rendered = render(service.config, app, {}, {"id": session_id, **jobs.SENTINELS})
        files = jobs.job_files(cluster, session_id)
        service.store.create(
            id=session_id, application=app.name, backend=cluster.name, holds_port=False, secret=secrets.token_hex(16),
            argv=list(rendered.argv), session_url=rendered.session_url, public={}, return_secret=True,
            log_path=str(files.log), job_dir=str(files.dir), token_hash=_sha256(secrets.token_urlsafe(32)),
            attach_hash=_sha256(secrets.token_urlsafe(24)),
        )
        service.store.update(session_id, job_id=job_id)
        if not service.store.transition(session_id, SessionState.QUEUED):
            raise BenchError(f"session {session_id} did not move to queued")


def profile_tick(poller: Poller, top: int = 25) -> str:
    """cProfile one cycle; the ``top`` functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    poller.tick()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- report ----------------------------------------------------------------------------------


def summarize(n: int, first: Cycle, cycles: Sequence[Cycle]) -> dict[str, Any]:
    calls_by_cmd: Counter[str] = Counter()
    for cycle in cycles:
        calls_by_cmd.update(cycle.calls)
    return {
        "n": n,
        "cycles": len(cycles),
        "calls_per_cycle": statistics.median(c.total_calls for c in cycles),
        "max_calls_per_cycle": max(c.total_calls for c in cycles),
        "calls_by_command": dict(calls_by_cmd),
        "subprocesses_per_cycle": statistics.median(c.subprocesses for c in cycles),
        "cpu_ms": round(statistics.median(c.cpu_ms for c in cycles), 2),
        "max_cpu_ms": round(max(c.cpu_ms for c in cycles), 2),
        "wall_ms": round(statistics.median(c.wall_ms for c in cycles), 2),
        "scheduler_ms": round(statistics.median(c.scheduler_ms for c in cycles), 2),
        "scheduler_cpu_ms": round(statistics.median(c.scheduler_cpu_ms for c in cycles), 2),
        "cpu_with_scheduler_ms": round(statistics.median(c.cpu_ms + c.scheduler_cpu_ms for c in cycles), 2),
        "samples_cpu_ms": [round(c.cpu_ms, 2) for c in cycles],
        "first_cycle": {"calls": first.total_calls, "subprocesses": first.subprocesses,
                        "cpu_ms": round(first.cpu_ms, 2), "wall_ms": round(first.wall_ms, 2)},
    }


def controller_jobs() -> int | None:
    """How many jobs slurmctld holds (every user's, finished ones for MinJobAge): what one Jobs.load() carries."""
    done = run_quiet(["squeue", "-h", "-t", "all", "-o", "%i"])
    return len(done.stdout.split()) if done.returncode == 0 else None


def report(rows: list[dict[str, Any]], submit_s: float, jobs_submitted: int, cycles: int,
           access: str = "cli") -> dict[str, Any]:
    """Print one access mode's table and its verdicts; return its JSON summary."""
    calls_ok = all(r["max_calls_per_cycle"] == TARGET_CALLS for r in rows)
    at_target = [r for r in rows if r["n"] == TARGET_CPU_AT]
    # pyslurm's libslurm side runs in the worker: its CPU counts with the launcher's (squeue's does not)
    judged = "cpu_ms" if access == "cli" else "cpu_with_scheduler_ms"
    cpu_ok = at_target[0][judged] <= TARGET_CPU_MS if at_target else None
    title = "poll cost" if access == "cli" else f"poll cost, access {access}"
    print(f"{title}: {cycles} measured cycles per N (after 1 warm-up cycle), held SLURM jobs, "
          f"partition {PARTITION}; {jobs_submitted} jobs submitted in {submit_s:.1f} s")
    print(f"{'N':>6}{'calls':>7}{'procs':>7}{'CPU ms':>9}{'max CPU':>9}{'wall ms':>9}{'sched ms':>10}"
          f"{'sched CPU':>11}   first cycle: calls / CPU ms / wall ms")
    for r in rows:
        f = r["first_cycle"]
        print(f"{r['n']:>6}{r['calls_per_cycle']:>7g}{r['subprocesses_per_cycle']:>7g}{r['cpu_ms']:>9.2f}"
              f"{r['max_cpu_ms']:>9.2f}{r['wall_ms']:>9.2f}{r['scheduler_ms']:>10.2f}{r['scheduler_cpu_ms']:>11.2f}"
              f"   {f['calls']} / {f['cpu_ms']:.2f} / {f['wall_ms']:.2f}")
    if access == "cli":
        print("  calls: scheduler commands run through the adapter's runner per cycle (median); procs: every "
              "subprocess started")
        print("  CPU: launcher process CPU (process_time) per cycle; sched ms / sched CPU: wall and CPU of the "
              "scheduler commands (not in CPU)")
        print_calls = "commands"
    else:
        print("  calls: requests to the pyslurm worker (each one pyslurm call, one libslurm RPC) per cycle (median); "
              "procs: every subprocess started")
        print("  CPU: launcher process CPU (process_time) per cycle, the worker's not included; sched ms: wall time "
              "waiting for the worker's reply; sched CPU: the worker's CPU (/proc schedstat)")
        print_calls = "worker requests"
    for r in rows:
        print(f"  N={r['n']}: {print_calls} over the measured cycles: {r['calls_by_command']}"
              f"; slurmctld held {r['controller_jobs']} jobs")
    print(f"target {TARGET_CALLS} scheduler call per cycle at every N: {'met' if calls_ok else 'NOT met'}")
    if cpu_ok is None:
        print(f"target <= {TARGET_CPU_MS:.0f} ms CPU per cycle at N={TARGET_CPU_AT}: not measured (N not in --sizes)")
    else:
        whose = "" if access == "cli" else " (launcher + worker)"
        print(f"target <= {TARGET_CPU_MS:.0f} ms CPU per cycle at N={TARGET_CPU_AT}{whose}: "
              f"{'met' if cpu_ok else 'NOT met'} ({at_target[0][judged]:.2f} ms)")
    return {"access": access, "sizes": rows, "submit_s": round(submit_s, 2), "target_calls": TARGET_CALLS,
            "target_cpu_ms": TARGET_CPU_MS, "calls_target_met": calls_ok, "cpu_target_met": cpu_ok}


def side_by_side(results: dict[str, list[dict[str, Any]]]) -> None:
    """Both access modes' medians per cycle in one table, by N."""
    cli, native = results["cli"], results["pyslurm"]
    print("\nside by side, median per cycle: cli runs squeue in a child (its CPU in +squeue, not in CPU); "
          "pyslurm asks its worker process (its CPU in +worker, not in CPU; = the sum)")
    print(f"{'':>6} | {'cli':<39}| pyslurm")
    print(f"{'N':>6} |{'calls':>6}{'procs':>6}{'CPU ms':>8}{'+squeue':>9}{'wall ms':>9} |"
          f"{'calls':>6}{'procs':>6}{'CPU ms':>8}{'+worker':>9}{'= ms':>8}{'wall ms':>9}")
    for c, p in zip(cli, native, strict=True):
        print(f"{c['n']:>6} |{c['calls_per_cycle']:>6g}{c['subprocesses_per_cycle']:>6g}{c['cpu_ms']:>8.2f}"
              f"{c['scheduler_cpu_ms']:>9.2f}{c['wall_ms']:>9.2f} |{p['calls_per_cycle']:>6g}"
              f"{p['subprocesses_per_cycle']:>6g}{p['cpu_ms']:>8.2f}{p['scheduler_cpu_ms']:>9.2f}"
              f"{p['cpu_with_scheduler_ms']:>8.2f}{p['wall_ms']:>9.2f}")


# -- main ------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be integers >= 1")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES),
                        help="numbers of tracked jobs to measure (default 1,100,1000)")
    parser.add_argument("--cycles", type=int, default=5, help="measured cycles per size (default 5)")
    parser.add_argument("--access", choices=[*ACCESS_MODES, "both"], default="both",
                        help="how the launcher reaches SLURM: its commands, pyslurm, or both one after the other "
                             "(default both)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more cycle at the largest size")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Submit the held jobs, meter the poller at each size for each access mode, print the report."""
    require_slurm(PARTITION)
    accesses = list(ACCESS_MODES) if args.access == "both" else [args.access]
    if args.access == "both":
        try:
            shared_worker().check(30.0)  # the worker every pyslurm adapter of this process uses
        except BatchError as exc:  # asked for by default: measure the command-line path alone
            print(f"access pyslurm: not measured ({exc})")
            accesses.remove("pyslurm")
    held = HeldJobs()
    runtimes: list[Runtime] = []
    try:
        with cleaned_tempdir("pvw-hpc-bench-poll-", held.cancel_all,
                             ignore_during_cleanup=[signal.SIGINT, signal.SIGTERM, signal.SIGHUP]) as root:
            submit_s = held.submit(max(args.sizes))
            job_ids = sorted(held.ids, key=int)
            results: dict[str, list[dict[str, Any]]] = {}
            summaries: dict[str, dict[str, Any]] = {}
            for access in accesses:
                if access != accesses[0]:
                    print()
                runtime = build_runtime(root / access, access)
                runtimes.append(runtime)
                rows, poller = measure_access(runtime, access, job_ids, args)
                results[access] = rows
                summaries[access] = report(rows, submit_s, len(held.ids), args.cycles, access)
                if args.profile:
                    print(f"\ncProfile of one more cycle at N={args.sizes[-1]}, access {access}:")
                    print(profile_tick(poller))
            if len(results) == 2:
                side_by_side(results)
            if args.json:
                print(json.dumps(summaries if len(summaries) > 1 else summaries[accesses[0]], indent=2))
            while runtimes:  # before the temp dir (their SQLite files) goes
                close_runtime(runtimes.pop())
    finally:
        for runtime in runtimes:
            with contextlib.suppress(Exception):
                close_runtime(runtime)


def close_runtime(runtime: Runtime) -> None:
    """The runtime (service, store, poller), then its pyslurm worker: nothing in the runtime closes adapters."""
    runtime.close()
    for adapter in runtime.service.adapters.values():
        if isinstance(adapter, SlurmPyslurmAdapter):
            adapter.close()


def measure_access(runtime: Runtime, access: str, job_ids: Sequence[str],
                   args: argparse.Namespace) -> tuple[list[dict[str, Any]], Poller]:
    """Grow the tracked set to each N and meter the runtime poller's cycles; the rows and the poller."""
    service = runtime.service
    cluster = CLUSTERS[access]
    adapter = service.adapters[cluster]
    meter: Meter
    if isinstance(adapter, SlurmPyslurmAdapter):
        meter = PyslurmMeter(adapter=adapter)
    else:
        meter = CycleMeter(runner=adapter.runner)  # type: ignore[attr-defined]
    meter.install()
    poller = runtime.poller
    rows = []
    tracked = 0
    for n in args.sizes:
        track(service, job_ids[tracked:n])
        tracked = n
        first = measure_tick(poller, meter)
        cycles = [measure_tick(poller, meter) for _ in range(args.cycles)]
        states = Counter(r.state.value for r in service.store.active(backend=cluster))
        if states != Counter({SessionState.QUEUED.value: n}):
            raise BenchError(f"{access}: expected {n} queued sessions after the cycles, found {dict(states)}")
        rows.append({**summarize(n, first, cycles), "controller_jobs": controller_jobs()})
    return rows, poller


if __name__ == "__main__":
    sys.exit(main())
