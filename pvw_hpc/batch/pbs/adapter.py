"""PBS Pro / OpenPBS and Torque through ``qsub``, ``qstat`` and ``qdel``.

Two families speak two dialects, chosen by the cluster's ``flavor``:

* ``pbspro`` (PBS Pro, OpenPBS >= 18.1): status from ``qstat -f -F json -x``,
  which includes finished jobs (state F) while the server keeps history; a
  reply that is not valid JSON (known server bugs) falls back to the text form.
* ``torque`` (Torque, and Slurm's Torque wrappers): ``qstat -f`` text; a
  finished job shows as C for a while, then is unknown, and the job's own
  exit-code file tells how it ended.

Ids are kept exactly as ``qsub`` printed them (``123.server``): PBS's short
display truncates them, and the Slurm wrapper's ``qdel 8.other`` would cancel
job 8. What a query's exit status means follows the PBS sources: 153 is
"unknown job id" (an answer), 35 "job has finished" (an answer), anything
else with nothing parsed is a failed query that must not end a session.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..base import (
    BatchError,
    JobId,
    JobInfo,
    JobScript,
    JobState,
    Presence,
    Report,
    SchedulerTraits,
    command_prefix,
    failed_query,
    submit_prefix_for,
)
from ..runner import CommandFailed, CommandRunner
from . import settings

FLAVORS = ("pbspro", "torque")
RC_UNKNOWN_JOB = 153  # PBSE_UNKJOBID & 0xff
RC_JOB_FINISHED = 35  # PBSE_HISTJOBID & 0xff: "Job has finished, use -x"
RC_BAD_STATE = 168  # Torque PBSE_BADSTATE: qdel of a completed job
SUBMIT_UMASK = 0o077

_JOB_ID = re.compile(r"^\d+(?:\[\d*\])?(?:\.[A-Za-z0-9_.-]+)?\Z")
_UNKNOWN = re.compile(r"(?:Unknown Job Id(?: Error)?|nonexistent job id:)\s+(\S+)")
_FINISHED = re.compile(r"(\S+)\s+Job has finished|Job has finished\s+(\S+)")
_GONE_ON_CANCEL = ("Unknown Job Id", "nonexistent job id", "Job has finished", "invalid state for job - COMPLETE")

# job_state letters of both families -> our states; F, X and C are final and decided by the exit status
_STATES: dict[str, JobState] = {
    "Q": JobState.QUEUED, "W": JobState.QUEUED, "T": JobState.QUEUED, "M": JobState.UNKNOWN,
    "H": JobState.HELD, "U": JobState.RUNNING,
    "R": JobState.RUNNING, "B": JobState.RUNNING, "S": JobState.RUNNING,
    "E": JobState.ENDING,
}
_FINAL = frozenset("FXC")
# negative Exit_status values that mean the walltime ran out (they differ between the families)
_WALLTIME_CODES = {"pbspro": -29, "torque": -11}


def parse_submit(stdout: str) -> JobId:
    """The job id ``qsub`` printed (``123.server``; the Slurm wrapper prints a bare ``278``)."""
    for line in stdout.splitlines():
        word = line.strip()
        if word:
            if _JOB_ID.match(word):
                return JobId(word)
            break
    raise BatchError(f"qsub printed no job id: {stdout.strip()[:200]!r}", returncode=0)


def same_job(a: str, b: str) -> bool:
    """True when two spellings name one job (``123`` and ``123.server``; PBS may add or drop the suffix)."""
    if a == b:
        return True
    short_a, _, server_a = a.partition(".")
    short_b, _, server_b = b.partition(".")
    return short_a == short_b and (not server_a or not server_b)


# -- qstat -f text --------------------------------------------------------------------------


def parse_text(stdout: str) -> list[dict[str, str]]:
    """``qstat -f`` text into one ``{attribute: value}`` per job (``Job Id`` under ``"Job_Id"``).

    PBS and Torque indent attributes with four spaces and fold long values onto
    lines that start with a TAB (joined back with nothing in between); the
    Slurm wrapper indents attributes with a TAB and never folds. Jobs are split
    on ``Job Id:``, not on blank lines, which can occur inside a job.
    """
    jobs: list[dict[str, str]] = []
    for block in re.split(r"(?m)^Job Id:[ \t]*", stdout)[1:]:
        lines = block.split("\n")
        attrs = {"Job_Id": lines[0].strip()}
        body = [line for line in lines[1:] if line.strip()]
        tab_indented = bool(body) and body[0].startswith("\t")
        name: str | None = None
        for line in body:
            if tab_indented or not line.startswith("\t"):
                key, sep, value = line.strip().partition(" = ")
                if sep and re.match(r"^[A-Za-z_][\w.]*\Z", key):
                    name = key
                    attrs[name] = value
                    continue
            if name is not None:  # a folded continuation (or a raw newline inside a value)
                attrs[name] += line[1:] if line.startswith("\t") else line.strip()
        jobs.append(attrs)
    return jobs


# -- qstat -f -F json -------------------------------------------------------------------------


def parse_json(stdout: str) -> list[dict[str, str]]:
    """``qstat -f -F json`` into the same flat form as :func:`parse_text` (nested keys joined with ``.``)."""
    doc = json.loads(stdout)
    if not isinstance(doc, dict):
        raise ValueError("qstat JSON is not an object")
    jobs = []
    for job_id, attrs in (doc.get("Jobs") or {}).items():  # no "Jobs" key when nothing matched
        flat = {"Job_Id": job_id}
        for key, value in (attrs or {}).items():
            if isinstance(value, dict):
                if key == "Variable_List":
                    flat[key] = ",".join(f"{k}={v}" for k, v in value.items())
                for sub, item in value.items():
                    flat[f"{key}.{sub}"] = str(item)
            else:
                flat[key] = str(value)
        jobs.append(flat)
    return jobs


# -- one job --------------------------------------------------------------------------------


def job_info(attrs: Mapping[str, str], flavor: str, job_id: str | None = None) -> JobInfo:
    """What one job's attributes mean for a session."""
    letter = attrs.get("job_state", "").strip()[:1]
    exit_code, why = _exit_status(attrs.get("Exit_status", attrs.get("exit_status")), flavor)
    if letter in _FINAL:
        state = JobState.COMPLETED if exit_code in (None, 0) else JobState.FAILED
    else:
        state = _STATES.get(letter, JobState.UNKNOWN)
    comment = attrs.get("comment", "").strip() or None
    reason = why or (comment if state in (JobState.QUEUED, JobState.HELD) or letter in _FINAL else None)
    if state == JobState.HELD and attrs.get("Hold_Types", "n") not in ("", "n"):
        reason = f"held ({attrs['Hold_Types']})" + (f": {comment}" if comment else "")
    return JobInfo(
        job_id=JobId(job_id or attrs.get("Job_Id", "")), presence=Presence.FOUND, state=state,
        native_state=letter or None, node=exec_node(attrs.get("exec_host")), reason=reason, exit_code=exit_code,
        start_estimate=_ctime(attrs.get("estimated.start_time")), name=attrs.get("Job_Name"),
        workdir=_workdir(attrs), raw=dict(attrs),
    )


