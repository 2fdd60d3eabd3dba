"""Jobs run as the requesting user: ``submit_prefix``, user-name checks and job files owned by that user.

The first part needs nothing but Python (config checks, the argv the adapter builds, the
runner's no-terminal rule). The rest is real: job folders chowned to the CI user
``slurmtest`` (needs root), and, marked ``slurm``, jobs submitted through the whole chain
a site would use, run for real:

    runuser -u pvwhpc -- sudo -n -u slurmtest sbatch --parsable <job_dir>/<session>/job.sh

``pvwhpc`` is an unprivileged service user whose only sudo right is sbatch/scancel as
``slurmtest`` (``schedulers/slurm/sudoers`` sets it up). ``runuser`` stands in for a
launcher running as that service user, so the sudoers rule, not root's powers, is what
lets the job through.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from pvw_hpc import jobs
from pvw_hpc.auth import hash_token
from pvw_hpc.batch.base import BatchError, JobId, JobScript, expand_prefix, is_valid_user
from pvw_hpc.batch.runner import CommandFailed, CommandRunner, Result
from pvw_hpc.batch.slurm.adapter import SlurmAdapter
from pvw_hpc.clusters import ClusterConfig, check_clusters
from tests.conftest import ADMIN_TOKEN, LauncherFactory, slurm_reason, wait_for

JOB_USER = os.environ.get("SLURM_CI_USER", "slurmtest")
SVC_USER = os.environ.get("PVW_HPC_SVC_USER", "pvwhpc")
SUDOERS_FILE = Path("/etc/sudoers.d/pvw-hpc-test")
SUDO_PREFIX = ["sudo", "-n", "-u", "${user}"]
AS_SERVICE = ["runuser", "-u", SVC_USER, "--"]  # the launcher, as its unprivileged service account

IS_ROOT = os.geteuid() == 0


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")


def chain_reason() -> str | None:
    """Why the real run-as-user chain cannot be tested here, or None."""
    if not IS_ROOT:
        return "needs root (runuser to the service user, chown of job folders)"
    reason = slurm_reason()
    if reason:
        return reason
    if not _user_exists(JOB_USER):
        return f"user {JOB_USER} is missing (run schedulers/slurm/up)"
    if shutil.which("sudo") is None or not SUDOERS_FILE.exists() or not _user_exists(SVC_USER):
        return f"sudo, user {SVC_USER} or {SUDOERS_FILE} missing (run schedulers/slurm/sudoers)"
    return None


# -- user names and the prefix -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "slurmtest", "_svc", "a", "build-bot_2", "n" * 32, "a.b", "alice.smith"])
def test_portable_user_names_are_valid(name: str) -> None:
    assert is_valid_user(name)


@pytest.mark.parametrize("name", [
    "root",  # refused on purpose: run-as-user exists to drop privileges
    "", "-u", "--", "#0", "Alice", "1abc", "a b", "a;b", "$(id)", "a/b", ".hidden", "../x", "n" * 33,
    "alice\n", "al\x00ice", None, 0, ["alice"],
])
def test_other_user_names_are_refused(name: Any) -> None:
    assert not is_valid_user(name)


def test_expand_prefix_replaces_only_the_placeholder() -> None:
    assert expand_prefix(["sudo", "-n", "-u", "${user}"], "alice") == ["sudo", "-n", "-u", "alice"]
    assert expand_prefix(["ssh", "login", "--", "sudo", "-nu${user}"], "bob") == ["ssh", "login", "--", "sudo", "-nubob"]
    with pytest.raises(BatchError, match="refusing to run a job as 'root'"):
        expand_prefix(SUDO_PREFIX, "root")


# -- config ----------------------------------------------------------------------------------------


def _check(**cluster: Any) -> tuple[dict[str, ClusterConfig], list[tuple[str, str]], list[tuple[str, str]]]:
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    raw = {"c": {"scheduler": "slurm", "job_dir": "/srv/pvw/jobs", **cluster}}
    clusters = check_clusters(raw, lambda p, m: errors.append((p, m)), lambda p, m: warnings.append((p, m)))
    return clusters, errors, warnings


def test_submit_prefix_defaults_to_none_and_is_read_as_a_tuple() -> None:
    clusters, errors, warnings = _check()
    assert not errors and not warnings and clusters["c"].submit_prefix == ()
    clusters, errors, warnings = _check(submit_prefix=SUDO_PREFIX)
    assert not errors and not warnings
    assert clusters["c"].submit_prefix == ("sudo", "-n", "-u", "${user}")
    assert SlurmAdapter.from_cluster(clusters["c"]).submit_prefix == ("sudo", "-n", "-u", "${user}")


@pytest.mark.parametrize(("prefix", "extra", "needle"), [
    (["sudo", "-n", "-u", "alice"], {}, "must contain ${user}"),
    ("sudo -n -u ${user}", {}, "must be a list"),
    (["sudo", "", "${user}"], {}, "must be a list"),
    (["sudo", "-n", "-u", "${user}\n"], {}, "must be a list"),
    (["sudo", 3, "${user}"], {}, "must be a list"),
    (["${user}"], {}, "first word"),
    (["sudo", "-n", "-u", "${user}", "${HOME}"], {}, "only ${user} is replaced"),
    (SUDO_PREFIX, {"access": "rest", "rest": {"url": "http://h:6820", "user": "svc"}}, "(access 'cli')"),
])
def test_bad_submit_prefix_is_a_config_error(prefix: Any, extra: dict[str, Any], needle: str) -> None:
    clusters, errors, _ = _check(submit_prefix=prefix, **extra)
    assert "c" not in clusters
    assert [p for p, _ in errors] == ["$.clusters.c.submit_prefix"], errors
    assert needle in errors[0][1]


def test_sudo_without_n_is_a_warning() -> None:
    clusters, errors, warnings = _check(submit_prefix=["/usr/bin/sudo", "-u", "${user}"])
    assert not errors and "c" in clusters
    assert warnings == [("$.clusters.c.submit_prefix", warnings[0][1])] and "-n" in warnings[0][1]


# -- the argv the adapter runs (a recording runner, nothing executed) --------------------------------


class RecordingRunner(CommandRunner):
    """Records each argv and answers like a successful sbatch/scancel.

    A fake on purpose: these tests pin the exact argv for paths and users that do not
    exist on this machine (``/opt/slurm/bin/sbatch``, ``alice``). That the chain really
    runs jobs as the user is proven by the ``slurm``-marked tests below with real sudo
    and the real cluster.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(attempts=1, **kwargs)
        self.calls: list[tuple[list[str], int | None]] = []

    def _once(self, argv: list[str], stdin: str | None, check: bool, umask: int | None = None,
              cwd: str | None = None) -> Result:
        self.calls.append((argv, umask))
        return Result(0, "4242\n", "")


