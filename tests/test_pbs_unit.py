"""PBS parsers and the adapter's decisions on recorded real outputs of PBS Pro, OpenPBS and Torque.

No PBS server runs here, so these outputs are the real thing this side of the
boundary: each fixture file is a published recording (``tests/fixtures/pbs/SOURCES.md``
says where from). The adapter tests replace only the command runner with one
that replays such recordings, and say so; the lifecycle against real
``qsub``/``qstat``/``qdel`` is in ``tests/test_batch_e2e.py`` (Slurm's Torque wrappers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pvw_hpc.batch.base import BatchError, JobId, JobScript, JobState, Presence
from pvw_hpc.batch.pbs.adapter import PbsAdapter, answer, exec_node, job_info, parse_json, parse_submit, parse_text, same_job
from pvw_hpc.batch.runner import CommandRunner, Result

FIXTURES = Path(__file__).parent / "fixtures" / "pbs"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# -- qsub -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stdout, job_id", [
    ("1.pbs\n", "1.pbs"),  # OpenPBS 23.06 (firecrest)
    ("53.testpbs.nas.nasa.gov\n", "53.testpbs.nas.nasa.gov"),  # openpbs#1255
    ("278\n", "278"),  # the Slurm wrapper
    ("123[].server\n", "123[].server"),
])
def test_qsub_output_gives_the_full_id(stdout: str, job_id: str) -> None:
    assert parse_submit(stdout) == job_id


@pytest.mark.parametrize("stdout", ["", "There was an error running the Slurm sbatch command.\n", "1.pbs; rm -rf /\n"])
def test_qsub_output_without_an_id_is_an_error(stdout: str) -> None:
    with pytest.raises(BatchError):
        parse_submit(stdout)


def test_ids_match_with_or_without_the_server_suffix_but_not_across_servers() -> None:
    assert same_job("123", "123.server") and same_job("123.server", "123")
    assert not same_job("123.a", "123.b") and not same_job("12", "123")


# -- qstat -f text ----------------------------------------------------------------------------


def test_pbspro_finished_job_text_is_unfolded_and_final() -> None:
    [job] = parse_text(fixture("pbspro-14-finished-qstat-xf.txt"))
    assert job["Job_Id"] == "7600424.pbs02"
    assert job["Output_Path"] == "login001.palmetto.clemson.edu:/home/username/MPI/pi-mpi.o7600424"  # folded mid-word
    assert job["exec_vnode"].count("(") == 4 and "\t" not in job["exec_vnode"]
    assert job["Variable_List"].endswith("PBS_O_HOST=login001.palmetto.clemson.edu")
    info = job_info(job, "pbspro")
    assert (info.state, info.native_state, info.exit_code, info.node) == (JobState.COMPLETED, "F", 0, "node0088")
    assert info.workdir == "/home/username/MPI"
    assert info.reason and info.reason.endswith("and finished")


def test_torque_running_job_text() -> None:
    [job] = parse_text(fixture("torque-2.3.7-running-qstat-f.txt"))
    info = job_info(job, "torque")
    assert (info.job_id, info.state, info.node, info.name) == (
        "114621.mike.bw.nitech.ac.jp", JobState.RUNNING, "cnode002.bw.nitech.ac.jp", "pmd")
    assert job["exec_host"].endswith("cnode003.bw.nitech.ac.jp/1+cnode003.bw.nitech.ac.jp/0")
    assert info.workdir == "/home/kobayashi/test"


def test_torque_completed_job_with_space_expanded_folds_and_a_blank_line_inside() -> None:
    [job] = parse_text(fixture("torque-6-completed-qstat-f.txt"))
    assert job["Error_Path"] == "torque01.bcgsc.ca:/projects/trans_scratch/validations/workspace/creisle/temp/subtest.sh.e9"
    assert job["request_version"] == "1"  # after the blank line: still the same job
    info = job_info(job, "torque")
    assert (info.state, info.native_state, info.exit_code) == (JobState.COMPLETED, "C", 0)
    assert info.workdir == "/projects/trans_scratch/validations/workspace/creisle/temp"


def test_the_slurm_wrappers_tab_indented_text() -> None:
    [job] = parse_text(fixture("slurm-torque-wrapper-qstat-f.txt"))
    info = job_info(job, "torque")
    assert info.name and info.name.startswith("pvw-")
    assert info.state in (JobState.RUNNING, JobState.QUEUED, JobState.COMPLETED)
    assert info.job_id.isdigit()


def test_several_jobs_in_one_text_reply() -> None:
    text = fixture("torque-2.3.7-running-qstat-f.txt") + "\n" + fixture("torque-6-completed-qstat-f.txt")
    assert [j["Job_Id"] for j in parse_text(text)] == ["114621.mike.bw.nitech.ac.jp", "9.torque01.bcgsc.ca"]


# -- qstat -f -F json -------------------------------------------------------------------------


def test_openpbs_json_running_job() -> None:
    [job] = parse_json(fixture("openpbs-23.06.06-running-qstat-f-F-json-x.json"))
    info = job_info(job, "pbspro")
    assert (info.job_id, info.state, info.native_state, info.node, info.name) == (
        "1.pbs", JobState.RUNNING, "R", "pbs", "hello_pbs")
    assert job["Resource_List.walltime"] == "00:05:00"
    assert info.workdir == "/home/fireuser"
    assert info.exit_code is None


def test_json_without_jobs_key_means_none_matched() -> None:
    assert parse_json(fixture("pbspro-2024-finished-without-x.json")) == []


@pytest.mark.parametrize("flavor, raw, code, reason", [
    ("pbspro", "271", 143, "killed by signal 15"),  # 256 + SIGTERM
    ("pbspro", "265", 137, "killed by signal 9"),
    ("pbspro", "-29", -29, "walltime limit exceeded"),  # JOB_EXEC_KILL_WALLTIME
    ("torque", "-11", -11, "walltime limit exceeded"),  # Torque's JOB_EXEC_OVERLIMIT_WT
    ("torque", "-29", -29, "PBS could not run or finish the job (Exit_status -29)"),
    ("pbspro", "3", 3, None),
])
def test_exit_status_values(flavor: str, raw: str, code: int, reason: str | None) -> None:
    info = job_info({"Job_Id": "5.s", "job_state": "F", "Exit_status": raw}, flavor)
    assert (info.state, info.exit_code) == (JobState.FAILED, code)
    if reason:
        assert info.reason == reason


@pytest.mark.parametrize("letter, state", [
    ("Q", JobState.QUEUED), ("W", JobState.QUEUED), ("T", JobState.QUEUED), ("H", JobState.HELD),
    ("R", JobState.RUNNING), ("B", JobState.RUNNING), ("S", JobState.RUNNING), ("U", JobState.RUNNING),
    ("E", JobState.ENDING), ("F", JobState.COMPLETED), ("X", JobState.COMPLETED), ("C", JobState.COMPLETED),
    ("M", JobState.UNKNOWN),
])
def test_every_state_letter_maps(letter: str, state: JobState) -> None:
    assert job_info({"Job_Id": "1.s", "job_state": letter}, "pbspro").state == state


def test_held_job_says_how_it_is_held() -> None:
    info = job_info({"Job_Id": "1.s", "job_state": "H", "Hold_Types": "u"}, "pbspro")
    assert info.reason == "held (u)"


@pytest.mark.parametrize("exec_host, node", [
    ("node0088/1*2+node0094/1*2", "node0088"), ("pbs/0", "pbs"), ("r2i4n13/0-23+r1i2n12/0-23", "r2i4n13"),
    ("", None), (None, None),
])
def test_exec_host_gives_the_first_node(exec_host: str | None, node: str | None) -> None:
    assert exec_node(exec_host) == node


# -- what a reply means per requested id ------------------------------------------------------


def test_unknown_ids_named_on_stderr_are_absent_the_rest_found() -> None:
    jobs = parse_text(fixture("torque-2.3.7-running-qstat-f.txt"))
    ids = [JobId("114621.mike.bw.nitech.ac.jp"), JobId("3481331.egeon2")]
    out = answer(jobs, ids, 153, "qstat: Unknown Job Id Error 3481331.egeon2\n", "torque")
    assert out[ids[0]].presence == Presence.FOUND and out[ids[1]].presence == Presence.ABSENT


def test_finished_without_history_is_found_and_final() -> None:
    job_id = JobId("79850.gw4head")
    stderr = "qstat: 79850.gw4head Job has finished, use -x or -H to obtain historical job information\n"
    info = answer([], [job_id], 35, stderr, "pbspro")[job_id]
    assert info.presence == Presence.FOUND and info.state == JobState.COMPLETED


def test_a_protocol_error_is_a_failed_query_not_a_finished_job() -> None:
    job_id = JobId("15458627.aqua")
    info = answer([], [job_id], 183, "qstat: Premature end of message 15458627.aqua\n", "pbspro")[job_id]
    assert info.presence == Presence.QUERY_FAILED


def test_silence_is_a_failed_query_but_153_is_an_answer() -> None:
    job_id = JobId("7")
    assert answer([], [job_id], 0, "", "torque")[job_id].presence == Presence.QUERY_FAILED
    assert answer([], [job_id], 255, "qstat: cannot connect to server s (errno=111)", "torque")[
        job_id].presence == Presence.QUERY_FAILED
    assert answer([], [job_id], 153, "", "torque")[job_id].presence == Presence.ABSENT  # the wrapper's silent 153


# -- the adapter over a replaying runner ------------------------------------------------------


class ReplayRunner(CommandRunner):
    """A stand-in for the PBS commands: no PBS server can run here, so it replays recorded replies.

    Keyed by the command name; records every argv so tests can check what would have run.
    """

    def __init__(self, replies: dict[str, list[Result]]) -> None:
        super().__init__(attempts=1)
        self.replies = replies
        self.calls: list[list[str]] = []

    def _once(self, argv: list[str], stdin: str | None, check: bool, umask: int | None = None,
              cwd: str | None = None) -> Result:
        self.calls.append(argv)
        return self.replies[argv[0]].pop(0)


def test_pbspro_poll_asks_json_with_history_and_falls_back_to_text_on_bad_json() -> None:
    runner = ReplayRunner({"qstat": [Result(0, '{"Jobs": {"7600424.pbs02": {"foo":005}}}', ""),
                                     Result(0, fixture("pbspro-14-finished-qstat-xf.txt"), "")]})
    adapter = PbsAdapter(runner=runner, flavor="pbspro")
    info = adapter.poll([JobId("7600424.pbs02")])[JobId("7600424.pbs02")]
    assert runner.calls == [["qstat", "-f", "-F", "json", "-x", "7600424.pbs02"], ["qstat", "-f", "-x", "7600424.pbs02"]]
    assert info.state == JobState.COMPLETED and info.exit_code == 0


def test_pbspro_submit_passes_the_name_and_runs_in_the_job_folder(tmp_path: Path) -> None:
    runner = ReplayRunner({"qsub": [Result(0, "53.testpbs.nas.nasa.gov\n", "")]})
    script = JobScript(text="", name="pvw-abc", path=tmp_path / "job.sh", workdir=tmp_path)
    assert PbsAdapter(runner=runner).submit(script) == "53.testpbs.nas.nasa.gov"
    assert runner.calls == [["qsub", "-N", "pvw-abc", str(tmp_path / "job.sh")]]


@pytest.mark.parametrize("reply", [
    Result(153, "", "qdel: Unknown Job Id 100000\n"),
    Result(35, "", "qdel: Job has finished 0.pbspro\n"),
    Result(153, "", "qdel: nonexistent job id: 23\n"),
    Result(168, "", "qdel: Request invalid for state of job MSG=invalid state for job - COMPLETE 1936\n"),
])
def test_cancelling_a_job_that_is_gone_succeeds(reply: Result) -> None:
    PbsAdapter(runner=ReplayRunner({"qdel": [reply]})).cancel(JobId("100000"))


def test_a_silent_qdel_failure_is_checked_against_the_queue() -> None:
    running = fixture("torque-2.3.7-running-qstat-f.txt")
    runner = ReplayRunner({"qdel": [Result(1, "", "")], "qstat": [Result(0, running, "")]})
    with pytest.raises(BatchError):
        PbsAdapter(runner=runner, flavor="torque").cancel(JobId("114621.mike.bw.nitech.ac.jp"))
    gone = ReplayRunner({"qdel": [Result(1, "", "")], "qstat": [Result(153, "", "")]})
    PbsAdapter(runner=gone, flavor="torque").cancel(JobId("8"))  # the wrapper's silent qdel of a finished job


def test_find_named_lists_live_jobs_by_name_prefix() -> None:
    runner = ReplayRunner({"qstat": [Result(0, fixture("openpbs-23.06.06-running-qstat-f-F-json-x.json"), "")]})
    assert set(PbsAdapter(runner=runner).find_named("hello")) == {"1.pbs"}
    assert runner.calls == [["qstat", "-f", "-F", "json"]]


def test_a_pbs_pro_reply_that_leaves_an_id_out_says_nothing_about_it() -> None:
    """PBS Pro names each unknown id on stderr; some OpenPBS builds answer only for the first of several ids."""
    [job] = parse_json(fixture("openpbs-23.06.06-running-qstat-f-F-json-x.json"))
    out = answer([job], [JobId("1.pbs"), JobId("2.pbs")], 0, "", "pbspro")
    assert out[JobId("1.pbs")].presence == Presence.FOUND and out[JobId("2.pbs")].presence == Presence.QUERY_FAILED