def exec_node(exec_host: str | None) -> str | None:
    """The first host of ``exec_host`` (``node0088/1*2+node0094/1*2`` -> ``node0088``)."""
    if not exec_host or not exec_host.strip():
        return None
    return re.split(r"[/+:*]", exec_host.strip(), maxsplit=1)[0] or None


def _exit_status(raw: str | None, flavor: str) -> tuple[int | None, str | None]:
    """PBS's exit status as a shell would report it, plus a reason when it is not the script's own."""
    if raw is None or not raw.strip().lstrip("-").isdigit():
        return None, None
    value = int(raw.strip())
    if value >= 256:  # the top process was killed by signal value - 256
        return 128 + value - 256, f"killed by signal {value - 256}"
    if value < 0:
        if value == _WALLTIME_CODES.get(flavor):
            return value, "walltime limit exceeded"
        return value, f"PBS could not run or finish the job (Exit_status {value})"
    return value, None


def _ctime(text: str | None) -> dt.datetime | None:
    """A ``ctime(3)`` time as qstat prints it (the client's local zone)."""
    if not text:
        return None
    try:
        return dt.datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y").astimezone(dt.timezone.utc)
    except ValueError:
        return None


def _workdir(attrs: Mapping[str, str]) -> str | None:
    """Where the job was submitted from (``PBS_O_WORKDIR``; Torque also ``init_work_dir``)."""
    if attrs.get("init_work_dir"):
        return attrs["init_work_dir"]
    match = re.search(r"(?:^|,)PBS_O_WORKDIR=([^,]*)", attrs.get("Variable_List", ""))
    return match.group(1) if match else attrs.get("Variable_List.PBS_O_WORKDIR")


