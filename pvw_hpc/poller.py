"""The poller: one thread that follows every batch session from queued to ended.

Each cycle makes ONE queue query per cluster for all of its live jobs, reads
the job logs of queued and starting sessions for the job side's ready marker,
and moves sessions through their states. The interval adapts: fast while
anything is queued or starting, slow when everything is ready, and backing off
while a scheduler does not answer. A failed query changes no session: only a
job the scheduler reports finished, or that is gone from the queue and
confirmed by its exit-code file or the scheduler's history, ends a session.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import userfiles
from .batch.base import JobId, JobInfo, JobState, Presence
from .local import log_tail
from .loops import BackgroundLoop
from .probe import reachable
from .service import Service
from .states import SessionState
from .store import TrackedJob
from .validate import is_valid_host, is_valid_port

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 60.0  # also after start: jobs by name against sessions
MAX_BACKOFF_S = 15.0  # while a scheduler is down: keep asking, at most this far apart
PROBE_TIMEOUT_S = 1.0  # a ready app's node:port that does not accept a connect this fast counts as unreachable
_MARKER_RE = re.compile(rb"PVW-HPC-READY ([0-9a-f-]{36}) (\S+):(\d+)\r?\n")
# the job side started the app again on another port: session, try, taken port, next port, Unix time
_RETRY_WORD = b"PVW-HPC-RETRY "
_RETRY_RE = re.compile(rb"PVW-HPC-RETRY ([0-9a-f-]{36}) (\d{1,2}) (\d{1,5}) (\d{1,5}) (\d{1,12}(?:\.\d{1,6})?)\r?\n")


@dataclass
class _Reach:
    """One cluster's reachability probes: when last, who answered once, who is silent since when."""

    last_probe: float = float("-inf")
    answered: set[str] = field(default_factory=set)
    silent_since: dict[str, float] = field(default_factory=dict)


@dataclass
class _LogScan:
    """How far into a job log the marker search has read."""

    offset: int = 0
    tail: bytes = b""


