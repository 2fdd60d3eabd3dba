"""The pyslurm adapter: its pure parts against a fake ``pyslurm``, then the real thing on the local SLURM.

The fake (``FakePyslurm``) is a fast seam beside the real tests, not instead of them: it
has only the names the worker calls (``Jobs.load``, ``Job(id).cancel``,
``JobSubmitDescription(**fields).submit``, ``RPCError``, ``version``, ``slurm_api_version``)
and job attributes named as in pyslurm 22.5's ``pyslurm/core/job/job.pyx``. The adapter gets a
``PyslurmWorker.in_process(fake)``: the worker's own request handler in this process, every
request and reply through JSON as over the worker's pipe. So it pins down the state mapping,
the ``#SBATCH`` translation, one call per poll and what an ``RPCError`` means, in milliseconds
and without a controller. The tests marked ``pyslurm`` then submit, poll, find and cancel
real jobs through the real pyslurm in a real worker process, and meet a controller that does
not answer through a worker whose slurm.conf points at a closed port (the shared slurmctld is
never stopped), while a thread of this process keeps ticking.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc import jobs
from pvw_hpc.batch import adapter_class, make_adapter
from pvw_hpc.batch.base import BatchError, JobId, JobScript, JobState, Presence
from pvw_hpc.batch.slurm_pyslurm.adapter import SlurmPyslurmAdapter, job_fields, job_info
from pvw_hpc.batch.slurm_pyslurm.client import WORKER_PATH, PyslurmWorker
from pvw_hpc.batch.slurm_pyslurm.worker import FIELDS, Worker, encode, job_record
from pvw_hpc.clusters import ClusterConfig, check_clusters
from tests.conftest import pid_alive, wait_for
from tests.support.schedulers import BACKENDS

SESSION = "0b7e7f0e-2a53-4c55-9d0e-3f3c2b1a9e11"
DOWN = "Unable to contact slurm controller (connect failure)"  # RPCError 1800: what a stopped slurmctld gives


# -- the fake pyslurm ---------------------------------------------------------------------------------


class FakeRPCError(Exception):
    """pyslurm.RPCError: ``errno`` and the message libslurm gave."""

    def __init__(self, errno: int = -1, msg: str | None = None) -> None:
        super().__init__(msg)
        self.errno, self.msg = errno, msg


@dataclass
class FakeJob:
    """The attributes of pyslurm.Job the adapter reads."""

    id: int
    name: str | None = None
    state: str = "PENDING"
    state_reason: str | None = None
    batch_host: str | None = None
    allocated_nodes: str | None = None
    exit_code: int = 0
    exit_code_signal: int = 0
    working_directory: str | None = None
    start_time: int | None = None


class FakePyslurm:
    """The module: its controller's jobs, what was called, and the error to raise (``down``)."""

    RPCError = FakeRPCError

    def __init__(self, *jobs: FakeJob) -> None:
        self.jobs = {job.id: job for job in jobs}
        self.api = (22, 5, 8)  # slurm_api_version(): what the worker's first reply says
        self.calls: Counter[str] = Counter()
        self.down: Exception | None = None
        self.submitted: list[dict[str, Any]] = []
        self.cancelled: list[int] = []
        self.next_id = 100
        fake = self

        class Jobs:
            @staticmethod
            def load() -> dict[int, FakeJob]:  # pyslurm.Jobs: a dict-like of id -> Job
                fake._call("Jobs.load")
                return dict(fake.jobs)

        class Job:
            def __init__(self, job_id: int) -> None:
                self.job_id = job_id

            @staticmethod
            def load(job_id: int) -> FakeJob:
                fake._call("Job.load")
                raise AssertionError("the adapter must not load jobs one by one")

            def cancel(self) -> None:
                fake._call("Job.cancel")
                fake.cancelled.append(self.job_id)

        class JobSubmitDescription:
            def __init__(self, **fields: Any) -> None:
                self.fields = fields

            def submit(self) -> int:
                fake._call("JobSubmitDescription.submit")
                fake.submitted.append(self.fields)
                fake.next_id += 1
                return fake.next_id

        self.Jobs, self.Job, self.JobSubmitDescription = Jobs, Job, JobSubmitDescription

    def version(self) -> str:
        return "22.5.3"

    def slurm_api_version(self) -> tuple[int, int, int]:
        return self.api

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.down is not None:
            raise self.down


