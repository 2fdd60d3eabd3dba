"""``GET /<endpoint>/<id>`` without Flask: the one request browsers and portals repeat all the time.

Why: a page polls its session, a portal lists its users' sessions, a load
balancer checks health; at 50 concurrent clients on a 2-core machine the
Flask request/response machinery was most of the cost of a session read
(waitress alone answers a trivial app ~10x faster). This WSGI wrapper answers
exactly that request itself - the same service call (``Service.get``: same
authorisation, same map-file wait, same JSON) and the same error bodies - and
hands every other request to the Flask app unchanged. Anything it does not
recognise (another method, a query string, a path that is not a session id)
goes to Flask, so the routes and their errors stay defined in one place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from werkzeug.http import parse_cookie

from ..errors import LaunchError
from ..service import Service
from ..validate import is_session_id
from . import internal_error_body
from .launcher import CREATOR_COOKIE
from .views import lifetime_view

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class FastSessionGet:
    """WSGI middleware: answers ``GET /<endpoint>/<session id>`` through :meth:`Service.get`, passes the rest on."""

    def __init__(self, app: WSGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.prefix = f"/{service.config.endpoint}/"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith(self.prefix) or environ.get("QUERY_STRING"):
            return self.app(environ, start_response)
        session_id = path[len(self.prefix):]
        if not is_session_id(session_id):
            return self.app(environ, start_response)
        try:
            identity = self.service.auth.identify(environ.get("HTTP_AUTHORIZATION"), _cookies(environ), CREATOR_COOKIE,
                                                  environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"))
            record = self.service.get(session_id, identity, environ.get("HTTP_X_SESSION_SECRET"))
            status, body = 200, lifetime_view(record, self.service.config)
        except LaunchError as exc:
            status, body = exc.status, exc.body()
        except Exception as exc:  # as the Flask app's last error handler answers
            log.exception("unexpected error on GET %s", path)
            status, body = 500, internal_error_body(exc)
        data = json.dumps(body, separators=(",", ":")).encode() + b"\n"  # as Flask's jsonify writes it
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def _cookies(environ: dict[str, Any]) -> Mapping[str, str]:
    """The request's cookies exactly as Flask's route sees them (werkzeug's parser: one odd cookie of
    another site on the domain does not hide the creator cookie)."""
    return parse_cookie(environ)
