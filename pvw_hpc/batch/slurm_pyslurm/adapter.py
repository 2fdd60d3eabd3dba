"""SLURM through pyslurm 22.5 (libslurm's own RPCs, in one worker process per launcher): one RPC per poll.

What pyslurm 22.5.3 (the vendored ``22.5.x`` branch, new API only) does against Slurm 22.05.8,
read in its source and measured on the cluster of ``schedulers/slurm/up``:

* ``JobSubmitDescription.submit()`` ignores the script's ``#SBATCH`` lines (a job whose script
  says ``--job-name=x`` keeps the ``name`` it was given); only ``load_sbatch_options()`` reads
  them, and that one drops options it does not know and splits values at ``=`` and ``#``. So
  :func:`job_fields` reads the directives of the rendered script the way sbatch does and sets
  them as the description's attributes; an option it cannot translate is a :class:`BatchError`,
  never dropped. The script is still submitted whole, directives and all.
* ``script`` may be a path or the text, and pyslurm tries ``Path(script).is_file()`` first, which
  raises ENAMETOOLONG for a text over 4 KiB (ours is about 10 KiB). The rendered file is passed
  by path, as sbatch gets it.
* libslurm adds nothing to the job's environment: without ``SLURM_UMASK`` the job runs with
  slurmd's umask 0022 and its log is created 0644 (measured), where sbatch passes its own
  umask. The environment is the launcher's, as sbatch's default ``--export=ALL`` sends it, plus
  ``SLURM_UMASK=0077`` (the CLI adapter's ``SUBMIT_UMASK``: job.log 0600, measured) and
  ``SLURM_SUBMIT_DIR``/``SLURM_SUBMIT_HOST`` as sbatch sets them. Resource limits are not
  propagated (sbatch's ``SLURM_RLIMIT_*``): the job gets slurmd's.
* Values are parsed by pyslurm, not by sbatch: a ``time_limit`` of digits must be an int (a
  string of digits is passed on unconverted and fails), memory goes through pyslurm's own
  rounding, and a memory of 0 (sbatch: all of the node's) is silently dropped. So minutes and
  sizes are converted here with sbatch's rules, and ``--mem=0`` is refused.
* ``Jobs.load()`` is one ``slurm_load_jobs`` RPC for every job the controller holds (finished
  ones stay for MinJobAge; about 4 ms for 220 jobs here), a dict-like of job id -> ``Job``:
  the one call per poll, whatever the number tracked. An id missing from it is ABSENT.
  ``Job.load(id)`` is not used: an unknown id and a controller that is down both raise
  ``RPCError``.
* A controller that does not answer: every call blocks MessageTimeout - 1 s (9 s by default)
  while libslurm retries, then raises ``RPCError`` errno 1800 "Unable to contact slurm
  controller (connect failure)". pyslurm holds the GIL in every libslurm call (its source has no
  ``nogil``), so in the launcher's process no other thread would run for those seconds. Every
  pyslurm call therefore runs in ONE long-lived worker process per launcher (:mod:`.worker`,
  spoken to by :mod:`.client`), which takes that pause alone. Measured against a closed port
  (MessageTimeout 20): in one process, a thread ticking every 50 ms ticked twice during the
  19 s ``Jobs.load()``; with the worker it ticked 20 times a second all along, until the
  cluster's 3 s deadline. Each request has the cluster's ``command_timeout_s`` as its deadline;
  past it the worker is killed (its process group), a poll is QUERY_FAILED for every id and a
  submit or cancel an ``unreachable`` BatchError (so launches get 503 at once while the poller
  sees the outage); the next request starts a new worker (about 50 ms). With
  ``command_timeout_s`` above MessageTimeout, libslurm's own "Unable to contact" comes first and
  the worker stays.
* A request is one JSON line each way over pipes, and the worker sends only the jobs asked
  for. Measured (bench/poll_cost.py, 1000 jobs held by slurmctld, medians per poll cycle): 1
  tracked job, 1.2 ms in the launcher + 4.2 ms in the worker against 6.2 ms in one process
  before; 1000 tracked jobs, about 4 ms more in all (the worker's JSON encoding about 3 ms,
  the launcher's decoding about 1 ms). ``Jobs.load()`` itself (and freeing its answer) costs
  about 5 us per job slurmctld holds, now in the worker.
* ``Job.exit_code`` / ``exit_code_signal`` split the wait status, but an exit status >= 128
  comes back with 128 taken off (exit 137 reads as 9). The poller prefers the job's own
  ``exit_code`` file, which has the app's real code.
* ``Job(id).cancel()`` sends signal 9, which slurmctld treats as scancel does (SIGTERM,
  KillWait, SIGKILL), and counts an unknown or finished job as done.
* ``import pyslurm`` runs ``slurm_init()``: when slurm.conf cannot be read, libslurm retries for
  60 s and then calls ``fatal()``, which exits the whole process (measured). It happens in the
  worker: a worker that ends while importing (or does not answer its first ``version`` request
  in time, or has pyslurm for another Slurm) is a :class:`BatchError` with its last stderr
  lines, remembered for a minute (not one process per poll).
* The worker runs with the launcher's environment, so what pyslurm adds to a job from its own
  process (the ``SLURM_*`` variables, before the given environment) is what it added in the
  launcher. It ends with the launcher: on stdin's end, and through ``PR_SET_PDEATHSIG`` in the
  middle of a call; the adapter's owner may also :meth:`SlurmPyslurmAdapter.close` it.

Jobs run as the launcher's user (no ``submit_prefix``: nothing can run in front of a library
call). Without slurmdbd there is no history beyond what the controller still holds.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import BatchError, JobId, JobInfo, JobScript, JobState, Presence, SchedulerTraits, failed_query
from ..slurm.adapter import SUBMIT_UMASK, _state, directive_tokens
from .client import API_VERSION, INSTALL_HINT, PyslurmWorker, WorkerError, shared_worker

__all__ = ["API_VERSION", "INSTALL_HINT", "UNREACHABLE_ERRNOS", "SlurmPyslurmAdapter", "job_fields", "job_info"]

# libslurm's words for "the controller did not answer" (slurm_errno.h): SLURM_COMMUNICATIONS_* 1001-1004,
# SLURMCTLD_COMMUNICATIONS_* 1800-1803 (what a stopped slurmctld gives), SLURM_PROTOCOL_SOCKET_* 5000-5005
UNREACHABLE_ERRNOS = frozenset({*range(1001, 1005), *range(1800, 1804), *range(5000, 5006)})


# -- #SBATCH directives -> JobSubmitDescription attributes ----------------------------------------


def _integer(value: str) -> int:
    if not value.isdigit():
        raise ValueError("must be a whole number")
    return int(value)


def _minutes(value: str) -> int | str:
    """sbatch ``--time``: digits are minutes (an int for pyslurm); the rest is libslurm's time_str2mins, as in sbatch."""
    return int(value) if value.isdigit() else value


