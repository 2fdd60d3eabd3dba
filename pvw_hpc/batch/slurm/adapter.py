"""SLURM through its command-line tools (the default wherever the launcher host is a Slurm client).

One ``squeue`` per poll covers every tracked job (``-t all`` so finished jobs
still show; ``-O`` fields each followed by ``|``, which 22.05 prints unpadded).
Jobs the queue has purged are looked up in ``sacct -P`` (``sacct -c -P`` when
there is no slurmdbd, reading ``jobcomp/filetxt``). Parsers are pure functions
so they are tested on output captured from a real cluster.

Jobs run as the requesting user when the cluster has a ``submit_prefix``
(``sudo -n -u ${user}``): sbatch and that job's scancel go through the prefix,
with ``${user}`` replaced by the script's (validated) user. squeue and sacct
stay the launcher's own: they show every user's jobs, and one call still
covers all of them.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..base import (
    BatchError,
    JobId,
    JobInfo,
    JobScript,
    JobState,
    Presence,
    SchedulerTraits,
    command_prefix,
    failed_query,
    submit_prefix_for,
)
from ..runner import CommandFailed, CommandRunner

# Slurm job states (squeue %T / sacct State) -> our reduced states
STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.HELD,
    "SUSPENDED": JobState.HELD,
    "STOPPED": JobState.HELD,
    "RESV_DEL_HOLD": JobState.HELD,
    "CONFIGURING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETING": JobState.ENDING,
    "STAGE_OUT": JobState.ENDING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.COMPLETED,
    "TIMEOUT": JobState.COMPLETED,
    "PREEMPTED": JobState.COMPLETED,
    "DEADLINE": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "REVOKED": JobState.FAILED,
}
HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin"})

# BatchHost, not NodeList: the node the script (and so the app) runs on, never a hostlist like n[1-2]
SQUEUE_FIELDS = ("JobID", "State", "Reason", "BatchHost", "exit_code", "StartTime", "Name")
SQUEUE_FORMAT = ",".join(f"{name}:|" for name in SQUEUE_FIELDS)
SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "End")
_SUBMIT_RE = re.compile(r"^(\d+)(?:;\S+)?\s*$")
_INVALID_ID = "Invalid job id specified"
# the submitting process's umask becomes the job's (SLURM_UMASK), so job.log is created 0600
# like the launcher's own files; sudo keeps it, as it ORs in its own 0022
SUBMIT_UMASK = 0o077


def parse_submit(stdout: str) -> JobId:
    """``sbatch --parsable`` prints ``<id>`` or ``<id>;<cluster>``."""
    match = _SUBMIT_RE.match(stdout.strip().splitlines()[-1] if stdout.strip() else "")
    if not match:
        raise BatchError(f"unexpected sbatch output: {stdout.strip()[:200]!r}")
    return JobId(match.group(1))


def _state(word: str, reason: str | None) -> JobState:
    base = word.split()[0].rstrip("+") if word else ""
    state = STATE_MAP.get(base, JobState.UNKNOWN)
    if state == JobState.QUEUED and reason in HELD_REASONS:
        return JobState.HELD
    return state


def _time(text: str) -> dt.datetime | None:
    if not text or text in ("N/A", "Unknown", "None", "(null)"):
        return None
    try:
        return dt.datetime.fromisoformat(text).astimezone(dt.timezone.utc)  # Slurm prints local time
    except ValueError:
        return None


def _wait_status(raw: str) -> int | None:
    """squeue's exit_code is a raw wait status: 768 is exit 3; a signal N gives 128 + N."""
    try:
        status = int(raw)
    except ValueError:
        return None
    if status & 0x7F:
        return 128 + (status & 0x7F)
    return status >> 8


