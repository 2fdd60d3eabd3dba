"""Who may launch, for whom, and who may see or stop a session: one policy object.

The service asks it and acts on the answer; the REST views and the CLI never
decide. The rules: tokens by role (``launch`` for the users its entry allows,
``read`` sees all, ``admin`` sees and stops all); anonymous browsers only when
the config allows them, each its own user for the limits and counted per client
address; named users must pass ``auth.users`` (no system accounts); a session's
creator (token, creator cookie) or the holder of its secret may see and stop it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from . import limits
from .auth import ANONYMOUS_USER, USER_RE, Identity, as_bytes, same_secret
from .config import AppConfig, LauncherConfig
from .connections import client_key
from .errors import BadRequest, Forbidden, Unauthorized
from .store import SessionRecord


def sha256(text: str) -> str:
    return hashlib.sha256(as_bytes(text)).hexdigest()


@dataclass(frozen=True)
class Requester:
    """Who a launch is for, and what it costs: decided once, before anything is written.

    ``user`` is ``${user}`` and the account a run-as-user job runs as; ``owner`` is who the
    limits and usage count it for: the user, or for an anonymous browser its own creator
    key (so one browser cannot spend every other browser's quota); ``creator`` is the
    token name, or ``anonymous@<client address>`` (the per-address anonymous limit).
    """

    user: str
    owner: str
    creator: str
    creator_hash: str | None
    creator_key: str | None
    anonymous: bool = False

    def guard(self, config: LauncherConfig, application: str, cores: int, walltime_s: int | None) -> Any:
        per_address = config.limits.anonymous_per_address if self.anonymous else None
        return limits.guard(config.limits, self.owner, application, cores, walltime_s,
                            creator=self.creator if per_address else None, per_creator=per_address)


class AccessPolicy:
    """The authorisation rules for one config (see the module docstring)."""

    def __init__(self, config: LauncherConfig):
        self.config = config

    def requester(self, identity: Identity, payload: Any) -> Requester:
        """Who may launch, and for which user (a launch token names the user in ``"user"``)."""
        named = payload.get("user") if isinstance(payload, dict) else None
        if identity.anonymous:
            if not self.config.auth.anonymous:
                raise Unauthorized("this launcher needs a bearer token to launch (anonymous launches are off)")
            key = identity.creator_key or secrets.token_urlsafe(24)
            digest = sha256(key)
            address = client_key(identity.address) if identity.address else "unknown"  # IPv6: its /64
            return Requester(ANONYMOUS_USER, f"{ANONYMOUS_USER}:{digest[:16]}", f"{ANONYMOUS_USER}@{address}",
                             digest, key, anonymous=True)
        if not identity.has("launch"):
            raise Forbidden(f"token {identity.name!r} may not launch sessions (role 'launch' needed)")
        user = identity.name if named is None else named
        if not isinstance(user, str) or not USER_RE.match(user):
            raise BadRequest("'user' must be a user name (lower-case letters, digits, '_', '-', '.')")
        entry = identity.token
        if entry is not None and user != identity.name and not (
                entry.may_name(user) if entry.users is not None else identity.has("admin")):
            raise Forbidden(f"token {identity.name!r} may not launch for user {user!r} "
                            "(its entry's 'users' does not allow it)")
        return Requester(user, user, identity.name, None, None)

    def check_account(self, requester: Requester, app: AppConfig) -> None:
        """Refuse a user the site does not allow (system accounts, outside the group) before any row exists."""
        cluster = self.config.clusters.get(app.cluster) if app.cluster else None
        runs_as = bool(cluster and cluster.submit_prefix)
        if requester.anonymous:
            if runs_as:
                raise Unauthorized(f"jobs of {app.name!r} run as the requesting user: launch with a token "
                                   "that names the user")
            return
        refused = self.config.auth.users.refusal(requester.user, runs_as)
        if refused:
            raise Forbidden(refused)

    @staticmethod
    def owns(record: SessionRecord, identity: Identity) -> bool:
        """A token's own launches, or an anonymous browser's (its creator cookie)."""
        if identity.anonymous:
            return bool(identity.creator_key and record.creator_hash
                        and hmac.compare_digest(record.creator_hash, sha256(identity.creator_key)))
        return identity.has("launch") and record.creator == identity.name

    def authorize(self, record: SessionRecord, identity: Identity, secret: str | None, *, stop: bool) -> None:
        """Admins see and stop all; readers see all; creators (token, cookie or secret) their own."""
        if identity.has("admin") or (not stop and identity.has("read")) or self.owns(record, identity):
            return
        if secret and same_secret(secret, record.secret):
            return
        if identity.anonymous:
            raise Unauthorized("send a bearer token, the creator cookie, or the session's secret "
                               "(X-Session-Secret) to see or stop this session")
        raise Forbidden(f"token {identity.name!r} may not {'stop' if stop else 'see'} this session")
