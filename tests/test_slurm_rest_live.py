"""The slurmrestd adapter against the real daemon: real jobs, real states, real errors.

Needs the CI cluster with slurmrestd on JWT (``SLURM_CI_RESTD=jwt schedulers/slurm/up``)
and a token: ``$SLURM_JWT``, or ``scontrol token`` for ``$SLURM_CI_USER`` (root only).
The daemon's URL is ``$SLURM_CI_RESTD_URL`` (``. schedulers/slurm/env.sh``), else the
facts file ``up`` writes. Without all that, every test here is skipped and says why.

The jobs run as the token's user, not as us, so their folders are 0777 temp dirs.
The script comes from the shipped template (``pvw_hpc.jobs.render_script``) with
its job side swapped for a few shell lines through the site-template path
(a cluster's own ``_common/job_body.sh.j2`` is found before the shipped one), so
the ``#SBATCH`` header under test is exactly the one production jobs get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from pvw_hpc import jobs
from pvw_hpc.batch import make_adapter
from pvw_hpc.batch.base import BatchError, JobId, JobInfo, JobScript, JobState, Presence
from pvw_hpc.batch.slurm_rest import adapter as slurm_rest
from pvw_hpc.batch.slurm_rest.adapter import SlurmRestAdapter
from pvw_hpc.batch.slurm_rest.settings import RestAccess
from pvw_hpc.clusters import ClusterConfig

USER = os.environ.get("SLURM_CI_USER", "slurmtest")
PARTITION = os.environ.get("SLURM_CI_PARTITION", "debug")
UNKNOWN = JobId("999999999")
BODY = 'echo "pvw-rest-live started on $(hostname) in $(pwd)"\nexec sleep 300\n'


def _restd_url() -> str | None:
    """``$SLURM_CI_RESTD_URL``, else what ``up`` recorded (env.sh reads the same file)."""
    if os.environ.get("SLURM_CI_RESTD_URL"):
        return os.environ["SLURM_CI_RESTD_URL"]
    facts = Path(os.environ.get("SLURM_CI_ROOT", "/tmp/slurm-ci")) / "run" / "ci.env"
    try:
        lines = facts.read_text().splitlines()
    except OSError:
        return None
    return next((line.partition("=")[2] for line in lines if line.startswith("SLURM_CI_RESTD_URL=")), None) or None


def _skip_reason() -> str | None:
    url = _restd_url()
    if not url:
        return "no slurmrestd: SLURM_CI_RESTD_URL unset (run `SLURM_CI_RESTD=jwt schedulers/slurm/up`)"
    if not url.startswith("http"):
        return f"slurmrestd listens on {url}; the adapter speaks HTTP (start it with SLURM_CI_RESTD=jwt)"
    try:
        requests.get(f"{url}/slurm/v0.0.38/ping", timeout=2)  # any answer, 401 included, means it is up
    except requests.RequestException as exc:
        return f"slurmrestd does not answer on {url}: {exc}"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


@dataclass
class Live:
    url: str
    work: Path
    token_file: Path
    submitted: list[JobId] = field(default_factory=list)

    def cluster(self, **overrides: Any) -> ClusterConfig:
        settings: dict[str, Any] = {
            "name": "ci-rest", "scheduler": "slurm", "job_dir": self.work / "jobs", "access": "rest",
            "template": str(self.work / "site" / "slurm.sh.j2"),  # absent: the shipped one, with our job body
            "settings": RestAccess(url=self.url, user=USER, token_file=str(self.token_file)), "command_timeout_s": 10.0,
            "defaults": {"partition": PARTITION, "time": "5", "cpus": 1, "memory": "100M"},
        }
        settings.update(overrides)
        return ClusterConfig(**settings)

    def script(self, config: ClusterConfig) -> JobScript:
        """A session's rendered script, its folder made writable for the job's user."""
        session_id = str(uuid.uuid4())
        text, _ = jobs.render_script(config, session_id, jobs.merged_resources(config, {}))
        files = jobs.job_files(config, session_id)
        files.dir.mkdir(parents=True)
        files.dir.chmod(0o777)
        return JobScript(text=text, name=jobs.job_name(session_id), path=files.script, workdir=files.dir)

    def submit(self, adapter: SlurmRestAdapter, script: JobScript) -> JobId:
        job_id = adapter.submit(script)
        self.submitted.append(job_id)
        return job_id


def _token() -> str | None:
    if os.environ.get("SLURM_JWT"):
        return os.environ["SLURM_JWT"]
    try:
        out = subprocess.run(["scontrol", "token", f"username={USER}", "lifespan=900"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().removeprefix("SLURM_JWT=") if out.returncode == 0 else None


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    token = _token()
    if not token:
        pytest.skip(f"no JWT: set SLURM_JWT, or run as root so `scontrol token username={USER}` works")
    work = Path(tempfile.mkdtemp(prefix="pvw-rest-live-", dir="/tmp"))
    work.chmod(0o777)
    (work / "jobs").mkdir(mode=0o777)
    (work / "jobs").chmod(0o777)
    (work / "site" / "_common").mkdir(parents=True)
    (work / "site" / "_common" / "job_body.sh.j2").write_text(BODY)
    token_file = work / "jwt"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    state = Live(url=str(_restd_url()), work=work, token_file=token_file)
    yield state
    cleanup = SlurmRestAdapter(url=state.url, user=USER, token_file=str(token_file))
    for job_id in state.submitted:
        try:
            cleanup.cancel(job_id)
        except BatchError:
            pass
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def http_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every request the adapter makes, as 'METHOD path'."""
    calls: list[str] = []
    real = requests.request

    def counting(method: str, url: str, **kwargs: Any) -> requests.Response:
        calls.append(f"{method} {url.split('/slurm/', 1)[-1]}")
        return real(method, url, **kwargs)

    monkeypatch.setattr(slurm_rest.requests, "request", counting)
    return calls


