"""The stock launcher REST API: POST to launch; GET and DELETE by id (always on); GET to list.

Plus the batch job's callback ``POST /<endpoint>/<id>/ready``, and the cookie
that makes a client's retried POST (wslink ``launcherRetry``) wait for the same
pending job instead of submitting another one.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue

from ..auth import Identity
from ..errors import LaunchError
from . import current_service, parse_json_body
from .views import launch_body, lifetime_view, session_view

ATTACH_COOKIE = "pvw_hpc_pending"
ATTACH_MAX_AGE_S = 3600
CREATOR_COOKIE = "pvw_hpc_creator"  # an anonymous browser's proof that it created its sessions
CREATOR_MAX_AGE_S = 30 * 86400
SECRET_HEADER = "X-Session-Secret"


def identify() -> Identity:
    """The caller: a bearer token, or an anonymous browser (with its creator cookie, if any)."""
    return current_service().auth.identify(request.headers.get("Authorization"), request.cookies, CREATOR_COOKIE,
                                           request.remote_addr, request.headers.get("X-Forwarded-For"))


def set_cookies(response: Response, endpoint: str, attach: str | None, creator: str | None = None) -> Response:
    if attach:
        response.set_cookie(ATTACH_COOKIE, attach, max_age=ATTACH_MAX_AGE_S, path=f"/{endpoint}",
                            httponly=True, samesite="Lax")
    if creator and request.cookies.get(CREATOR_COOKIE) != creator:
        response.set_cookie(CREATOR_COOKIE, creator, max_age=CREATOR_MAX_AGE_S, path=f"/{endpoint}",
                            httponly=True, samesite="Lax")
    return response


def make_blueprint(endpoint: str) -> Blueprint:
    """Routes under ``/<endpoint>``, with and without the trailing slash clients vary on."""
    bp = Blueprint("launcher", __name__)
    base = f"/{endpoint}"

    @bp.post(base)
    @bp.post(f"{base}/")
    def launch() -> ResponseReturnValue:
        try:
            identity = identify()
            result = current_service().launch(parse_json_body(), attach=request.cookies.get(ATTACH_COOKIE),
                                              identity=identity)
        except LaunchError as exc:
            response = jsonify(exc.body())
            response.status_code = exc.status
            return set_cookies(response, endpoint, exc.cookie)
        response = jsonify(launch_body(result, current_service().config))
        response.status_code = result.status
        if result.status == 200 and request.cookies.get(ATTACH_COOKIE):
            response.delete_cookie(ATTACH_COOKIE, path=base)
        return set_cookies(response, endpoint, result.cookie, result.creator_key)

    @bp.get(base)
    @bp.get(f"{base}/")
    def list_sessions() -> ResponseReturnValue:
        service = current_service()
        return {"sessions": [lifetime_view(r, service.config) for r in service.list(identify())]}

    @bp.get(f"{base}/<session_id>")
    def get_session(session_id: str) -> ResponseReturnValue:
        service = current_service()
        return lifetime_view(service.get(session_id, identify(), request.headers.get(SECRET_HEADER)), service.config)

    @bp.delete(f"{base}/<session_id>")
    def delete_session(session_id: str) -> ResponseReturnValue:
        return session_view(current_service().stop(session_id, reason="stopped by DELETE", identity=identify(),
                                                   secret=request.headers.get(SECRET_HEADER)))

    @bp.post(f"{base}/<session_id>/ready")
    def job_ready(session_id: str) -> ResponseReturnValue:
        """The job side's callback; authorised by the session's own token only."""
        body = parse_json_body()
        if not isinstance(body, dict):
            body = {}
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else body.get("token")
        return session_view(current_service().mark_ready(session_id, token, body.get("host"), body.get("port"),
                                                         body.get("port_retries")))

    return bp