def adapter_with(*jobs: FakeJob) -> tuple[SlurmPyslurmAdapter, FakePyslurm]:
    fake = FakePyslurm(*jobs)
    return SlurmPyslurmAdapter(client=PyslurmWorker.in_process(fake)), fake


def info(job: FakeJob) -> Any:
    """``job`` as the worker sends it (its attributes, read once), read by the adapter."""
    return job_info(job_record(job))


def cluster(tmp_path: Path, **overrides: Any) -> ClusterConfig:
    settings: dict[str, Any] = {
        "name": "hpc", "scheduler": "slurm", "access": "pyslurm", "job_dir": tmp_path / "job files",
        "command_timeout_s": 7.0,
        "defaults": {"partition": "debug", "account": "proj1", "qos": "normal", "time": "1:30", "nodes": 1,
                     "cpus": 2, "memory": "4G", "gpus": 1, "gres": "gpu:a100:1",
                     "extra_directives": ["--constraint=avx2", "--exclusive"]},
    }
    settings.update(overrides)
    return ClusterConfig(**settings)


def rendered(config: ClusterConfig, **env: str) -> JobScript:
    text, _ = jobs.render_script(config, SESSION, jobs.merged_resources(config, {}))
    files = jobs.job_files(config, SESSION)
    return JobScript(text=text, name=jobs.job_name(SESSION), path=files.script, workdir=files.dir, env=env)


# -- states --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("word", "reason", "state"), [
    ("PENDING", None, JobState.QUEUED),
    ("PENDING", "Priority", JobState.QUEUED),
    ("PENDING", "JobHeldUser", JobState.HELD),
    ("PENDING", "JobHeldAdmin", JobState.HELD),
    ("REQUEUED", None, JobState.QUEUED),
    ("SUSPENDED", None, JobState.HELD),
    ("CONFIGURING", None, JobState.RUNNING),
    ("RUNNING", None, JobState.RUNNING),
    ("COMPLETING", None, JobState.ENDING),
    ("COMPLETED", None, JobState.COMPLETED),
    ("CANCELLED", None, JobState.COMPLETED),
    ("TIMEOUT", None, JobState.COMPLETED),
    ("PREEMPTED", None, JobState.COMPLETED),
    ("FAILED", "NonZeroExitCode", JobState.FAILED),
    ("NODE_FAIL", None, JobState.FAILED),
    ("OUT_OF_MEMORY", None, JobState.FAILED),
    ("BOOT_FAIL", None, JobState.FAILED),
    ("SOMETHING_NEW", None, JobState.UNKNOWN),
])
def test_pyslurms_state_words_map_like_squeues(word: str, reason: str | None, state: JobState) -> None:
    read = info(FakeJob(7, state=word, state_reason=reason))
    assert (read.presence, read.state, read.native_state) == (Presence.FOUND, state, word)


def test_a_job_record_reads_node_exit_code_reason_name_and_workdir() -> None:
    ended = info(FakeJob(8, name="pvw-x", state="FAILED", state_reason="NonZeroExitCode", batch_host="vm",
                             allocated_nodes="vm,vm2", exit_code=3, working_directory="/jobs/x"))
    assert (ended.node, ended.exit_code, ended.reason, ended.name, ended.workdir) == \
        ("vm", 3, "NonZeroExitCode", "pvw-x", "/jobs/x")
    killed = info(FakeJob(9, state="CANCELLED", allocated_nodes="n[1-2]", exit_code=0, exit_code_signal=15))
    assert (killed.node, killed.exit_code) == ("n[1-2]", 143)  # 128 + SIGTERM, as the CLI adapter reads it
    running = info(FakeJob(10, state="RUNNING", state_reason="None", batch_host="vm", exit_code=0))
    assert (running.reason, running.exit_code) == (None, None)  # no exit code before the end
    queued = info(FakeJob(11, state="PENDING", start_time=1_800_000_000))
    assert queued.node is None and queued.start_estimate is not None
    assert queued.start_estimate.timestamp() == 1_800_000_000
    assert info(FakeJob(12, state="RUNNING", start_time=1_800_000_000)).start_estimate is None