def wait_for(adapter: SlurmRestAdapter, ids: list[JobId], done: Callable[[dict[JobId, JobInfo]], bool],
             timeout_s: float = 30.0) -> dict[JobId, JobInfo]:
    deadline = time.monotonic() + timeout_s
    while True:
        infos = adapter.poll(ids)
        assert not [i for i in infos.values() if i.presence == Presence.QUERY_FAILED], infos
        if done(infos):
            return infos
        assert time.monotonic() < deadline, f"gave up waiting: {infos}"
        time.sleep(0.25)


def _over(info: JobInfo) -> bool:
    return info.presence == Presence.ABSENT or (info.state is not None and info.state.is_final)


def test_submit_poll_cancel_with_the_shipped_template(live: Live, http_calls: list[str]) -> None:
    config = live.cluster()
    adapter = make_adapter(config)
    assert isinstance(adapter, SlurmRestAdapter)
    scripts = [live.script(config), live.script(config)]
    a, b = (live.submit(adapter, s) for s in scripts)

    del http_calls[:]
    infos = wait_for(adapter, [a, b, UNKNOWN], lambda i: i[a].state == i[b].state == JobState.RUNNING)
    assert http_calls and set(http_calls) == {"GET v0.0.38/jobs"}  # one call per poll, however many ids
    assert infos[UNKNOWN].presence == Presence.ABSENT
    for job_id, script in zip((a, b), scripts, strict=True):
        raw = infos[job_id].raw  # what slurmctld made of the #SBATCH header we translated
        assert raw["name"] == script.name
        assert raw["current_working_directory"] == str(script.workdir)
        assert raw["standard_output"] == str(script.workdir / "job.log")
        assert raw["requeue"] is False and raw["time_limit"] == 5 and raw["partition"] == PARTITION
        assert raw["user_name"] == USER
        assert infos[job_id].node == os.environ.get("SLURM_CI_NODE", raw["batch_host"])

    log = scripts[0].workdir / "job.log"
    deadline = time.monotonic() + 10
    while "pvw-rest-live started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"no output in {log}"
        time.sleep(0.1)
    assert f"in {scripts[0].workdir}" in log.read_text()

    adapter.cancel(a)
    infos = wait_for(adapter, [a, b], lambda i: _over(i[a]))
    assert infos[a].presence == Presence.ABSENT or infos[a].native_state == "CANCELLED"
    assert infos[b].state == JobState.RUNNING
    adapter.cancel(b)
    wait_for(adapter, [a, b], lambda i: _over(i[a]) and _over(i[b]))
    adapter.cancel(a)  # an ended job
    adapter.cancel(UNKNOWN)  # a job the controller never knew


def test_exit_code_of_a_failed_job(live: Live) -> None:
    adapter = make_adapter(live.cluster())
    assert isinstance(adapter, SlurmRestAdapter)
    folder = live.work / "exit3"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    text = f"#!/bin/bash\n#SBATCH --job-name=pvw-rest-exit3\n#SBATCH --chdir={folder}\n#SBATCH --time=1\nexit 3\n"
    job_id = live.submit(adapter, JobScript(text=text, name="pvw-rest-exit3", path=folder / "job.sh", workdir=folder))
    info = wait_for(adapter, [job_id], lambda i: _over(i[job_id]))[job_id]
    assert (info.presence, info.state, info.native_state, info.exit_code) == (Presence.FOUND, JobState.FAILED, "FAILED", 3)
    assert (folder / f"slurm-{job_id}.out").exists()  # no --output: sbatch's default name, in --chdir


def test_time_and_memory_mean_what_sbatch_makes_of_them(live: Live) -> None:
    # the values go through verbatim; slurmrestd 22.05 parses them with sbatch's own option code
    config = live.cluster(defaults={"partition": PARTITION, "time": "1:30", "memory": "1500K"})
    adapter = make_adapter(config)
    assert isinstance(adapter, SlurmRestAdapter)
    job_id = live.submit(adapter, live.script(config))
    raw = wait_for(adapter, [job_id], lambda i: i[job_id].presence == Presence.FOUND)[job_id].raw
    assert raw["time_limit"] == 2  # "1:30" is minutes:seconds, rounded up
    assert raw["memory_per_node"] == 2  # MB, rounded up from 1500K
    adapter.cancel(job_id)


def test_submit_error_comes_back_as_batch_error(live: Live) -> None:
    config = live.cluster(defaults={"partition": "no-such-partition"})
    with pytest.raises(BatchError, match=r"Invalid partition name specified \(2000\)") as err:
        make_adapter(config).submit(live.script(config))
    assert err.value.returncode == 500


def test_a_bad_token_is_query_failed_not_absent(live: Live) -> None:
    bad = live.work / "bad-jwt"
    bad.write_text("not-a-token\n")
    adapter = make_adapter(live.cluster(settings=RestAccess(url=live.url, user=USER, token_file=str(bad))))
    infos = adapter.poll([UNKNOWN, JobId("1")])
    assert {i.presence for i in infos.values()} == {Presence.QUERY_FAILED}, infos  # HTTP 500 with "jobs": []
    with pytest.raises(BatchError, match=r"\(5005\)"):
        adapter.cancel(UNKNOWN)  # not mistaken for "already gone"
