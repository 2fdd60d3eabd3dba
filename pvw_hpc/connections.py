"""How many TCP connections the launcher holds, per client and in all, and for how long.

waitress serves idle and half-sent requests without a thread, but every open
connection counts against its connection limit: without bounds, a few hundred
idle sockets (no credentials needed) would stop ``/health`` and every API call
for everyone. ``configuration.connections`` bounds them:

* ``max``: connections held at once (waitress's ``connection_limit``);
* ``per_client``: connections one client address may hold; addresses in
  ``auth.trusted_proxies`` (Apache, which multiplexes many browsers) are exempt;
* ``header_timeout``: seconds a client has to send a whole request head;
* ``idle_timeout``: seconds a keep-alive connection may sit idle between requests.

A request being answered (a blocking POST that waits minutes for its job) is
never cut by these timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONNECTION_KEYS = ("max", "per_client", "header_timeout", "idle_timeout")


@dataclass(frozen=True)
class ConnectionLimits:
    """``configuration.connections``."""

    max: int = 1000
    per_client: int = 100
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0


def check_connections_config(raw: Any, error: Any, warn: Any) -> ConnectionLimits:
    """Check ``configuration.connections``; problems go to ``error(path, message)``."""
    path = "$.configuration.connections"
    if raw is None:
        return ConnectionLimits()
    if not isinstance(raw, dict):
        error(path, "must be an object {max, per_client, header_timeout, idle_timeout}")
        return ConnectionLimits()
    for key in raw:
        if key not in CONNECTION_KEYS:
            warn(f"{path}.{key}", "unknown key, ignored")
    defaults = ConnectionLimits()
    values: dict[str, Any] = {}
    for key, field_name, kind, least in (("max", "max", int, 10), ("per_client", "per_client", int, 1),
                                         ("header_timeout", "header_timeout_s", float, 1),
                                         ("idle_timeout", "idle_timeout_s", float, 1)):
        value = raw.get(key, getattr(defaults, field_name))
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value >= least
        if not ok:
            error(f"{path}.{key}", f"must be {'an integer' if kind is int else 'a number of seconds'} >= {least}")
            value = getattr(defaults, field_name)
        values[field_name] = kind(value)
    if values["per_client"] > values["max"]:
        error(f"{path}.per_client", "must not be larger than max")
    return ConnectionLimits(**values)