def test_the_worker_reads_each_attribute_job_info_needs_and_sends_plain_values() -> None:
    class Counted(FakeJob):
        reads: Counter[str] = Counter()

        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_") and name != "reads":
                Counted.reads[name] += 1
            return super().__getattribute__(name)

    record = job_record(Counted(7, name="pvw-x", state="RUNNING", start_time=5))
    assert json.loads(json.dumps(record)) == record  # JSON carries it as it is
    assert tuple(record) == FIELDS and set(Counted.reads) == set(FIELDS)
    assert set(Counted.reads.values()) == {1}  # each read once
    odd = job_record(FakeJob(8, name=Path("/odd"), start_time=dt.datetime(2030, 1, 1)))  # type: ignore[arg-type]
    assert json.loads(encode({"ok": odd}))["ok"]["start_time"] == "2030-01-01 00:00:00"  # a type JSON lacks: text


# -- poll, history, find_named -----------------------------------------------------------------------


def test_one_jobs_load_per_poll_whatever_the_number_of_jobs() -> None:
    adapter, fake = adapter_with(*(FakeJob(n, state="PENDING") for n in range(1, 1001)), FakeJob(5000))
    wanted = [JobId(str(n)) for n in range(1, 1001)]
    infos = adapter.poll(wanted)
    assert fake.calls == Counter({"Jobs.load": 1})
    assert set(infos) == set(wanted) and all(i.presence == Presence.FOUND for i in infos.values())
    assert adapter.poll([]) == {} and fake.calls["Jobs.load"] == 1  # nothing to ask: no call


def test_an_id_missing_from_a_successful_answer_is_absent() -> None:
    adapter, _ = adapter_with(FakeJob(1, state="RUNNING", batch_host="vm"))
    infos = adapter.poll([JobId("1"), JobId("2")])
    assert infos[JobId("1")].state == JobState.RUNNING and infos[JobId("1")].node == "vm"
    assert infos[JobId("2")].presence == Presence.ABSENT


@pytest.mark.parametrize("error", [FakeRPCError(1800, DOWN), FakeRPCError(1003, "Message receive failure"),
                                   MemoryError("xmalloc failed for job_info_t")])
def test_a_failed_query_is_query_failed_for_every_id_never_absent(error: Exception) -> None:
    adapter, fake = adapter_with(FakeJob(1))
    fake.down = error
    for method in (adapter.poll, adapter.history):
        infos = method([JobId("1"), JobId("2")])
        assert {i.presence for i in infos.values()} == {Presence.QUERY_FAILED}
        assert all(str(error) in (i.reason or "") for i in infos.values())


def test_history_is_what_the_controller_still_holds() -> None:
    adapter, fake = adapter_with(FakeJob(1, state="COMPLETED", exit_code=0), FakeJob(2, state="TIMEOUT"))
    infos = adapter.history([JobId("1"), JobId("3")])
    assert infos[JobId("1")].state == JobState.COMPLETED and infos[JobId("1")].exit_code == 0
    assert infos[JobId("3")].presence == Presence.ABSENT  # purged, no slurmdbd: the poller keeps the session
    assert fake.calls == Counter({"Jobs.load": 1})


def test_find_named_lists_live_jobs_by_name_prefix_with_their_folders() -> None:
    adapter, fake = adapter_with(
        FakeJob(1, name="pvw-a", state="PENDING", working_directory="/jobs/a"),
        FakeJob(2, name="pvw-b", state="RUNNING", working_directory="/jobs/b"),
        FakeJob(3, name="pvw-c", state="COMPLETED"),  # over: nothing to adopt or cancel
        FakeJob(4, name="someone-else", state="RUNNING"),
        FakeJob(5, name=None, state="RUNNING"),
    )
    found = adapter.find_named("pvw-")
    assert {j: (i.name, i.workdir) for j, i in found.items()} == {"1": ("pvw-a", "/jobs/a"), "2": ("pvw-b", "/jobs/b")}
    fake.down = FakeRPCError(1800, DOWN)
    with pytest.raises(BatchError, match="Unable to contact"):
        adapter.find_named("pvw-")
    assert fake.calls == Counter({"Jobs.load": 2})


