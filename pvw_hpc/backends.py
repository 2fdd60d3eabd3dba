"""Where sessions run, behind one interface: this machine, or a batch cluster.

The service holds one :class:`Backend` per place (``local`` and every entry of
``clusters``) and never asks which kind it has: a launch goes to the app's
backend, a stop to the session's, and at start every backend recovers what the
last run left behind. State changes go through the service's
:class:`~pvw_hpc.lifecycle.Lifecycle` only.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import jobs, limits
from .batch.base import BatchAdapter, BatchError, JobId
from .batch.runner import CommandFailed
from .clusters import LOCAL_BACKEND, ClusterConfig
from .config import AppConfig
from .errors import BadRequest, Unavailable
from .local import Relaunch, find_unrecorded, with_display
from .policy import sha256
from .ports import candidates
from .procs import terminate_group
from .states import SessionState
from .store import PortTaken, SessionRecord
from .substitute import Rendered, render, substitute
from .validate import is_session_id

if TYPE_CHECKING:
    from .policy import Requester
    from .service import Service

log = logging.getLogger(__name__)

WAIT_GRACE_S = 1.0  # the local monitor enforces the timeout; the POST waits a little longer for its verdict


@dataclass(frozen=True)
class Started:
    """A session a backend has started: how long a POST waits for it, and a batch job's re-attach cookie."""

    session_id: str
    wait_s: float
    cookie: str | None = None  # lets a retried POST wait for the same pending job


class Backend(Protocol):
    """What the service needs from a place where sessions run."""

    name: str
    sees_clients: bool  # the launcher can see the app's client connections itself (idle sessions)

    def launch(self, app: AppConfig, payload: Mapping[str, Any], requester: Requester) -> Started:
        """Record the session (limits checked in the same transaction) and start it; raises LaunchError."""

    def stop(self, record: SessionRecord) -> None:
        """Stop what a session that just reached a final state still runs (its process or job)."""

    def recover(self) -> dict[str, int]:
        """At start, before anything is served: adopt, end or fail what the last run left. Counts for the log."""

    def start(self) -> None:
        """Start this backend's own threads, if it has any."""

    def close(self) -> None:
        """Stop them."""


def public_fields(service: Service, payload: Mapping[str, Any], rendered: Rendered) -> dict[str, Any]:
    """The configured ``fields`` (and sessionManagerURL) known at launch; host and port are added later."""
    source: dict[str, Any] = {**payload, **rendered.variables, **rendered.session_data}
    skip = {"id", "sessionURL", "secret", "secret_file", "host", "port"}
    public = {key: source[key] for key in service.config.fields if key in source and key not in skip}
    if "sessionManagerURL" in payload:
        public["sessionManagerURL"] = payload["sessionManagerURL"]
    return public


