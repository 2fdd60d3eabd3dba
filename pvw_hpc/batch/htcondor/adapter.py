"""HTCondor through its official Python bindings (``htcondor>=25,<26``: ``htcondor2`` / ``classad2``).

Jobs are followed by reading their user event log (``events.log`` in the
session's folder, named by the submit description) with
``JobEventLog.events(stop_after=0)``, which returns only what was appended since
the last call and never blocks; the schedd is not asked on every cycle. It is
asked (``Schedd.query``) only for jobs whose log says nothing yet, e.g. after a
launcher restart or when the schedd could not open the log at all, and its
history (``Schedd.history``) confirms jobs that left the queue.

A held job never runs until someone acts, and HTCondor holds jobs it cannot
run (a missing file, a job past ``allowed_job_duration``), so a hold fails the
session with the ``HoldReason`` and the poller removes the job (``stuck``).

``CONDOR_CONFIG`` must be set before ``htcondor2`` is imported: without a config
the module points itself at ``/dev/null``. The adapter sets it from the
cluster's ``condor_config`` first and reloads the configuration if the module
was imported before.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ... import userfiles
from ..base import BatchError, JobId, JobInfo, JobScript, JobState, Presence, Report, SchedulerTraits, failed_query
from . import settings

EVENT_LOG = "events.log"  # in the job's initialdir; the template's ``log =`` names the same file

# JobStatus of the schedd's ClassAds
_STATUS = {1: ("IDLE", JobState.QUEUED), 2: ("RUNNING", JobState.RUNNING), 3: ("REMOVED", JobState.COMPLETED),
           4: ("COMPLETED", JobState.COMPLETED), 5: ("HELD", JobState.FAILED), 6: ("TRANSFERRING", JobState.ENDING),
           7: ("SUSPENDED", JobState.RUNNING)}
_PROJECTION = ["ClusterId", "ProcId", "JobStatus", "ExitCode", "ExitBySignal", "ExitSignal", "HoldReason",
               "RemoteHost", "LastRemoteHost", "JobBatchName", "Iwd", "UserLog"]


_configured_for: str | None = None  # the CONDOR_CONFIG the imported module last read


def bindings(condor_config: str | None) -> Any:
    """``htcondor2``, configured by ``condor_config`` (set in the environment before the first import)."""
    global _configured_for
    if condor_config:
        os.environ["CONDOR_CONFIG"] = condor_config
    imported_before = "htcondor2" in sys.modules
    try:
        import htcondor2  # type: ignore[import-untyped]  # the bindings ship no type information
    except ImportError as exc:
        raise BatchError("HTCondor clusters need the htcondor bindings: pip install 'pvw-hpc[htcondor]'") from exc
    if condor_config and condor_config != _configured_for:
        if imported_before:
            htcondor2.reload_config()
        _configured_for = condor_config
    return htcondor2


def node_of(slot: str | None) -> str | None:
    """The execute host of a slot name (``slot1_1@node7`` -> ``node7``)."""
    if not slot:
        return None
    return slot.rsplit("@", 1)[-1] or None


@dataclass
class _Follow:
    """One job's event log and what it has said so far."""

    path: Path
    log: Any = None  # htcondor2.JobEventLog, opened once the schedd has created the file
    state: JobState | None = None
    native: str | None = None
    node: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    stuck: bool = False


