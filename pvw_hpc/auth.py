"""Who is asking: bearer tokens for portals and admins, or an anonymous browser.

Tokens are never stored: the config (or a token file) holds their SHA-256, and
a presented token is hashed and compared against every entry with
``hmac.compare_digest``, so neither the comparison nor the lookup leaks timing.
Tokens are never logged. Roles:

* ``launch``: start sessions for the user the request names (``"user"`` in the
  body); read and stop the sessions this token started;
* ``read``: read every session;
* ``admin``: read, list and stop every session; implies the other two.

Anonymous requests (the stock browser flow, which has no credentials) may
launch only when the config allows it, and may then read or stop only the
sessions they created: proven by the creator cookie set on the launch answer
or by the session's own secret.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accounts import AccountRule, check_users_config
from .errors import Forbidden, Unauthorized
from .validate import USER_NAME_RE

__all__ = ["Forbidden", "Unauthorized"]

log = logging.getLogger(__name__)

ROLES = ("launch", "read", "admin")
USER_RE = USER_NAME_RE  # one rule for every layer (validate.USER_NAME_RE)
ANONYMOUS_USER = "anonymous"
RESERVED_TOKEN_NAMES = frozenset({ANONYMOUS_USER, "local-admin"})  # names the launcher gives callers itself
_USER_PATTERN_RE = re.compile(r"^[a-z0-9_.*?\[\]-]{1,64}\Z")


def hash_token(token: str) -> str:
    return hashlib.sha256(as_bytes(token)).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_secret(given: str, expected: str) -> bool:
    """Compare a presented secret with the real one as bytes, in constant time.

    Header values reach us as text decoded byte by byte (latin-1): a non-ASCII
    value must be a mismatch (401), never a TypeError (500).
    """
    return hmac.compare_digest(as_bytes(given), as_bytes(expected))


def as_bytes(text: str) -> bytes:
    """Any text as bytes, never an error (lone surrogates included): for hashing and comparing credentials."""
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    roles: frozenset[str]
    # the users a launch with this token may name (exact names or fnmatch patterns such as "lab-*");
    # None: only the token's own name, so a portal's token cannot spend another user's quota by accident
    users: tuple[str, ...] | None = None

    def may_name(self, user: str) -> bool:
        if self.users is None:
            return user == self.name
        return any(fnmatch.fnmatchcase(user, pattern) for pattern in self.users)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AuthConfig:
    """``configuration.auth``; absent means anonymous launches allowed and no tokens (stock behaviour).

    ``trusted_proxies``: addresses or networks of the front end (Apache). Only
    their ``X-Forwarded-For`` is believed, and only they may hold more than
    ``connections.per_client`` connections.
    """

    anonymous: bool = True
    tokens: tuple[TokenEntry, ...] = ()
    token_file: Path | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    users: AccountRule = field(default_factory=AccountRule)

    def is_trusted_proxy(self, address: str | None) -> bool:
        """True when ``address`` (a peer's IP text) lies in ``trusted_proxies``."""
        if not address or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the peer, or behind a trusted proxy the last X-Forwarded-For hop it added.

        Hops are read from the right, skipping trusted proxies, so a client cannot
        name its own address by sending an X-Forwarded-For of its own.
        """
        if not self.is_trusted_proxy(peer) or not forwarded_for:
            return peer
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            if not hop:
                continue
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a hop we cannot read: count the proxy, not a guess
            if not self.is_trusted_proxy(hop):
                return hop
        return peer


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    name: str  # token name, or "anonymous"
    roles: frozenset[str] = field(default_factory=frozenset)
    creator_key: str | None = None  # anonymous: the browser's creator cookie, if it sent one
    address: str | None = None  # the client's address (behind a trusted proxy: from X-Forwarded-For)
    token: TokenEntry | None = None  # the token entry it presented, if any

    @property
    def anonymous(self) -> bool:
        return not self.roles

    def has(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles


LOCAL_ADMIN = Identity("local-admin", frozenset({"admin"}))  # the in-process CLI: it has the database anyway


def parse_entries(raw: Any, path: str, error: Any) -> list[TokenEntry]:
    """Check a list of ``{"name", "sha256", "roles"}``; problems go to ``error(path, message)``."""
    if not isinstance(raw, list):
        error(path, "must be a list of {name, sha256, roles}")
        return []
    entries = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            error(where, "must be an object {name, sha256, roles}")
            continue
        name, digest, roles = item.get("name"), item.get("sha256"), item.get("roles")
        if not isinstance(name, str) or not USER_RE.match(name):
            error(f"{where}.name", "must be a short lower-case name")
            continue
        if name in RESERVED_TOKEN_NAMES:
            error(f"{where}.name", f"{name!r} is reserved (the launcher's name for callers without a token)")
            continue
        users = item.get("users")
        if users is not None and (not isinstance(users, list) or not users
                                  or not all(isinstance(u, str) and _USER_PATTERN_RE.match(u) for u in users)):
            error(f"{where}.users", "must be a non-empty list of user names or patterns such as \"lab-*\" or \"*\"")
            continue
        if not isinstance(digest, str) or not re.match(r"^[0-9a-f]{64}\Z", digest):
            error(f"{where}.sha256", "must be the hex SHA-256 of the token (pvw-hpc new-token prints it)")
            continue
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            error(f"{where}.roles", f"must be a non-empty list of {', '.join(ROLES)}")
            continue
        entries.append(TokenEntry(name, digest, frozenset(roles), tuple(users) if users is not None else None))
    return entries


def check_auth(raw: Any, error: Any) -> AuthConfig:
    if raw is None:
        return AuthConfig()
    if not isinstance(raw, dict):
        error("$.configuration.auth", "must be an object {anonymous, tokens, token_file}")
        return AuthConfig()
    anonymous = raw.get("anonymous", False)
    if not isinstance(anonymous, bool):
        error("$.configuration.auth.anonymous", "must be true or false")
    tokens = parse_entries(raw.get("tokens", []), "$.configuration.auth.tokens", error)
    token_file = raw.get("token_file")
    if token_file is not None and not isinstance(token_file, str):
        error("$.configuration.auth.token_file", "must be a path")
        token_file = None
    proxies = check_networks(raw.get("trusted_proxies", []), "$.configuration.auth.trusted_proxies", error)
    return AuthConfig(anonymous=anonymous is True, tokens=tuple(tokens),
                      token_file=Path(token_file) if token_file else None, trusted_proxies=proxies,
                      users=check_users_config(raw.get("users"), error))


def check_networks(raw: Any, path: str, error: Any) -> tuple[IPNetwork, ...]:
    """A list of IP addresses or CIDR networks (``10.1.0.0/16``, ``127.0.0.1``, ``::1``)."""
    if not isinstance(raw, list):
        error(path, "must be a list of IP addresses or networks such as 10.1.0.0/16")
        return ()
    nets = []
    for i, item in enumerate(raw):
        try:
            nets.append(ipaddress.ip_network(item, strict=False) if isinstance(item, str) else None)
        except ValueError:
            nets.append(None)
        if nets[-1] is None:
            error(f"{path}[{i}]", f"must be an IP address or network such as 10.1.0.0/16, got {item!r}")
    return tuple(n for n in nets if n is not None)


class Authenticator:
    """Turns request credentials into an :class:`Identity`; re-reads the token file when it changes."""

    def __init__(self, config: AuthConfig):
        self.config = config
        self._file_entries: list[TokenEntry] = []
        self._file_mtime: int | None = None
        self._lock = threading.Lock()

    def identify(self, authorization: str | None, cookies: Mapping[str, str], cookie_name: str,
                 peer: str | None = None, forwarded_for: str | None = None) -> Identity:
        """Raises :class:`Unauthorized` for a token that matches no entry."""
        address = self.config.client_address(peer, forwarded_for)
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            entry = self._match(token.strip())
            if entry is None:
                raise Unauthorized("unknown or revoked token")
            return Identity(entry.name, entry.roles, address=address, token=entry)
        return Identity(ANONYMOUS_USER, creator_key=cookies.get(cookie_name) or None, address=address)

    def _match(self, token: str) -> TokenEntry | None:
        digest = hash_token(token)
        found = None
        for entry in (*self.config.tokens, *self._tokens_from_file()):
            if hmac.compare_digest(entry.sha256, digest):  # no early exit: same work for every token
                found = found or entry
        return found

    def _tokens_from_file(self) -> list[TokenEntry]:
        path = self.config.token_file
        if path is None:
            return []
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            log.error("token file %s is missing; only the config's tokens are accepted", path)
            return []
        with self._lock:
            if mtime != self._file_mtime:
                problems: list[str] = []
                try:
                    raw = json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    log.error("token file %s unreadable: %s", path, exc)
                    return self._file_entries
                entries = parse_entries(raw, str(path), lambda p, m: problems.append(f"{p}: {m}"))
                for problem in problems:
                    log.error("token file: %s", problem)
                self._file_entries, self._file_mtime = entries, mtime
            return self._file_entries