# -- submit --------------------------------------------------------------------------------------------


def test_submit_sets_the_template_directives_as_description_fields(tmp_path: Path) -> None:
    adapter, fake = adapter_with()
    config = cluster(tmp_path)
    script = rendered(config, LANG="C.UTF-8")
    assert adapter.submit(script) == JobId("101")
    (fields,) = fake.submitted
    env = fields.pop("environment")
    files = jobs.job_files(config, SESSION)
    assert fields == {
        "name": f"pvw-{SESSION}",
        "standard_output": str(files.log),  # the template shell-quotes it: the folder has a space
        "working_directory": str(files.dir),
        "is_requeueable": False,
        "partitions": "debug", "account": "proj1", "qos": "normal",
        "time_limit": "1:30",  # libslurm's time_str2mins reads it, as in sbatch (2 minutes)
        "nodes": "1", "ntasks": 1, "cpus_per_task": 2,
        "memory_per_node": 4096,  # MB, converted as sbatch does
        "gpus": "1", "gres_per_node": "gpu:a100:1",
        "constraints": "avx2", "resource_sharing": "no",  # the extra directives
        "script": str(files.script), "script_args": [str(files.script)],  # by path: the text is over 4 KiB
    }
    assert env["SLURM_UMASK"] == "0077"  # the job's files private, as sbatch under SUBMIT_UMASK
    assert env["LANG"] == "C.UTF-8" and env["PATH"] == os.environ["PATH"]  # sbatch's --export=ALL, plus the script's
    assert env["SLURM_SUBMIT_HOST"] == socket.gethostname()


def test_a_requeueable_cluster_leaves_requeue_to_slurm(tmp_path: Path) -> None:
    adapter, fake = adapter_with()
    adapter.submit(rendered(cluster(tmp_path, requeue=True, defaults={})))
    assert "is_requeueable" not in fake.submitted[0]
    assert (fake.submitted[0]["nodes"], fake.submitted[0]["ntasks"]) == ("1", 1)


def test_directives_are_read_like_sbatch_reads_them() -> None:
    text = (
        "#!/bin/bash\n"
        "# a comment\n"
        "\n"
        "#SBATCH -J short -N1 --ntasks 1   # trailing comment\n"
        "#SBATCH --output='/data/my dir/%j.log' -c 4 -H\n"
        "#SBATCH --time=10 --mem=1500K\n"
        "#SBATCH --time=20\n"  # the later one wins
        "#SBATCH --mem-per-cpu 2g --no-requeue --requeue\n"
        "echo hi\n"
        "#SBATCH --partition=ignored-after-the-first-command\n"
    )
    assert job_fields(text) == {
        "name": "short", "nodes": "1", "ntasks": 1, "standard_output": "/data/my dir/%j.log", "cpus_per_task": 4,
        "priority": 0,  # -H: what sbatch sends, held as JobHeldUser
        "time_limit": 20,  # minutes as an int: pyslurm passes a string of digits on unconverted
        "memory_per_node": 2, "memory_per_cpu": 2048,  # 1500K rounds up to 2 MB, as sbatch does
        "is_requeueable": True,
    }


@pytest.mark.parametrize(("line", "words"), [
    ("#SBATCH --mail-type=END", "--mail-type cannot be passed through pyslurm"),
    ("#SBATCH --export=NONE", "--export cannot be passed"),
    ("#SBATCH -a 1-3", "-a cannot be passed"),
    ("#SBATCH --mem=0", "0 .all of a node's memory. cannot be passed"),
    ("#SBATCH --mem=lots", "must be a size"),
    ("#SBATCH --cpus-per-task=two", "must be a whole number"),
    ("#SBATCH --time", "--time needs a value"),
    ("#SBATCH --hold=yes", "--hold takes no value"),
    ("#SBATCH stray", "unexpected #SBATCH argument"),
    ("#SBATCH --job-name='open", "cannot read directive on line 2"),
])
def test_directives_it_cannot_translate_are_refused_not_dropped(tmp_path: Path, line: str, words: str) -> None:
    adapter, fake = adapter_with()
    with pytest.raises(BatchError, match=words):
        adapter.submit(JobScript(text=f"#!/bin/bash\n{line}\ntrue\n", name="pvw-x", path=tmp_path / "job.sh",
                                 workdir=tmp_path))
    assert not fake.calls  # nothing reached the controller