def answer(jobs: Iterable[Mapping[str, str]], job_ids: Collection[JobId], returncode: int, stderr: str,
           flavor: str) -> dict[JobId, JobInfo]:
    """Each requested id as FOUND, ABSENT or QUERY_FAILED after one ``qstat``.

    An id qstat names as unknown is ABSENT; one it says has finished (asked
    without ``-x``) is FOUND and final, its exit decided by the exit-code file.
    For Torque, when the command worked (0) or only failed for unknown ids
    (153), an id missing from the output is ABSENT: the Slurm wrapper leaves
    unknown ids out silently. Otherwise a missing id is QUERY_FAILED.
    """
    found = list(jobs)
    unknown = {m.group(1) for m in _UNKNOWN.finditer(stderr)}
    finished = {m.group(1) or m.group(2) for m in _FINISHED.finditer(stderr)}
    out: dict[JobId, JobInfo] = {}
    for job_id in job_ids:
        match = next((a for a in found if same_job(a.get("Job_Id", ""), job_id)), None)
        if match is not None:
            out[job_id] = job_info(match, flavor, job_id)
        elif any(same_job(u, job_id) for u in unknown):
            out[job_id] = JobInfo(job_id, Presence.ABSENT)
        elif any(same_job(f, job_id) for f in finished):
            out[job_id] = JobInfo(job_id, Presence.FOUND, JobState.COMPLETED, native_state="F")
        elif flavor == "torque" and returncode in (0, RC_UNKNOWN_JOB) and (found or returncode == RC_UNKNOWN_JOB):
            # Torque's Slurm wrapper leaves unknown ids out silently; PBS Pro names each one on stderr
            # (and some OpenPBS builds answer only for the first of several ids), so there silence is no answer
            out[job_id] = JobInfo(job_id, Presence.ABSENT)
        else:
            why = stderr.strip()[:300] or ("qstat printed nothing" if returncode == 0 else f"qstat exit {returncode}")
            out[job_id] = JobInfo(job_id, Presence.QUERY_FAILED, reason=why)
    return out


