"""The stock launcher REST API: POST to launch; GET and DELETE by id (always on); GET to list.

Plus the batch job's callback ``POST /<endpoint>/<id>/ready``, and the cookie
that makes a client's retried POST (wslink ``launcherRetry``) wait for the same
pending job instead of submitting another one.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue

from ..errors import LaunchError
from . import current_service, parse_json_body

ATTACH_COOKIE = "pvw_hpc_pending"
ATTACH_MAX_AGE_S = 3600


def set_attach_cookie(response: Response, endpoint: str, value: str | None) -> Response:
    if value:
        response.set_cookie(ATTACH_COOKIE, value, max_age=ATTACH_MAX_AGE_S, path=f"/{endpoint}",
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
            result = current_service().launch(parse_json_body(), attach=request.cookies.get(ATTACH_COOKIE))
        except LaunchError as exc:
            response = jsonify(exc.body())
            response.status_code = exc.status
            return set_attach_cookie(response, endpoint, exc.cookie)
        response = jsonify(result.body)
        response.status_code = result.status
        if result.status == 200 and request.cookies.get(ATTACH_COOKIE):
            response.delete_cookie(ATTACH_COOKIE, path=base)
        return set_attach_cookie(response, endpoint, result.cookie)

    @bp.get(base)
    @bp.get(f"{base}/")
    def list_sessions() -> ResponseReturnValue:
        return {"sessions": current_service().list()}

    @bp.get(f"{base}/<session_id>")
    def get_session(session_id: str) -> ResponseReturnValue:
        return current_service().get(session_id)

    @bp.delete(f"{base}/<session_id>")
    def delete_session(session_id: str) -> ResponseReturnValue:
        return current_service().stop(session_id, reason="stopped by DELETE")

    @bp.post(f"{base}/<session_id>/ready")
    def job_ready(session_id: str) -> ResponseReturnValue:
        """The job side's callback; authorised by the session's own token only."""
        body = parse_json_body()
        if not isinstance(body, dict):
            body = {}
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else body.get("token")
        return current_service().mark_ready(session_id, token, body.get("host"), body.get("port"))

    return bp
