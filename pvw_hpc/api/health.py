"""``GET /health`` for monitors and load balancers."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from .. import __version__

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> ResponseReturnValue:
    from . import current_service

    return {"status": "ok", "version": __version__, "active_sessions": current_service().store.count_active()}
