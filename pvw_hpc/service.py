"""The service layer: every launch, read, stop and recovery goes through here.

The REST views and the CLI only translate their input into calls on
:class:`Service` and its results back out, so the rules (validation, port
choice, states, map file) live in one place.
"""

from __future__ import annotations

import builtins
import hmac
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import jobs, limits, port_retries
from .auth import LOCAL_ADMIN, Authenticator, Identity
from .backends import Backend, ClusterSessions, LocalSessions
from .batch import make_adapter
from .batch.base import BatchAdapter, JobId, Presence
from .clusters import LOCAL_BACKEND
from .config import AppConfig, LauncherConfig
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from .lifecycle import Lifecycle
from .local import LocalBackend
from .mapfile import MapWriter
from .policy import AccessPolicy, sha256
from .routes import RoutePolicy
from .states import SessionState
from .store import SessionRecord, Store, utcnow
from .validate import is_session_id, is_valid_host, is_valid_port

log = logging.getLogger(__name__)

NODE_ASK_EVERY_S = 2.0  # a callback for a job whose node the poller has not seen asks the scheduler at most this often


@dataclass(frozen=True)
class LaunchResult:
    """What a launch answered: 200 ready or 202 accepted, and the session as it was then.

    The API layer (``api/views.py``) turns it into the response body.
    """

    status: int
    record: SessionRecord
    session_id: str
    cookie: str | None = None  # lets a retried POST re-attach to this pending batch session
    creator_key: str | None = None  # anonymous: the creator cookie to set (proves ownership later)


