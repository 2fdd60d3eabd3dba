"""The one place a session's state changes.

psij's single status setter is the model: the service (launch, stop, callbacks,
recovery), the poller (batch jobs) and the local backend's monitor all call
:meth:`Lifecycle.move`, and nothing else writes a state. One move is, in order:

1. the conditional update (``Store.transition``: one UPDATE ... WHERE state IN
   (allowed sources), atomic across threads and launcher processes);
2. a skipped state filled in: a session that becomes ready straight from
   submitted or queued (it ran and got ready between two polls) passes through
   ``starting`` first, so ``starting_at`` -- where core-hours are counted from --
   is always set;
3. waiters woken (a POST waiting for its session) and a map rewrite requested;
4. the map rule: a move that enters ``ready`` or may leave it (a final state,
   a requeue back to ``queued``) returns only once the map file shows it, so no
   browser is sent to an app that is gone and nobody is told "ready" before the
   route exists;
5. the stop policy: with ``stop=True`` a move to a final state also stops what
   the session runs (its process or its batch job), after the route is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from .mapfile import MapWriter
from .states import FINAL_STATES, SessionState
from .store import Store

log = logging.getLogger(__name__)

_BEFORE_READY = frozenset({SessionState.SUBMITTED, SessionState.QUEUED})


class Lifecycle:
    """Owns every state change of every session (see the module docstring)."""

    def __init__(self, store: Store, map_writer: MapWriter):
        self.store = store
        self.map = map_writer
        # set by the service: stops a session's process or job (``move(..., stop=True)``)
        self.stop_backend: Callable[[str], None] | None = None
        # called after every move (the service forgets per-session caches of ended sessions)
        self.on_moved: Callable[[str, SessionState], None] | None = None
        self._events: dict[str, threading.Event] = {}
        self._events_lock = threading.Lock()

    def move(self, session_id: str, to: SessionState, *, current: SessionState | None = None, stop: bool = False,
             sync_map: bool = True, **fields: Any) -> bool:
        """Move a session to ``to`` if its state allows it; False when it does not (or another writer won).

        ``current``: the state the caller last saw, if it knows it (saves nothing but a
        needless fill-in attempt). ``sync_map=False`` only for recovery before anything is
        served, which writes the map once at its end.
        """
        routes = _may_change_routes(to, current)
        with self.map.changing() if routes else nullcontext():  # readers wait for the map from the commit on
            if to == SessionState.READY and current in (None, *_BEFORE_READY):
                self.store.transition(session_id, SessionState.STARTING)  # no-op unless it skipped starting
            if not self.store.transition(session_id, to, **fields):
                return False
            self.map.request()
        with self._events_lock:
            event = self._events.get(session_id)
        if event is not None:
            event.set()
        if self.on_moved is not None:
            self.on_moved(session_id, to)
        if sync_map and routes and not self.map.sync():
            log.error("map file not written in time after session %s became %s", session_id, to.value)
        if stop and to in FINAL_STATES and self.stop_backend is not None:
            self.stop_backend(session_id)
        return True

    @contextmanager
    def waiting(self, session_id: str) -> Iterator[threading.Event]:
        """An event set on every move of ``session_id`` while the caller waits for it."""
        event = threading.Event()
        with self._events_lock:
            self._events[session_id] = event
        try:
            yield event
        finally:
            with self._events_lock:
                self._events.pop(session_id, None)


def _may_change_routes(to: SessionState, current: SessionState | None) -> bool:
    """Entering ready, or possibly leaving it: a final state, or a requeue (queued from anything but submitted)."""
    return to == SessionState.READY or to in FINAL_STATES or (to == SessionState.QUEUED
                                                               and current != SessionState.SUBMITTED)
