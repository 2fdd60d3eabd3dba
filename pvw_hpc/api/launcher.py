"""The stock launcher REST API: POST to launch; GET and DELETE by id (always on); GET to list."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from . import current_service, parse_json_body


def make_blueprint(endpoint: str) -> Blueprint:
    """Routes under ``/<endpoint>``, with and without the trailing slash clients vary on."""
    bp = Blueprint("launcher", __name__)
    base = f"/{endpoint}"

    @bp.post(base)
    @bp.post(f"{base}/")
    def launch() -> ResponseReturnValue:
        result = current_service().launch(parse_json_body())
        return result.body, result.status

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

    return bp