def _script(user: str | None) -> JobScript:
    return JobScript(text="#!/bin/bash\n", name="pvw-x", path=Path("/jobs/x/job.sh"), workdir=Path("/jobs/x"), user=user)


def test_prefix_goes_before_the_overridden_sbatch_and_the_jobs_scancel() -> None:
    runner = RecordingRunner(bin_overrides={"sbatch": "/opt/slurm/bin/sbatch"})
    adapter = SlurmAdapter(runner, submit_prefix=tuple(SUDO_PREFIX))
    assert adapter.submit(_script("alice")) == "4242"
    adapter.cancel(JobId("4242"), user="alice")
    adapter.poll([JobId("4242")])
    assert [argv for argv, _ in runner.calls] == [
        ["sudo", "-n", "-u", "alice", "/opt/slurm/bin/sbatch", "--parsable", "/jobs/x/job.sh"],
        ["sudo", "-n", "-u", "alice", "scancel", "4242"],
        ["squeue", "-h", "-t", "all", "-j", "4242", "-O", runner.calls[2][0][-1]],  # the poll stays the launcher's
    ]
    assert runner.calls[0][1] == 0o077  # so job.log is created 0600, like every other job file


def test_without_a_prefix_the_user_changes_nothing() -> None:
    runner = RecordingRunner()
    adapter = SlurmAdapter(runner)
    adapter.submit(_script("alice"))
    adapter.cancel(JobId("7"), user="alice")
    adapter.cancel(JobId("8"))
    assert [argv for argv, _ in runner.calls] == [
        ["sbatch", "--parsable", "/jobs/x/job.sh"], ["scancel", "7"], ["scancel", "8"]]


