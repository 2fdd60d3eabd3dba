"""A scripted scheduler adapter: the poller's decisions in milliseconds, with no scheduler running.

A FAKE, on purpose, beside the real-scheduler tests (tests/test_slurm_e2e.py,
tests/test_batch_e2e.py), which remain the proof: this one exists so that someone
changing the poller can run every decision it makes (found / absent / query failed in
every state, unreachable, requeue, NODE_FAIL) in well under a second. Each job id has
a queue of scripted answers; ``poll`` pops one per id per call (the last one repeats),
so a test reads like the scheduler's side of a story.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from pvw_hpc.batch.base import BatchError, JobId, JobInfo, JobScript, JobState, Presence


def found(state: JobState, native: str, node: str | None = "localhost", **extra: object) -> JobInfo:
    """One FOUND answer (the job id is filled in by the adapter)."""
    return JobInfo(JobId(""), Presence.FOUND, state, native_state=native, node=node, **extra)  # type: ignore[arg-type]


ABSENT = JobInfo(JobId(""), Presence.ABSENT)
QUERY_FAILED = JobInfo(JobId(""), Presence.QUERY_FAILED, reason="Unable to contact slurm controller")
QUEUED = found(JobState.QUEUED, "PENDING", node=None, reason="Priority")
RUNNING = found(JobState.RUNNING, "RUNNING")
COMPLETED = found(JobState.COMPLETED, "COMPLETED", exit_code=0)
NODE_FAIL = found(JobState.FAILED, "NODE_FAIL", reason="NodeDown")


@dataclass
class ScriptedScheduler:
    """Implements ``BatchAdapter``; ``script(job_id, *answers)`` queues what ``poll`` will say about it."""

    name: ClassVar[str] = "fake"
    answers: dict[JobId, deque[JobInfo]] = field(default_factory=dict)
    history_answers: dict[JobId, JobInfo] = field(default_factory=dict)
    submitted: list[JobScript] = field(default_factory=list)
    cancelled: list[JobId] = field(default_factory=list)
    polls: list[set[JobId]] = field(default_factory=list)
    refuse_submit: str | None = None  # sbatch's words for a refusal (a bad partition, say)
    unreachable: bool = False  # with refuse_submit: the adapter's verdict that the scheduler does not answer
    closed: bool = False
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def script(self, job_id: JobId, *answers: JobInfo) -> None:
        """What the next polls say about ``job_id``, in order; the last answer repeats."""
        self.answers[job_id] = deque(answers)

    def submit(self, script: JobScript) -> JobId:
        if self.refuse_submit is not None:
            raise BatchError(self.refuse_submit, returncode=1, unreachable=self.unreachable)
        self.submitted.append(script)
        job_id = JobId(str(next(self._ids)))
        self.answers.setdefault(job_id, deque([QUEUED]))
        return job_id

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        self.polls.append(set(job_ids))
        out = {}
        for job_id in job_ids:
            queue = self.answers.get(job_id) or deque([ABSENT])
            answer = queue.popleft() if len(queue) > 1 else queue[0]
            out[job_id] = JobInfo(job_id, answer.presence, answer.state, answer.native_state, answer.node,
                                  answer.reason, answer.exit_code, answer.start_estimate)
        return out

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        return {j: self.history_answers.get(j, JobInfo(j, Presence.ABSENT)) for j in job_ids}

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        return {}

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        self.cancelled.append(job_id)

    def close(self) -> None:
        self.closed = True
