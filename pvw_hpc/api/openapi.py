"""``GET /openapi.json``: an OpenAPI 3.1 document of this launcher's REST API.

The document is built from the running config, not written by hand, because the
parts a client most needs to know differ per launcher: the endpoint name, the
application names it may launch, and which client keys reach a command (and the
rule each value must pass). A hand-written file would drift from the config the
moment an admin adds an app; this one cannot.

Schemas describe what the server really answers (the property-based fuzzer in
``tests/test_openapi_fuzz.py`` checks every answer against them), so they are
deliberately open where the server is: a session carries the admin's ``fields``
as extra keys, and an error body may grow keys (``id``, ``state``, limits).

OpenAPI 3.1 rather than 3.0 because the request needs full JSON Schema:
``const`` per application, ``propertyNames`` to say that a client key may not
name a launcher property, and ``null`` in type lists for batch sessions whose
host and port are not known yet.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from .. import __version__
from ..config import LAUNCHER_KEYS, AppConfig, LauncherConfig, SanitizeRule
from ..states import ACTIVE_STATES, SessionState
from ..substitute import CLIENT_CONTROL_KEYS, referenced_names
from ..validate import USER_NAME_RE
from . import launcher

bp = Blueprint("openapi", __name__)

JSON = "application/json"
# validate.SESSION_ID_RE in ECMA-262 syntax (JSON Schema patterns): any other id is a 404
SESSION_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
# validate.SAFE_CLIENT_VALUE_RE in ECMA-262 syntax ('\Z' -> '$'; the classes are ASCII already)
SAFE_VALUE_PATTERN = r"^(?!(?:.*/)?\.\.(?:/|$))(?:[A-Za-z0-9_.,:@+=/][A-Za-z0-9_.,:@+=/-]{0,1023})?$"
# validate.CONTROL_CHARS_RE: refused in every value that reaches a template, whatever its rule
CONTROL_CHARS_PATTERN = "[\\u0000-\\u001f\\u007f]"
# the one user-name rule (validate.USER_NAME_RE) in ECMA-262 syntax, for portals launching on a user's behalf
USER_PATTERN = USER_NAME_RE.pattern.replace("\\Z", "$")
STATES = [s.value for s in SessionState]
# how an anonymous browser proves it created a session (names owned by api/launcher.py)
CREATOR_COOKIE: str = getattr(launcher, "CREATOR_COOKIE", "pvw_hpc_creator")
SECRET_HEADER: str = getattr(launcher, "SECRET_HEADER", "X-Session-Secret")
ATTACH_COOKIE: str = getattr(launcher, "ATTACH_COOKIE", "pvw_hpc_pending")


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    """Serve the document for the config this process runs (rebuilt per request: it is cheap)."""
    from . import current_service

    return build_document(current_service().config)


def build_document(config: LauncherConfig) -> dict[str, Any]:
    """The whole OpenAPI document for ``config``: paths, schemas, security schemes."""
    base = f"/{config.endpoint}"
    launch = _launch_operation(config)
    listing = _list_operation()
    paths: dict[str, Any] = {
        base: {"post": {**launch, "operationId": "launchSession"}, "get": {**listing, "operationId": "listSessions"}},
        f"{base}/": {
            "post": {**launch, "operationId": "launchSessionSlash",
                     "summary": launch["summary"] + " (trailing slash: the JavaScript clients vary)"},
            "get": {**listing, "operationId": "listSessionsSlash"},
        },
        f"{base}/{{id}}": {
            "parameters": [_id_parameter()],
            "get": _session_operation("getSession", "Read one session", "The session."),
            "delete": _session_operation(
                "stopSession", "Stop a session",
                "The session, now `ended` (its process is stopped or its batch job cancelled). "
                "Stopping a session that is already over changes nothing and answers it as it is.",
            ),
        },
        f"{base}/{{id}}/ready": {"parameters": [_id_parameter()], "post": _ready_operation()},
        "/health": {"get": _health_operation()},
        "/openapi.json": {"get": _openapi_operation()},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pvw-hpc launcher",
            "version": __version__,
            "description": (
                "The stock ParaViewWeb/wslink launcher REST API, plus pvw-hpc's additions (`wait: false`, "
                "the job callback, `/health`). Request bodies are parsed as JSON whatever the Content-Type "
                "(browsers send `text/plain;charset=UTF-8`), UTF-8 only, at most 1 MiB. Every answer, "
                "errors included, is JSON."
            ),
            "license": {"name": "BSD-3-Clause", "identifier": "BSD-3-Clause"},
        },
        "servers": [{"url": "/", "description": "this launcher"}],
        "paths": paths,
        "components": {"schemas": _schemas(config), "securitySchemes": _security_schemes()},
    }


# -- operations ------------------------------------------------------------------------------------


def _launch_operation(config: LauncherConfig) -> dict[str, Any]:
    anonymous = bool(getattr(getattr(config, "auth", None), "anonymous", True))
    security: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    if anonymous:
        security.insert(0, {})  # the stock browser flow carries no credentials
    return {
        "summary": "Launch a session",
        "description": (
            "Starts a session of `application`. By default the answer waits until the app is ready (200) "
            "or has failed (503); with `\"wait\": false` it answers 202 at once and the client polls "
            "`GET /{endpoint}/{id}`. An anonymous launch's answer sets the `" + CREATOR_COOKIE + "` cookie, "
            "with which that browser later reads, lists and stops its sessions. A 503 for a batch job that is "
            "still queued sets the `" + ATTACH_COOKIE + "` cookie, with which a retried POST waits for the same "
            "job instead of submitting another. "
            + ("Anonymous launches are allowed by this launcher; a bearer token is optional. "
               if anonymous else "This launcher requires a bearer token to launch. ")
        ),
        "security": security,
        "requestBody": {
            "required": True,
            "description": "A JSON object (sent as `application/json` or, by browsers, as `text/plain`).",
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/LaunchRequest"}}},
        },
        "responses": {
            "200": {
                "description": "The session is ready: connect to `sessionURL` (with `secret` as the wslink key).",
                "content": _json_ref("ReadySession"),
                "links": _session_links(),
            },
            "202": {
                "description": "Accepted (`wait: false`): the session as it is now, plus `secret` when the app gets one.",
                "content": _json_ref("CreatedSession"),
                "links": _session_links(),
            },
            "400": _error("The body is not a JSON object (or not UTF-8, or nested too deeply); `application` is "
                          "missing or unknown; `wait` is not a boolean; a value fails its sanitize rule or the "
                          "safe pattern; a client key names a launcher property; a token's `user` is not a user "
                          "name; `walltime` is not a time."),
            "401": _error("A bearer token was sent but matches no token, or the launcher requires one."),
            "403": _error("The token may not launch (or not for this `user`)."),
            "413": _error("The body is larger than 1 MiB."),
            "429": _error("A per-user limit (sessions, walltime, compute hours) is reached; the error names it."),
            "503": _error("No free port; the program did not start; the app exited or was not ready in time "
                          "(the error names the session log; `id` and `state` say which session failed); a batch "
                          "job is still queued or starting; the scheduler is not answering. The wslink client "
                          "retries when `launcherRetry` is set."),
        },
    }


def _list_operation() -> dict[str, Any]:
    return {
        "summary": "List sessions",
        "description": "Every session this caller may read, active and over, oldest launch first: all of them "
                       "for admin and read tokens, its own for a launch token or an anonymous browser (none "
                       "without the creator cookie).",
        "security": [{}, {"bearerAuth": []}, {"creatorCookie": []}],
        "responses": {
            "200": {"description": "The sessions.", "content": _json_ref("SessionList")},
            "401": _error("The bearer token matches no token."),
        },
    }


def _session_operation(operation_id: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": "Allowed for admin tokens, read tokens (reading only), the token that launched it, and "
                       f"an anonymous caller with the creator cookie or the session's secret (`{SECRET_HEADER}`).",
        "security": [{"bearerAuth": []}, {"creatorCookie": []}, {"sessionSecret": []}],
        "responses": {
            "200": {"description": description, "content": _json_ref("Session")},
            "401": _error("Anonymous, without the creator cookie or the session's secret; or the bearer token "
                          "matches no token."),
            "403": _error("The token may not see (or stop) this session."),
            "404": _error("No session with this id (ids are lower-case UUID 4; anything else is unknown)."),
        },
    }


def _ready_operation() -> dict[str, Any]:
    return {
        "operationId": "jobReady",
        "summary": "Job callback: the batch job's app is listening",
        "description": (
            "Called by the job script on the compute node, with the session's own callback token (in "
            "`Authorization: Bearer`, or as `token` in the body). Sets the session's host and port and "
            "makes it ready; repeating the same call is harmless."
        ),
        "security": [{"jobToken": []}],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/ReadyCallback"}}},
        },
        "responses": {
            "200": {"description": "The session, now ready.", "content": _json_ref("Session")},
            "400": _error("The body is not JSON, or `host` is not a host name or IP address, or `port` is not "
                          "an integer 1..65535."),
            "403": _error("The token is missing or is not this session's."),
            "404": _error("No session with this id."),
            "409": _error("The session is over (or otherwise cannot become ready)."),
            "413": _error("The body is larger than 1 MiB."),
        },
    }


def _health_operation() -> dict[str, Any]:
    return {
        "operationId": "health",
        "summary": "Liveness and session counts, for monitors and load balancers",
        "security": [],
        "responses": {"200": {"description": "The launcher answers.", "content": _json_ref("Health")}},
    }


def _openapi_operation() -> dict[str, Any]:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "security": [],
        "responses": {
            "200": {"description": "The OpenAPI 3.1 document of this launcher.",
                    "content": {JSON: {"schema": {"type": "object", "required": ["openapi", "paths"]}}}},
        },
    }


def _id_parameter() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The session id the launch answered.",
        "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
    }


def _session_links() -> dict[str, Any]:
    """OpenAPI links: the id a launch answers is what the per-session operations take."""
    return {
        name: {"operationId": op, "parameters": {"id": "$response.body#/id"}}
        for name, op in (("GetSession", "getSession"), ("StopSession", "stopSession"))
    }


def _json_ref(name: str) -> dict[str, Any]:
    return {JSON: {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_ref("Error")}


def _security_schemes() -> dict[str, Any]:
    return {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token issued to a portal or an admin (`configuration.auth`); only its SHA-256 is "
                           "kept by the launcher. Optional for launches when anonymous launches are allowed.",
        },
        "creatorCookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": CREATOR_COOKIE,
            "description": "Set on an anonymous launch's answer: proves that this browser created the session.",
        },
        "sessionSecret": {
            "type": "apiKey",
            "in": "header",
            "name": SECRET_HEADER,
            "description": "The session's secret (from the launch answer): proves the caller created it.",
        },
        "jobToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The per-session token the launcher writes into the batch job's files; it only "
                           "authorises that session's ready callback.",
        },
    }


# -- schemas ---------------------------------------------------------------------------------------


def _schemas(config: LauncherConfig) -> dict[str, Any]:
    nullable_str: dict[str, Any] = {"type": ["string", "null"]}
    session: dict[str, Any] = {
        "type": "object",
        "description": "A session as GET, the list and DELETE show it: never the secret or the command. "
                       "The config's `fields` are extra keys; batch sessions add the cluster keys.",
        "required": ["id", "application", "state", "transitions", "host", "port", "sessionURL"],
        "properties": {
            "id": {"type": "string", "pattern": SESSION_ID_PATTERN},
            "application": {"type": "string"},
            "state": {"$ref": "#/components/schemas/State"},
            "transitions": {
                "type": "object",
                "description": "state -> when it was reached (ISO 8601, UTC), in life-cycle order",
                "propertyNames": {"enum": STATES},
                "additionalProperties": {"type": "string", "format": "date-time"},
            },
            "host": {**nullable_str, "description": "null until a batch job reports where it runs"},
            "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
            "sessionURL": {"type": "string"},
            "sessionManagerURL": {"description": "echoed as the launch request sent it"},
            "error": {**nullable_str, "description": "why it failed (failed sessions only)"},
            "exit_code": {"type": ["integer", "null"], "description": "the app's exit code (sessions that are over)"},
            "reason": {"type": "string", "description": "why it ended"},
            "cluster": {"type": "string"},
            "job_id": nullable_str,
            "scheduler_state": nullable_str,
            "scheduler_reason": nullable_str,
            "start_estimate": {"type": ["string", "null"], "format": "date-time"},
            "port_retries": {
                "type": "array", "maxItems": 4,
                "description": "present when the app was started again because its port was taken before it "
                               "could bind it: each retry's try number, the taken port, the next one, when",
                "items": {"type": "object", "required": ["try", "port", "next_port", "at"], "properties": {
                    "try": {"type": "integer", "minimum": 2}, "port": {"type": "integer"},
                    "next_port": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}}},
            },
        },
        "additionalProperties": True,
    }
    return {
        "State": {"type": "string", "enum": STATES},
        "Error": {
            "type": "object",
            "description": "Every error answer. `id` and `state` are set when a session was created and failed.",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "minLength": 1},
                "id": {"type": "string", "pattern": SESSION_ID_PATTERN},
                "state": {"$ref": "#/components/schemas/State"},
            },
            "additionalProperties": True,
        },
        "LaunchRequest": _launch_request(config),
        "Session": session,
        "CreatedSession": {
            "description": "The session plus `secret` (when the app's command uses it): what its creator sees.",
            "allOf": [{"$ref": "#/components/schemas/Session"},
                      {"type": "object", "properties": {"secret": {"type": "string"}}}],
        },
        "ReadySession": {
            "type": "object",
            "description": "The stock launcher's success answer: id, sessionURL, secret (when the app gets one), "
                           "sessionManagerURL (when sent), the config's `fields`, and the state.",
            "required": ["id", "sessionURL", "state"],
            "properties": {
                "id": {"type": "string", "pattern": SESSION_ID_PATTERN},
                "sessionURL": {"type": "string"},
                "secret": {"type": "string"},
                "sessionManagerURL": {"description": "echoed as the launch request sent it"},
                "host": nullable_str,
                "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
                "state": {"type": "string", "enum": [SessionState.READY.value]},
            },
            "additionalProperties": True,
        },
        "SessionList": {
            "type": "object",
            "required": ["sessions"],
            "properties": {"sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}},
            "additionalProperties": False,
        },
        "ReadyCallback": {
            "type": "object",
            "required": ["host", "port"],
            "properties": {
                "host": {"type": "string", "minLength": 1, "maxLength": 253,
                         "description": "a DNS name or an IPv4/IPv6 literal (it goes into the map file)"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "token": {"type": "string", "description": "the job token, when it is not in the Authorization header"},
                "port_retries": {
                    "type": "array", "description": "the job side's retries on other ports before this one "
                                                    "(entries that are not valid are ignored)",
                    "items": {"type": "object", "properties": {
                        "try": {"type": "integer"}, "port": {"type": "integer"}, "next_port": {"type": "integer"},
                        "at": {"type": "number", "description": "Unix time on the node"}}},
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "version", "active_sessions"],
            "properties": {
                "status": {"const": "ok"},
                "version": {"type": "string"},
                "active_sessions": {
                    "type": "object",
                    "description": "active state -> number of sessions in it",
                    "propertyNames": {"enum": sorted(s.value for s in ACTIVE_STATES)},
                    "additionalProperties": {"type": "integer", "minimum": 1},
                },
            },
        },
    }


def _launch_request(config: LauncherConfig) -> dict[str, Any]:
    """The POST body: one variant per application, naming the client keys its templates use.

    Only keys that reach a template are checked by the server (trame sends every
    page-URL parameter, so unknown keys are ignored whatever their value), and
    which keys those are depends on the application: hence ``oneOf`` on
    ``application``, each variant open to extra keys.
    """
    names = sorted(config.apps)
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["application"],
        "properties": {
            "application": {"type": "string", "enum": names, "description": "one of this launcher's apps"},
            "wait": {"type": "boolean", "default": True,
                     "description": "false: answer 202 at once instead of waiting until the app is ready"},
            # not typed: only a token's launch checks it (an anonymous one ignores it), and a schema stricter
            # than the server would make negative fuzzing report accepted "invalid" requests
            "user": {"description": "a token's launch: the user it is for (per-user limits, run-as-user), a "
                                    f"lower-case name matching {USER_PATTERN}; ignored for anonymous launches"},
            "walltime": {"description": "batch apps: minutes or [D-]HH:MM:SS, within the configured maximum "
                                        "(ignored by local apps)"},
            "sessionManagerURL": {"description": "sent by the JavaScript clients; echoed in the answer"},
        },
        "additionalProperties": True,
        "oneOf": [_app_variant(config, config.apps[name]) for name in names],
    }
    if config.properties:
        schema["propertyNames"] = {
            "not": {"enum": sorted(config.properties)},
            "description": "a key naming a launcher property is refused (it would change what the admin set)",
        }
    return schema


def _app_variant(config: LauncherConfig, app: AppConfig) -> dict[str, Any]:
    templates = [*app.cmd, config.session_url, *config.session_data.values(), *app.env.values()]
    keys = referenced_names(templates) - LAUNCHER_KEYS - CLIENT_CONTROL_KEYS - set(config.properties)
    return {
        "title": app.name,
        "type": "object",
        "properties": {
            "application": {"const": app.name},
            **{key: _client_value(config.sanitize.get(key)) for key in sorted(keys)},
        },
    }


def _client_value(rule: SanitizeRule | None) -> dict[str, Any]:
    """What the server accepts for a key that reaches a template (``substitute.client_variables``).

    Numbers are turned into their decimal text and checked like strings, so
    which numbers pass depends on the rule: exact for the default rule and for
    ``inList``, approximated by "any number" for an admin's ``regexp``.
    """
    no_control = {"not": {"pattern": CONTROL_CHARS_PATTERN}}
    if rule is None:
        return {
            "description": "no sanitize rule: letters, digits and _.,:@+=/- only, not starting with '-', "
                           "no '..' segment, at most 1024 characters; or a number >= 0",
            "anyOf": [{"type": "string", "pattern": SAFE_VALUE_PATTERN, "maxLength": 1024},
                      {"type": "number", "minimum": 0}],
        }
    if rule.kind == "inList":
        allowed: list[Any] = []
        for value in rule.allowed:
            for candidate in (value, str(value)):
                if candidate not in allowed and not isinstance(candidate, bool):
                    allowed.append(candidate)
        return {"description": "sanitize rule inList", "enum": allowed}
    assert rule.pattern is not None
    return {
        "description": "sanitize rule regexp (Python syntax, matched at the start); numbers are checked as their "
                       "decimal text",
        "anyOf": [{"type": "string", "pattern": f"^(?:{rule.pattern.pattern})", **no_control}, {"type": "number"}],
    }