def test_a_prefix_cluster_refuses_a_job_without_a_user_or_with_a_bad_one() -> None:
    runner = RecordingRunner()
    adapter = SlurmAdapter(runner, submit_prefix=tuple(SUDO_PREFIX))
    with pytest.raises(BatchError, match="has no user"):
        adapter.submit(_script(None))
    for bad in ("root", "-n", "#0", "a b"):
        with pytest.raises(BatchError, match="refusing to run a job as"):
            adapter.submit(_script(bad))
        with pytest.raises(BatchError, match="refusing to run a job as"):
            adapter.cancel(JobId("1"), user=bad)
    adapter.cancel(JobId("9"))  # no user: the launcher tries itself, as before
    assert [argv for argv, _ in runner.calls] == [["scancel", "9"]]


# -- the runner: no terminal, no stdin, whole group killed -------------------------------------------


def test_commands_have_no_terminal_so_sudo_cannot_prompt() -> None:
    result = CommandRunner(attempts=1).run(["sh", "-c", "exec 3</dev/tty && echo has-tty; read x; echo \"[$x]\""],
                                           check=False)
    assert "has-tty" not in result.stdout  # opening /dev/tty fails: no controlling terminal


def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    runner = CommandRunner(timeout_s=0.5, attempts=1)
    started = time.monotonic()
    with pytest.raises(CommandFailed, match="timed out"):
        runner.run(["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"])
    assert time.monotonic() - started < 5
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not _alive(grandchild), 5, "the backgrounded sleep to be killed with its group")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- job files owned by the job's user (root, no scheduler) -------------------------------------------


