"""SLURM adapter parsers and job-script rendering, on output captured from the real cluster.

The parsers are pure functions; their inputs in tests/fixtures/slurm/ were recorded
from the Slurm 22.05.8 that schedulers/slurm/up runs here (see the README there).
The adapter tests run fake `squeue`/`sbatch` executables through the runner's
`bin_overrides`: that is the boundary where a real scheduler cannot be made to
fail on demand (a timeout, garbage output), and the docstring of each says so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pvw_hpc.batch.base import BatchError, JobId, JobState, Presence
from pvw_hpc.batch.runner import CommandRunner
from pvw_hpc.batch.slurm.adapter import SlurmAdapter, parse_queue, parse_sacct, parse_submit
from pvw_hpc.clusters import check_clusters
from pvw_hpc.jobs import merged_resources, render_script

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


def test_parse_submit() -> None:
    assert parse_submit("278\n") == "278"
    assert parse_submit("12;cluster2\n") == "12"
    with pytest.raises(BatchError):
        parse_submit("sbatch: error: oops\n")


def test_parse_queue_maps_states_nodes_reasons_and_exit_codes() -> None:
    ids = [JobId(i) for i in ("3264", "3266", "3267", "3268", "3269", "404")]
    jobs = parse_queue((FIXTURES / "squeue_all.txt").read_text(), ids)
    held = jobs[JobId("3264")]
    assert held.state == JobState.HELD and held.reason == "JobHeldUser"
    assert held.node is None and held.start_estimate is None
    assert jobs[JobId("3266")].state == JobState.RUNNING and jobs[JobId("3266")].node == "vm"
    assert jobs[JobId("3267")].state == JobState.FAILED and jobs[JobId("3267")].exit_code == 3
    later = jobs[JobId("3268")]  # held, --begin in 10 minutes, named "a|b"
    assert later.state == JobState.HELD and later.start_estimate is not None
    assert jobs[JobId("3269")].state == JobState.COMPLETED and jobs[JobId("3269")].exit_code == 128 + 15
    assert jobs[JobId("3269")].native_state == "CANCELLED"
    assert jobs[JobId("404")].presence == Presence.ABSENT


def test_parse_sacct_skips_steps_and_decodes_exit_codes() -> None:
    jobs = parse_sacct((FIXTURES / "sacct_c.txt").read_text(), [JobId("12"), JobId("13"), JobId("5"), JobId("77")])
    assert jobs[JobId("12")].state == JobState.FAILED and jobs[JobId("12")].exit_code == 3
    assert jobs[JobId("13")].native_state == "CANCELLED"
    assert jobs[JobId("5")].node is None
    assert jobs[JobId("77")].presence == Presence.ABSENT


def _fake(tmp_path: Path, name: str, body: str) -> str:
    """A stand-in executable, for failures a live scheduler cannot be made to produce on demand."""
    path = tmp_path / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_failed_or_hung_squeue_is_query_failed_never_absent(tmp_path: Path) -> None:
    """Fakes squeue at the command boundary: exit 1 with a controller error, and a hang."""
    ids = [JobId("1"), JobId("2")]
    down = _fake(tmp_path, "squeue-down", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1")
    adapter = SlurmAdapter(CommandRunner(attempts=2, backoff_s=0.01, bin_overrides={"squeue": down}))
    assert {i.presence for i in adapter.poll(ids).values()} == {Presence.QUERY_FAILED}
    hung = _fake(tmp_path, "squeue-hung", "sleep 5")
    adapter = SlurmAdapter(CommandRunner(timeout_s=0.3, attempts=1, bin_overrides={"squeue": hung}))
    results = adapter.poll(ids)
    assert {i.presence for i in results.values()} == {Presence.QUERY_FAILED}
    assert "timed out" in (results[JobId("1")].reason or "")
    purged = _fake(tmp_path, "squeue-purged", f"cat {FIXTURES / 'squeue_invalid.txt'} >&2; exit 1")
    adapter = SlurmAdapter(CommandRunner(attempts=1, bin_overrides={"squeue": purged}))
    assert {i.presence for i in adapter.poll(ids).values()} == {Presence.ABSENT}


def test_runner_retries_with_backoff_before_giving_up(tmp_path: Path) -> None:
    """Fakes sbatch: fails twice, then works, counting its calls in a file."""
    count = tmp_path / "count"
    flaky = _fake(tmp_path, "sbatch-flaky", f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count};"
                                            " [ $n -ge 2 ] && echo 42 && exit 0; exit 1")
    runner = CommandRunner(attempts=3, backoff_s=0.01, bin_overrides={"sbatch": flaky})
    assert runner.run(["sbatch", "--parsable", "x"]).stdout.strip() == "42"
    assert count.read_text().strip() == "3"


HOSTILE = ["$(touch /tmp/pvw-owned)", "`id`", "a;b", "a\nb", "a b", "x' || true '", "--x=1\n#SBATCH --uid=0"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_resource_values_are_refused_by_the_config(value: str) -> None:
    errors: list[str] = []
    check_clusters({"c": {"scheduler": "slurm", "job_dir": "/tmp/x",
                          "defaults": {"partition": value, "account": value, "time": value, "memory": value}}},
                   lambda p, m: errors.append(p), lambda p, m: None)
    assert {"$.clusters.c.defaults.partition", "$.clusters.c.defaults.account", "$.clusters.c.defaults.time",
            "$.clusters.c.defaults.memory"} <= set(errors)


@pytest.mark.parametrize("value", HOSTILE[:2] + HOSTILE[3:6])
def test_environment_values_are_quoted_and_the_script_is_valid_bash(value: str, tmp_path: Path) -> None:
    errors: list[str] = []
    clusters = check_clusters({"c": {"scheduler": "slurm", "job_dir": str(tmp_path),
                                     "defaults": {"environment": {"SITE_VALUE": value.replace("\n", " ")}}}},
                              lambda p, m: errors.append(f"{p}: {m}"), lambda p, m: None)
    assert not errors
    cluster = clusters["c"]
    script, template = render_script(cluster, "11111111-1111-4111-8111-111111111111",
                                     merged_resources(cluster, {}))
    assert template.endswith("slurm.sh.j2")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # run only the export line: the value must arrive verbatim and nothing may execute
    line = next(x for x in script.splitlines() if x.startswith("export SITE_VALUE="))
    out = subprocess.run(["bash", "-c", f"{line}; printf %s \"$SITE_VALUE\""], capture_output=True, text=True)
    assert out.stdout == value.replace("\n", " ")
    assert not os.path.exists("/tmp/pvw-owned")


def test_a_site_template_wins_over_the_shipped_one(tmp_path: Path) -> None:
    site = tmp_path / "site.sh.j2"
    site.write_text("#!/bin/bash\n#SBATCH --job-name={{ job_name }}\n# site rule\n"
                    "{% include '_common/job_body.sh.j2' %}")
    errors: list[str] = []
    clusters = check_clusters({"c": {"scheduler": "slurm", "job_dir": str(tmp_path), "template": str(site)}},
                              lambda p, m: errors.append(p), lambda p, m: None)
    script, template = render_script(clusters["c"], "11111111-1111-4111-8111-111111111111",
                                     merged_resources(clusters["c"], {}))
    assert template == str(site) and "# site rule" in script and "PVW_HPC_JOB_SIDE" in script