@pytest.mark.parametrize(("error", "unreachable"), [
    (FakeRPCError(1800, DOWN), True),
    (FakeRPCError(1802, "Unable to contact slurm controller (receive failure)"), True),
    (FakeRPCError(5004, "Socket timed out on send/recv operation"), True),
    (FakeRPCError(2000, "Invalid partition name specified"), False),  # a refusal: the controller answered
    (FakeRPCError(2050, "Job violates accounting/QOS policy"), False),
    (ValueError("Invalid Time Specification: 1:xx."), False),  # pyslurm's own check of a value
])
def test_a_submit_that_fails_says_whether_the_controller_answered(tmp_path: Path, error: Exception,
                                                                 unreachable: bool) -> None:
    adapter, fake = adapter_with()
    fake.down = error
    with pytest.raises(BatchError) as failed:
        adapter.submit(rendered(cluster(tmp_path)))
    assert failed.value.unreachable is unreachable and str(error) in str(failed.value)


# -- cancel --------------------------------------------------------------------------------------------


def test_cancel_is_one_call_as_the_launcher_and_refuses_what_is_not_a_job_id() -> None:
    adapter, fake = adapter_with()
    adapter.cancel(JobId("42"), user="alice")  # the user is ignored: the launcher submitted it
    assert fake.cancelled == [42] and fake.calls == Counter({"Job.cancel": 1})
    with pytest.raises(BatchError, match="not a Slurm job id"):
        adapter.cancel(JobId("42;rm"))
    fake.down = FakeRPCError(1800, DOWN)
    with pytest.raises(BatchError, match="Unable to contact") as failed:
        adapter.cancel(JobId("42"))
    assert failed.value.unreachable
    fake.down = OSError("something pyslurm did not expect")  # not an RPCError: still a BatchError, not an outage
    with pytest.raises(BatchError, match="cancel of job 42 failed: OSError: something") as failed:
        adapter.cancel(JobId("42"))
    assert not failed.value.unreachable


# -- one call at a time, and a missing pyslurm ------------------------------------------------------


