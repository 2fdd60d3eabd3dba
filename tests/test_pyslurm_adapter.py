"""The pyslurm adapter: its pure parts against a fake ``pyslurm``, then the real thing on the local SLURM.

The fake (``FakePyslurm``) is a fast seam beside the real tests, not instead of them: it
has only the names the adapter calls (``Jobs.load``, ``Job(id).cancel``,
``JobSubmitDescription(**fields).submit``, ``RPCError``) and job attributes named as in
pyslurm 22.5's ``pyslurm/core/job/job.pyx``, so it pins down the state mapping, the
``#SBATCH`` translation, one call per poll and what an ``RPCError`` means, in milliseconds
and without a controller. The tests marked ``pyslurm`` then submit, poll, find and cancel
real jobs through the real pyslurm, and meet a controller that does not answer in a child
process whose slurm.conf points at a closed port (the shared slurmctld is never stopped).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc import jobs
from pvw_hpc.batch import adapter_class, make_adapter
from pvw_hpc.batch.base import BatchError, JobId, JobScript, JobState, Presence
from pvw_hpc.batch.slurm_pyslurm import adapter as pyslurm_adapter
from pvw_hpc.batch.slurm_pyslurm.adapter import SlurmPyslurmAdapter, job_fields, job_info
from pvw_hpc.clusters import ClusterConfig, check_clusters
from tests.conftest import wait_for
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

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.down is not None:
            raise self.down


def adapter_with(*jobs: FakeJob) -> tuple[SlurmPyslurmAdapter, FakePyslurm]:
    fake = FakePyslurm(*jobs)
    return SlurmPyslurmAdapter(bindings=fake), fake


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
    info = job_info(FakeJob(7, state=word, state_reason=reason))
    assert (info.presence, info.state, info.native_state) == (Presence.FOUND, state, word)


def test_a_job_record_reads_node_exit_code_reason_name_and_workdir() -> None:
    ended = job_info(FakeJob(8, name="pvw-x", state="FAILED", state_reason="NonZeroExitCode", batch_host="vm",
                             allocated_nodes="vm,vm2", exit_code=3, working_directory="/jobs/x"))
    assert (ended.node, ended.exit_code, ended.reason, ended.name, ended.workdir) == \
        ("vm", 3, "NonZeroExitCode", "pvw-x", "/jobs/x")
    killed = job_info(FakeJob(9, state="CANCELLED", allocated_nodes="n[1-2]", exit_code=0, exit_code_signal=15))
    assert (killed.node, killed.exit_code) == ("n[1-2]", 143)  # 128 + SIGTERM, as the CLI adapter reads it
    running = job_info(FakeJob(10, state="RUNNING", state_reason="None", batch_host="vm", exit_code=0))
    assert (running.reason, running.exit_code) == (None, None)  # no exit code before the end
    queued = job_info(FakeJob(11, state="PENDING", start_time=1_800_000_000))
    assert queued.node is None and queued.start_estimate is not None
    assert queued.start_estimate.timestamp() == 1_800_000_000
    assert job_info(FakeJob(12, state="RUNNING", start_time=1_800_000_000)).start_estimate is None


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


_find_spec = pyslurm_adapter.importlib.util.find_spec


@pytest.fixture
def no_pyslurm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as if pyslurm were not installed (and never imported)."""
    monkeypatch.setattr(pyslurm_adapter, "_loaded", None)
    monkeypatch.setattr(pyslurm_adapter, "_load_failed", None)
    monkeypatch.delitem(sys.modules, "pyslurm", raising=False)
    monkeypatch.setattr(pyslurm_adapter.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyslurm" else _find_spec(name, *a))
    yield


def test_without_pyslurm_polls_fail_and_submits_are_refused_saying_how_to_install(no_pyslurm: None,
                                                                                 tmp_path: Path) -> None:
    adapter = SlurmPyslurmAdapter()
    infos = adapter.poll([JobId("1")])
    assert infos[JobId("1")].presence == Presence.QUERY_FAILED
    assert "not installed" in (infos[JobId("1")].reason or "") and "scripts/install-pyslurm" in (infos[JobId("1")].reason or "")
    with pytest.raises(BatchError, match=r"\[pyslurm\]") as refused:
        adapter.submit(rendered(cluster(tmp_path)))
    assert not refused.value.unreachable  # a launcher problem, not a scheduler outage


def test_importing_the_registry_does_not_import_pyslurm() -> None:
    code = "import sys, pvw_hpc.batch; assert 'pyslurm' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_pyslurm_cluster_comes_from_the_config_and_refuses_run_as_keys(tmp_path: Path) -> None:
    assert adapter_class("slurm", "pyslurm") is SlurmPyslurmAdapter
    made = make_adapter(cluster(tmp_path))
    assert isinstance(made, SlurmPyslurmAdapter) and made.import_timeout_s == 7.0 and made.bindings is None
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


CHILD = """
import json, sys
from pathlib import Path
from pvw_hpc.batch.base import BatchError, JobId, JobScript
from pvw_hpc.batch.slurm_pyslurm.adapter import SlurmPyslurmAdapter
adapter = SlurmPyslurmAdapter()
out = {"poll": {j: i.presence.value for j, i in adapter.poll([JobId("1"), JobId("2")]).items()},
       "reason": adapter.poll([JobId("1")])[JobId("1")].reason}
path = Path(sys.argv[1])
try:
    adapter.submit(JobScript(text=path.read_text(), name="pvw-down", path=path, workdir=path.parent))
except BatchError as exc:
    out["submit"] = {"unreachable": exc.unreachable, "error": str(exc)}
print(json.dumps(out))
"""


@pytest.mark.pyslurm
def test_a_controller_that_does_not_answer_is_a_failed_query_and_an_unreachable_submit(live: SlurmPyslurmAdapter,
                                                                                     tmp_path: Path) -> None:
    """The real libslurm against a closed port (a copy of slurm.conf): what a stopped slurmctld looks like."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text().splitlines()
    conf = [line for line in conf if not line.startswith(("SlurmctldPort=", "MessageTimeout="))]
    (tmp_path / "slurm.conf").write_text("\n".join([*conf, f"SlurmctldPort={port}", "MessageTimeout=2", ""]))
    script = job_script(tmp_path / "down", "pvw-down", "true")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CHILD, str(script.path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["poll"] == {"1": "query_failed", "2": "query_failed"}  # never ABSENT: we know nothing
    assert "Unable to contact slurm controller" in out["reason"]
    assert out["submit"]["unreachable"] is True and "errno 1800" in out["submit"]["error"]
    assert time.monotonic() - started < 60  # each call waits MessageTimeout - 1 s, then gives up


@pytest.mark.pyslurm
def test_an_import_that_would_end_the_process_is_tried_in_a_child_first(live: SlurmPyslurmAdapter,
                                                                          tmp_path: Path) -> None:
    """libslurm calls fatal() on a slurm.conf it cannot use; the launcher gets a BatchError instead."""
    (tmp_path / "slurm.conf").write_text("ClusterName=broken\n")  # no SlurmctldHost: fatal at once
    code = ("from pvw_hpc.batch.base import JobId\n"
            "from pvw_hpc.batch.slurm_pyslurm.adapter import SlurmPyslurmAdapter\n"
            "print(SlurmPyslurmAdapter().poll([JobId('1')])[JobId('1')].reason)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr  # still alive to print the reason
    assert "import pyslurm failed (exit 1)" in done.stdout and "Unable to process configuration file" in done.stdout
