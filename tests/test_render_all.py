"""``pvw-hpc render`` for every scheduler: the exact script (or submit description) a launch would submit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")
APP = {"cmd": ["python3", "app.py", "--port", "${port}", "--authKeyFile", "${secret_file}"], "ready_line": "go"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    jobs = tmp_path / "jobs"
    path = tmp_path / "launcher.json"
    path.write_text(json.dumps({
        "configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "log_dir": str(tmp_path / "logs"),
                          "proxy_file": str(tmp_path / "proxy.txt"), "sessionURL": "ws://x/proxy?sessionId=${id}"},
        "resources": [],
        "clusters": {
            "slurm": {"scheduler": "slurm", "job_dir": str(jobs / "s"), "defaults": {"time": "01:00:00", "cpus": 2}},
            "pro": {"scheduler": "pbs", "job_dir": str(jobs / "p"),
                    "defaults": {"partition": "viz", "time": "1-02:30", "cpus": 4, "memory": "16G", "gpus": 1}},
            "torque": {"scheduler": "pbs", "flavor": "torque", "job_dir": str(jobs / "t"),
                       "defaults": {"time": 90, "cpus": 2, "memory": "2000"}},
            "condor": {"scheduler": "htcondor", "job_dir": str(jobs / "c"), "defaults": {"cpus": 2, "time": 30}},
        },
        "apps": {name: {**APP, "cluster": name} for name in ("slurm", "pro", "torque", "condor")},
    }))
    return path


@pytest.mark.parametrize("app, needles", [
    ("slurm", ["#SBATCH --job-name=pvw-", "#SBATCH --cpus-per-task=2", "#SBATCH --time=01:00:00"]),
    ("pro", ["#PBS -N pvw-", "#PBS -q viz", "#PBS -l walltime=26:30:00", "#PBS -l select=1:ncpus=4:mem=16384mb:ngpus=1"]),
    ("torque", ["#PBS -l walltime=01:30:00", "#PBS -l nodes=1:ppn=2", "#PBS -l mem=2000mb"]),
    ("condor", ["executable = ", "/body.sh", "batch_name = pvw-", "request_cpus = 2", "allowed_job_duration = 1800",
                "log = ", "#!/bin/bash", "PVW_HPC_JOB_SIDE"]),
])
def test_render_prints_what_a_launch_would_submit(config: Path, app: str, needles: list[str]) -> None:
    done = subprocess.run([PVW_HPC, "render", app, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for needle in needles:
        assert needle in done.stdout, (needle, done.stdout[:1500])
    if app != "condor":  # a job script: valid bash
        assert subprocess.run(["bash", "-n"], input=done.stdout, text=True, timeout=30).returncode == 0