def test_calls_from_many_threads_reach_libslurm_one_at_a_time() -> None:
    adapter, fake = adapter_with(FakeJob(1))
    inside, most = 0, 0
    counting = threading.Lock()
    load = fake.Jobs.load

    def slow_load() -> dict[int, FakeJob]:
        nonlocal inside, most
        with counting:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)
        with counting:
            inside -= 1
        return load()

    fake.Jobs.load = staticmethod(slow_load)  # type: ignore[method-assign]
    threads = [threading.Thread(target=adapter.poll, args=([JobId("1")],)) for _ in range(8)]
    threads += [threading.Thread(target=adapter.find_named, args=("pvw-",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1 and fake.calls["Jobs.load"] == 12


def test_without_pyslurm_polls_fail_and_submits_are_refused_saying_how_to_install(tmp_path: Path) -> None:
    """A real worker on a Python that cannot import pyslurm (``-S``: no site-packages; the worker needs none)."""
    client = PyslurmWorker(command=[sys.executable, "-S", WORKER_PATH])
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=30)
    try:
        infos = adapter.poll([JobId("1")])
        assert infos[JobId("1")].presence == Presence.QUERY_FAILED
        reason = infos[JobId("1")].reason or ""
        assert "not installed" in reason and "scripts/install-pyslurm" in reason
        with pytest.raises(BatchError, match=r"\[pyslurm\]") as refused:
            adapter.submit(rendered(cluster(tmp_path)))
        assert not refused.value.unreachable  # a launcher problem, not a scheduler outage
        assert (client.start_attempts, client.starts) == (1, 0)  # remembered: not one worker per call
    finally:
        client.close()


def test_a_pyslurm_for_another_slurm_is_refused_once_and_remembered() -> None:
    adapter, fake = adapter_with(FakeJob(1))
    fake.api = (23, 2, 0)
    for _ in range(3):
        infos = adapter.poll([JobId("1")])
        assert "built for another Slurm" in (infos[JobId("1")].reason or "")
    assert adapter.worker.start_attempts == 1 and not fake.calls  # nothing was asked of the controller


def test_the_worker_answers_what_it_does_not_know_as_data() -> None:
    handler = Worker(FakePyslurm())
    assert handler.answer({"id": 3, "op": "rm -rf"})["error"]["kind"] == "request"
    assert handler.answer({"id": 4, "op": "cancel", "job_id": "42"})["error"]["kind"] == "request"
    assert handler.answer(["not", "a", "request"]) == {
        "id": None, "error": {"kind": "request", "text": "not a request this worker knows: ['not', 'a', 'request']"}}
    assert handler.answer({"id": 5, "op": "cancel", "job_id": 42}) == {"id": 5, "ok": None}
    assert Worker(None, "pyslurm is not installed").answer({"id": 6, "op": "load"}) == {
        "id": 6, "error": {"kind": "import", "text": "pyslurm is not installed"}}


def test_importing_the_registry_does_not_import_pyslurm() -> None:
    code = "import sys, pvw_hpc.batch; assert 'pyslurm' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_pyslurm_cluster_comes_from_the_config_and_refuses_run_as_keys(tmp_path: Path) -> None:
    assert adapter_class("slurm", "pyslurm") is SlurmPyslurmAdapter
    made = make_adapter(cluster(tmp_path))
    assert isinstance(made, SlurmPyslurmAdapter) and made.command_timeout_s == 7.0 and made.client is None
    errors: list[str] = []
    check_clusters({"a": {"scheduler": "slurm", "access": "pyslurm", "job_dir": str(tmp_path),
                          "submit_prefix": ["sudo", "-n", "-u", "${user}"]},
                    "b": {"scheduler": "slurm", "access": "pyslurm", "job_dir": str(tmp_path), "job_user": "bob"}},
                   lambda path, message: errors.append(path), lambda *_: None)
    assert errors == ["$.clusters.a.submit_prefix", "$.clusters.b.job_user"]


# -- the real pyslurm on the local SLURM ------------------------------------------------------------

LIVE = BACKENDS["pyslurm"]
NODE = os.environ.get("SLURM_CI_NODE") or socket.gethostname().split(".")[0]  # the one node of schedulers/slurm/up


@pytest.fixture(scope="module")
def live() -> SlurmPyslurmAdapter:
    reason = LIVE.skip_reason()  # under CI a failure, not a skip
    if reason:
        pytest.skip(reason)
    return SlurmPyslurmAdapter()


def job_script(folder: Path, name: str, body: str, *directives: str) -> JobScript:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"--job-name={name}", f"--output={folder}/job.log", f"--chdir={folder}", "--partition=debug",
             "--time=00:05:00", "--nodes=1", "--ntasks=1", "--no-requeue", *directives]
    text = "#!/bin/bash\n" + "".join(f"#SBATCH {line}\n" for line in lines) + "\n" + body + "\n"
    path = folder / "job.sh"
    path.write_text(text)
    return JobScript(text=text, name=name, path=path, workdir=folder)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.pyslurm
def test_a_held_job_is_found_queued_then_cancelled(live: SlurmPyslurmAdapter, tmp_path: Path) -> None:
    name = unique("pvw-pyslurm-held")
    job_id = live.submit(job_script(tmp_path / "held", name, "sleep 60", "--hold"))
    try:
        info = live.poll([job_id, JobId("999999999")])
        held, unknown = info[job_id], info[JobId("999999999")]
        assert (held.presence, held.state, held.native_state, held.reason) == \
            (Presence.FOUND, JobState.HELD, "PENDING", "JobHeldUser")
        assert (held.name, held.workdir, held.node) == (name, str(tmp_path / "held"), None)
        assert unknown.presence == Presence.ABSENT  # a clean answer without it: not a failed query
        found = live.find_named(name)
        assert list(found) == [job_id] and found[job_id].workdir == str(tmp_path / "held")
    finally:
        live.cancel(job_id)
    ended = live.poll([job_id])[job_id]
    assert (ended.presence, ended.state, ended.native_state) == (Presence.FOUND, JobState.COMPLETED, "CANCELLED")
    assert live.history([job_id])[job_id].state == JobState.COMPLETED  # slurmctld keeps it for MinJobAge
    assert live.find_named(name) == {}  # over: not a live job any more
    live.cancel(job_id)  # cancelling a finished job succeeds
    live.cancel(JobId("999999999"))  # and an unknown one


@pytest.mark.pyslurm
def test_a_job_runs_with_its_directives_private_files_and_exit_code(live: SlurmPyslurmAdapter, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    job_id = live.submit(job_script(folder, unique("pvw-pyslurm-exit"), 'echo "umask $(umask)"; exit 3',
                                    "--mem=64M", "--comment='pvw-hpc test'"))
    wait_for(lambda: (live.poll([job_id])[job_id].state or JobState.UNKNOWN).is_final, 60, f"job {job_id} to end")
    ended = live.poll([job_id])[job_id]
    assert (ended.state, ended.native_state, ended.exit_code, ended.node) == \
        (JobState.FAILED, "FAILED", 3, NODE)
    log = folder / "job.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and "umask 0077" in log.read_text()  # SLURM_UMASK
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "MinMemoryNode=64M" in shown and "Comment=pvw-hpc test" in shown and "Requeue=0" in shown
    assert f"Command={folder / 'job.sh'}" in shown  # argv[0] as sbatch sends it


@pytest.mark.pyslurm
def test_a_refused_submit_is_not_an_outage(live: SlurmPyslurmAdapter, tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="Invalid partition name") as refused:
        live.submit(job_script(tmp_path / "refused", unique("pvw-pyslurm-refused"), "true",
                               "--partition=no-such-partition"))
    assert not refused.value.unreachable


def closed_port_conf(folder: Path, message_timeout_s: int) -> Path:
    """A copy of slurm.conf whose controller port nothing listens on: what a stopped slurmctld looks like."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text().splitlines()
    conf = [line for line in conf if not line.startswith(("SlurmctldPort=", "MessageTimeout="))]
    path = folder / "slurm.conf"
    path.write_text("\n".join([*conf, f"SlurmctldPort={port}", f"MessageTimeout={message_timeout_s}", ""]))
    return path


class Ticker:
    """A thread of this process ticking every 50 ms: whether the launcher's threads run while the worker waits."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ticks.append(time.monotonic())
            time.sleep(0.05)

    def __enter__(self) -> Ticker:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def within(self, seconds: float) -> int:
        return sum(1 for t in self.ticks if t - self.started < seconds)


def worker_with(conf: Path) -> PyslurmWorker:
    return PyslurmWorker(env={**os.environ, "SLURM_CONF": str(conf)})


@pytest.mark.pyslurm
def test_a_controller_that_does_not_answer_is_a_failed_query_and_an_unreachable_submit(live: SlurmPyslurmAdapter,
                                                                                     tmp_path: Path) -> None:
    """The real libslurm against a closed port: it gives up after MessageTimeout - 1 s; this process runs on."""
    client = worker_with(closed_port_conf(tmp_path, 2))
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=7)
    try:
        client.check(30)  # started: what is timed below is the call alone
        with Ticker() as ticker:
            infos = adapter.poll([JobId("1"), JobId("2")])
            took = time.monotonic() - ticker.started
        assert {j: i.presence for j, i in infos.items()} == {"1": Presence.QUERY_FAILED, "2": Presence.QUERY_FAILED}
        assert "Unable to contact slurm controller" in (infos[JobId("1")].reason or "")  # libslurm's own answer
        assert 0.5 < took < 7  # libslurm waited, the deadline did not end it
        assert ticker.within(1.0) >= 10  # the GIL was the worker's to hold, not this process's
        with pytest.raises(BatchError) as failed:
            adapter.submit(job_script(tmp_path / "down", "pvw-down", "true"))
        assert failed.value.unreachable is True and "errno 1800" in str(failed.value)
        assert client.starts == 1  # an answer, even "unable to contact", keeps the worker
    finally:
        client.close()


@pytest.mark.pyslurm
@pytest.mark.slow  # waits out the worker's deadline
def test_a_call_past_its_deadline_kills_the_worker_and_this_process_ticks_on(live: SlurmPyslurmAdapter,
                                                                            tmp_path: Path) -> None:
    """libslurm would wait 19 s (MessageTimeout 20); the cluster's 3 s deadline stops the worker instead."""
    client = worker_with(closed_port_conf(tmp_path, 20))
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=3)
    try:
        client.check(30)
        blocked = client.pid
        assert blocked is not None
        with Ticker() as ticker:
            infos = adapter.poll([JobId("1"), JobId("2")])
            took = time.monotonic() - ticker.started
        assert {i.presence for i in infos.values()} == {Presence.QUERY_FAILED}
        assert "did not answer in 3 s" in (infos[JobId("1")].reason or "")
        assert 3 <= took < 5
        assert ticker.within(1.0) >= 10 and len(ticker.ticks) >= 40  # 20 a second, all along
        assert not pid_alive(blocked) and client.pid is None  # killed and reaped
        started = time.monotonic()
        with pytest.raises(BatchError, match="did not answer in 3 s") as failed:  # a new worker, as stuck
            adapter.submit(job_script(tmp_path / "down", "pvw-down", "true"))
        assert failed.value.unreachable is True and time.monotonic() - started < 5
        assert client.starts == 2
    finally:
        client.close()