@dataclass
class PbsAdapter(SchedulerTraits):
    """qsub / qstat / qdel through the injectable runner; ``flavor`` picks the status dialect."""

    name: ClassVar[str] = "pbs"
    scheduler: ClassVar[str] = "pbs"
    access: ClassVar[str] = "cli"
    template: ClassVar[str] = "pbs.sh.j2"
    takes_submit_prefix: ClassVar[bool] = True
    takes_commands: ClassVar[bool] = True
    settings_keys: ClassVar[frozenset[str]] = settings.KEYS

    @staticmethod
    def check_settings(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> settings.PbsSettings:
        return settings.check(raw, path, error, warn)
    runner: CommandRunner = field(default_factory=CommandRunner)
    flavor: str = "pbspro"
    submit_prefix: tuple[str, ...] = ()

    @classmethod
    def from_cluster(cls, cluster: Any) -> PbsAdapter:
        return cls(runner=CommandRunner(timeout_s=cluster.command_timeout_s, bin_overrides=dict(cluster.commands)),
                   flavor=cluster.settings.flavor, submit_prefix=tuple(cluster.submit_prefix))

    def submit(self, script: JobScript) -> JobId:
        """``qsub`` the script file from its job folder (so ``PBS_O_WORKDIR`` names it)."""
        prefix = submit_prefix_for(self.submit_prefix, script)
        # -N again on the command line: Slurm's wrapper reads options only there, not from #PBS lines
        argv = ["qsub", "-N", script.name, str(script.path)]
        try:
            result = self.runner.run(argv, attempts=1, prefix=prefix, umask=SUBMIT_UMASK, cwd=str(script.workdir))
        except CommandFailed as exc:
            detail = (exc.stderr or exc.stdout).strip()[:300] or exc.why
            # no exit code: it hung; the Torque wrappers relay sbatch's "Unable to contact"; PBS's own words
            unreachable = exc.returncode is None or any(
                words in exc.stderr for words in ("Unable to contact", "cannot connect to server", "Connection refused"))
            raise BatchError(f"qsub failed: {detail}", exc.argv, exc.returncode, exc.stderr,
                             unreachable=unreachable) from None
        return parse_submit(result.stdout)

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        if not job_ids:
            return {}
        return self._qstat(sorted(job_ids), job_ids)

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """PBS Pro keeps finished jobs for ``qstat -x`` (what :meth:`poll` asks); Torque forgets them."""
        if not job_ids:
            return {}
        if self.flavor == "pbspro":
            return self._qstat(sorted(job_ids), job_ids)
        return {j: JobInfo(j, Presence.ABSENT) for j in job_ids}

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        """Every live job (no ``-x``) whose ``Job_Name`` starts with ``prefix``."""
        argv = ["qstat", "-f", *(["-F", "json"] if self.flavor == "pbspro" else [])]
        try:
            result = self.runner.run(argv, check=False)
        except CommandFailed as exc:
            raise BatchError(f"qstat failed: {exc.why}", exc.argv, exc.returncode, exc.stderr) from None
        if result.returncode != 0:
            raise BatchError(f"qstat exit {result.returncode}: {result.stderr.strip()[:300]}", argv,
                             result.returncode, result.stderr)
        jobs = self._parse(result.stdout)
        if jobs is None:  # one job's JSON the server could not write: the text form has them all
            try:
                text = self.runner.run(["qstat", "-f"])
            except CommandFailed as exc:
                raise BatchError(f"qstat failed: {exc.why}", exc.argv, exc.returncode, exc.stderr) from None
            jobs = parse_text(text.stdout)
        infos = [job_info(a, self.flavor) for a in jobs]
        return {i.job_id: i for i in infos if i.name and i.name.startswith(prefix)}

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """``qdel``; a job that is unknown or already finished counts as cancelled."""
        prefix = command_prefix(self.submit_prefix, user)
        try:
            result = self.runner.run(["qdel", str(job_id)], check=False, prefix=prefix)
        except CommandFailed as exc:
            raise BatchError(f"qdel failed: {exc.why}", exc.argv, exc.returncode, exc.stderr) from None
        said = result.stderr + result.stdout
        if result.returncode == 0 or any(text in said for text in _GONE_ON_CANCEL) or \
                result.returncode in (RC_UNKNOWN_JOB, RC_JOB_FINISHED, RC_BAD_STATE):
            return
        # the Slurm wrapper says nothing (exit 1) for a job that is over: ask before calling it a failure
        info = self.poll([job_id])[job_id]
        if info.presence == Presence.ABSENT or (info.state is not None and info.state.is_final):
            return
        raise BatchError(f"qdel {job_id} exit {result.returncode}: {said.strip()[:300]}", ["qdel", str(job_id)],
                         result.returncode, result.stderr)

    # -- internals ------------------------------------------------------------------------

    def _qstat(self, ids: list[str], job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        json_form = self.flavor == "pbspro"
        argv = ["qstat", "-f", *(["-F", "json", "-x"] if json_form else []), *ids]
        try:
            result = self.runner.run(argv, check=False)
        except CommandFailed as exc:
            return failed_query(job_ids, exc.why)
        jobs = self._parse(result.stdout)
        if jobs is None and json_form:  # invalid JSON from the server: ask again in text
            try:
                result = self.runner.run(["qstat", "-f", "-x", *ids], check=False)
            except CommandFailed as exc:
                return failed_query(job_ids, exc.why)
            jobs = parse_text(result.stdout) if "Job Id:" in result.stdout else []
        return answer(jobs or [], job_ids, result.returncode, result.stderr, self.flavor)

    def _parse(self, stdout: str) -> list[dict[str, str]] | None:
        """Jobs from JSON or text; None when JSON was expected and did not parse."""
        if self.flavor == "pbspro" and stdout.strip():
            try:
                return parse_json(stdout)
            except ValueError:
                return None
        return parse_text(stdout)