class Poller:
    """Owns the batch sessions' progress; ``tick()`` runs one cycle (tests call it directly)."""

    def __init__(self, service: Service):
        self.service = service
        self.store = service.store
        self._scans: dict[str, _LogScan] = {}
        self._failures: dict[str, int] = {}  # cluster -> consecutive failed queries
        self._reach: dict[str, _Reach] = {}  # cluster -> what the probes of its ready apps found
        # job folders belong to the jobs' users: their files are read off this thread, with a deadline
        self.files = userfiles.BoundedReader()
        self._loop = BackgroundLoop("pvw-poller", self._step)
        self._last_reconcile = time.monotonic()  # serve runs the startup reconcile before listening
        self.cycles = 0
        self.moves = 0  # state changes made, for tests and benchmarks

    def start(self) -> None:
        if self.service.adapters and not self._loop.running:
            self.service.poller_wake = self._loop.wake
            self._last_reconcile = time.monotonic()
            self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        self.files.close()

    def _step(self) -> float:
        """One pass of the background loop: the periodic reconcile when due, then a cycle."""
        if time.monotonic() - self._last_reconcile >= RECONCILE_EVERY_S:
            self._last_reconcile = time.monotonic()
            self.reconcile()
        return self.tick()

    # -- jobs and sessions agree -------------------------------------------------------------

    def reconcile(self, startup: bool = False) -> dict[str, int]:
        """Every cluster's jobs by name against our sessions (see :meth:`ClusterSessions.reconcile`)."""
        counts = {"adopted": 0, "cancelled": 0, "failed": 0}
        for name in self.service.config.clusters:
            for key, value in self.service.cluster_backend(name).reconcile(startup).items():
                counts[key] += value
        return counts

    # -- one cycle --------------------------------------------------------------------------

    def tick(self) -> float:
        """Poll every cluster once; returns the seconds until the next cycle should run."""
        self.cycles += 1
        intervals = []
        for name, cluster in self.service.config.clusters.items():
            jobs = self.store.tracked(name)
            if not any(j.job_id for j in jobs):  # no job to ask about (one may be mid-submit): no evidence either way
                if name in self.service.unreachable:  # ask the queue whether it is back
                    probe = self.service.adapters[name].poll([JobId("0")])
                    if all(i.presence != Presence.QUERY_FAILED for i in probe.values()):
                        self.service.unreachable.pop(name, None)
                self._failures.pop(name, None)
                intervals.append(cluster.poll_fast_s if name in self.service.unreachable else cluster.poll_slow_s)
                continue
            ok, why, busy = self._poll_cluster(name, jobs)
            if cluster.probe_every_s and ok:  # while the scheduler does not answer, nothing is judged
                self._probe_ready(name, cluster.probe_every_s, cluster.unreachable_after_s)
                intervals.append(cluster.probe_every_s)
            if ok:
                self._failures.pop(name, None)
                self.service.unreachable.pop(name, None)
                intervals.append(cluster.poll_fast_s if busy else cluster.poll_slow_s)
            else:
                self._failures[name] = self._failures.get(name, 0) + 1
                self.service.unreachable[name] = why
                log.warning("cluster %s: scheduler query failed (%d in a row): %s", name, self._failures[name], why)
                intervals.append(min(MAX_BACKOFF_S, cluster.poll_fast_s * 2 ** self._failures[name]))
        return min(intervals, default=10.0)

    def _poll_cluster(self, name: str, jobs: list[TrackedJob]) -> tuple[bool, str, bool]:
        """One queue query for all of a cluster's jobs; returns (query ok, why not, anything not ready)."""
        adapter = self.service.adapters[name]
        with_ids = [j for j in jobs if j.job_id]
        infos = adapter.poll([JobId(j.job_id) for j in with_ids if j.job_id])
        failed = [i for i in infos.values() if i.presence == Presence.QUERY_FAILED]
        bookkeeping: list[tuple[str, dict[str, object]]] = []
        absent, waiting = [], set()
        moves_before = self.moves
        for job in with_ids:
            info = infos[JobId(job.job_id or "")]
            if info.presence == Presence.FOUND:
                if info.node:
                    self.service.nodes[job.id] = info.node
                changed: dict[str, object] = {"native_state": info.native_state, "scheduler_reason": info.reason,
                           "start_estimate": info.start_estimate}
                if any(getattr(job, k) != v for k, v in changed.items()):
                    bookkeeping.append((job.id, changed))
                self._apply(name, job, info)
                if info.state in (JobState.QUEUED, JobState.HELD):
                    waiting.add(job.id)  # it has not run: no ready marker to look for
            elif info.presence == Presence.ABSENT:
                absent.append(job)
        self.store.update_many(bookkeeping)
        if absent:
            self._confirm_absent(name, absent)
        # re-read only when this cycle changed something: at 1000 idle jobs a read is most of the cost
        current = self.store.tracked(name) if (absent or self.moves != moves_before) else jobs
        scan = [j for j in current if j.state in (SessionState.QUEUED, SessionState.STARTING) and j.id not in waiting]
        self._check_markers(name, scan, infos)
        busy = any(j.state != SessionState.READY for j in current)
        return not failed, (failed[0].reason or "query failed") if failed else "", busy

    def _probe_ready(self, cluster: str, every_s: float, give_up_after_s: float) -> None:
        """Connect to every ready app of a cluster; end those silent for ``give_up_after_s``.

        A scheduler learns late that a node is gone (SLURM: ~30 s after its link
        is cut the job is still RUNNING), and until then the map would route
        browsers into the void. Only an app that answered from here before can
        be judged: where the launcher cannot reach the nodes at all (a portal
        outside the cluster network) nothing is ever ended by a probe.
        """
        now = time.monotonic()
        reach = self._reach.setdefault(cluster, _Reach())
        if now - reach.last_probe < every_s:
            return
        reach.last_probe = now
        ready = [j for j in self.store.tracked(cluster) if j.state == SessionState.READY and j.host and j.port]
        ready = [j for j in ready if not self._fail_refused_route(cluster, j)]
        address = {j.id: (str(j.host), int(j.port or 0)) for j in ready}
        answers = reachable(address.values(), timeout_s=PROBE_TIMEOUT_S)
        if len({j.host for j in ready}) > 1 and not any(answers.values()):
            # every app on every node silent at once: the launcher's own network, not the apps
            log.warning("cluster %s: none of %d ready apps answers; not judging them this time", cluster, len(ready))
            return
        for job in ready:
            answer = answers[address[job.id]]
            if answer:
                reach.answered.add(job.id)
                reach.silent_since.pop(job.id, None)
                continue
            if answer is None or job.id not in reach.answered:
                continue
            since = reach.silent_since.setdefault(job.id, now)
            if since == now:
                log.warning("session %s: its app at %s:%s does not answer (job %s is %s)", job.id, job.host,
                            job.port, job.job_id, job.native_state)
            if now - since >= give_up_after_s:
                error = (f"the app at {job.host}:{job.port} did not answer for {now - since:.0f} s while the "
                         f"scheduler still reported job {job.job_id} {job.native_state or 'running'}; "
                         "the job was cancelled")
                if self.service.lose(job.id, error):
                    self.moves += 1
        live = {j.id for j in ready}
        reach.answered &= live
        for session_id in set(reach.silent_since) - live:
            del reach.silent_since[session_id]

    def _fail_refused_route(self, cluster: str, job: TrackedJob) -> bool:
        """Fail a ready session whose stored route the rules now refuse (the config changed): it is never probed.

        Only the rules that need no name lookup are applied here (port range, loopback, the
        launcher's own addresses), so a resolver hiccup can never fail a session.
        """
        why = self.service.static_route_refusal(cluster, str(job.host), int(job.port or 0))
        if why and self.service.lose(job.id, f"its route {job.host}:{job.port} is refused: {why}; the job was cancelled"):
            self.moves += 1
        return why is not None

    def _apply(self, cluster: str, record: TrackedJob, info: JobInfo) -> None:
        """Move one session according to what the scheduler says about its job."""
        state = info.state
        if state in (JobState.QUEUED, JobState.HELD):
            if record.state in (SessionState.STARTING, SessionState.READY):  # requeued: the old node is gone
                self._scans[record.id] = _LogScan(offset=self.files.call(str(record.log_path), lambda: _size(record.log_path), 0))
                self.service.nodes.pop(record.id, None)  # it runs somewhere else next
                self._move(record, SessionState.QUEUED, host=None, port=None)
            elif record.state == SessionState.SUBMITTED:
                self._move(record, SessionState.QUEUED)
        elif state in (JobState.RUNNING, JobState.ENDING):
            if record.state in (SessionState.SUBMITTED, SessionState.QUEUED):
                self._move(record, SessionState.STARTING)
        elif state is not None and state.is_final:
            self._finish(cluster, record, info)

    def _confirm_absent(self, cluster: str, records: list[TrackedJob]) -> None:
        """A job gone from the queue ends its session only when something confirms it ended."""
        unconfirmed = []
        for record in records:
            code = _exit_code(self._job_file(record, "exit_code"))
            if code is not None:
                self._finish(cluster, record, JobInfo(JobId(record.job_id or ""), Presence.FOUND, JobState.COMPLETED,
                                             native_state="GONE", exit_code=code))
            else:
                unconfirmed.append(record)
        if not unconfirmed:
            return
        history = self.service.adapters[cluster].history([JobId(r.job_id or "") for r in unconfirmed])
        for record in unconfirmed:
            info = history[JobId(record.job_id or "")]
            if info.presence == Presence.FOUND and info.state is not None and info.state.is_final:
                self._finish(cluster, record, info)
            else:
                log.warning("job %s of session %s is not in the queue and not confirmed ended; keeping it",
                            record.job_id, record.id)

    def _finish(self, cluster: str, record: TrackedJob, info: JobInfo) -> None:
        exit_code = _exit_code(self._job_file(record, "exit_code"))
        if exit_code is None:
            exit_code = info.exit_code
        what = info.native_state or "ended"
        if info.reason:
            what += f" ({info.reason})"
        told = self._job_file(record, "end_reason")  # the job side's own word, e.g. stopped when idle
        if told:
            what += f": {told}"
        if record.state == SessionState.READY and info.state == JobState.COMPLETED:
            self._move(record, SessionState.ENDED, exit_code=exit_code, end_reason=f"job {record.job_id} {what}")
        else:
            error = f"job {record.job_id} {what}"
            if exit_code is not None:
                error += f", exit code {exit_code}"
            if record.state != SessionState.READY:
                error += " before the app was ready"
                tail = self.files.call(str(record.log_path), lambda: log_tail(record.log_path), "")
                if tail:
                    error += f"; job log {record.log_path}, last lines:\n{tail}"
            self._move(record, SessionState.FAILED, exit_code=exit_code, error=error)
        self._scans.pop(record.id, None)
        if info.stuck and record.job_id:  # e.g. held by HTCondor: it would wait in the queue forever
            self.service.cluster_backend(cluster).cancel(JobId(record.job_id), f"job {record.job_id} is stuck ({what})")

    def _check_markers(self, cluster: str, records: list[TrackedJob], infos: dict[JobId, JobInfo]) -> None:
        """The job side's marker lines in the job logs: the fallback when callbacks cannot reach us.

        The logs are the job users' files: read on worker threads under one deadline, and a
        marker is only believed for the job's own node and the cluster's port range.
        """
        records = [r for r in records if r.log_path]
        scans = [self._scans.setdefault(r.id, _LogScan()) for r in records]
        late = None
        found = self.files.many([(str(r.log_path), functools.partial(_read_markers, Path(str(r.log_path)), scan))
                                 for r, scan in zip(records, scans, strict=True)], late)
        for record, answer in zip(records, found, strict=True):
            if answer is None:
                continue  # no answer in time: the same bytes are read again next cycle
            markers, retries, moved = answer
            info = infos.get(JobId(record.job_id or ""))
            node = info.node if info else None
            if node is None and markers:
                continue  # where the job runs is not known yet: read these lines again once it is
            self._scans[record.id] = moved
            mine = [r for session_id, r in retries if session_id == record.id]
            if mine:
                self.service.note_port_retries(record.id, mine)
            for session_id, host, port in markers:
                if session_id != record.id or not is_valid_host(host) or not is_valid_port(port):
                    continue
                refused = self.service.route_refusal(cluster, node, host, port)
                if refused:
                    self.service.refuse_route(record.id, f"marker {host}:{port}", refused)
                    continue
                self._move(record, SessionState.READY, host=host, port=port)  # from queued: starting is filled in
                break

    def _job_file(self, record: TrackedJob, name: str) -> str | None:
        """A small job-side file of this session, or None (absent, refused, or no answer in time)."""
        return self.files.call(f"{record.job_dir}/{name}", lambda: _read_job_file(record, name), None)

    def _move(self, record: TrackedJob, to: SessionState, **fields: Any) -> None:
        if self.service.life.move(record.id, to, current=record.state, **fields):
            self.moves += 1