_SIZE = re.compile(r"^(\d+)([KMGT]?)\Z", re.IGNORECASE)


def _megabytes(value: str) -> int:
    """sbatch's ``--mem``: a number of MB, or K/M/G/T; K rounds up to whole MB (str_to_mbytes)."""
    match = _SIZE.match(value)
    if not match:
        raise ValueError("must be a size such as 4000, 4000M or 4G")
    number, unit = int(match.group(1)), match.group(2).upper()
    megabytes = -(-number // 1024) if unit == "K" else number * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    if megabytes == 0:  # sbatch: all of a node's memory; pyslurm 22.5 skips a zero without a word
        raise ValueError("0 (all of a node's memory) cannot be passed through pyslurm 22.5")
    return megabytes


# sbatch long option -> (JobSubmitDescription attribute, how its value is converted): what the shipped
# template writes (jobscripts/slurm.sh.j2) and the usual site extras whose value pyslurm reads as sbatch does
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "job-name": ("name", str),
    "output": ("standard_output", str),
    "error": ("standard_error", str),
    "chdir": ("working_directory", str),
    "partition": ("partitions", str),
    "account": ("account", str),
    "qos": ("qos", str),
    "time": ("time_limit", _minutes),
    "nodes": ("nodes", str),  # N or N-M, as pyslurm's _parse_nodes reads it
    "ntasks": ("ntasks", _integer),
    "cpus-per-task": ("cpus_per_task", _integer),
    "mem": ("memory_per_node", _megabytes),
    "mem-per-cpu": ("memory_per_cpu", _megabytes),
    "gpus": ("gpus", str),
    "gres": ("gres_per_node", str),
    "constraint": ("constraints", str),
    "reservation": ("reservations", str),
    "nodelist": ("required_nodes", str),
    "exclude": ("excluded_nodes", str),
    "licenses": ("licenses", str),
    "comment": ("comment", str),
    "wckey": ("wckey", str),
}
# options without a value -> (attribute, the value sbatch sends for them)
_FLAGS: dict[str, tuple[str, Any]] = {
    "no-requeue": ("is_requeueable", False),
    "requeue": ("is_requeueable", True),
    "hold": ("priority", 0),  # what sbatch -H sends: priority 0, which slurmctld holds as JobHeldUser
    "exclusive": ("resource_sharing", "no"),
}
_SHORT = {"J": "job-name", "o": "output", "e": "error", "D": "chdir", "p": "partition", "A": "account", "q": "qos",
          "t": "time", "N": "nodes", "n": "ntasks", "c": "cpus-per-task", "G": "gpus", "C": "constraint",
          "w": "nodelist", "x": "exclude", "L": "licenses", "H": "hold"}