@pytest.mark.pyslurm
def test_closing_during_a_blocked_request_ends_it_at_once_without_another_worker(live: SlurmPyslurmAdapter,
                                                                                tmp_path: Path) -> None:
    client = worker_with(closed_port_conf(tmp_path, 20))
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=30)
    client.check(30)
    worker = client.pid
    threading.Timer(0.5, client.close).start()  # the owner closes while libslurm waits (19 s)
    started = time.monotonic()
    infos = adapter.poll([JobId("1")])
    assert time.monotonic() - started < 3
    assert "the worker ended during the request" in (infos[JobId("1")].reason or "")
    assert (client.start_attempts, client.pid) == (1, None) and worker is not None and not pid_alive(worker)


@pytest.mark.pyslurm
@pytest.mark.parametrize("settled", [True, False], ids=["found-dead", "dying-as-asked"])
def test_a_worker_killed_between_polls_is_replaced_without_a_failed_poll(live: SlurmPyslurmAdapter,
                                                                       tmp_path: Path, settled: bool) -> None:
    """Long dead (the next request sees it ended) or killed just before the request (it ends during it)."""
    client = PyslurmWorker()
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=30)
    job_id = adapter.submit(job_script(tmp_path / "held", unique("pvw-pyslurm-restart"), "sleep 60", "--hold"))
    try:
        assert adapter.poll([job_id])[job_id].state == JobState.HELD
        first = client.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        if settled:
            wait_for(lambda: not pid_alive(first), 5, "the killed worker to be a zombie")
        again = adapter.poll([job_id])[job_id]
        assert (again.presence, again.state) == (Presence.FOUND, JobState.HELD)
        assert client.pid not in (None, first) and client.starts == 2
        assert not pid_alive(first)
    finally:
        adapter.cancel(job_id)
        client.close()
    assert client.pid is None


@pytest.mark.pyslurm
def test_an_import_that_ends_the_worker_is_a_batch_error_with_its_last_words(live: SlurmPyslurmAdapter,
                                                                             tmp_path: Path) -> None:
    """libslurm calls fatal() on a slurm.conf it cannot use: the worker ends, this process gets a BatchError."""
    (tmp_path / "slurm.conf").write_text("ClusterName=broken\n")  # no SlurmctldHost: fatal at once
    client = worker_with(tmp_path / "slurm.conf")
    adapter = SlurmPyslurmAdapter(client=client, command_timeout_s=30)
    reason = adapter.poll([JobId("1")])[JobId("1")].reason or ""
    assert "ended while importing pyslurm (exit 1" in reason and "Unable to process configuration file" in reason
    assert adapter.poll([JobId("1")])[JobId("1")].reason == reason  # remembered, not tried again at once
    assert (client.start_attempts, client.starts, client.pid) == (1, 0, None)