Retry = tuple[str, dict[str, Any]]  # session id, as port_retries.checked reads an entry


def _read_markers(path: Path, scan: _LogScan) -> tuple[list[tuple[str, str, int]], list[Retry], _LogScan]:
    """Ready and retry marker lines after ``scan`` (at most 1 MiB a cycle) and the scan position after them.

    Pure: it runs on a reader thread and may answer too late, so the poller decides
    whether the new position is kept.
    """
    read = userfiles.read_range(path, scan.offset, 1 << 20)
    if read is None:
        return [], [], scan
    data, _size = read
    window = scan.tail + data
    found = [(m.group(1).decode(), m.group(2).decode("ascii", "replace"), int(m.group(3)))
             for m in _MARKER_RE.finditer(window)]
    retries = [] if _RETRY_WORD not in window else [
        (m.group(1).decode(), {"try": int(m.group(2)), "port": int(m.group(3)), "next_port": int(m.group(4)),
                               "at": float(m.group(5))})
        for m in _RETRY_RE.finditer(window)]
    cut = window.rfind(b"\n")
    return found, retries, _LogScan(offset=scan.offset + len(data), tail=window[cut + 1:][-256:] if cut >= 0 else window[-256:])


def _read_job_file(record: TrackedJob, name: str) -> str | None:
    """A small file the job side writes (exit_code, end_reason), read as :mod:`userfiles` allows."""
    if not record.job_dir:
        return None
    text = userfiles.read_small(Path(record.job_dir) / name)
    return text[:500] if text is not None else None


def _exit_code(text: str | None) -> int | None:
    return int(text) if text and len(text) < 12 and text.lstrip("-").isdigit() else None


def _size(path: str | None) -> int:
    read = userfiles.read_range(path, 0, 0) if path else None
    return read[1] if read else 0
