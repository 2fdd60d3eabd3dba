"""What the end-to-end suite needs to know about each real scheduler on this machine.

``tests/test_batch_e2e.py`` runs the same tests for every backend; this
module holds the few things that differ: the cluster config, the demo app's
command (HTCondor jobs run inside the pool's chroot, with its python), how to
ask the scheduler whether a job still runs, how to cancel it from outside
pvw-hpc, and how a held job looks. Under ``CI=true`` a scheduler that does not
answer fails the tests instead of skipping them: CI starts all of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_APP = REPO_ROOT / "examples" / "demo" / "app.py"
BOOM = "import sys; print('boom: no data', flush=True); sys.exit(3)"


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


@dataclass
class Backend:
    """One scheduler as the suite sees it."""

    name: str
    cluster: dict[str, Any]
    python: str  # the python with wslink where the jobs run
    held_fails: bool = False  # True: a held job fails its session (HTCondor); else it stays queued
    held_words: str = ""  # what the session's error says about a held job
    held_resources: dict[str, Any] = field(default_factory=dict)

    def apps(self) -> dict[str, Any]:
        demo = {"cluster": self.name, "ready_line": "Starting factory",
                "cmd": [self.python, str(DEMO_APP), "--host", "${host}", "--port", "${port}",
                        "--authKeyFile", "${secret_file}", "--timeout", "120"]}
        return {
            "demo": demo,
            "boom": {**demo, "cmd": [self.python, "-c", BOOM]},
            "held": {**demo, "timeout": 3, "resources": self.held_resources},
        }

    def skip_reason(self) -> str | None:
        reason = self._why_not()
        if reason and os.environ.get("CI"):
            pytest.fail(f"{self.name} must run in CI: {reason}")
        return reason

    def _why_not(self) -> str | None:
        raise NotImplementedError

    def job_running(self, job_id: str, queued_too: bool = False) -> bool:
        """True while the scheduler runs the job (or, with ``queued_too``, still has it queued or held)."""
        raise NotImplementedError

    def cancel_outside(self, job_id: str) -> None:
        """Cancel the job with the scheduler's own tool, as an admin would."""
        raise NotImplementedError


class Slurm(Backend):
    def _why_not(self) -> str | None:
        if shutil.which("sinfo") is None:
            return "SLURM is not installed (schedulers/slurm/up)"
        if _run(["sinfo", "-h", "-o", "%T"]).returncode != 0:
            return "the local SLURM cluster does not answer (schedulers/slurm/up)"
        return None

    def job_running(self, job_id: str, queued_too: bool = False) -> bool:
        state = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"]).stdout.strip()
        return state in ("RUNNING", "CONFIGURING", "COMPLETING") or (queued_too and state == "PENDING")

    def cancel_outside(self, job_id: str) -> None:
        _run(["scancel", job_id]).check_returncode()


def pyslurm_vendored() -> bool:
    """Whether scripts/install-pyslurm has something to install from (the folders it looks in)."""
    candidates = [os.environ.get("PVW_PYSLURM_VENDOR"), REPO_ROOT.parent / "shared" / "vendor" / "pyslurm",
                  "/work/shared/vendor/pyslurm"]
    return any(c and (Path(c) / "SHA256SUMS").is_file() for c in candidates)


class Pyslurm(Slurm):
    """The same local SLURM reached through pyslurm (its worker process); watched and cancelled with the CLI."""

    def skip_reason(self) -> str | None:
        """Under CI a failure, as for every scheduler, unless the machine has no vendored pyslurm to install.

        No registry has a pyslurm for Slurm 22.05: where the vendor folder is missing nothing could
        have installed it, and the tests skip saying so instead of failing the run.
        """
        if not pyslurm_vendored() and self._why_not():
            return "no vendored pyslurm on this machine (scripts/install-pyslurm looks for ../shared/vendor/pyslurm)"
        return super().skip_reason()

    def _why_not(self) -> str | None:
        reason = super()._why_not()
        if reason:
            return reason
        # in a child: where slurm.conf cannot be read, libslurm ends the importing process
        probe = _run([sys.executable, "-c", "import pyslurm; pyslurm.Jobs.load()"])
        if probe.returncode != 0:
            said = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            return f"pyslurm does not load the local SLURM's jobs (scripts/install-pyslurm): {said}"
        return None


