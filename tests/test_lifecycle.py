"""The one owner of session state: every move goes through ``Lifecycle.move`` (real SQLite, real map file)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from pvw_hpc.lifecycle import Lifecycle
from pvw_hpc.mapfile import MapWriter
from pvw_hpc.states import SessionState
from pvw_hpc.store import Store

PACKAGE = Path(__file__).resolve().parents[1] / "pvw_hpc"


def _world(tmp_path: Path) -> tuple[Store, MapWriter, Lifecycle]:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    writer = MapWriter(tmp_path / "proxy.txt", store.ready_routes)
    writer.start()
    return store, writer, Lifecycle(store, writer)


def _session(store: Store, session_id: str) -> None:
    store.create(id=session_id, application="viz", backend="c", holds_port=False, secret="s" * 32, argv=["x"],
                 session_url="ws://x", public={}, return_secret=False, cores=1)


def test_nothing_but_the_lifecycle_writes_a_state() -> None:
    offenders = [f"{path.name}:{number}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name not in ("lifecycle.py", "store.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\.transition\(", line)]
    assert offenders == []


def test_ready_from_queued_fills_in_starting_syncs_the_map_and_wakes_waiters(tmp_path: Path) -> None:
    store, writer, life = _world(tmp_path)
    sid = "11111111-1111-4111-8111-111111111111"
    try:
        _session(store, sid)
        assert life.move(sid, SessionState.QUEUED, current=SessionState.SUBMITTED)
        woken = threading.Event()
        with life.waiting(sid) as event:
            threading.Thread(target=lambda: event.wait(5) and woken.set()).start()
            assert life.move(sid, SessionState.READY, host="127.0.0.1", port=20001)
            assert woken.wait(5)
        record = store.get(sid)
        assert record is not None and record.state == SessionState.READY and record.starting_at is not None
        # the map shows the route the moment move() returns: no wait, no sync by the caller
        assert (tmp_path / "proxy.txt").read_text() == f"{sid} 127.0.0.1:20001\n"
        assert not life.move(sid, SessionState.STARTING)  # backwards: refused, nothing changes
        stopped: list[str] = []
        life.stop_backend = stopped.append
        assert life.move(sid, SessionState.ENDED, stop=True, end_reason="test")
        assert (tmp_path / "proxy.txt").read_text() == "" and stopped == [sid]  # the route went first
        assert not life.move(sid, SessionState.FAILED, stop=True)  # a final state is final
        assert stopped == [sid]
    finally:
        writer.stop()
        store.close()
