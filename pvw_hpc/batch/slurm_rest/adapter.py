"""SLURM through slurmrestd (openapi/v0.0.38, Slurm 22.05) with a JWT: for a launcher outside the cluster.

What the daemon does, as measured on a real 22.05.8 (see tests/fixtures/slurm_rest/):

* ``#SBATCH`` lines in ``script`` are ignored: every job option must be in the
  ``job`` object, and a job without ``current_working_directory`` runs in ``/``
  and writes ``/slurm-<id>.out``. So :func:`sbatch_directives` reads the
  directives the shipped template writes and turns them into ``job`` fields.
  Their values go through verbatim, as strings: slurmrestd 22.05 feeds every
  ``job`` field to sbatch's own option parser, so ``time_limit: "1:30"`` or
  ``memory_per_node: "4G"`` mean exactly what ``--time``/``--mem`` mean to
  sbatch (measured: "1:30" is 2 minutes, "1500K" is 2M).
* ``"requeue": false`` is silently ignored (the value is not read); only the
  ``no_requeue`` key turns requeueing off.
* ``environment`` is mandatory (HTTP 400, error 2127 without it) and is the
  job's whole environment: nothing of the launcher's is exported.
* A bad or expired token is not a 401 but an HTTP 500 whose errors say nothing
  about auth (``/jobs``: -1 "Failed while looking for jobs" with ``"jobs": []``;
  ``DELETE``: 5005 "Zero Bytes were transmitted or received"). So an empty or
  failed answer is never read as "the job is gone": only error 2017 "Invalid
  job id specified" means that, and only ``DELETE`` and ``GET /job/ID`` give it.
* ``GET /jobs`` lists every job the controller holds (no id filter), which is
  the one call per poll; finished jobs stay for MinJobAge. ``exit_code`` is a
  raw wait status, as in ``squeue``.
* ``DELETE /job/ID`` sends signal 9 by default, which slurmctld treats as
  ``scancel`` does (SIGTERM, KillWait, SIGKILL).
* Submit answers HTTP 200 with a ``job_id`` and a non-empty ``errors`` list for
  conditions sbatch would only warn about (2042 held, 2068 node not available):
  a ``job_id`` means the job exists.

Without slurmdbd there is no job history through slurmrestd, so :meth:`history`
reports QUERY_FAILED and the poller keeps a vanished job's session until its
exit-code file shows up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

from ..base import BatchError, JobId, JobInfo, JobScript, JobState, Presence, Report, SchedulerTraits, failed_query
from ..slurm.adapter import _state, _wait_status, directive_tokens
from . import settings

log = logging.getLogger(__name__)

SUPPORTED_API_VERSIONS = settings.API_VERSIONS  # later versions take a differently shaped job description
INVALID_JOB_ID = 2017  # ESLURM_INVALID_JOB_ID: the controller does not know the id
ALREADY_DONE = 2021  # ESLURM_ALREADY_DONE (not seen here: a finished job's DELETE gave 200)
TOKEN_SYMPTOMS = {5005, -1}  # what 22.05 says to a rejected JWT: nothing about auth (HTTP 500)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"  # the job's PATH unless the script's env sets one

# sbatch option -> slurmrestd v0.0.38 job field: the options the shipped template writes
# (jobscripts/slurm.sh.j2), plus their short forms. Flags take no value and are sent as true.
_OPTIONS: dict[str, str] = {
    "job-name": "name",
    "output": "standard_output",
    "chdir": "current_working_directory",
    "no-requeue": "no_requeue",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time_limit",
    "nodes": "nodes",
    "ntasks": "tasks",
    "cpus-per-task": "cpus_per_task",
    "mem": "memory_per_node",
    "gpus": "gpus",
    "gres": "gres",
}
_FLAGS = frozenset({"no-requeue"})
_SHORT = {"J": "job-name", "o": "output", "D": "chdir", "p": "partition", "A": "account", "q": "qos",
          "t": "time", "N": "nodes", "n": "ntasks", "c": "cpus-per-task", "G": "gpus"}


def sbatch_directives(text: str) -> dict[str, Any]:
    """The ``job`` fields for the ``#SBATCH`` lines of ``text``, read the way sbatch reads them.

    Like sbatch: directives count only before the first command (blank lines and
    comments may come between), a line may hold several options, values may be
    shell-quoted (the templates quote every value), a later option overrides an
    earlier one. An option we cannot translate raises :class:`BatchError`, so a
    site's extra directive is never silently dropped.
    """
    tokens = directive_tokens(text)
    job: dict[str, Any] = {}
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
        if name not in _OPTIONS:
            supported = ", ".join(f"--{o}" for o in _OPTIONS)
            raise BatchError(f"#SBATCH {token.partition('=')[0]} cannot be passed through slurmrestd "
                             f"(it ignores #SBATCH lines; pvw-hpc translates only {supported})")
        if name in _FLAGS:
            if has_value:
                raise BatchError(f"#SBATCH --{name} takes no value")
            job[_OPTIONS[name]] = True
            continue
        if not has_value:
            if i >= len(tokens):
                raise BatchError(f"#SBATCH --{name} needs a value")
            value = tokens[i]
            i += 1
        job[_OPTIONS[name]] = value
    return job


def job_info(job: Mapping[str, Any]) -> JobInfo:
    """One record of ``GET /jobs`` as a FOUND :class:`JobInfo`."""
    native = str(job.get("job_state") or "")
    reason = job.get("state_reason")
    reason_text = None if reason in (None, "", "None") else str(reason)
    state = _state(native, reason_text)
    # batch_host is where the script (so the job side and the app) runs; nodes may be a range.
    node = job.get("batch_host") or job.get("nodes") or None
    exit_code = job.get("exit_code")
    start = job.get("start_time")
    return JobInfo(
        job_id=JobId(str(job.get("job_id"))), presence=Presence.FOUND, state=state, native_state=native or None,
        node=str(node) if node else None, reason=reason_text,
        exit_code=_wait_status(str(exit_code)) if state.is_final and isinstance(exit_code, int) else None,
        start_estimate=(dt.datetime.fromtimestamp(start, dt.timezone.utc)
                        if state in (JobState.QUEUED, JobState.HELD) and isinstance(start, int) and start > 0
                        else None),
        raw=dict(job),
    )


def _retryable(exc: BaseException) -> bool:
    """Connection refused/reset are worth another try; a timeout already cost the full wait."""
    return isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any  # parsed JSON, or the text when the body is not JSON (the 401 is text/plain)

    @property
    def errors(self) -> list[dict[str, Any]]:
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    def error_numbers(self) -> set[int]:
        """Slurm's error numbers: ``error_number`` in most answers, ``error_code`` in submit's."""
        numbers = (e.get("error_number", e.get("error_code")) for e in self.errors)
        return {n for n in numbers if isinstance(n, int)}

    def why(self) -> str:
        """A one-line account of what went wrong, for logs and session errors."""
        parts = []
        for e in self.errors:
            code = e.get("error_number", e.get("error_code"))
            text = " - ".join(str(e[k]) for k in ("error", "description") if e.get(k))
            parts.append(f"{text} ({code})" if code is not None else text)
        if not parts and not isinstance(self.body, dict):
            parts.append(str(self.body).strip()[:200])
        why = f"HTTP {self.status}: {'; '.join(parts) or 'no error given'}"
        if self.status == 500 and self.error_numbers() & TOKEN_SYMPTOMS:
            why += " (slurmrestd 22.05 answers a bad or expired token this way)"
        return why


@dataclass
class SlurmRestAdapter(SchedulerTraits):
    """submit / poll / cancel as HTTP calls to slurmrestd, authenticated per call with a fresh token."""

    name: ClassVar[str] = "slurm"  # same scheduler, ids and states as the CLI adapter
    scheduler: ClassVar[str] = "slurm"
    access: ClassVar[str] = "rest"
    template: ClassVar[str] = "slurm.sh.j2"
    takes_job_user: ClassVar[bool] = True  # jobs run as the token's user
    settings_keys: ClassVar[frozenset[str]] = settings.KEYS

    @staticmethod
    def check_settings(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> settings.RestAccess | None:
        return settings.check(raw, path, error, warn)

    url: str
    user: str
    token_file: str | None = None
    api_version: str = "v0.0.38"
    timeout_s: float = 30.0
    attempts: int = 3  # for the idempotent calls (poll, cancel); submit is never repeated
    retry_wait_s: float = 0.3
    base_environment: Mapping[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})

    def __post_init__(self) -> None:
        if self.api_version not in SUPPORTED_API_VERSIONS:
            raise ValueError(f"slurmrestd API {self.api_version} is not supported (only {', '.join(SUPPORTED_API_VERSIONS)})")
        self.url = self.url.rstrip("/")

    @classmethod
    def from_cluster(cls, cluster: Any) -> SlurmRestAdapter:
        rest = cluster.settings
        if rest is None:
            raise ValueError(f"cluster {cluster.name!r} uses access 'rest' but has no 'rest' settings")
        return cls(url=rest.url, user=rest.user, token_file=rest.token_file, api_version=rest.api_version,
                   timeout_s=cluster.command_timeout_s)

    # -- the adapter interface ---------------------------------------------------------------

    def submit(self, script: JobScript) -> JobId:
        """POST the script with its directives as ``job`` fields; never retried, a repeat could run it twice."""
        job = sbatch_directives(script.text)
        job.setdefault("current_working_directory", str(script.workdir))  # sbatch's default: where it runs
        job["environment"] = {**self.base_environment, **script.env}
        answer = self._call("POST", "job/submit", body={"script": script.text, "job": job}, retry=False)
        job_id = answer.body.get("job_id") if isinstance(answer.body, dict) else None
        if answer.status == 200 and isinstance(job_id, int) and job_id > 0:
            if answer.errors:  # submitted anyway: what sbatch would print as a warning
                log.info("job %s submitted with remarks: %s", job_id, answer.why())
            return JobId(str(job_id))
        raise self._error("submit", answer)

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """One ``GET /jobs`` (it cannot filter by id) for all ids; ABSENT only from a clean, complete answer."""
        if not job_ids:
            return {}
        try:
            answer = self._call("GET", "jobs")
        except BatchError as exc:
            return failed_query(job_ids, str(exc))
        jobs = answer.body.get("jobs") if isinstance(answer.body, dict) else None
        # an auth failure is a 500 with "jobs": [] - anything but a clean 200 means we know nothing
        if answer.status != 200 or answer.errors or not isinstance(jobs, list):
            return failed_query(job_ids, f"slurmrestd GET jobs: {answer.why()}")
        wanted = {str(j) for j in job_ids}
        found: dict[str, JobInfo] = {}
        for job in jobs:
            if isinstance(job, dict) and str(job.get("job_id")) in wanted:
                found[str(job["job_id"])] = job_info(job)
        return {j: found.get(str(j)) or JobInfo(j, Presence.ABSENT) for j in job_ids}

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        """Live jobs named ``prefix...`` from one ``GET /jobs``."""
        answer = self._call("GET", "jobs")
        jobs = answer.body.get("jobs") if isinstance(answer.body, dict) else None
        if answer.status != 200 or answer.errors or not isinstance(jobs, list):
            raise BatchError(f"slurmrestd GET jobs: {answer.why()}")
        found = {}
        for job in jobs:
            if isinstance(job, dict) and str(job.get("name", "")).startswith(prefix):
                info = job_info(job)
                if info.state is not None and not info.state.is_final:
                    found[info.job_id] = dataclasses.replace(
                        info, name=str(job["name"]), workdir=job.get("current_working_directory"))
        return found

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """slurmrestd keeps no history of purged jobs without slurmdbd: we cannot know."""
        return failed_query(job_ids, "no job history through slurmrestd (needs slurmdbd)") if job_ids else {}

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """``DELETE /job/ID``, which slurmctld treats like scancel; error 2017 means the job is already gone.

        ``user`` is accepted as the interface asks and ignored: slurmrestd acts as its token's user
        (``rest.user``), who submitted the job, so that is who cancels it.
        """
        if not str(job_id).isdigit():  # it goes into the URL path
            raise BatchError(f"not a Slurm job id: {job_id!r}")
        answer = self._call("DELETE", f"job/{job_id}")
        if answer.status == 200 and not answer.errors:
            return
        if answer.error_numbers() & {INVALID_JOB_ID, ALREADY_DONE}:  # gone or over: what cancel wants
            return
        raise self._error(f"cancel {job_id}", answer)

    # -- HTTP -------------------------------------------------------------------------------

    def _token(self) -> str:
        """Read on every call: tokens are short-lived and rotated by whoever writes the file."""
        if self.token_file:
            try:
                text = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise BatchError(f"cannot read the slurmrestd token file {self.token_file}: {exc.strerror}") from None
        else:
            text = os.environ.get("SLURM_JWT", "").strip()
        token = text.removeprefix("SLURM_JWT=")  # the file may hold `scontrol token` output as is
        if not token:
            raise BatchError(f"no slurmrestd token ({'empty ' + self.token_file if self.token_file else 'SLURM_JWT unset'})")
        return token

    def _call(self, method: str, path: str, *, body: Any = None, retry: bool = True) -> _Answer:
        """One request (retried on refused/reset connections when ``retry``); BatchError if there is no answer."""
        url = f"{self.url}/slurm/{self.api_version}/{path}"
        headers = {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self._token(), "Accept": "application/json"}
        retrying = Retrying(stop=stop_after_attempt(self.attempts if retry else 1), wait=wait_fixed(self.retry_wait_s),
                            retry=retry_if_exception(_retryable), reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    response = requests.request(method, url, headers=headers, json=body, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise BatchError(f"slurmrestd {method} {url}: {type(exc).__name__}: {exc}", [method, url],
                             unreachable=True) from None
        try:
            parsed: Any = response.json()
        except (ValueError, json.JSONDecodeError):
            parsed = response.text
        return _Answer(response.status_code, parsed)

    def _error(self, what: str, answer: _Answer) -> BatchError:
        body = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)[:2000]
        why = answer.why()
        # slurmrestd answers, but slurmctld behind it does not (its own words), or a proxy in front says so
        unreachable = "Unable to contact" in why or "Unable to contact" in body or answer.status in (502, 503, 504)
        return BatchError(f"slurmrestd {what} failed: {why}", [what], answer.status, body, unreachable=unreachable)