@pytest.fixture
def job_root() -> Iterator[Path]:
    """A job_dir parent the way a site would make it: root's, mode 0711 (pass through, no listing)."""
    root = Path(tempfile.mkdtemp(prefix="pvw-runas-", dir="/tmp"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cluster(job_dir: Path, prefix: Sequence[str] = ()) -> ClusterConfig:
    return ClusterConfig(name="slurm", scheduler="slurm", job_dir=job_dir, python="/usr/bin/python3",
                         defaults={"partition": "debug", "time": "00:05:00", "cpus": 1}, submit_prefix=tuple(prefix),
                         command_timeout_s=20)


def _write(cluster: ClusterConfig, session_id: str, argv: list[str], owner: str | None) -> JobScript:
    script, _ = jobs.render_script(cluster, session_id, jobs.merged_resources(cluster, {}))
    return jobs.write_job_files(cluster, session_id, script=script, argv=argv, env={}, ready_line=None, port=None,
                                cwd=None, secret="s3cr3t" * 5, token="t0ken" * 5, callback_url=None, owner=owner)


def _session() -> str:
    return str(uuid.uuid4())


def assert_owned_by(folder: Path, user: str) -> None:
    """The folder and its files are ``user``'s (and their primary group's), 0700 / 0700 / 0600."""
    entry = pwd.getpwnam(user)
    expected = {folder: 0o700, folder / "job.sh": 0o700, folder / "spec.json": 0o600, folder / "secret": 0o600,
                folder / "token": 0o600}
    for path, mode in expected.items():
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (entry.pw_uid, entry.pw_gid), path
        assert stat.S_IMODE(info.st_mode) == mode, f"{path}: {stat.S_IMODE(info.st_mode):o}"


def run_as(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@needs_root
def test_owner_gets_the_folder_and_files_with_the_same_modes(job_root: Path) -> None:
    if not _user_exists(JOB_USER):
        pytest.skip(f"user {JOB_USER} is missing (run schedulers/slurm/up)")
    cluster = _cluster(job_root / "jobs")
    sid = _session()
    script = _write(cluster, sid, ["true"], owner=JOB_USER)
    assert script.user == JOB_USER and script.workdir == job_root / "jobs" / sid
    assert_owned_by(script.workdir, JOB_USER)
    assert stat.S_IMODE((job_root / "jobs").stat().st_mode) == 0o755  # made by root with umask 022
    assert jobs.job_owner(script.workdir) == JOB_USER
    assert run_as(JOB_USER, "cat", str(script.workdir / "secret")).stdout == "s3cr3t" * 5 + "\n"
    # without an owner: the launcher's, as before
    plain = _write(cluster, _session(), ["true"], owner=None)
    assert plain.user is None and plain.workdir.stat().st_uid == os.geteuid() and jobs.job_owner(plain.workdir) is None
    assert jobs.job_owner(job_root / "gone") is None


@needs_root
@pytest.mark.parametrize(("owner", "needle"), [
    ("root", "not a valid user name"), ("a b", "not a valid user name"),
    ("nosuchuser-pvw", "no such user on the launcher host"),
])
def test_refused_owner_leaves_no_folder(job_root: Path, owner: str, needle: str) -> None:
    cluster = _cluster(job_root / "jobs")
    sid = _session()
    with pytest.raises(jobs.JobFilesError, match=needle):
        _write(cluster, sid, ["true"], owner=owner)
    assert not (job_root / "jobs" / sid).exists()


@needs_root
def test_a_job_dir_the_owner_cannot_pass_is_refused_at_once(job_root: Path) -> None:
    if not _user_exists(JOB_USER):
        pytest.skip(f"user {JOB_USER} is missing (run schedulers/slurm/up)")
    closed = job_root / "closed"
    closed.mkdir(mode=0o700)
    sid = _session()
    with pytest.raises(jobs.JobFilesError, match=r"closed is mode 0700 .*make it 0711 or 0755"):
        _write(_cluster(closed / "jobs"), sid, ["true"], owner=JOB_USER)
    assert not (closed / "jobs" / sid).exists()


# -- the real chain: service user -> sudo -> sbatch as the job's user ------------------------------------


@pytest.fixture
def chain(job_root: Path) -> Iterator[tuple[ClusterConfig, list[str]]]:
    """A cluster whose prefix runs the launcher's commands as the service user, then sudo; cleans up jobs."""
    reason = chain_reason()
    if reason:
        pytest.skip(reason)
    submitted: list[str] = []
    cluster = _cluster(job_root / "jobs", [*AS_SERVICE, *SUDO_PREFIX])
    try:
        yield cluster, submitted
    finally:
        if submitted:  # as root, by id: whatever a failed assertion left running
            subprocess.run(["scancel", *submitted], capture_output=True, timeout=30)


def squeue_field(job_id: str, field: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-O", f"{field}:|"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().rstrip("|")


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)


@pytest.mark.slurm
def test_service_user_submits_through_sudo_and_the_job_runs_as_the_requesting_user(
        chain: tuple[ClusterConfig, list[str]]) -> None:
    cluster, submitted = chain
    adapter = SlurmAdapter.from_cluster(cluster)
    probe = 'echo "whoami=$(id -un) uid=$(id -u) sudo_user=$SUDO_USER"; sleep 120'
    script = _write(cluster, _session(), ["/bin/sh", "-c", probe], owner=JOB_USER)
    job_id = adapter.submit(script)
    submitted.append(job_id)

    # (a) the scheduler says the job belongs to the requesting user, and the job itself agrees
    uid = pwd.getpwnam(JOB_USER).pw_uid
    assert squeue_field(job_id, "UserName") == JOB_USER
    assert scontrol(job_id)["UserId"] == f"{JOB_USER}({uid})"
    log = script.workdir / "job.log"
    wait_for(lambda: log.exists() and "whoami=" in log.read_text(), 30, "the job to print who it runs as", 0.1)
    # it went through the service user's sudo (sbatch passes the submit environment on)
    assert f"whoami={JOB_USER} uid={uid} sudo_user={SVC_USER}" in log.read_text()

    # (c) everything in the folder is the user's; the service user and others cannot read any of it
    assert_owned_by(script.workdir, JOB_USER)
    assert log.stat().st_uid == uid and stat.S_IMODE(log.stat().st_mode) == 0o600
    for outsider in (SVC_USER, "nobody"):
        for name in ("secret", "token", "spec.json", "job.sh", "job.log"):
            denied = run_as(outsider, "cat", str(script.workdir / name))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (outsider, name)
        assert run_as(outsider, "ls", str(script.workdir)).returncode != 0
    assert run_as(JOB_USER, "cat", str(script.workdir / "token")).returncode == 0

    # cancel through the same prefix, as the job's owner (the service user itself could not)
    adapter.cancel(job_id, user=jobs.job_owner(script.workdir))
    wait_for(lambda: squeue_field(job_id, "State") == "CANCELLED", 20, "the job to be cancelled", 0.2)
    exit_file = script.workdir / "exit_code"
    wait_for(exit_file.exists, 20, "the job side to write exit_code", 0.1)  # it could write in its folder
    assert exit_file.stat().st_uid == uid and stat.S_IMODE(exit_file.stat().st_mode) == 0o600


@pytest.mark.slurm
def test_no_sudoers_rule_for_that_user_fails_fast_with_a_clear_batch_error(
        chain: tuple[ClusterConfig, list[str]]) -> None:
    cluster, _ = chain
    adapter = SlurmAdapter.from_cluster(cluster)
    script = _write(cluster, _session(), ["true"], owner=JOB_USER)
    # (b) the service user may act as slurmtest only: as anyone else sudo -n refuses at once
    for other in ("nobody", "daemon"):
        started = time.monotonic()
        with pytest.raises(BatchError) as refused:
            adapter.submit(replace(script, user=other))
        assert time.monotonic() - started < 5
        err = refused.value
        assert err.returncode == 1 and "a password is required" in err.stderr
        assert str(err).startswith(f"sbatch as {other!r} failed: exit 1: sudo: a password is required")
        assert err.argv[:8] == [*AS_SERVICE, "sudo", "-n", "-u", other]
        with pytest.raises(BatchError, match=f"scancel as {other!r} failed: exit 1: sudo: a password is required"):
            adapter.cancel(JobId("999999"), user=other)
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-n", script.name, "-o", "%i"], capture_output=True,
                            text=True, timeout=30)
    assert listed.stdout.strip() == ""  # nothing was submitted

    # a site that forgot -n still gets an answer at once: commands have no terminal to prompt on
    no_n = SlurmAdapter.from_cluster(replace(cluster, submit_prefix=(*AS_SERVICE, "sudo", "-u", "${user}")))
    started = time.monotonic()
    with pytest.raises(BatchError, match="sudo: a terminal is required|sudo: a password is required"):
        no_n.submit(replace(script, user="nobody"))
    assert time.monotonic() - started < 5


@pytest.mark.slurm
def test_without_sudo_the_service_user_cannot_touch_the_users_job(chain: tuple[ClusterConfig, list[str]]) -> None:
    """The control experiment: the sudoers rule is what lets submit and cancel through, not the launcher's powers."""
    cluster, submitted = chain
    script = _write(cluster, _session(), ["/bin/sh", "-c", "sleep 120"], owner=JOB_USER)
    job_id = SlurmAdapter.from_cluster(cluster).submit(script)
    submitted.append(job_id)
    as_service = CommandRunner(attempts=1, timeout_s=20)  # the service user on its own, no sudo
    with pytest.raises(CommandFailed, match="Unable to open file"):  # cannot even read the user's script
        as_service.run(["sbatch", "--parsable", str(script.path)], prefix=AS_SERVICE)
    with pytest.raises(CommandFailed, match="Access/permission denied"):
        as_service.run(["scancel", job_id], prefix=AS_SERVICE)
    assert squeue_field(job_id, "State") in ("PENDING", "RUNNING")


# -- through the launcher -----------------------------------------------------------------------


def test_a_launch_for_a_user_runs_as_that_user_end_to_end(launcher: LauncherFactory) -> None:
    """POST as a portal for user slurmtest; the launcher itself submits through runuser + sudo."""
    reason = chain_reason()
    if reason:
        pytest.skip(reason)
    portal = "portal-run-as-token"
    # the app must be readable by the job user: the system python's http.server, ready when its port answers
    app = {"cluster": "slurm", "cmd": ["/usr/bin/python3", "-m", "http.server", "${port}", "--bind", "${host}"]}
    lau = launcher(
        configuration={"auth": {"anonymous": False, "tokens": [
            {"name": "portal", "sha256": hash_token(portal), "roles": ["launch"], "users": [JOB_USER]},
            {"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]}},
        clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3,
                            "submit_prefix": [*AS_SERVICE, *SUDO_PREFIX]}},
        apps={"web": app})
    response = requests.post(lau.url, json={"application": "web", "user": JOB_USER}, timeout=60,
                             headers={"Authorization": f"Bearer {portal}"})
    assert response.status_code == 200, response.text
    session_id = response.json()["id"]
    info = lau.get(session_id).json()
    owner = subprocess.run(["squeue", "-h", "-j", info["job_id"], "-O", "UserName:|"], capture_output=True,
                           text=True, check=True).stdout.strip().rstrip("|")
    assert owner == JOB_USER
    assert requests.get(f"http://{info['host']}:{info['port']}/", timeout=10).status_code == 200
    assert_owned_by(lau.root / "jobs" / "slurm" / session_id, JOB_USER)
    assert lau.delete(session_id).json()["state"] == "ended"
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", info["job_id"], "-O", "State:|"], capture_output=True,
                                    text=True).stdout.strip().rstrip("|") in ("", "CANCELLED", "COMPLETING"),
             20, "the job to be cancelled as its user")
