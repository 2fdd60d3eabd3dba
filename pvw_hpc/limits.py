"""Per-user limits: concurrent sessions (overall and per app), walltime per request, and a
compute-hour budget over a rolling window.

The checks run inside the store's write-locked insert transaction
(``Store.create(guard=...)``), so counting and inserting are one atomic step:
50 parallel requests from one user with a limit of 3 start exactly 3, across
threads and launcher processes. A refusal is a 429 that names the limit and,
where it can be known, when capacity returns.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from .errors import TooManyRequests
from .states import ACTIVE_STATES
from .store import sessions, utcnow

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,4})(?::(\d{1,2}))?(?::(\d{1,2}))?\Z")


def walltime_seconds(value: Any) -> int | None:
    """A Slurm-style time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds; None if it is not one.

    Zero is not a walltime: SLURM reads ``--time=0`` as "no limit", which would slip past ``max_walltime``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 60 if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _TIME.match(value)
    if not match:
        return None
    seconds = _seconds(*match.groups())
    return seconds if seconds > 0 else None


def _seconds(days: str | None, a: str, b: str | None, c: str | None) -> int:
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b or 0) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # minutes


@dataclass(frozen=True)
class Limits:
    """``configuration.limits``; every limit is off unless set."""

    max_sessions_per_user: int | None = None
    max_sessions_per_user_per_app: Mapping[str, int] = field(default_factory=dict)
    max_walltime_s: int | None = None
    compute_hours: float | None = None  # core-hours per user per window
    window_hours: float = 168.0
    # live anonymous sessions one client address may hold (None: max_sessions_per_user, if that is set);
    # each anonymous browser is its own user, so without it a client that drops its cookie has no limit
    max_anonymous_per_address: int | None = None

    @property
    def anonymous_per_address(self) -> int | None:
        return self.max_anonymous_per_address or self.max_sessions_per_user

    @property
    def active(self) -> bool:
        return bool(self.max_sessions_per_user or self.max_sessions_per_user_per_app or self.compute_hours)


def check_limits_config(raw: Any, app_names: set[str], error: Any) -> Limits:
    if raw is None:
        return Limits()
    path = "$.configuration.limits"
    if not isinstance(raw, dict):
        error(path, "must be an object")
        return Limits()

    def positive(key: str, value: Any, kind: type = int) -> Any:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
        if value is not None and not ok:
            error(f"{path}.{key}", "must be a positive number")
            return None
        return value

    per_user = positive("max_sessions_per_user", raw.get("max_sessions_per_user"))
    per_app = raw.get("max_sessions_per_user_per_app", {})
    if not isinstance(per_app, dict) or not all(isinstance(v, int) and v > 0 for v in per_app.values()):
        error(f"{path}.max_sessions_per_user_per_app", "must map application names to positive integers")
        per_app = {}
    for name in per_app:
        if name not in app_names:
            error(f"{path}.max_sessions_per_user_per_app.{name}", "no such application")
    walltime = raw.get("max_walltime")
    walltime_s = walltime_seconds(walltime) if walltime is not None else None
    if walltime is not None and walltime_s is None:
        error(f"{path}.max_walltime", "must be minutes or [D-]HH:MM:SS as sbatch --time reads it")
    hours = positive("compute_hours", raw.get("compute_hours"), float)
    window = positive("window_hours", raw.get("window_hours", 168.0), float) or 168.0
    per_address = positive("max_anonymous_per_address", raw.get("max_anonymous_per_address"))
    return Limits(per_user, dict(per_app), walltime_s, float(hours) if hours else None, float(window), per_address)


def _until(when: dt.datetime) -> dict[str, Any]:
    now = utcnow()
    return {"retry_after_s": max(1, int((when - now).total_seconds())), "capacity_returns_at": when.isoformat()}


def core_hours_used(conn: Connection, user: str, window_hours: float,
                    now: dt.datetime | None = None) -> tuple[float, dt.datetime | None]:
    """Core-hours a user's sessions consumed in the window, from their recorded start and end times.

    A session counts from ``starting_at`` (its process or job started) to its end
    (``ended_at``/``failed_at``, or now while it runs), clipped to the window, times
    its cores. Also returns the oldest counted start, after which usage begins to
    leave the window.
    """
    now = now or utcnow()
    since = now - dt.timedelta(hours=window_hours)
    c = sessions.c
    end = func.coalesce(c.ended_at, c.failed_at)
    rows = conn.execute(
        select(c.starting_at, c.ended_at, c.failed_at, c.cores).where(
            c.owner == user, c.starting_at.is_not(None), or_(end.is_(None), end > since),
        )
    )
    total, oldest = 0.0, None
    for starting, ended, failed, cores in rows:
        start = max(starting, since)
        stop = ended or failed or now
        if stop > start:
            total += (stop - start).total_seconds() / 3600 * (cores or 1)
            oldest = start if oldest is None or start < oldest else oldest
    return total, oldest


def guard(limits: Limits, user: str, application: str, cores: int, walltime_s: int | None,  # noqa: ANN201
          creator: str | None = None, per_creator: int | None = None):
    """The check to run inside the locked insert transaction of one launch.

    ``creator``/``per_creator``: at most that many live sessions with this creator (an
    anonymous client address), whoever owns them.
    """

    def check(conn: Connection) -> None:
        if limits.max_walltime_s is not None and walltime_s is not None and walltime_s > limits.max_walltime_s:
            raise TooManyRequests(
                f"limit max_walltime: {walltime_s // 60} min asked, at most {limits.max_walltime_s // 60} min",
                limit="max_walltime")
        c = sessions.c
        active = [s.value for s in ACTIVE_STATES]
        if limits.max_sessions_per_user is not None:
            count = conn.execute(select(func.count()).where(c.owner == user, c.state.in_(active))).scalar_one()
            if count >= limits.max_sessions_per_user:
                raise TooManyRequests(
                    f"limit max_sessions_per_user: {user} has {count} of {limits.max_sessions_per_user} sessions; "
                    "capacity returns when one of them ends", limit="max_sessions_per_user")
        if creator is not None and per_creator is not None:
            count = conn.execute(select(func.count()).where(c.creator == creator, c.state.in_(active))).scalar_one()
            if count >= per_creator:
                raise TooManyRequests(
                    f"limit max_anonymous_per_address: this address has {count} of {per_creator} anonymous "
                    "sessions; capacity returns when one of them ends", limit="max_anonymous_per_address")
        per_app = limits.max_sessions_per_user_per_app.get(application)
        if per_app is not None:
            count = conn.execute(select(func.count()).where(
                and_(c.owner == user, c.application == application, c.state.in_(active)))).scalar_one()
            if count >= per_app:
                raise TooManyRequests(
                    f"limit max_sessions_per_user_per_app: {user} has {count} of {per_app} {application} sessions; "
                    "capacity returns when one of them ends", limit="max_sessions_per_user_per_app")
        if limits.compute_hours is not None:
            used, oldest = core_hours_used(conn, user, limits.window_hours)
            if used >= limits.compute_hours:
                extra: dict[str, Any] = {"limit": "compute_hours", "used_core_hours": round(used, 6)}
                if oldest is not None:
                    extra.update(_until(oldest + dt.timedelta(hours=limits.window_hours)))
                raise TooManyRequests(
                    f"limit compute_hours: {user} used {used:.2f} of {limits.compute_hours:g} core-hours "
                    f"in the last {limits.window_hours:g} h", **extra)

    return check
