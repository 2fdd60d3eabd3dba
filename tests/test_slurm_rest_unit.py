"""The slurmrestd adapter against recorded answers of the real daemon.

The ``responses`` library fakes the HTTP boundary only: every answer replayed
here was recorded from the real slurmrestd 22.05.8 (openapi/v0.0.38, JWT) on
this machine by ``tests/fixtures/slurm_rest/record_fixtures.py`` (``GET /jobs``
trimmed to the recorded jobs and the fields worth reading). What the daemon
does with what we send is checked by ``tests/test_slurm_rest_live.py``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from pvw_hpc import jobs
from pvw_hpc.batch import make_adapter
from pvw_hpc.batch.base import BatchError, JobId, JobScript, JobState, Presence
from pvw_hpc.batch.slurm_rest.adapter import DEFAULT_PATH, SlurmRestAdapter, job_info, sbatch_directives
from pvw_hpc.batch.slurm_rest.settings import RestAccess
from pvw_hpc.clusters import ClusterConfig

FIXTURES = Path(__file__).parent / "fixtures" / "slurm_rest"
URL = "http://restd.test:6820"
API = f"{URL}/slurm/v0.0.38"
TOKEN = "eyJ.recorded.token"
SESSION = "0b7e7f0e-2a53-4c55-9d0e-3f3c2b1a9e11"
# the recorded jobs (fixture jobs.json): held, running, completed, exit 3, cancelled, timed out
HELD, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT = (JobId(str(n)) for n in range(46, 52))
OTHER = JobId("15")  # someone else's job in the same answer
UNKNOWN = JobId("999999")


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def replay(method: str, url: str, name: str) -> None:
    """Answer ``method url`` with the recorded answer ``name``."""
    rec = fixture(name)
    if isinstance(rec["body"], str):
        responses.add(method, url, body=rec["body"], status=rec["status"], content_type=rec["content_type"])
    else:
        responses.add(method, url, json=rec["body"], status=rec["status"])


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt"
    path.write_text(f"SLURM_JWT={TOKEN}\n")  # `scontrol token` output, as is
    return path


@pytest.fixture
def adapter(token_file: Path) -> SlurmRestAdapter:
    return SlurmRestAdapter(url=URL + "/", user="slurmtest", token_file=str(token_file), timeout_s=5, retry_wait_s=0)


def cluster(tmp_path: Path, **overrides: Any) -> ClusterConfig:
    settings: dict[str, Any] = {
        "name": "hpc", "scheduler": "slurm", "job_dir": tmp_path / "job files", "access": "rest",
        "settings": RestAccess(url=URL, user="slurmtest", token_file=str(tmp_path / "jwt")), "command_timeout_s": 7.0,
        "defaults": {"partition": "debug", "account": "proj1", "qos": "normal", "time": "1:30", "nodes": 1,
                     "cpus": 2, "memory": "4G", "gpus": 1, "gres": "gpu:a100:1"},
    }
    settings.update(overrides)
    return ClusterConfig(**settings)


def rendered(config: ClusterConfig, **env: str) -> JobScript:
    text, _ = jobs.render_script(config, SESSION, jobs.merged_resources(config, {}))
    files = jobs.job_files(config, SESSION)
    return JobScript(text=text, name=jobs.job_name(SESSION), path=files.script, workdir=files.dir, env=env)


# -- submit ---------------------------------------------------------------------------------------


@responses.activate
def test_submit_sends_the_template_directives_as_job_fields(tmp_path: Path, adapter: SlurmRestAdapter) -> None:
    replay("POST", f"{API}/job/submit", "submit_ok")
    config = cluster(tmp_path)
    script = rendered(config, LANG="C.UTF-8")

    assert adapter.submit(script) == JobId("47")

    (call,) = responses.calls
    assert call.request.headers["X-SLURM-USER-NAME"] == "slurmtest"
    assert call.request.headers["X-SLURM-USER-TOKEN"] == TOKEN
    assert call.request.headers["Content-Type"] == "application/json"
    body = json.loads(call.request.body)
    assert body["script"] == script.text  # the whole script, #SBATCH lines included (they are comments)
    files = jobs.job_files(config, SESSION)
    assert body["job"] == {
        "name": f"pvw-{SESSION}",
        "standard_output": str(files.log),  # the template shell-quotes it: the folder has a space
        "current_working_directory": str(files.dir),
        "no_requeue": True,
        "partition": "debug", "account": "proj1", "qos": "normal",
        "time_limit": "1:30",  # verbatim: slurmrestd parses it as sbatch does (2 minutes)
        "nodes": "1", "tasks": "1", "cpus_per_task": "2", "memory_per_node": "4G",
        "gpus": "1", "gres": "gpu:a100:1",
        "environment": {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
    }


@responses.activate
def test_submit_of_a_requeueable_job_sends_no_requeue_field(tmp_path: Path, adapter: SlurmRestAdapter) -> None:
    # "requeue": false would be ignored by 22.05 anyway; the cluster default applies
    replay("POST", f"{API}/job/submit", "submit_ok")
    adapter.submit(rendered(cluster(tmp_path, requeue=True, defaults={})))
    job = json.loads(responses.calls[0].request.body)["job"]
    assert "no_requeue" not in job and "requeue" not in job
    assert job["nodes"] == "1" and job["tasks"] == "1"


@responses.activate
def test_submit_defaults_the_working_directory_and_lets_the_script_env_set_path(adapter: SlurmRestAdapter) -> None:
    replay("POST", f"{API}/job/submit", "submit_ok")
    script = JobScript(text="#!/bin/bash\n#SBATCH -J mine -t 5\nhostname\n", name="mine", path=Path("/w/job.sh"),
                       workdir=Path("/w"), env={"PATH": "/opt/pv/bin:/usr/bin"})
    adapter.submit(script)
    job = json.loads(responses.calls[0].request.body)["job"]
    assert job == {"name": "mine", "time_limit": "5", "current_working_directory": "/w",
                   "environment": {"PATH": "/opt/pv/bin:/usr/bin"}}


@responses.activate
def test_submit_accepts_a_job_id_that_comes_with_remarks(tmp_path: Path, adapter: SlurmRestAdapter) -> None:
    replay("POST", f"{API}/job/submit", "submit_held_remark")  # HTTP 200, job_id 46, error 2042 "held"
    assert adapter.submit(rendered(cluster(tmp_path))) == JobId("46")


@pytest.mark.parametrize(("name", "status", "words"), [
    ("submit_bad_partition", 500, "Invalid partition name specified (2000)"),
    ("submit_no_environment", 400, "environment must be set (2127)"),
    ("submit_unknown_key", 400, 'Unknown key "no_such_key"'),
    ("submit_bad_token", 500, "Zero Bytes were transmitted or received (5005) (slurmrestd 22.05 answers a bad or expired token"),
])
@responses.activate
def test_submit_errors_raise_with_what_the_daemon_said(
    tmp_path: Path, adapter: SlurmRestAdapter, name: str, status: int, words: str,
) -> None:
    replay("POST", f"{API}/job/submit", name)
    with pytest.raises(BatchError) as err:
        adapter.submit(rendered(cluster(tmp_path)))
    assert words in str(err.value)
    assert err.value.returncode == status  # an answer: the service must not call the cluster unreachable
    assert len(responses.calls) == 1


@responses.activate
def test_submit_without_a_connection_is_not_retried(tmp_path: Path, adapter: SlurmRestAdapter) -> None:
    responses.add("POST", f"{API}/job/submit", body=requests.ConnectionError("connection refused"))
    with pytest.raises(BatchError) as err:
        adapter.submit(rendered(cluster(tmp_path)))
    assert err.value.returncode is None  # the service marks the cluster unreachable
    assert len(responses.calls) == 1  # a POST that may have arrived is never sent twice


@responses.activate
def test_submit_refuses_a_directive_it_cannot_translate(tmp_path: Path, adapter: SlurmRestAdapter) -> None:
    config = cluster(tmp_path, defaults={"extra_directives": ["--constraint=haswell"]})
    with pytest.raises(BatchError, match="--constraint cannot be passed through slurmrestd"):
        adapter.submit(rendered(config))
    assert not responses.calls


# -- the token --------------------------------------------------------------------------------------


@responses.activate
def test_the_token_is_read_again_for_every_call(adapter: SlurmRestAdapter, token_file: Path) -> None:
    replay("GET", f"{API}/jobs", "jobs")
    adapter.poll([RUNNING])
    token_file.write_text("eyJ.rotated\n")
    adapter.poll([RUNNING])
    assert [c.request.headers["X-SLURM-USER-TOKEN"] for c in responses.calls] == [TOKEN, "eyJ.rotated"]


@responses.activate
def test_the_token_comes_from_slurm_jwt_without_a_token_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JWT", "eyJ.from.env")
    replay("GET", f"{API}/jobs", "jobs")
    SlurmRestAdapter(url=URL, user="slurmtest").poll([RUNNING])
    assert responses.calls[0].request.headers["X-SLURM-USER-TOKEN"] == "eyJ.from.env"


@responses.activate
def test_no_token_fails_without_asking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLURM_JWT", raising=False)
    infos = SlurmRestAdapter(url=URL, user="slurmtest").poll([RUNNING])
    assert infos[RUNNING].presence == Presence.QUERY_FAILED and "SLURM_JWT unset" in (infos[RUNNING].reason or "")
    missing = SlurmRestAdapter(url=URL, user="slurmtest", token_file=str(tmp_path / "nope"))
    with pytest.raises(BatchError, match="cannot read the slurmrestd token file"):
        missing.cancel(RUNNING)
    assert not responses.calls


# -- poll -----------------------------------------------------------------------------------------


@responses.activate
def test_poll_is_one_call_for_all_ids(adapter: SlurmRestAdapter) -> None:
    replay("GET", f"{API}/jobs", "jobs")
    ids = [HELD, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, UNKNOWN]

    infos = adapter.poll(ids)

    assert len(responses.calls) == 1
    assert set(infos) == set(ids)  # someone else's job in the answer is not reported
    assert infos[UNKNOWN].presence == Presence.ABSENT
    got = {j: (i.presence, i.state, i.native_state, i.reason, i.node, i.exit_code) for j, i in infos.items() if j != UNKNOWN}
    assert got == {
        HELD: (Presence.FOUND, JobState.HELD, "PENDING", "JobHeldUser", None, None),
        RUNNING: (Presence.FOUND, JobState.RUNNING, "RUNNING", None, "vm", None),
        COMPLETED: (Presence.FOUND, JobState.COMPLETED, "COMPLETED", None, "vm", 0),
        FAILED: (Presence.FOUND, JobState.FAILED, "FAILED", "NonZeroExitCode", "vm", 3),  # wait status 768
        CANCELLED: (Presence.FOUND, JobState.COMPLETED, "CANCELLED", None, "vm", 128 + 15),  # SIGTERM
        TIMEOUT: (Presence.FOUND, JobState.COMPLETED, "TIMEOUT", "TimeLimit", "vm", 128 + 15),
    }
    assert infos[RUNNING].raw["name"] == "rec-running"
    assert infos[HELD].start_estimate is None  # start_time 0: no estimate yet


def test_a_pending_job_with_a_start_time_has_an_estimate() -> None:
    record = copy.deepcopy(next(j for j in fixture("jobs")["body"]["jobs"] if j["job_id"] == int(HELD)))
    record.update(state_reason="Priority", start_time=1795705400)
    info = job_info(record)
    assert info.state == JobState.QUEUED
    assert info.start_estimate == dt.datetime.fromtimestamp(1795705400, dt.timezone.utc)


@responses.activate
def test_poll_of_no_ids_asks_nothing(adapter: SlurmRestAdapter) -> None:
    assert adapter.poll([]) == {}
    assert not responses.calls


@pytest.mark.parametrize("name", ["jobs_bad_token", "no_token_401", "job_unknown"])
@responses.activate
def test_poll_error_answers_are_query_failed_never_absent(adapter: SlurmRestAdapter, name: str) -> None:
    # jobs_bad_token: HTTP 500 with "jobs": [] - read as "nothing there" it would end every session
    replay("GET", f"{API}/jobs", name)
    infos = adapter.poll([RUNNING, UNKNOWN])
    assert {i.presence for i in infos.values()} == {Presence.QUERY_FAILED}
    assert all((i.reason or "").startswith("slurmrestd GET jobs: HTTP ") for i in infos.values())
    if name == "jobs_bad_token":
        hint = "Failed while looking for jobs (-1) (slurmrestd 22.05 answers a bad or expired token"
        assert hint in (infos[RUNNING].reason or "")


@responses.activate
def test_poll_retries_a_refused_connection(adapter: SlurmRestAdapter) -> None:
    responses.add("GET", f"{API}/jobs", body=requests.ConnectionError("connection refused"))
    replay("GET", f"{API}/jobs", "jobs")
    assert adapter.poll([RUNNING])[RUNNING].state == JobState.RUNNING
    assert len(responses.calls) == 2


@responses.activate
def test_poll_without_a_connection_is_query_failed(adapter: SlurmRestAdapter) -> None:
    responses.add("GET", f"{API}/jobs", body=requests.ConnectionError("connection refused"))
    infos = adapter.poll([RUNNING, HELD])
    assert {i.presence for i in infos.values()} == {Presence.QUERY_FAILED}
    assert "connection refused" in (infos[RUNNING].reason or "")
    assert len(responses.calls) == adapter.attempts


@responses.activate
def test_poll_timeout_is_query_failed_at_once(adapter: SlurmRestAdapter) -> None:
    responses.add("GET", f"{API}/jobs", body=requests.ReadTimeout("read timed out"))
    assert adapter.poll([RUNNING])[RUNNING].presence == Presence.QUERY_FAILED
    assert len(responses.calls) == 1  # the wait was already as long as we allow


@responses.activate
def test_poll_of_a_garbled_answer_is_query_failed(adapter: SlurmRestAdapter) -> None:
    responses.add("GET", f"{API}/jobs", body="<html>proxy error</html>", status=200, content_type="text/html")
    assert adapter.poll([RUNNING])[RUNNING].presence == Presence.QUERY_FAILED


@responses.activate
def test_history_cannot_be_asked_without_slurmdbd(adapter: SlurmRestAdapter) -> None:
    infos = adapter.history([COMPLETED])
    assert infos[COMPLETED].presence == Presence.QUERY_FAILED
    assert not responses.calls


# -- cancel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("job", "name"), [
    (CANCELLED, "cancel_ok"),
    (UNKNOWN, "cancel_unknown"),  # HTTP 500, error 2017 "Invalid job id specified": already gone
    (COMPLETED, "cancel_finished"),
])
@responses.activate
def test_cancel_succeeds_for_live_gone_and_finished_jobs(adapter: SlurmRestAdapter, job: JobId, name: str) -> None:
    replay("DELETE", f"{API}/job/{job}", name)
    adapter.cancel(job)
    assert responses.calls[0].request.headers["X-SLURM-USER-TOKEN"] == TOKEN


@responses.activate
def test_cancel_with_a_bad_token_raises(adapter: SlurmRestAdapter) -> None:
    replay("DELETE", f"{API}/job/{UNKNOWN}", "cancel_bad_token")  # HTTP 500, 5005: not "gone"
    with pytest.raises(BatchError, match="Zero Bytes were transmitted or received") as err:
        adapter.cancel(UNKNOWN)
    assert err.value.returncode == 500


@responses.activate
def test_cancel_without_a_connection_raises_after_retries(adapter: SlurmRestAdapter) -> None:
    responses.add("DELETE", f"{API}/job/47", body=requests.ConnectionError("connection refused"))
    with pytest.raises(BatchError) as err:
        adapter.cancel(JobId("47"))
    assert err.value.returncode is None
    assert len(responses.calls) == adapter.attempts


@responses.activate
def test_cancel_refuses_what_is_not_a_job_id(adapter: SlurmRestAdapter) -> None:
    with pytest.raises(BatchError, match="not a Slurm job id"):
        adapter.cancel(JobId("47/../../jobs"))
    assert not responses.calls


# -- #SBATCH lines ------------------------------------------------------------------------------


def test_directives_are_read_like_sbatch_reads_them() -> None:
    text = (
        "#!/bin/bash\n"
        "# a comment\n"
        "\n"
        "#SBATCH -J short -N1 --ntasks 1   # trailing comment\n"
        "#SBATCH --output='/data/my dir/%j.log' -c 4\n"
        "#SBATCH --time=10\n"
        "#SBATCH --time=20\n"  # the later one wins
        "#SBATCH --no-requeue\n"
        "echo hi\n"
        "#SBATCH --partition=ignored-after-the-first-command\n"
    )
    assert sbatch_directives(text) == {
        "name": "short", "nodes": "1", "tasks": "1", "standard_output": "/data/my dir/%j.log",
        "cpus_per_task": "4", "time_limit": "20", "no_requeue": True,
    }


@pytest.mark.parametrize(("line", "words"), [
    ("#SBATCH --exclusive", "--exclusive cannot be passed"),
    ("#SBATCH -w node1", "-w cannot be passed"),
    ("#SBATCH --time", "--time needs a value"),
    ("#SBATCH --no-requeue=yes", "--no-requeue takes no value"),
    ("#SBATCH stray", "unexpected #SBATCH argument"),
    ("#SBATCH --job-name='open", "cannot read directive on line 2"),
])
def test_directives_we_cannot_translate_are_refused(line: str, words: str) -> None:
    with pytest.raises(BatchError, match=words):
        sbatch_directives(f"#!/bin/bash\n{line}\ntrue\n")


# -- construction ---------------------------------------------------------------------------------


def test_the_registry_builds_it_from_the_cluster_config(tmp_path: Path) -> None:
    made = make_adapter(cluster(tmp_path))
    assert isinstance(made, SlurmRestAdapter)
    assert (made.url, made.user, made.token_file, made.timeout_s) == (URL, "slurmtest", str(tmp_path / "jwt"), 7.0)


def test_unsupported_settings_fail_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="v0.0.39 is not supported"):
        make_adapter(cluster(tmp_path, settings=RestAccess(url=URL, user="u", api_version="v0.0.39")))
    with pytest.raises(ValueError, match="has no 'rest' settings"):
        make_adapter(cluster(tmp_path, settings=None))
