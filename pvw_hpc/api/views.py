"""How a session is shown: the JSON bodies of launch, GET, list and DELETE.

The service answers with records; this module alone decides what of a record a
caller sees, so the rule "never the secret or the command, except the secret to
the session's creator when the app gets it" is written once, for the REST API and
the CLI's in-process client alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .. import jobs
from ..config import LauncherConfig
from ..service import LaunchResult
from ..states import SessionState
from ..store import SessionRecord


def session_url(record: SessionRecord) -> str:
    """The sessionURL; for a batch session host and port are only known once it is ready."""
    url = record.session_url
    if record.host and record.port:
        url = url.replace(jobs.SENTINELS["host"], record.host).replace(jobs.SENTINELS["port"], str(record.port))
    return url


def session_view(record: SessionRecord) -> dict[str, Any]:
    """The public JSON of a session (GET, list, DELETE): never the secret or the command."""
    view: dict[str, Any] = {
        **record.public,  # first: a configured field can never shadow what the launcher reports
        "id": record.id,
        "application": record.application,
        "state": record.state.value,
        "transitions": record.transitions(),
        "host": record.host,
        "port": record.port,
        "sessionURL": session_url(record),
    }
    if record.job_dir is not None:  # a batch job (its folder is made with the row): the scheduler's view too
        view["cluster"] = record.backend
        view["job_id"] = record.job_id
        view["scheduler_state"] = record.native_state
        view["scheduler_reason"] = record.scheduler_reason
        view["start_estimate"] = record.start_estimate.isoformat() if record.start_estimate else None
    if record.state == SessionState.FAILED:
        view["error"] = record.error
    if record.state in (SessionState.ENDED, SessionState.FAILED):
        view["exit_code"] = record.exit_code
    if record.end_reason:
        view["reason"] = record.end_reason
    if record.port_retries:  # the app was started again because its port was taken first
        view["port_retries"] = record.port_retries
    return view


def lifetime_view(record: SessionRecord, config: LauncherConfig) -> dict[str, Any]:
    """The session's JSON plus its lifetime limits (when it will be stopped): GET and list."""
    body = session_view(record)
    app = config.apps.get(record.application)
    if app is not None and not record.is_final:
        if app.max_age_s and record.starting_at:
            body["expires_at"] = (record.starting_at + dt.timedelta(seconds=app.max_age_s)).isoformat()
        if app.idle_timeout_s:
            body["idle_timeout_s"] = app.idle_timeout_s
    return body


def creator_view(record: SessionRecord) -> dict[str, Any]:
    """What the creator of a session sees at once (202): the session plus the secret when the app gets it."""
    body = session_view(record)
    if record.return_secret:
        body["secret"] = record.secret
    return body


def ready_body(record: SessionRecord, config: LauncherConfig) -> dict[str, Any]:
    """The stock success body: id, sessionURL, secret (when the app gets it), fields."""
    body: dict[str, Any] = {"id": record.id, "sessionURL": session_url(record)}
    if record.return_secret:
        body["secret"] = record.secret
    body.update(record.public)
    for key in ("host", "port"):
        if key in config.fields:
            body[key] = getattr(record, key)
    body["state"] = record.state.value
    return body


def launch_body(result: LaunchResult, config: LauncherConfig) -> dict[str, Any]:
    """A launch's answer: the stock body when ready (200), the creator's view when accepted (202)."""
    return ready_body(result.record, config) if result.status == 200 else creator_view(result.record)