class LocalSessions:
    """Sessions as child processes of this machine (ports from ``resources``), watched by the local monitor."""

    name = LOCAL_BACKEND
    sees_clients = True  # the launcher can read this machine's TCP table (idle sessions)

    def __init__(self, service: Service):
        self.service = service
        self.monitor = service.local

    def launch(self, app: AppConfig, payload: Mapping[str, Any], requester: Requester) -> Started:
        service = self.service
        session_id, secret = str(uuid.uuid4()), secrets.token_hex(16)
        record, rendered = self._reserve(app, payload, session_id, secret, requester)
        timeout_s = service.config.app_timeout_s(app)
        env = {key: substitute(value, rendered.variables) for key, value in app.env.items()}
        try:
            self.monitor.spawn(record, argv=with_display(app.display, list(rendered.argv)), env=env, cwd=app.cwd,
                               ready_line=app.ready_line, timeout_s=timeout_s,
                               relaunch=functools.partial(self._relaunch, app, payload, secret, requester))
        except OSError as exc:
            error = f"the process did not start: {exc}; session log {record.log_path}"
            service.life.move(record.id, SessionState.FAILED, error=error)
            raise Unavailable(error, id=record.id, state=SessionState.FAILED.value) from exc
        return Started(record.id, timeout_s + WAIT_GRACE_S)

    def _reserve(self, app: AppConfig, payload: Mapping[str, Any], session_id: str, secret: str,
                 requester: Requester) -> tuple[SessionRecord, Rendered]:
        """Render the templates and insert the row holding a free host:port."""
        config, store = self.service.config, self.service.store
        held: dict[str, set[int]] = {}
        for res in config.resources:
            held.setdefault(res.host, store.held_ports(res.host))
        for host, port in candidates(config.resources, held):
            rendered = render(config, app, payload, {"id": session_id, "host": host, "port": str(port),
                                                     "secret": secret, "user": requester.user})
            try:
                record = store.create(
                    guard=requester.guard(config, app.name, 1, None),
                    owner=requester.owner, creator=requester.creator, creator_hash=requester.creator_hash, cores=1,
                    id=session_id, application=app.name, backend=self.name, host=host, port=port,
                    holds_port=True, secret=secret, argv=list(rendered.argv), session_url=rendered.session_url,
                    public=public_fields(self.service, payload, rendered), return_secret=rendered.secret_in_argv,
                    log_path=str(config.log_dir / f"{session_id}.txt"),
                )
            except PortTaken:
                continue  # another request took it between our read and our insert
            return record, rendered
        # validate the request even when full, so a bad request is told so, not "busy"
        render(config, app, payload, {"id": session_id, "host": "", "port": "", "secret": secret,
                                      "user": requester.user})
        raise Unavailable("All the resources are currently taken: no free port in 'resources'")

    def _relaunch(self, app: AppConfig, payload: Mapping[str, Any], secret: str, requester: Requester,
                  session_id: str, tried: list[int], attempt: int) -> Relaunch | None:
        """Another free port of ``resources`` for a session whose port was taken: the row moves to it first.

        Its templates are rendered again for the new port (argv, sessionURL, fields), and the
        retry is kept on the session (``port_retries``) before the app starts again.
        """
        config, store = self.service.config, self.service.store
        held = {res.host: store.held_ports(res.host) for res in config.resources}
        for host, port in candidates(config.resources, held):
            if port in tried:
                continue
            rendered = render(config, app, payload, {"id": session_id, "host": host, "port": str(port),
                                                     "secret": secret, "user": requester.user})
            try:
                store.move_port(session_id, host, port, argv=list(rendered.argv), session_url=rendered.session_url,
                                public=public_fields(self.service, payload, rendered))
            except PortTaken:
                continue
            self.service.note_port_retries(session_id, [{"try": attempt, "port": tried[-1], "next_port": port,
                                                         "at": time.time()}])
            env = {key: substitute(value, rendered.variables) for key, value in app.env.items()}
            return Relaunch(host, port, with_display(app.display, list(rendered.argv)), env, app.cwd)
        return None

    def stop(self, record: SessionRecord) -> None:
        exit_code = self.monitor.stop(record)
        if exit_code is not None:
            self.service.store.update(record.id, exit_code=exit_code)

    def recover(self) -> dict[str, int]:
        """Re-attach to live processes by pid and start time; end or fail the rest."""
        service, move = self.service, self.service.life.move
        counts = {"adopted": 0, "ended": 0, "failed": 0}
        watched = self.monitor.watched()
        for record in service.store.active(backend=self.name):
            if record.id in watched:
                continue
            app = service.config.apps.get(record.application)
            ready_line = app.ready_line if app else None
            timeout_s = service.config.app_timeout_s(app) if app else service.config.timeout_s
            if record.pid is None:
                for pid in find_unrecorded(record.id):
                    terminate_group(pid, None)
                move(record.id, SessionState.FAILED, sync_map=False,
                     error="the launcher stopped before the process was recorded")
                counts["failed"] += 1
            elif self.monitor.adopt(record, ready_line, timeout_s):
                counts["adopted"] += 1
            elif record.state == SessionState.READY:
                move(record.id, SessionState.ENDED, sync_map=False,
                     end_reason="the process exited while the launcher was down")
                counts["ended"] += 1
            else:
                move(record.id, SessionState.FAILED, sync_map=False,
                     error="the process exited before it was ready, while the launcher was down")
                counts["failed"] += 1
        return counts

    def start(self) -> None:
        self.monitor.start_monitor()

    def close(self) -> None:
        self.monitor.stop_monitor()