def job_fields(text: str) -> dict[str, Any]:
    """``JobSubmitDescription`` attributes for the ``#SBATCH`` lines of ``text`` (a later option wins, as in sbatch).

    An option without a translation here raises :class:`BatchError`: pyslurm would not read it
    from the script, so passing the job on would quietly run it without that option.
    """
    tokens = directive_tokens(text)
    fields: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            has_value = bool(eq)
        elif token.startswith("-") and len(token) >= 2:
            name, value = _SHORT.get(token[1], "-" + token[1]), token[2:]
            has_value = bool(value)
        else:
            raise BatchError(f"unexpected #SBATCH argument {token!r}")
        if name in _FLAGS:
            if has_value:
                raise BatchError(f"#SBATCH --{name} takes no value here")
            attribute, constant = _FLAGS[name]
            fields[attribute] = constant
            continue
        if name not in _OPTIONS:
            supported = ", ".join(f"--{o}" for o in (*_OPTIONS, *_FLAGS))
            raise BatchError(f"#SBATCH {token.partition('=')[0]} cannot be passed through pyslurm "
                             f"(it does not read #SBATCH lines; pvw-hpc translates only {supported})")
        if not has_value:
            if i >= len(tokens):
                raise BatchError(f"#SBATCH --{name} needs a value")
            value = tokens[i]
            i += 1
        attribute, convert = _OPTIONS[name]
        try:
            fields[attribute] = convert(value)
        except ValueError as exc:
            raise BatchError(f"#SBATCH --{name}={value}: {exc}") from None
    return fields


# -- pyslurm's Job -> JobInfo ---------------------------------------------------------------------------


def exit_status(code: int | None, signal: int | None) -> int | None:
    """The shell's convention, as the CLI adapter's ``_wait_status``: the exit status, or 128 + the signal."""
    if signal:
        return 128 + int(signal)
    return int(code) if code is not None else None


