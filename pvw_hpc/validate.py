"""Validators for values that end up in the map file, a command line or a path.

Everything that reaches Apache's ``RewriteMap`` file or a child's argv passes
through one of these, so the rules live in one place and tests can aim an
injection corpus at them.
"""

from __future__ import annotations

import ipaddress
import re

# uuid4 text form: lowercase, survives trame's lower-casing of sessionURL
SESSION_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?\Z")

# Default rule for client values that reach a command and have no sanitize rule:
# path- and number-like text, no whitespace, no shell or map-file metacharacters,
# no leading '-' (a value cannot turn into an option of the app) and no '..'
# path segment. \Z, not $: '$' would also accept a trailing newline.
SAFE_CLIENT_VALUE_RE = re.compile(
    r"^(?!(?:.*/)?\.\.(?:/|\Z))(?:[A-Za-z0-9_.,:@+=/][A-Za-z0-9_.,:@+=/-]{0,1023})?\Z", re.ASCII
)
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")

# User names, one rule for authentication, the OpenAPI document and run-as-user: POSIX portable
# login names (letters, digits, '_', '.', '-'; sudo -u accepts '.'), lower case, at most 32 (the
# useradd limit), never starting with '-' or '.' (an option, a path, a sudo uid such as '#0')
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z", re.ASCII)
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z", re.ASCII)
APP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", re.ASCII)
ENDPOINT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", re.ASCII)


def is_session_id(value: object) -> bool:
    """True for ids this launcher issues (lower-case uuid4)."""
    return isinstance(value, str) and SESSION_ID_RE.match(value) is not None


def is_valid_host(value: object) -> bool:
    """True for a DNS name or an IPv4/IPv6 literal: nothing that could break a map line."""
    if not isinstance(value, str) or not value or len(value) > 253 or "%" in value:
        return False  # '%': an IPv6 scope id would let anything after it into the map line
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return _HOSTNAME_RE.match(value) is not None


def is_valid_port(value: object) -> bool:
    """True for an int TCP port 1..65535 (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def host_port(host: str, port: int) -> str:
    """``host:port`` as Apache's ``ws://`` URL expects it (IPv6 in brackets)."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_user_name(value: object) -> bool:
    """True for a user name that :data:`USER_NAME_RE` allows (every layer checks with this one rule)."""
    return isinstance(value, str) and USER_NAME_RE.match(value) is not None
