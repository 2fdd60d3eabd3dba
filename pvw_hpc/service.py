"""The service layer: every launch, read, stop and recovery goes through here.

The REST views and the CLI only translate their input into calls on
:class:`Service` and its results back out, so the rules (validation, port
choice, states, map file) live in one place.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import AppConfig, LauncherConfig
from .errors import BadRequest, NotFound, Unavailable
from .local import LocalBackend, find_unrecorded
from .mapfile import MapWriter
from .ports import candidates
from .procs import terminate_group
from .states import SessionState
from .store import PortTaken, SessionRecord, Store
from .substitute import Rendered, render, substitute
from .validate import is_session_id

log = logging.getLogger(__name__)

WAIT_GRACE_S = 1.0  # the monitor enforces the timeout; the POST waits a little longer for its verdict


@dataclass(frozen=True)
class LaunchResult:
    """What a launch answered: HTTP status and JSON body (200 ready, 202 accepted)."""

    status: int
    body: dict[str, Any]
    session_id: str


def session_view(record: SessionRecord) -> dict[str, Any]:
    """The public JSON of a session (GET, list, DELETE): never the secret or the command."""
    view: dict[str, Any] = {
        "id": record.id,
        "application": record.application,
        "state": record.state.value,
        "transitions": record.transitions(),
        "host": record.host,
        "port": record.port,
        "sessionURL": record.session_url,
        **record.public,
    }
    if record.state == SessionState.FAILED:
        view["error"] = record.error
    if record.state in (SessionState.ENDED, SessionState.FAILED):
        view["exit_code"] = record.exit_code
    if record.end_reason:
        view["reason"] = record.end_reason
    return view


class Service:
    """Owns the store, the map writer and the backends for one config."""

    def __init__(self, config: LauncherConfig, store: Store | None = None):
        self.config = config
        self.store = store or Store(config.database_url)
        self.map = MapWriter(config.proxy_file, self.store.ready_routes)
        self.local = LocalBackend(self.store, self._on_change)
        self._events: dict[str, threading.Event] = {}
        self._events_lock = threading.Lock()

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from the last run, then start the background threads."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.recover()
        self.map.start()
        self.local.start_monitor()

    def close(self) -> None:
        self.local.stop_monitor()
        self.map.stop()
        self.store.close()

    def recover(self) -> dict[str, int]:
        """Re-attach to live sessions, end the rest, rebuild the map. Returns counts for the log."""
        counts = {"adopted": 0, "ended": 0, "failed": 0}
        watched = self.local.watched()
        for record in self.store.active(backend="local"):
            if record.id in watched:
                continue
            app = self.config.apps.get(record.application)
            ready_line = app.ready_line if app else None
            timeout_s = self.config.app_timeout_s(app) if app else self.config.timeout_s
            if record.pid is None:
                for pid in find_unrecorded(record.id):
                    terminate_group(pid, None)
                self._finish(record.id, SessionState.FAILED,
                             error="the launcher stopped before the process was recorded")
                counts["failed"] += 1
            elif self.local.adopt(record, ready_line, timeout_s):
                counts["adopted"] += 1
            elif record.state == SessionState.READY:
                self._finish(record.id, SessionState.ENDED, end_reason="the process exited while the launcher was down")
                counts["ended"] += 1
            else:
                self._finish(record.id, SessionState.FAILED,
                             error="the process exited before it was ready, while the launcher was down")
                counts["failed"] += 1
        self.map.write_now()
        return counts

    # -- the API ---------------------------------------------------------------------------

    def launch(self, payload: Any, wait: bool | None = None) -> LaunchResult:
        """Start a session for a launch request (the body of ``POST /<endpoint>``)."""
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        app = self._app(payload.get("application"))
        if wait is None:
            wait = payload.get("wait", True)
            if not isinstance(wait, bool):
                raise BadRequest("'wait' must be true or false")
        session_id = str(uuid.uuid4())
        secret = secrets.token_hex(16)
        record, rendered = self._reserve(app, payload, session_id, secret)
        timeout_s = self.config.app_timeout_s(app)
        env = {key: substitute(value, rendered.variables) for key, value in app.env.items()}
        try:
            self.local.spawn(record, argv=list(rendered.argv), env=env, cwd=app.cwd,
                             ready_line=app.ready_line, timeout_s=timeout_s)
        except OSError as exc:
            error = f"the process did not start: {exc}; session log {record.log_path}"
            self._finish(record.id, SessionState.FAILED, error=error)
            raise Unavailable(error, id=record.id, state=SessionState.FAILED.value) from exc
        if not wait:
            body = session_view(self._get(record.id))
            if record.return_secret:
                body["secret"] = record.secret  # only the creator ever sees it
            return LaunchResult(202, body, record.id)
        return self._wait_ready(record.id, timeout_s + WAIT_GRACE_S)

    def get(self, session_id: str) -> dict[str, Any]:
        return session_view(self._get(session_id))

    def list(self) -> list[dict[str, Any]]:
        return [session_view(r) for r in self.store.list()]

    def stop(self, session_id: str, reason: str = "stopped by request") -> dict[str, Any]:
        """End a session and stop its process; stopping an ended session is a no-op."""
        record = self._get(session_id)
        if not record.is_final:
            self._finish(session_id, SessionState.ENDED, end_reason=reason)
            self.map.sync()  # the route is gone before we answer, even if the process is slow to stop
            exit_code = self.local.stop(self._get(session_id))
            if exit_code is not None:
                self.store.update(session_id, exit_code=exit_code)
        return session_view(self._get(session_id))

    def flush_map(self) -> int:
        """Rewrite the map file from the database now; returns the number of routes."""
        self.map.write_now()
        return len(self.store.ready_routes())

    # -- internals -------------------------------------------------------------------------

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

    def _reserve(
        self, app: AppConfig, payload: Mapping[str, Any], session_id: str, secret: str
    ) -> tuple[SessionRecord, Rendered]:
        """Render the templates and insert the row holding a free host:port."""
        held: dict[str, set[int]] = {}
        for res in self.config.resources:
            held.setdefault(res.host, self.store.held_ports(res.host))
        for host, port in candidates(self.config.resources, held):
            rendered = render(self.config, app, payload,
                              {"id": session_id, "host": host, "port": str(port), "secret": secret})
            try:
                record = self.store.create(
                    id=session_id, application=app.name, backend="local", host=host, port=port,
                    holds_port=True, secret=secret, argv=list(rendered.argv), session_url=rendered.session_url,
                    public=self._public(payload, rendered, host, port), return_secret=rendered.secret_in_argv,
                    log_path=str(self.config.log_dir / f"{session_id}.txt"),
                )
            except PortTaken:
                continue  # another request took it between our read and our insert
            return record, rendered
        # validate the request even when full, so a bad request is told so, not "busy"
        render(self.config, app, payload, {"id": session_id, "host": "", "port": "", "secret": secret})
        raise Unavailable("All the resources are currently taken: no free port in 'resources'")

    def _public(self, payload: Mapping[str, Any], rendered: Rendered, host: str, port: int) -> dict[str, Any]:
        """The configured ``fields`` (and sessionManagerURL) as the POST and GET answer them."""
        source: dict[str, Any] = {**payload, **rendered.variables, **rendered.session_data, "host": host, "port": port}
        source.pop("secret", None)
        public = {key: source[key] for key in self.config.fields if key in source and key not in ("id", "sessionURL")}
        if "sessionManagerURL" in payload:
            public["sessionManagerURL"] = payload["sessionManagerURL"]
        return public

    def _finish(self, session_id: str, state: SessionState, **fields: Any) -> bool:
        moved = self.store.transition(session_id, state, **fields)
        if moved:
            self._on_change(session_id, state)
        return moved

    def _on_change(self, session_id: str, state: SessionState) -> None:
        if state in (SessionState.READY, SessionState.ENDED, SessionState.FAILED):
            self.map.request()
        with self._events_lock:
            event = self._events.get(session_id)
        if event is not None:
            event.set()

    def _wait_ready(self, session_id: str, timeout_s: float) -> LaunchResult:
        """Block until the session is ready (200) or failed (503)."""
        event = threading.Event()
        with self._events_lock:
            self._events[session_id] = event
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                record = self._get(session_id)
                if record.state == SessionState.READY:
                    if not self.map.sync():
                        log.error("map file not written in time for %s", session_id)
                    return LaunchResult(200, self._ready_body(record), session_id)
                if record.is_final:
                    raise Unavailable(record.error or record.end_reason or f"the session {record.state.value}",
                                      id=session_id, state=record.state.value)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    error = f"not ready before the timeout; see the session log {record.log_path}"
                    self._finish(session_id, SessionState.FAILED, error=error)
                    self.local.stop(self._get(session_id))
                    raise Unavailable(error, id=session_id, state=SessionState.FAILED.value)
                event.wait(min(remaining, 0.25))  # also re-reads: another process may move it
                event.clear()
        finally:
            with self._events_lock:
                self._events.pop(session_id, None)

    def _ready_body(self, record: SessionRecord) -> dict[str, Any]:
        """The stock success body: id, sessionURL, secret (when the app gets it), fields."""
        body: dict[str, Any] = {"id": record.id, "sessionURL": record.session_url}
        if record.return_secret:
            body["secret"] = record.secret
        body.update(record.public)
        body["state"] = record.state.value
        return body
