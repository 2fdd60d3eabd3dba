"""Crash consistency on the real SLURM: launches in flight while the launcher is killed with -9.

After each kill the launcher restarts on the same database; its startup
reconciliation (jobs found by name against session rows) must leave 0 jobs
without a session, 0 sessions without their job, and a map file equal to the
set of ready sessions.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time

import pytest
import requests

from tests.conftest import SLURM_DEMO_APP, TEXT_PLAIN, Launcher, LauncherFactory, slurm_reason, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(slurm_reason() is not None, reason=str(slurm_reason()))]


def our_live_jobs(lau: Launcher) -> dict[str, str]:
    """job id -> session id of every live SLURM job running from this launcher's job folders."""
    out = subprocess.run(["squeue", "-h", "-O", "JobID:|,WorkDir:|,Name:|"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    jobs_root = str(lau.root / "jobs") + "/"
    live = {}
    for line in out.splitlines():
        job_id, workdir, name = (line.split("|") + ["", ""])[:3]
        if workdir.startswith(jobs_root):
            live[job_id] = name.removeprefix("pvw-")
    return live


def sessions_by_id(lau: Launcher) -> dict[str, dict]:
    return {s["id"]: s for s in lau.sessions()}


def fire(lau: Launcher, count: int) -> None:
    """``count`` concurrent launches, one per thread; requests cut by the kill just fail."""
    def one(i: int) -> None:
        app = "demo" if i % 5 == 0 else "held"
        try:
            requests.post(lau.url, data=json.dumps({"application": app, "wait": False}), timeout=30,
                          headers={"Content-Type": TEXT_PLAIN})
        except requests.RequestException:
            pass  # the launcher was killed under us

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_kill_9_during_fifty_launches_leaves_jobs_sessions_and_map_in_agreement(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"threads": 32},
                   clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3, "poll_slow_s": 1}},
                   apps={"demo": SLURM_DEMO_APP,
                         "held": {**SLURM_DEMO_APP, "resources": {"extra_directives": ["--hold"]}}})
    rng = random.Random()
    for _ in range(3):
        burst = threading.Thread(target=fire, args=(lau, 50))
        burst.start()
        time.sleep(rng.uniform(0.1, 1.0))  # a random moment inside the burst of 50
        lau.kill9()
        burst.join(90)
        lau.restart()

    def consistent() -> bool:
        live_jobs = our_live_jobs(lau)
        sessions = sessions_by_id(lau)
        active = {sid: s for sid, s in sessions.items() if s["state"] not in ("ended", "failed")}
        orphans = [j for j, sid in live_jobs.items() if sid not in active or active[sid]["job_id"] != j]
        jobless = [sid for sid, s in active.items() if s.get("job_id") not in live_jobs]
        return not orphans and not jobless

    wait_for(consistent, 60, "jobs and sessions to agree after the restarts", interval=1)
    live_jobs = our_live_jobs(lau)
    sessions = sessions_by_id(lau)
    assert live_jobs, "the bursts should have left some jobs running or queued"
    assert len(sessions) >= len(live_jobs)

    def map_matches() -> bool:
        ready = {f"{s['id']} {s['host']}:{s['port']}" for s in lau.sessions() if s["state"] == "ready"}
        return set(lau.map_lines()) == ready

    wait_for(map_matches, 30, "the map file to equal the ready sessions", interval=0.5)
    print(f"sessions: {len(sessions)}, live jobs: {len(live_jobs)}, "
          f"ready: {sum(s['state'] == 'ready' for s in sessions.values())}")
    # every job folder belongs to a recorded session: the row is written before the folder and the job
    folders = {p.name for p in (lau.root / "jobs" / "slurm").iterdir()}
    assert folders <= set(sessions)