@dataclass
class HTCondorAdapter(SchedulerTraits):
    """Submit with ``Schedd.submit``, follow event logs, reconcile with ``query``/``history``, remove with ``act``."""

    name: ClassVar[str] = "htcondor"
    scheduler: ClassVar[str] = "htcondor"
    access: ClassVar[str] = "bindings"
    template: ClassVar[str] = "htcondor.sub.j2"
    submits_description: ClassVar[bool] = True
    takes_job_user: ClassVar[bool] = True  # jobs run as the token's identity
    settings_keys: ClassVar[frozenset[str]] = settings.KEYS

    @staticmethod
    def check_settings(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> settings.HTCondorSettings:
        return settings.check(raw, path, error, warn)

    @staticmethod
    def check_clusters(clusters: Sequence[Any], error: Report) -> None:
        settings.check_clusters(clusters, error)
    condor_config: str | None = None
    schedd_name: str | None = None
    _follows: dict[JobId, _Follow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # the bindings are used from several threads

    @classmethod
    def from_cluster(cls, cluster: Any) -> HTCondorAdapter:
        return cls(condor_config=cluster.settings.condor_config, schedd_name=cluster.settings.schedd)

    @functools.cached_property
    def htcondor(self) -> Any:
        """The configured bindings, looked up once (the poller reads event types for every job, every cycle)."""
        return bindings(self.condor_config)

    def _schedd(self) -> Any:
        htcondor = self.htcondor
        if self.schedd_name is None:
            return htcondor.Schedd()
        ad = htcondor.Collector().locate(htcondor.DaemonType.Schedd, self.schedd_name)
        return htcondor.Schedd(ad)

    # -- the interface ------------------------------------------------------------------------

    def submit(self, script: JobScript) -> JobId:
        """``Schedd.submit`` the rendered submit description; the job id is ``<cluster>.0``."""
        with self._lock:
            try:
                description = self.htcondor.Submit(script.text)
                result = self._schedd().submit(description)
            except Exception as exc:  # the bindings raise HTCondorException, ValueError, RuntimeError...
                # no return code marks "the scheduler does not answer" (503s for a while): only for those
                unreachable = any(w in str(exc) for w in ("Unable to locate", "Failed to connect", "connect to"))
                raise BatchError(f"HTCondor submit failed: {exc}", returncode=None if unreachable else 1,
                                 unreachable=unreachable) from None
            job_id = JobId(f"{result.cluster()}.0")
            self._follows[job_id] = _Follow(script.workdir / EVENT_LOG)
            return job_id

    def poll(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        """Read every job's new events; ask the schedd only about jobs whose log has said nothing."""
        if not job_ids:
            return {}
        with self._lock:
            out: dict[JobId, JobInfo] = {}
            silent: list[JobId] = []
            for job_id in job_ids:
                follow = self._follows.get(job_id)
                if follow is not None:
                    try:
                        self._read(follow)
                    except Exception as exc:  # an unreadable log: the schedd is the fallback
                        follow.reason = f"event log unreadable: {exc}"
                if follow is None or follow.state is None:
                    silent.append(job_id)
                else:
                    out[job_id] = self._info(job_id, follow)
            if silent:
                out.update(self._query(silent))
            self._forget(set(self._follows) - set(job_ids))
            return out

    def _forget(self, job_ids: set[JobId]) -> None:
        """Close the event logs of jobs the poller no longer asks about (their sessions are over)."""
        for job_id in job_ids:
            follow = self._follows.pop(job_id)
            if follow.log is not None:
                follow.log.close()

    def history(self, job_ids: Collection[JobId]) -> dict[JobId, JobInfo]:
        if not job_ids:
            return {}
        with self._lock:
            try:
                found = _ad_infos(self._schedd().history(_constraint(job_ids), projection=_PROJECTION))
            except Exception as exc:
                return failed_query(job_ids, f"HTCondor history failed: {exc}")
            return {j: found.get(j) or JobInfo(j, Presence.ABSENT) for j in job_ids}

    def find_named(self, prefix: str) -> dict[JobId, JobInfo]:
        """Live jobs whose batch name (our job name) starts with ``prefix``: one ``Schedd.query``."""
        constraint = f'JobBatchName =!= undefined && substr(JobBatchName, 0, {len(prefix)}) == "{_classad_text(prefix)}"'
        with self._lock:
            try:
                return _ad_infos(self._schedd().query(constraint, projection=_PROJECTION))
            except Exception as exc:
                raise BatchError(f"HTCondor query failed: {exc}") from None

    def cancel(self, job_id: JobId, user: str | None = None) -> None:
        """``Schedd.act(Remove)``; a job that is unknown or already gone counts as removed."""
        with self._lock:
            try:
                self._schedd().act(self.htcondor.JobAction.Remove, [str(job_id)])
            except Exception as exc:
                raise BatchError(f"HTCondor remove of {job_id} failed: {exc}") from None

    # -- internals ------------------------------------------------------------------------

    def _read(self, follow: _Follow) -> None:
        """Apply the events appended since the last read (never blocks)."""
        if follow.log is None:
            try:  # the folder is job_user's: open the file we checked, not whatever the name points to later
                fd = userfiles.open_checked(follow.path)
            except OSError:
                return  # not there yet, or not a file the schedd wrote (a link, a FIFO): the queue still answers
            try:
                follow.log = self.htcondor.JobEventLog(f"/proc/self/fd/{fd}")  # the bindings open that same file
            finally:
                os.close(fd)
        types = self.htcondor.JobEventType
        for event in follow.log.events(stop_after=0):
            kind = event.type
            if kind == types.SUBMIT:
                follow.state, follow.native = follow.state or JobState.QUEUED, follow.native or "IDLE"
            elif kind == types.EXECUTE:
                follow.state, follow.native = JobState.RUNNING, "RUNNING"
                follow.node = node_of(event.get("SlotName")) or follow.node
            elif kind in (types.JOB_EVICTED, types.JOB_RELEASED):
                if follow.state not in (JobState.COMPLETED, JobState.FAILED):
                    follow.state, follow.native = JobState.QUEUED, "IDLE"
            elif kind == types.JOB_HELD:
                follow.state, follow.native, follow.stuck = JobState.FAILED, "HELD", True
                follow.reason = f"held: {event.get('HoldReason', 'no reason given')}"
            elif kind == types.JOB_TERMINATED:
                follow.stuck = False
                if event.get("TerminatedNormally", True):
                    follow.exit_code = int(event.get("ReturnValue", 0))
                    follow.state = JobState.COMPLETED if follow.exit_code == 0 else JobState.FAILED
                    follow.native = "COMPLETED"
                else:
                    signal = event.get("TerminatedBySignal")
                    follow.state, follow.native = JobState.FAILED, "COMPLETED"
                    follow.reason = f"killed by signal {signal}"
                    follow.exit_code = 128 + int(signal) if signal is not None else None
            elif kind == types.JOB_ABORTED:
                follow.stuck = False
                if follow.native != "HELD":  # a removed held job keeps its hold as the reason
                    follow.state, follow.native = JobState.COMPLETED, "REMOVED"
                    follow.reason = "removed"

    def _info(self, job_id: JobId, follow: _Follow) -> JobInfo:
        return JobInfo(job_id, Presence.FOUND, follow.state, native_state=follow.native, node=follow.node,
                       reason=follow.reason, exit_code=follow.exit_code, stuck=follow.stuck)

    def _query(self, job_ids: list[JobId]) -> dict[JobId, JobInfo]:
        """The schedd's view of jobs whose log is silent; a job found there is followed by its log from now on."""
        try:
            out = _ad_infos(self._schedd().query(_constraint(job_ids), projection=_PROJECTION))
        except Exception as exc:
            return failed_query(job_ids, f"HTCondor query failed: {exc}")
        for job_id, info in out.items():
            if job_id not in self._follows and info.workdir:
                self._follows[job_id] = _Follow(Path(str(info.workdir)) / EVENT_LOG)
        return {j: out.get(j) or JobInfo(j, Presence.ABSENT) for j in job_ids}


def _job_id(ad: Any) -> JobId:
    return JobId(f"{ad['ClusterId']}.{ad['ProcId']}")


def _value(ad: Any, key: str) -> Any:
    """An attribute of a ClassAd, None when missing or ``undefined``/``error`` (classad2.Value, an IntEnum)."""
    value = ad.get(key)
    return None if value is None or type(value).__name__ == "Value" else value


def _ad_info(ad: Any) -> JobInfo:
    native, state = _STATUS.get(int(_value(ad, "JobStatus") or 0), ("UNKNOWN", JobState.UNKNOWN))
    exit_code = _value(ad, "ExitCode")
    reason = f"held: {_value(ad, 'HoldReason')}" if native == "HELD" else ("removed" if native == "REMOVED" else None)
    if _value(ad, "ExitBySignal") is True:
        signal = _value(ad, "ExitSignal")
        exit_code = 128 + int(signal) if signal is not None else None
        reason = f"killed by signal {signal}"
        if native == "COMPLETED":
            state = JobState.FAILED
    if native == "COMPLETED" and exit_code not in (None, 0):
        state = JobState.FAILED
    host = _value(ad, "RemoteHost") or _value(ad, "LastRemoteHost")
    return JobInfo(_job_id(ad), Presence.FOUND, state, native_state=native, node=node_of(str(host) if host else None),
                   reason=reason, exit_code=int(exit_code) if exit_code is not None else None,
                   name=_value(ad, "JobBatchName"), workdir=_value(ad, "Iwd"), stuck=native == "HELD")


def _ad_infos(ads: Any) -> dict[JobId, JobInfo]:
    """Every ad as a JobInfo; raises BatchError for an ad that cannot be read (the caller's failed query)."""
    try:
        return {_job_id(ad): _ad_info(ad) for ad in ads}
    except (KeyError, TypeError, ValueError) as exc:
        raise BatchError(f"HTCondor answered an ad that cannot be read: {exc!r}") from None


def _constraint(job_ids: Collection[JobId]) -> str:
    """``ClusterId == 12 || ClusterId == 13`` for ids we issued (``<cluster>.0``); anything else matches nothing."""
    clusters = sorted({j.split(".")[0] for j in job_ids if j.split(".")[0].isdigit()})
    return " || ".join(f"ClusterId == {c}" for c in clusters) or "false"


def _classad_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