def job_info(job: Mapping[str, Any]) -> JobInfo:
    """One job as the worker's ``load`` sends it (a plain dict of ``pyslurm.Job`` attributes, see
    :func:`.worker.job_record`) as a FOUND :class:`JobInfo`, its state words read with the CLI adapter's table.
    """
    native, reason, batch_host, nodes = str(job["state"] or ""), job["state_reason"], job["batch_host"], \
        job["allocated_nodes"]
    code, signal, start = job["exit_code"], job["exit_code_signal"], job["start_time"]
    reason_text = None if reason in (None, "", "None") else str(reason)
    state = _state(native, reason_text)
    # batch_host is where the script (so the job side and the app) runs; allocated_nodes may be a range
    node = batch_host or nodes or None
    return JobInfo(
        job_id=JobId(str(job["id"])), presence=Presence.FOUND, state=state, native_state=native or None,
        node=str(node) if node else None, reason=reason_text,
        exit_code=exit_status(code, signal) if state.is_final else None,
        start_estimate=(dt.datetime.fromtimestamp(start, dt.timezone.utc)
                        if state in (JobState.QUEUED, JobState.HELD) and isinstance(start, int) and start > 0 else None),
        name=job["name"], workdir=job["working_directory"],
        raw={"state": native, "state_reason": reason, "batch_host": batch_host, "allocated_nodes": nodes,
             "exit_code": code, "exit_code_signal": signal, "start_time": start},
    )


def _rpc_error(what: str, error: WorkerError) -> BatchError:
    """The worker's ``rpc`` error as a BatchError; ``unreachable`` when libslurm says the controller did not answer."""
    errno, text = error.errno, error.text
    unreachable = errno in UNREACHABLE_ERRNOS or "Unable to contact" in text
    return BatchError(f"pyslurm {what} failed: {text}" + (f" (slurm errno {errno})" if errno is not None else ""),
                      [f"pyslurm {what}"], errno, text, unreachable=unreachable)


def _reply_error(what: str, error: WorkerError, refused: str | None = None) -> BatchError:
    """Any error reply: ``rpc`` as :func:`_rpc_error`; what else pyslurm raised as ``refused`` (or a failure of ``what``)."""
    if error.kind == "rpc":
        return _rpc_error(what, error)
    said = f"{error.type}: {error.text}" if error.type else error.text
    if error.kind == "value" and refused is not None:
        return BatchError(f"{refused}: {said}")
    return BatchError(f"pyslurm {what} failed: {said}", [f"pyslurm {what}"])