def parse_queue(stdout: str, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
    """Parse ``squeue -h -t all -O <SQUEUE_FORMAT>``; ids not listed are ABSENT."""
    found: dict[JobId, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) < len(SQUEUE_FIELDS) - 1:
            continue
        job_id, state_word, reason, nodes, exit_code, start = parts[:6]
        reason_text = None if reason in ("", "None") else reason
        state = _state(state_word, reason_text)
        found[JobId(job_id)] = JobInfo(
            job_id=JobId(job_id), presence=Presence.FOUND, state=state, native_state=state_word,
            node=None if nodes in ("", "n/a", "(null)") else nodes, reason=reason_text,
            exit_code=_wait_status(exit_code) if state.is_final else None,
            start_estimate=_time(start) if state in (JobState.QUEUED, JobState.HELD) else None,
            raw=line,
        )
    return {j: found.get(j) or JobInfo(j, Presence.ABSENT) for j in job_ids}


def parse_named(stdout: str, prefix: str) -> dict[JobId, JobInfo]:
    """Parse ``squeue -h -O JobID:|,State:|,WorkDir:|,Name:|``; keep jobs named ``prefix...``."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) < 4:
            continue
        job_id, state_word, workdir, name = parts[0], parts[1], parts[2], parts[3].rstrip("|")
        if name.startswith(prefix):
            found[JobId(job_id)] = JobInfo(JobId(job_id), Presence.FOUND, _state(state_word, None),
                                           native_state=state_word, name=name, workdir=workdir, raw=line)
    return found


def parse_sacct(stdout: str, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
    """Parse ``sacct -P -n -o JobID,State,ExitCode,NodeList,End``; ids not listed are ABSENT."""
    found: dict[JobId, JobInfo] = {}
    wanted = set(job_ids)
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) < len(SACCT_FIELDS) or parts[0] not in wanted:  # skips steps like 12.batch
            continue
        job_id, state_word, exit_code, nodes, _end = parts[:5]
        code, _, signal = exit_code.partition(":")
        exit_value = int(code) if code.isdigit() else None
        if signal.isdigit() and int(signal):
            exit_value = 128 + int(signal)
        found[JobId(job_id)] = JobInfo(
            job_id=JobId(job_id), presence=Presence.FOUND, state=_state(state_word, None),
            native_state=state_word.split()[0], node=None if nodes in ("", "(null)", "None assigned") else nodes,
            exit_code=exit_value, raw=line,
        )
    return {j: found.get(j) or JobInfo(j, Presence.ABSENT) for j in job_ids}


def directive_tokens(text: str) -> list[str]:
    """The arguments of the ``#SBATCH`` lines, read where sbatch reads them.

    Only before the first command (blank lines and comments may come between); a line may
    hold several options; values may be shell-quoted, and ``#`` after whitespace starts a comment.
    """
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if number == 1 and stripped.startswith("#!"):
            continue
        if line.startswith("#SBATCH"):
            try:
                tokens.extend(shlex.split(line[len("#SBATCH"):], comments=True))
            except ValueError as exc:
                raise BatchError(f"cannot read directive on line {number}: {line!r}: {exc}") from None
        elif stripped and not stripped.startswith("#"):
            break
    return tokens


@dataclass
class SlurmAdapter(SchedulerTraits):
    """sbatch / squeue / sacct / scancel, each through the injectable runner."""

    name: ClassVar[str] = "slurm"
    scheduler: ClassVar[str] = "slurm"
    access: ClassVar[str] = "cli"
    template: ClassVar[str] = "slurm.sh.j2"
    takes_submit_prefix: ClassVar[bool] = True
    takes_commands: ClassVar[bool] = True
    runner: CommandRunner = field(default_factory=CommandRunner)
    use_jobcomp: bool | None = None  # sacct -c (no slurmdbd); None: try sacct first, then -c
    submit_prefix: tuple[str, ...] = ()  # e.g. ("sudo", "-n", "-u", "${user}"); empty: as the launcher

    @classmethod
    def from_cluster(cls, cluster: Any) -> SlurmAdapter:
        return cls(runner=CommandRunner(timeout_s=cluster.command_timeout_s, bin_overrides=dict(cluster.commands)),
                   submit_prefix=tuple(cluster.submit_prefix))

    def submit(self, script: JobScript) -> JobId:
        """sbatch the script; through the prefix as ``script.user`` when the cluster has one."""
        prefix = submit_prefix_for(self.submit_prefix, script)
        try:
            result = self.runner.run(["sbatch", "--parsable", str(script.path)], attempts=1, prefix=prefix,
                                     umask=SUBMIT_UMASK)
        except CommandFailed as exc:
            # no exit code: it hung and was killed; "Unable to contact": slurmctld does not answer
            unreachable = exc.returncode is None or "Unable to contact" in exc.stderr
            raise BatchError(f"sbatch{_as(prefix, script.user)} failed: {exc.why}", exc.argv, exc.returncode,
                             exc.stderr, unreachable=unreachable) from None
        return parse_submit(result.stdout)

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        if not job_ids:
            return {}
        argv = ["squeue", "-h", "-t", "all", "-j", ",".join(sorted(job_ids)), "-O", SQUEUE_FORMAT]
        try:
            result = self.runner.run(argv, check=False)
        except CommandFailed as exc:
            return failed_query(job_ids, exc.why)
        if result.returncode != 0:
            if _INVALID_ID in result.stderr:  # every id was purged from the queue: a real answer
                return {j: JobInfo(j, Presence.ABSENT) for j in job_ids}
            return failed_query(job_ids, f"squeue exit {result.returncode}: {result.stderr.strip()[:300]}")
        return parse_queue(result.stdout, job_ids)

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        argv = ["squeue", "-h", "-O", "JobID:|,State:|,WorkDir:|,Name:|"]  # live jobs of every user
        try:
            result = self.runner.run(argv)
        except CommandFailed as exc:
            raise BatchError(f"squeue failed: {exc.why}", exc.argv, exc.returncode, exc.stderr) from None
        return parse_named(result.stdout, prefix)

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        if not job_ids:
            return {}
        base = ["sacct", "-P", "-n", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(sorted(job_ids))]
        modes = [True] if self.use_jobcomp else [False] if self.use_jobcomp is False else [False, True]
        last_error = ""
        for jobcomp in modes:
            argv = [*base[:1], "-c", *base[1:]] if jobcomp else base
            try:
                result = self.runner.run(argv, check=False, attempts=1)
            except CommandFailed as exc:
                last_error = exc.why
                continue
            if result.returncode == 0:
                self.use_jobcomp = jobcomp
                return parse_sacct(result.stdout, job_ids)
            last_error = result.stderr.strip()[:300]
        return failed_query(job_ids, f"sacct: {last_error}")

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """scancel; as ``user`` through the prefix when both are set, else as the launcher.

        The job's owner may cancel it, so a launcher that cannot cancel other users' jobs
        passes the user it submitted as. Without a user (a record from before the prefix
        was configured) the launcher tries itself: root can, an unprivileged account gets
        a clear BatchError, and nothing runs under a guessed identity.
        """
        prefix = command_prefix(self.submit_prefix, user)
        try:
            # an unknown id exits 0 silently: already gone
            self.runner.run(["scancel", str(job_id)], prefix=prefix)
        except CommandFailed as exc:
            raise BatchError(f"scancel{_as(prefix, user)} failed: {exc.why}", exc.argv, exc.returncode,
                             exc.stderr) from None


def _as(prefix: Sequence[str], user: str | None) -> str:
    """`` as 'alice'`` for error messages when the command ran through the prefix."""
    return f" as {user!r}" if prefix else ""
