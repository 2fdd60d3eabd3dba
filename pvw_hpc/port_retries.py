"""Starts of an app on another port because the chosen one was taken first: what is kept of them.

Between the moment a free port is chosen and the moment the app binds it, any
other program (an outgoing connection takes an ephemeral port) may take it; the
app then exits saying "address already in use". The job side and the local
backend start it again on another port, a bounded number of times. Each retry
is kept on the session (``port_retries``: try number, the taken port, the next
one, when) so the scientist and the admin see why the start took longer, and
the session's JSON shows them beside its transitions.

What the job side reports is the job user's claim: only small integers and a
time clamped to the session's own life are kept, at most ``MAX_TRIES - 1`` entries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from .validate import is_valid_port

MAX_TRIES = 4  # starts in all, as the job side's PORT_TRIES: the first and up to three retries


def entry(attempt: int, port: int, next_port: int, at: dt.datetime) -> dict[str, Any]:
    return {"try": attempt, "port": port, "next_port": next_port, "at": at.isoformat()}


def checked(raw: Any, earliest: dt.datetime, now: dt.datetime) -> list[dict[str, Any]]:
    """The valid entries of a reported list (``[{try, port, next_port, at?}]``); anything else is dropped.

    ``at`` is a Unix time from the node's clock; outside ``earliest..now`` it is read as ``now``.
    """
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:16]:  # a claim of the job user: only its first few entries are looked at
        if not isinstance(item, dict):
            continue
        attempt, port, next_port, at = item.get("try"), item.get("port"), item.get("next_port"), item.get("at")
        if not (isinstance(attempt, int) and isinstance(port, int) and isinstance(next_port, int)
                and not isinstance(attempt, bool) and 2 <= attempt <= MAX_TRIES
                and is_valid_port(port) and is_valid_port(next_port)):
            continue
        when = now
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            try:
                stamp = dt.datetime.fromtimestamp(float(at), dt.timezone.utc)
            except (OverflowError, OSError, ValueError):
                stamp = now
            when = stamp if earliest <= stamp <= now else now
        out.append(entry(attempt, port, next_port, when))
    return out[:MAX_TRIES - 1]


def merged(kept: Sequence[dict[str, Any]] | None, new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` plus the entries of ``new`` with a try number not seen yet, in try order.

    The same retry may be reported twice (its marker line read again after a restart, then the callback).
    """
    by_try = {e["try"]: e for e in kept or []}
    for e in new:
        by_try.setdefault(e["try"], e)
    return [by_try[k] for k in sorted(by_try)][:MAX_TRIES - 1]