class Service:
    """Owns the store, the map writer and the backends for one config."""

    def __init__(self, config: LauncherConfig, store: Store | None = None,
                 adapters: Mapping[str, BatchAdapter] | None = None):
        """``adapters``: a cluster's adapter to use instead of the registered one (tests' scripted scheduler)."""
        self.config = config
        self.store = store or Store(config.database_url, pool_size=config.threads + 4)
        self.map = MapWriter(config.proxy_file, self.store.ready_routes)
        self.life = Lifecycle(self.store, self.map)  # every state change goes through it
        self.life.stop_backend = self._stop_backend
        self.life.on_moved = self._moved
        self.local = LocalBackend(self.store, self.life.move)  # the local processes' monitor
        given = adapters or {}
        self.adapters: dict[str, BatchAdapter] = {name: given[name] if name in given else make_adapter(c)
                                                  for name, c in config.clusters.items()}
        # where sessions run, one backend per place; the service never asks which kind it holds
        self.backends: dict[str, Backend] = {LOCAL_BACKEND: LocalSessions(self)}
        self.backends.update({name: ClusterSessions(self, cluster) for name, cluster in config.clusters.items()})
        self.auth = Authenticator(config.auth)
        self.policy = AccessPolicy(config)  # who may launch for whom, see and stop what
        self.unreachable: dict[str, str] = {}  # cluster -> why its scheduler is not answering (set by the poller)
        self.routes = {name: RoutePolicy(c) for name, c in config.clusters.items()}
        self.nodes: dict[str, str] = {}  # session id -> the node its job runs on, as the poller last saw it
        self._refused: dict[str, dict[str, str]] = {}  # session id -> refused route -> why (logged once)
        self._node_asked: dict[str, float] = {}  # session id -> when a callback last made us ask the scheduler

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from the last run, then start the background threads."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log.info("recovered from the last run: %s", self.recover())
        self.map.start()
        for backend in self.backends.values():
            backend.start()

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.map.stop()
        self.store.close()

    def recover(self) -> dict[str, dict[str, int]]:
        """Every backend adopts, ends or fails what the last run left; then the map is rebuilt once."""
        counts = {name: backend.recover() for name, backend in self.backends.items()}
        self.map.write_now()
        return counts

    # -- the API ---------------------------------------------------------------------------

    def launch(self, payload: Any, wait: bool | None = None, attach: str | None = None,
               identity: Identity = LOCAL_ADMIN) -> LaunchResult:
        """Start a session for a launch request (the body of ``POST /<endpoint>``).

        ``attach`` is the cookie a 503 "still queued" answer set: a retried POST
        with it waits for the same pending session instead of submitting again.
        """
        requester = self.policy.requester(identity, payload)
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        app = self._app(payload.get("application"))
        self.policy.check_account(requester, app)
        if wait is None:
            wait = payload.get("wait", True)
            if not isinstance(wait, bool):
                raise BadRequest("'wait' must be true or false")
        pending = self._attached(attach, app)
        if pending is not None:
            return self._wait_ready(pending.id, self.config.app_timeout_s(app), attach_cookie=attach)
        started = self.backends[app.cluster or LOCAL_BACKEND].launch(app, payload, requester)
        if not wait:
            return LaunchResult(202, self._get(started.session_id), started.session_id, started.cookie,
                                requester.creator_key)
        return self._wait_ready(started.session_id, started.wait_s, attach_cookie=started.cookie,
                                creator_key=requester.creator_key)

    def render_job(self, application: str, payload: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """The exact script a launch of ``application`` would submit, and its template file (dry run)."""
        app = self._app(application)
        if app.cluster is None:
            raise BadRequest(f"application {application!r} runs locally (no 'cluster'): there is no job script")
        cluster = self.config.clusters[app.cluster]
        session_id, resources = "00000000-0000-4000-8000-000000000000", jobs.merged_resources(cluster, dict(app.resources))
        text, template = jobs.render_script(cluster, session_id, resources)
        body = jobs.render_body(cluster, session_id, resources)
        if body is not None:  # a submit description: show the script it runs too
            text += f"\n# ---- {jobs.job_files(cluster, session_id).body} ----\n{body}"
        return text, template

    def mark_ready(self, session_id: str, token: str | None, host: Any, port: Any,
                   retries: Any = None) -> SessionRecord:
        """The job's callback: only the holder of this session's token may set its host:port.

        ``retries``: the job side's starts on other ports before this one (kept as reported, if valid).
        """
        record = self._get(session_id)
        if not isinstance(token, str) or not token.isascii():
            token = None  # only the job side's own (ASCII) token can match
        if record.token_hash is None or not token or not hmac.compare_digest(record.token_hash, sha256(token)):
            raise Forbidden("this token does not belong to this session")
        if not is_valid_host(host) or not is_valid_port(port):
            raise BadRequest("'host' must be a host name or IP address and 'port' an integer 1..65535")
        if record.state == SessionState.READY and (record.host, record.port) == (host, port):
            return record  # a retried callback: this route was checked when it was accepted
        refused = self.route_refusal(record.backend, self._node_of(record), host, port)
        if refused:
            self.refuse_route(session_id, f"callback {host}:{port}", refused)
            raise Forbidden(f"route {host}:{port} refused: {refused}")
        if retries:
            self.note_port_retries(session_id, retries)
        # from submitted or queued (it ran and got ready between polls) starting is filled in
        if not self.life.move(session_id, SessionState.READY, current=record.state, host=host, port=port):
            raise Conflict(f"session {session_id} is {self._get(session_id).state.value}; it cannot become ready")
        return self._get(session_id)

    def note_port_retries(self, session_id: str, reported: Any) -> None:
        """Keep the retries on other ports a job side reported (callback or marker lines); see :mod:`port_retries`."""
        record = self.store.get(session_id)
        if record is None or record.is_final:
            return
        new = port_retries.checked(reported, record.submitted_at or utcnow(), utcnow())
        kept = port_retries.merged(record.port_retries, new)
        if kept != (record.port_retries or []):
            self.store.update(session_id, port_retries=kept)
            for entry in new:
                log.info("session %s: port %s was taken; the app was started again on %s (try %s)",
                         session_id, entry["port"], entry["next_port"], entry["try"])

    def cluster_backend(self, name: str) -> ClusterSessions:
        """The backend of cluster ``name`` (the poller follows, reconciles and cancels its jobs through it)."""
        backend = self.backends[name]
        assert isinstance(backend, ClusterSessions)
        return backend

    def route_refusal(self, cluster: str, node: str | None, host: str, port: int) -> str | None:
        """Why a job's claimed ``host:port`` may not be routed to, or None (see :mod:`routes`)."""
        policy = self.routes.get(cluster)
        if policy is None:
            return f"cluster {cluster!r} is not configured"
        if policy.launcher_port is None and self.listening_url:
            policy.launcher_port = urlsplit(self.listening_url).port
        return policy.refusal(node, host, port)

    def static_route_refusal(self, cluster: str, host: str, port: int) -> str | None:
        """The rules of :meth:`route_refusal` that need no name lookup (the probe rechecks stored routes with them)."""
        policy = self.routes.get(cluster)
        return policy.static_refusal(host, port) if policy is not None else None

    def refuse_route(self, session_id: str, what: str, why: str) -> None:
        """A refused route changes nothing; it is logged once per session and route (it may be an attack).

        The last refusal is kept for the session's "still starting" answer: a genuine job
        whose address the rules do not know (a multi-homed node) should not just time out.
        """
        logged = self._refused.setdefault(session_id, {})
        if what not in logged and len(logged) < 20:
            log.warning("session %s: refused the %s: %s", session_id, what, why)
        logged[what] = why

    def _node_of(self, record: SessionRecord) -> str | None:
        """The node a session's job runs on: as the poller last saw it, else asked of the scheduler now."""
        node = self.nodes.get(record.id)
        adapter = self.adapters.get(record.backend)
        if node is not None or adapter is None or not record.job_id:
            return node
        now = time.monotonic()
        if now - self._node_asked.get(record.id, float("-inf")) < NODE_ASK_EVERY_S:
            # the token's holder may call back in a loop: one scheduler query per session this often
            raise Unavailable("the scheduler was just asked where this job runs; retry in a moment")
        self._node_asked[record.id] = now
        info = adapter.poll([JobId(record.job_id)]).get(JobId(record.job_id))
        if info is None or info.presence == Presence.QUERY_FAILED:
            raise Unavailable("the scheduler cannot say where this job runs right now; retry")
        if info.node:
            self.nodes[record.id] = info.node
        return info.node

    def get(self, session_id: str, identity: Identity = LOCAL_ADMIN, secret: str | None = None) -> SessionRecord:
        if self.map.pending():  # the map agrees with the state we answer: a route for "ready", none after it
            self.map.wait_pending()
        record = self._get(session_id)
        self.policy.authorize(record, identity, secret, stop=False)
        return record

    def list(self, identity: Identity = LOCAL_ADMIN) -> list[SessionRecord]:
        """Every session for admins and readers; a launcher token or a browser sees its own."""
        records = self.store.list()
        if not identity.has("read"):
            records = [r for r in records if self.policy.owns(r, identity)]
        return records

    def stop(self, session_id: str, reason: str = "stopped by request", identity: Identity = LOCAL_ADMIN,
             secret: str | None = None) -> SessionRecord:
        """End a session and stop its process or job; stopping an ended session is a no-op."""
        record = self._get(session_id)
        self.policy.authorize(record, identity, secret, stop=True)
        if not record.is_final:  # the route is gone before the process or job is stopped
            self.life.move(session_id, SessionState.ENDED, current=record.state, stop=True, end_reason=reason)
        return self._get(session_id)

    def _stop_backend(self, session_id: str) -> None:
        """Stop what a session that just reached a final state still runs: its process or its batch job."""
        record = self.store.get(session_id)
        backend = self.backends.get(record.backend) if record is not None else None
        if record is not None and backend is not None:  # a cluster removed from the config has no backend
            backend.stop(record)

    def lose(self, session_id: str, error: str) -> bool:
        """The launcher gave up on a live batch session (its app stopped answering): fail it, cancel its job.

        The route goes first, so no browser is sent to an app we consider gone;
        the job is cancelled so that an app that is only cut off (a node whose
        link is down) does not hold its node once it is back.
        """
        return self.life.move(session_id, SessionState.FAILED, stop=True, error=error)

    def usage(self, user: str | None = None) -> builtins.list[dict[str, Any]]:
        """Per user: live sessions and core-hours used in the limits' window (``pvw-hpc usage``)."""
        window = self.config.limits.window_hours
        records = self.store.list()  # one read; active counts and owners both come from it
        owners = sorted({r.owner for r in records if r.owner and (user is None or r.owner == user)})
        if user is not None and user not in owners:
            owners = [user]
        active = Counter(r.owner for r in records if not r.is_final)
        report = []
        with self.store.engine.connect() as conn:
            for owner in owners:
                used, _ = limits.core_hours_used(conn, owner, window)
                report.append({
                    "user": owner, "active_sessions": active[owner], "core_hours": round(used, 4),
                    "window_hours": window, "budget_core_hours": self.config.limits.compute_hours,
                    "max_sessions": self.config.limits.max_sessions_per_user,
                })
        return report

    def flush_map(self) -> int:
        """Rewrite the map file from the database now; returns the number of routes."""
        self.map.write_now()
        return len(self.store.ready_routes())

    # -- internals -------------------------------------------------------------------------

    def _attached(self, cookie: str | None, app: AppConfig) -> SessionRecord | None:
        """The pending session a retried POST's cookie names, if it is still worth waiting for."""
        if not cookie or "." not in cookie:
            return None
        session_id, _, attach = cookie.partition(".")
        record = self.store.get(session_id) if is_session_id(session_id) else None
        if record is None or record.attach_hash is None or record.is_final or record.application != app.name:
            return None
        return record if hmac.compare_digest(record.attach_hash, sha256(attach)) else None

    def wake_poller(self) -> None:
        """Hook for the poller (set by ``pvw-hpc serve``) to look at new jobs at once."""
        if self.poller_wake is not None:
            self.poller_wake()

    poller_wake: Any = None
    listening_url: str | None = None  # the endpoint URL `serve` bound; what callback_url "auto" means

    def _app(self, name: Any) -> AppConfig:
        if name is None:
            raise BadRequest("The request is not complete: 'application' is missing")
        if not isinstance(name, str) or name not in self.config.apps:
            known = ", ".join(sorted(self.config.apps))
            raise BadRequest(f"unknown application {name!r}; this launcher has: {known}")
        return self.config.apps[name]

    def _get(self, session_id: str) -> SessionRecord:
        record = self.store.get(session_id) if is_session_id(session_id) else None
        if record is None:
            raise NotFound(f"No session with id: {session_id}")
        return record

    def _moved(self, session_id: str, state: SessionState) -> None:
        """After every move: forget what was kept about an ended session's job."""
        if state in (SessionState.ENDED, SessionState.FAILED):
            self.nodes.pop(session_id, None)
            self._refused.pop(session_id, None)
            self._node_asked.pop(session_id, None)

    def _wait_ready(self, session_id: str, timeout_s: float, attach_cookie: str | None = None,
                    creator_key: str | None = None) -> LaunchResult:
        """Block until the session is ready (200) or failed (503).

        A local session not ready in time is failed (stock behaviour). A batch
        session is not: it is still queued or starting, so the 503 says so and
        carries a cookie that lets the client's retry wait for the same job.
        """
        deadline = time.monotonic() + timeout_s
        with self.life.waiting(session_id) as event:
            while True:
                record = self._get(session_id)
                if record.state == SessionState.READY:
                    if not self.map.sync():
                        log.error("map file not written in time for %s", session_id)
                    return LaunchResult(200, record, session_id, creator_key=creator_key)
                if record.is_final:
                    raise Unavailable(record.error or record.end_reason or f"the session {record.state.value}",
                                      id=session_id, state=record.state.value)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if attach_cookie is not None:
                        raise Unavailable(self._pending_message(record), cookie=attach_cookie,
                                          id=session_id, state=record.state.value)
                    error = f"not ready before the timeout; see the session log {record.log_path}"
                    self.life.move(session_id, SessionState.FAILED, current=record.state, stop=True, error=error)
                    raise Unavailable(error, id=session_id, state=SessionState.FAILED.value)
                event.wait(min(remaining, 0.25))  # also re-reads: another process may move it
                event.clear()

    def _pending_message(self, record: SessionRecord) -> str:
        if record.state == SessionState.STARTING:
            refused = self._refused.get(record.id)
            if refused:
                what, why = list(refused.items())[-1]
                return (f"the job {record.job_id} is running, but its {what} was refused: {why} (an admin may need "
                        "the node's network in the cluster's node_networks); retry to wait more")
            return f"the job {record.job_id} is running; the app is starting (not ready yet); retry to wait more"
        why = f" ({record.scheduler_reason})" if record.scheduler_reason else ""
        when = f", expected to start {record.start_estimate.isoformat()}" if record.start_estimate else ""
        return f"the job {record.job_id} is still queued{why}{when}; retry to wait more"
