"""The session states and the only transitions allowed between them.

This module is the single owner of the life cycle. It imports nothing from the
project so that the store, the service, the poller and the adapters can all
depend on it without cycles.

A session moves forward only: ``submitted -> queued -> starting -> ready`` and
then to one of the final states ``ended`` or ``failed``. Skipping forward is
allowed (the local backend never queues; a poll can miss a short RUNNING
phase). The one backward edge is a requeued batch job, which goes from
``starting``/``ready`` back to ``queued``: it lost its node and must earn its
map line again.
"""

from __future__ import annotations

import enum


class SessionState(str, enum.Enum):
    """States reported by the API, stored as their lower-case value."""

    SUBMITTED = "submitted"
    QUEUED = "queued"
    STARTING = "starting"
    READY = "ready"
    ENDED = "ended"
    FAILED = "failed"

    def __str__(self) -> str:  # so f-strings and JSON show "ready", not the enum repr
        return self.value


FINAL_STATES: frozenset[SessionState] = frozenset({SessionState.ENDED, SessionState.FAILED})
ACTIVE_STATES: frozenset[SessionState] = frozenset(SessionState) - FINAL_STATES

# to-state -> the states it may be entered from
ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    SessionState.SUBMITTED: frozenset(),
    SessionState.QUEUED: frozenset(
        {SessionState.SUBMITTED, SessionState.STARTING, SessionState.READY}  # requeue goes back
    ),
    SessionState.STARTING: frozenset({SessionState.SUBMITTED, SessionState.QUEUED}),
    SessionState.READY: frozenset({SessionState.SUBMITTED, SessionState.QUEUED, SessionState.STARTING}),
    SessionState.ENDED: ACTIVE_STATES,
    SessionState.FAILED: ACTIVE_STATES,
}


def is_final(state: SessionState | str) -> bool:
    """True for states a session never leaves."""
    return SessionState(state) in FINAL_STATES


def can_move(from_state: SessionState | str, to_state: SessionState | str) -> bool:
    """True when ``from_state -> to_state`` is an allowed transition."""
    return SessionState(from_state) in ALLOWED[SessionState(to_state)]


def sources_of(to_state: SessionState | str) -> frozenset[SessionState]:
    """The states from which ``to_state`` may be entered (for conditional updates)."""
    return ALLOWED[SessionState(to_state)]
