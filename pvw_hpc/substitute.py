"""Turn a launch request into the values of one session: argv, sessionURL, sessionData.

Substitution is the stock one (``string.Template.safe_substitute``: ``$x``,
``${x}``, ``$$``, unknown names left literal), done in a single pass over one
merged dict, so a value inserted from one source is never expanded again.

Deliberate differences from stock, all for safety (documented in the README):

* properties and the launcher's own keys win over client keys; a client key that
  names a property is refused rather than silently swapping, say, the executable;
* a client value that reaches the command or the URLs must be a string or a
  number and pass its ``sanitize`` rule, or the safe default pattern when the
  key has no rule. A failing value is refused (400) instead of replaced.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import LAUNCHER_KEYS, AppConfig, LauncherConfig
from .errors import BadRequest
from .validate import CONTROL_CHARS_RE, SAFE_CLIENT_VALUE_RE

# keys the JS clients send that are never template variables
CLIENT_CONTROL_KEYS = frozenset({"application", "wait", "sessionManagerURL", "user", "walltime"})


@dataclass(frozen=True)
class Rendered:
    """The substituted values of a session, before it starts."""

    argv: tuple[str, ...]
    session_url: str
    session_data: dict[str, str]
    variables: dict[str, str]
    secret_in_argv: bool


def referenced_names(templates: Iterable[str]) -> set[str]:
    """Every ``$name`` / ``${name}`` used in ``templates`` (``$$`` is not a reference)."""
    names: set[str] = set()
    for template in templates:
        for match in string.Template.pattern.finditer(template):
            name = match.group("named") or match.group("braced")
            if name:
                names.add(name)
    return names


def substitute(template: str, variables: Mapping[str, str]) -> str:
    return string.Template(template).safe_substitute(variables)


def client_variables(config: LauncherConfig, app: AppConfig, payload: Mapping[str, Any]) -> dict[str, str]:
    """Check the client's keys that reach a template and return them as strings.

    Keys no template uses are left alone (trame sends every page-URL parameter),
    except that a key naming a property is always refused: it is an attempt, or
    a mistake, that would change what the admin configured.
    """
    templates = [*app.cmd, config.session_url, *config.session_data.values(), *app.env.values()]
    used = referenced_names(templates)
    out: dict[str, str] = {}
    for key, value in payload.items():
        if key in config.properties:
            raise BadRequest(f"key {key!r} is a launcher property and cannot be set by the client")
        if key in LAUNCHER_KEYS or key in CLIENT_CONTROL_KEYS or key not in used:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadRequest(f"value of {key!r} must be a string or a number")
        text = str(value)
        if CONTROL_CHARS_RE.search(text):  # no rule may let a newline split a line of a script
            raise BadRequest(f"value of {key!r} contains a control character (newline, tab, ...)")
        rule = config.sanitize.get(key)
        if rule is not None:
            if not rule.accepts(text):
                raise BadRequest(f"value of {key!r} is not allowed by its sanitize rule ({rule.kind})")
        elif not SAFE_CLIENT_VALUE_RE.match(text):
            raise BadRequest(
                f"value of {key!r} may only hold letters, digits and _.,:@+=/- (not starting with '-', "
                "no '..' path segment); "
                "add a sanitize rule to allow more"
            )
        out[key] = text
    return out


def render(
    config: LauncherConfig,
    app: AppConfig,
    payload: Mapping[str, Any],
    launcher_values: Mapping[str, str],
) -> Rendered:
    """Substitute one session's templates. ``launcher_values`` holds id, host, port, secret."""
    variables = {
        **client_variables(config, app, payload),
        **config.properties,
        "application": app.name,
        **launcher_values,
    }
    argv = tuple(substitute(part, variables) for part in app.cmd)
    session_url = substitute(config.session_url, variables)
    session_data = {key: substitute(t, variables) for key, t in config.session_data.items()}
    secret = launcher_values.get("secret")
    return Rendered(
        argv=argv,
        session_url=session_url,
        session_data=session_data,
        variables=variables,
        secret_in_argv=secret is not None and bool(secret) and any(secret in part for part in argv),
    )