@dataclass
class SlurmPyslurmAdapter(SchedulerTraits):
    """submit / poll / cancel as libslurm RPCs through pyslurm, in the launcher's pyslurm worker process."""

    name: ClassVar[str] = "slurm"  # same scheduler, ids and states as the CLI adapter
    scheduler: ClassVar[str] = "slurm"
    access: ClassVar[str] = "pyslurm"
    template: ClassVar[str] = "slurm.sh.j2"  # the CLI path's script; its directives also become job fields
    takes_submit_prefix: ClassVar[bool] = False  # a library call has no argv to put sudo in front of
    takes_job_user: ClassVar[bool] = False  # jobs run as the launcher's user

    client: PyslurmWorker | None = None  # None: the process's one worker (shared_worker()); tests pass their own
    command_timeout_s: float = 30.0  # each request's deadline (the worker is stopped past it); also a start's

    @classmethod
    def from_cluster(cls, cluster: Any) -> SlurmPyslurmAdapter:
        return cls(command_timeout_s=cluster.command_timeout_s)

    @property
    def worker(self) -> PyslurmWorker:
        """The worker this adapter's requests go to."""
        return self.client if self.client is not None else shared_worker()

    def close(self) -> None:
        """Stop the worker (the next request starts another); the process's at exit anyway."""
        self.worker.close()

    # -- the adapter interface ---------------------------------------------------------------

    def submit(self, script: JobScript) -> JobId:
        """``JobSubmitDescription(...).submit()`` of the rendered file, its directives as the description's fields."""
        fields = job_fields(script.text)
        fields.setdefault("name", script.name)
        fields.setdefault("working_directory", str(script.workdir))  # sbatch's default is where it runs
        fields["environment"] = _environment(script)
        fields["script"] = str(script.path)
        fields["script_args"] = [str(script.path)]  # argv[0], as sbatch sends it (scontrol's Command=)
        try:
            job_id = self.worker.request("submit", self.command_timeout_s, fields=fields)
        except WorkerError as exc:  # slurmctld refused it or did not answer; or pyslurm's own checks of the values
            raise _reply_error("submit", exc, refused="pyslurm refused the job description") from None
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
            raise BatchError(f"pyslurm submit returned {job_id!r}, not a job id")
        return JobId(str(job_id))

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """One ``Jobs.load()`` for all ids; an id not in a successful answer is ABSENT, any failure QUERY_FAILED."""
        if not job_ids:
            return {}
        try:
            found = self._load(sorted({str(j) for j in job_ids}))
        except BatchError as exc:
            return failed_query(job_ids, str(exc))
        return {j: found.get(JobId(str(j))) or JobInfo(j, Presence.ABSENT) for j in job_ids}

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """What the controller still holds (MinJobAge after the end): one ``Jobs.load()``; ABSENT when not there.

        pyslurm's accounting side (``pyslurm.db``) needs slurmdbd, and slurmctld keeps nothing
        older: a job missing here is ABSENT, which the poller never takes as an end.
        """
        return self.poll(job_ids)

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        """Live jobs (of every user) named ``prefix...``, with their working directories: one ``Jobs.load()``."""
        found = self._load(None, prefix)
        return {j: info for j, info in found.items() if info.state is not None and not info.state.is_final}

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """``Job(id).cancel()``; an unknown or finished job counts as cancelled (pyslurm ignores those errors).

        ``user`` is accepted as the interface asks and ignored: the launcher's user submitted the
        job, so that is who cancels it.
        """
        if not str(job_id).isdigit():
            raise BatchError(f"not a Slurm job id: {job_id!r}")
        try:
            self.worker.request("cancel", self.command_timeout_s, job_id=int(job_id))
        except WorkerError as exc:
            raise _reply_error(f"cancel of job {job_id}", exc) from None

    # -- internals ------------------------------------------------------------------------

    def _load(self, wanted: list[str] | None, prefix: str | None = None) -> dict[JobId, JobInfo]:
        """One ``Jobs.load()`` in the worker: the jobs whose ids are ``wanted`` (or whose names start with ``prefix``).

        The worker sends only those. Raises :class:`BatchError` for anything that went wrong, so no
        failure reads as an empty queue.
        """
        try:
            records = self.worker.request("load", self.command_timeout_s, ids=wanted, prefix=prefix)
        except WorkerError as exc:
            raise _reply_error("Jobs.load", exc) from None
        if not isinstance(records, list):
            raise BatchError(f"pyslurm Jobs.load: the worker sent {type(records).__name__}, not a list of jobs")
        try:
            return {info.job_id: info for info in map(job_info, records)}
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # a record of another shape
            raise BatchError(f"pyslurm Jobs.load: a job record the adapter cannot read: {type(exc).__name__}: {exc}") \
                from None


def _environment(script: JobScript) -> dict[str, str]:
    """The job's environment as sbatch would send it from a launcher running with ``SUBMIT_UMASK``."""
    try:
        submit_dir = os.getcwd()
    except OSError:  # the launcher's folder was removed under it
        submit_dir = str(script.workdir)
    return {**os.environ, **script.env, "SLURM_UMASK": f"{SUBMIT_UMASK:04o}", "SLURM_SUBMIT_DIR": submit_dir,
            "SLURM_SUBMIT_HOST": socket.gethostname()}
