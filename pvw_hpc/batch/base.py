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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NewType, Protocol

from ..validate import is_user_name

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
    """A rendered job script and where it lives. ``name`` carries the session id.

    ``user`` is who the job runs as when the cluster has a ``submit_prefix`` (see
    :func:`expand_prefix`); None means the launcher's own user.
    """

    text: str
    name: str
    path: Path
    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None


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
    name: str | None = None  # the job name; ours carry the session id
    workdir: str | None = None
    raw: Any = None
    # the scheduler keeps the job although it will never run on its own (an HTCondor hold that failed
    # the session): the poller removes it once the session has ended
    stuck: bool = False


class BatchError(Exception):
    """A submit or cancel failed; carries what the scheduler said.

    ``unreachable`` is the adapter's verdict that the scheduler itself did not answer (its
    controller is down or cannot be reached), as opposed to refusing this one request: the
    service then answers further launches on that cluster with 503 at once until the poller
    sees the scheduler answer again. Only the adapter knows its scheduler's words for that.
    """

    def __init__(self, message: str, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = "",
                 unreachable: bool = False):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.unreachable = unreachable


Report = Callable[[str, str], None]  # (JSON path, message): how config checks report a problem


class SchedulerTraits:
    """What an adapter tells the rest of the launcher about its scheduler, with the common defaults.

    Each adapter class inherits this and overrides what differs, so the cluster checks, the job
    files and the service read these instead of comparing scheduler names. ``check_settings``
    validates the adapter's own config keys (``settings_keys``) and returns its frozen settings
    object (``ClusterConfig.settings``); ``check_clusters`` sees every cluster of this adapter at
    once, for rules across clusters (HTCondor's one ``CONDOR_CONFIG`` per process).
    """

    scheduler: ClassVar[str]  # the ``scheduler`` value in a cluster's config
    access: ClassVar[str]  # the ``access`` value; the first registered for a scheduler is its default
    template: ClassVar[str]  # the shipped template in ``jobscripts/``
    submits_description: ClassVar[bool] = False  # a submit description (not a shell script): body.sh beside it
    takes_submit_prefix: ClassVar[bool] = False  # the launcher runs argv: a prefix can run it as the requester
    takes_job_user: ClassVar[bool] = False  # jobs run as the identity the adapter authenticates as
    takes_commands: ClassVar[bool] = False  # it runs the scheduler's commands: ``commands`` may name them
    settings_keys: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    def check_settings(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> Any:
        """The adapter's own keys of one cluster entry, checked; None when it has none."""
        return None

    @staticmethod
    def check_clusters(clusters: Sequence[Any], error: Report) -> None:
        """Rules across every cluster that uses this adapter (none by default)."""

    def close(self) -> None:
        """Release what the adapter holds (a worker process, a connection) when the launcher stops; jobs run on."""


class BatchAdapter(Protocol):
    """What the poller and the service need from a scheduler (plus the class-level traits above)."""

    name: ClassVar[str]
    scheduler: ClassVar[str]
    access: ClassVar[str]
    template: ClassVar[str]
    submits_description: ClassVar[bool]
    takes_submit_prefix: ClassVar[bool]
    takes_job_user: ClassVar[bool]
    takes_commands: ClassVar[bool]
    settings_keys: ClassVar[frozenset[str]]

    @staticmethod
    def check_settings(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> Any:
        """See :class:`SchedulerTraits`."""

    @staticmethod
    def check_clusters(clusters: Sequence[Any], error: Report) -> None:
        """See :class:`SchedulerTraits`."""

    @classmethod
    def from_cluster(cls, cluster: Any) -> BatchAdapter:
        """The adapter for one checked ``ClusterConfig`` (its generic keys and its ``settings``)."""

    def submit(self, script: JobScript) -> JobId:
        """Submit; raises :class:`BatchError` (with ``unreachable`` set when the scheduler did not answer)."""

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """ONE scheduler call for all ``job_ids``; never raises (failures are QUERY_FAILED)."""

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """Final records of jobs the queue no longer shows (ABSENT when unknown there too)."""

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        """Every live job whose name starts with ``prefix`` (ONE call); raises :class:`BatchError`.

        How a restarted launcher finds jobs it submitted but never recorded.
        """

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """Cancel; cancelling a job that is gone succeeds. Raises :class:`BatchError`.

        ``user``: the job's owner, for adapters that submit through a ``submit_prefix``
        (the cancel goes through the same prefix); others accept and ignore it.
        """

    def close(self) -> None:
        """See :class:`SchedulerTraits` (nothing by default)."""


def failed_query(job_ids: Collection[JobId], why: str) -> dict[JobId, JobInfo]:
    """The answer for every id when the scheduler could not be asked."""
    return {j: JobInfo(j, Presence.QUERY_FAILED, reason=why) for j in job_ids}


# -- running jobs as the requesting user ------------------------------------------------------

USER_PLACEHOLDER = "${user}"
REFUSED_USERS = frozenset({"root"})


def is_valid_user(name: object) -> bool:
    """True for a user name a job may run as.

    The name is substituted into the submit prefix (``sudo -n -u ${user}``), so it must
    be inert there: :data:`validate.USER_NAME_RE` (the one rule the request was checked
    with), nothing that sudo or getopt would read as something else. ``root`` is refused on purpose: running jobs as the
    requesting user is about dropping privileges, and a request that maps to root is a
    misconfiguration (or an attack) whatever sudoers says.
    """
    return is_user_name(name) and name not in REFUSED_USERS


def expand_prefix(prefix: Sequence[str], user: str) -> list[str]:
    """``prefix`` with every ``${user}`` replaced by ``user``; raises :class:`BatchError` for a bad name.

    Checked here, at the point of use, and not only where the name came from, so no
    path into an adapter can put an unchecked name in front of ``sbatch``.
    """
    if not is_valid_user(user):
        raise BatchError(f"refusing to run a job as {user!r}: not a valid user name "
                         "(lowercase letters, digits, _ and -, at most 32, not root)")
    return [part.replace(USER_PLACEHOLDER, user) for part in prefix]


def command_prefix(prefix: Sequence[str], user: str | None) -> list[str]:
    """The argv prefix for a command run as ``user``: empty without a prefix or a user; a bad name raises."""
    if not prefix or user is None:
        return []
    return expand_prefix(prefix, user)


def submit_prefix_for(prefix: Sequence[str], script: JobScript) -> list[str]:
    """The prefix for submitting ``script``; a cluster with a prefix refuses a script without a user.

    Submitting it as the launcher's (service) account instead would quietly run the job under
    the wrong identity. Without a prefix ``script.user`` is ignored.
    """
    if prefix and script.user is None:
        raise BatchError("this cluster runs jobs as the requesting user (submit_prefix), but the job has no user")
    return command_prefix(prefix, script.user)