class ClusterSessions:
    """Sessions as batch jobs of one cluster: job files, submit, cancel; the poller follows them."""

    sees_clients = False  # only the job side on the node sees the app's connections

    def __init__(self, service: Service, cluster: ClusterConfig):
        self.service = service
        self.cluster = cluster
        self.name = cluster.name

    @property
    def adapter(self) -> BatchAdapter:
        """The cluster's scheduler adapter, as the service holds it (one place: the poller uses the same)."""
        return self.service.adapters[self.name]

    def launch(self, app: AppConfig, payload: Mapping[str, Any], requester: Requester) -> Started:
        """Write the job files, record the session, then submit: the row exists before the job."""
        service, cluster = self.service, self.cluster
        down = service.unreachable.get(cluster.name)
        if down is not None:  # answer at once instead of letting sbatch hang on a dead controller
            raise Unavailable(f"the scheduler of cluster {cluster.name!r} is not answering ({down}); "
                              "running sessions are kept; try again later")
        session_id = str(uuid.uuid4())
        secret, token, attach = secrets.token_hex(16), secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        rendered = render(service.config, app, payload, {"id": session_id, "user": requester.user, **jobs.SENTINELS})
        env = {key: substitute(value, rendered.variables) for key, value in app.env.items()}
        resources = jobs.merged_resources(cluster, dict(app.resources))
        walltime = payload.get("walltime")
        if walltime is not None:  # a portal may ask for a shorter or longer session, within max_walltime
            if limits.walltime_seconds(walltime) is None:
                raise BadRequest("'walltime' must be minutes or [D-]HH:MM:SS")
            resources["time"] = walltime
        cores = (resources.get("cpus") or 1) * (resources.get("nodes") or 1)
        walltime_s = limits.walltime_seconds(resources["time"]) if resources.get("time") else None
        script, _template = jobs.render_script(cluster, session_id, resources)
        body = jobs.render_body(cluster, session_id, resources)
        files = jobs.job_files(cluster, session_id)
        service.store.create(
            guard=requester.guard(service.config, app.name, cores, walltime_s),
            id=session_id, application=app.name, backend=cluster.name, holds_port=False, secret=secret,
            argv=list(rendered.argv), session_url=rendered.session_url,
            public=public_fields(service, payload, rendered), return_secret=self._app_gets_secret(app),
            log_path=str(files.log), job_dir=str(files.dir), token_hash=sha256(token), attach_hash=sha256(attach),
            owner=requester.owner, creator=requester.creator, creator_hash=requester.creator_hash, cores=cores,
        )
        try:
            job_script = jobs.write_job_files(
                cluster, session_id, script=script, argv=list(rendered.argv), env=env, ready_line=app.ready_line,
                port=app.port, cwd=app.cwd, secret=secret, token=token,
                callback_url=service.listening_url if cluster.callback_url == "auto" else cluster.callback_url,
                # run as the user (or the cluster's job account): the files are theirs
                owner=requester.user if cluster.submit_prefix else cluster.job_user,
                idle_timeout_s=app.idle_timeout_s, body=body, display=app.display,
            )
            job_id = self.adapter.submit(job_script)
        except (OSError, BatchError, CommandFailed) as exc:
            if isinstance(exc, BatchError) and exc.unreachable:  # the adapter's verdict, not a string match
                service.unreachable[cluster.name] = str(exc)[:300]
                service.wake_poller()  # the poller clears the mark once the scheduler answers again
            error = f"could not submit the job to cluster {cluster.name!r}: {exc}"
            service.life.move(session_id, SessionState.FAILED, current=SessionState.SUBMITTED, error=error)
            raise Unavailable(error, id=session_id, state=SessionState.FAILED.value) from exc
        service.store.update(session_id, job_id=job_id)
        service.life.move(session_id, SessionState.QUEUED, current=SessionState.SUBMITTED)
        service.wake_poller()
        return Started(session_id, service.config.app_timeout_s(app), cookie=f"{session_id}.{attach}")

    def _app_gets_secret(self, app: AppConfig) -> bool:
        return any(jobs.SENTINELS["secret"] in part or jobs.SENTINELS["secret_file"] in part
                   for part in render(self.service.config, app, {}, {"id": "x", **jobs.SENTINELS}).argv)

    def stop(self, record: SessionRecord) -> None:
        """Cancel the session's job; a failure is recorded, the session stays ended."""
        if not record.job_id:
            return
        try:
            # who the job runs as is known from the launch (no stat of the user's folder, which may hang)
            owner = record.owner if self.cluster.submit_prefix else None
            if owner:  # a job submitted as the user is cancelled as the user, through the same prefix
                self.adapter.cancel(JobId(record.job_id), user=owner)
            else:
                self.adapter.cancel(JobId(record.job_id))
        except (BatchError, CommandFailed) as exc:
            log.error("could not cancel job %s of session %s: %s", record.job_id, record.id, exc)
            self.service.store.update(record.id, error=f"cancelling job {record.job_id} failed: {exc}")

    def recover(self) -> dict[str, int]:
        """Make this cluster's live ``pvw-<id>`` jobs and our sessions agree, before anything is served."""
        return self.reconcile(startup=True)

    def reconcile(self, startup: bool = False) -> dict[str, int]:
        """Jobs by name against sessions (at start, and every minute from the poller).

        The session row is written before its job is submitted and the job name
        carries the session id, so: a job whose session never got its job id is
        adopted; a job whose session is over, or that has no session at all but
        lives in our job folder, is cancelled; and at ``startup`` (before any
        request is served) a session still waiting for a job id with no job
        behind it failed before its submit went through.
        """
        counts = {"adopted": 0, "cancelled": 0, "failed": 0}
        store, move = self.service.store, self.service.life.move
        try:
            found = self.adapter.find_named(jobs.job_name(""))
        except (BatchError, NotImplementedError) as exc:
            log.warning("cluster %s: cannot list jobs by name to reconcile: %s", self.name, exc)
            return counts
        prefix = len(jobs.job_name(""))
        named = {info.name[prefix:]: info for info in found.values() if info.name}
        for session_id, info in named.items():
            if not is_session_id(session_id):
                continue
            record = store.get(session_id)
            ours = info.workdir is not None and Path(info.workdir) == self.cluster.job_dir / session_id
            if record is None or record.backend != self.name:
                if ours:  # submitted by a launcher that died before committing anything else
                    self.cancel(info.job_id, f"job {info.job_id} has no session")
                    counts["cancelled"] += 1
            elif record.is_final:
                self.cancel(info.job_id, f"job {info.job_id} outlived its session {session_id}")
                counts["cancelled"] += 1
            elif record.job_id is None:
                store.update(session_id, job_id=info.job_id)
                move(session_id, SessionState.QUEUED, current=record.state)
                log.info("adopted job %s of session %s", info.job_id, session_id)
                counts["adopted"] += 1
        for job in store.tracked(self.name) if startup else []:
            if job.job_id is None and job.state == SessionState.SUBMITTED and job.id not in named:
                if move(job.id, SessionState.FAILED, current=job.state,
                        error="the launcher stopped before the job was submitted; nothing is running"):
                    counts["failed"] += 1
        return counts

    def cancel(self, job_id: JobId, why: str) -> None:
        """Cancel a job that no session wants (the poller's stuck jobs, reconcile's orphans)."""
        log.warning("%s: cancelling it", why)
        try:
            self.adapter.cancel(job_id)
        except BatchError as exc:
            log.error("cancelling job %s failed: %s", job_id, exc)

    def start(self) -> None:
        """The poller follows every cluster's jobs; a cluster has no thread of its own."""

    def close(self) -> None:
        """Let the adapter release what it holds (the pyslurm worker process); jobs keep running."""
        self.adapter.close()
