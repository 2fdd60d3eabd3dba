"""The Flask app factory: the stock launcher routes plus health, all answering JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask, current_app, redirect, request, send_from_directory
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from ..config import LauncherConfig
from ..errors import LaunchError
from ..service import Service

MAX_BODY_BYTES = 1 << 20  # stock (aiohttp) default: 1 MiB


def create_app(config: LauncherConfig | None = None, *, service: Service | None = None) -> Flask:
    """Build the WSGI app. The caller owns the service's threads (``Service.start``)."""
    if service is None:
        if config is None:
            raise ValueError("create_app needs a config or a service")
        service = Service(config)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the stock key order
    app.extensions["pvw_hpc"] = service

    from . import health, launcher, openapi

    app.register_blueprint(health.bp)
    app.register_blueprint(launcher.make_blueprint(service.config.endpoint))
    app.register_blueprint(openapi.bp)  # after the stock routes: they win if the endpoint is named 'openapi.json'
    _register_content(app, service.config)
    _register_errors(app)
    return app


def current_service() -> Service:
    return current_app.extensions["pvw_hpc"]  # type: ignore[no-any-return]


def _register_content(app: Flask, config: LauncherConfig) -> None:
    """Stock ``content``: serve a static folder at ``/`` (the launcher as a mini front end)."""
    if not config.content:
        return
    root = Path(config.content).resolve()

    @app.get("/")
    def index() -> ResponseReturnValue:
        query = request.query_string.decode()
        return redirect("index.html" + (f"?{query}" if query else ""))

    @app.get("/<path:filename>")
    def content(filename: str) -> ResponseReturnValue:
        return send_from_directory(root, filename)


def _register_errors(app: Flask) -> None:
    @app.errorhandler(LaunchError)
    def launch_error(exc: LaunchError) -> ResponseReturnValue:
        return exc.body(), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        messages: dict[int, str] = {
            404: f"not found: {request.path}",
            405: f"method {request.method} not allowed on {request.path}",
            413: f"request body larger than {MAX_BODY_BYTES} bytes",
        }
        status = exc.code or 500
        allow = {k: v for k, v in exc.get_headers() if k == "Allow"}  # 405 keeps its Allow header
        return {"error": messages.get(status, exc.description or exc.name)}, status, allow

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        app.logger.exception("unexpected error on %s %s", request.method, request.path)
        return internal_error_body(exc), 500


def internal_error_body(exc: Exception) -> dict[str, str]:
    """What a 500 says: the kind of error, never its text (which may hold paths or secrets)."""
    return {"error": f"internal error ({type(exc).__name__}); see the launcher log"}


def parse_json_body() -> Any:
    """The body as JSON whatever the Content-Type (browsers send text/plain)."""
    from ..errors import BadRequest

    raw = request.get_data(cache=False)
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object with 'application'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits, NaN, Infinity, 1e999
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value
