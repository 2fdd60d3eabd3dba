"""The narrow interface every scheduler adapter implements, and its value objects.

Adapters submit an already rendered script, poll many jobs with ONE scheduler
call, and cancel. They never render templates and never decide what a missing
job means: ``poll`` reports each job as FOUND, ABSENT or QUERY_FAILED and the
poller decides (a failed query never ends a session; an absent job ends only
when its exit-code file or the scheduler's history confirms it).

This module imports nothing from the rest of the project, so an adapter runs in
a bare script and the parsers are testable on captured output alone.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NewType, Protocol

JobId = NewType("JobId", str)


class Presence(enum.Enum):
    FOUND = "found"
    ABSENT = "absent"  # the query worked and the job was not in it
    QUERY_FAILED = "query_failed"  # we know nothing: never a reason to end a session


class JobState(enum.Enum):
    """The scheduler's state, reduced to what the session life cycle needs."""

    QUEUED = "queued"
    HELD = "held"
    RUNNING = "running"
    ENDING = "ending"  # COMPLETING / exiting: not over yet
    COMPLETED = "completed"  # ended by itself, or by a cancel
    FAILED = "failed"  # ended badly: node failure, launch failure, non-zero exit...
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


@dataclass(frozen=True)
class JobScript:
    """A rendered job script and where it lives. ``name`` carries the session id."""

    text: str
    name: str
    path: Path
    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobInfo:
    """One job as one poll saw it."""

    job_id: JobId
    presence: Presence
    state: JobState | None = None
    native_state: str | None = None  # e.g. "PENDING", "NODE_FAIL"
    node: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    start_estimate: dt.datetime | None = None
    raw: Any = None


class BatchError(Exception):
    """A submit or cancel failed; carries what the scheduler said."""

    def __init__(self, message: str, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class BatchAdapter(Protocol):
    """What the poller and the service need from a scheduler."""

    name: ClassVar[str]

    def submit(self, script: JobScript) -> JobId:
        """Submit; raises :class:`BatchError`."""

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """ONE scheduler call for all ``job_ids``; never raises (failures are QUERY_FAILED)."""

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """Final records of jobs the queue no longer shows (ABSENT when unknown there too)."""

    def cancel(self, job_id: JobId) -> None:
        """Cancel; cancelling a job that is gone succeeds. Raises :class:`BatchError`."""


def failed_query(job_ids: Collection[JobId], why: str) -> dict[JobId, JobInfo]:
    """The answer for every id when the scheduler could not be asked."""
    return {j: JobInfo(j, Presence.QUERY_FAILED, reason=why) for j in job_ids}