class Pbs(Backend):
    """Slurm's Torque wrappers: real qsub/qstat/qdel programs in the Torque dialect."""

    def _why_not(self) -> str | None:
        if shutil.which("qsub") is None or shutil.which("qstat") is None:
            return "no qsub/qstat (schedulers/pbs/up installs Slurm's Torque wrappers)"
        if _run(["qstat", "-f", "999999999"]).returncode != 153:
            return "qstat does not answer (schedulers/pbs/up)"
        return None

    def job_running(self, job_id: str, queued_too: bool = False) -> bool:
        from pvw_hpc.batch.pbs.adapter import parse_text

        jobs = parse_text(_run(["qstat", "-f", job_id]).stdout)
        state = jobs[0].get("job_state", "") if jobs else ""
        return state in ("R", "E") or (queued_too and state in ("Q", "H", "W"))

    def cancel_outside(self, job_id: str) -> None:
        _run(["qdel", job_id]).check_returncode()


HTCONDOR_STATE = Path(os.environ.get("HTCONDOR_STATE", "/tmp/pvw-htcondor"))
CONDOR_CONFIG = str(HTCONDOR_STATE / "condor_config")


class HTCondor(Backend):
    """The pool of schedulers/htcondor/up; jobs run in its chroot, as its submit user."""

    def _why_not(self) -> str | None:
        try:
            import htcondor2  # noqa: F401
        except ImportError:
            return "the htcondor bindings are not installed (pip install '.[htcondor]')"
        if not Path(CONDOR_CONFIG).exists():
            return "the local HTCondor pool is not up (schedulers/htcondor/up)"
        try:
            self._schedd().query("false", projection=["ClusterId"])
        except Exception as exc:
            return f"the local HTCondor pool does not answer (schedulers/htcondor/up): {exc}"
        return None

    def _schedd(self) -> Any:
        from pvw_hpc.batch.htcondor.adapter import bindings
        return bindings(CONDOR_CONFIG).Schedd()

    def job_running(self, job_id: str, queued_too: bool = False) -> bool:
        cluster = job_id.split(".")[0]
        ads = self._schedd().query(f"ClusterId == {cluster}", projection=["JobStatus"])
        states = {int(ad["JobStatus"]) for ad in ads}
        return 2 in states or (queued_too and bool(states & {1, 5}))

    def cancel_outside(self, job_id: str) -> None:
        from pvw_hpc.batch.htcondor.adapter import bindings
        result = self._schedd().act(bindings(CONDOR_CONFIG).JobAction.Remove, [job_id])
        assert result["TotalSuccess"] == 1, dict(result)


BACKENDS: dict[str, Backend] = {
    "slurm": Slurm("slurm", {"scheduler": "slurm", "poll_fast_s": 0.5, "poll_slow_s": 2,
                             "defaults": {"partition": "debug", "time": "00:10:00", "cpus": 1}},
                   python="${python_exec}", held_words="JobHeldUser",
                   held_resources={"extra_directives": ["--hold"]}),
    # the same cluster through pyslurm: same template, same --hold, same JobHeldUser
    "pyslurm": Pyslurm("pyslurm", {"scheduler": "slurm", "access": "pyslurm", "poll_fast_s": 0.5, "poll_slow_s": 2,
                                   "defaults": {"partition": "debug", "time": "00:10:00", "cpus": 1}},
                       python="${python_exec}", held_words="JobHeldUser",
                       held_resources={"extra_directives": ["--hold"]}),
    "pbs": Pbs("pbs", {"scheduler": "pbs", "flavor": "torque", "poll_fast_s": 0.5, "poll_slow_s": 2,
                       "defaults": {"time": "00:10:00", "cpus": 1}},
               python="${python_exec}", held_words="queued", held_resources={"extra_directives": ["-h"]}),
    # jobs run inside the pool's chroot: its python3 for the job side, its venv (with wslink) for the app
    "htcondor": HTCondor("htcondor", {"scheduler": "htcondor", "condor_config": CONDOR_CONFIG, "job_user": "pvwcondor",
                                      "python": "/usr/bin/python3", "poll_fast_s": 0.5, "poll_slow_s": 2,
                                      "defaults": {"time": "00:10:00", "cpus": 1, "memory": "256M"}},
                         python=os.environ.get("HTCONDOR_PYTHON", "/opt/pvw-venv/bin/python"), held_fails=True,
                         held_words="held: ",
                         held_resources={"extra_directives": ["should_transfer_files = YES",
                                                              "transfer_input_files = /nonexistent/pvw-hpc-input"]}),
}


def available() -> list[Backend]:
    """The backends that run here (under CI, all of them or a failure)."""
    return [b for b in BACKENDS.values() if b.skip_reason() is None]
