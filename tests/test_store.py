"""The SQLite store: conditional transitions, port ownership across threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from pathlib import Path

from sqlalchemy import text

from pvw_hpc.states import SessionState
from pvw_hpc.store import PortTaken, Store

S = SessionState


def new_row(store: Store, port: int = 9001, **extra: object) -> str:
    session_id = str(uuid.uuid4())
    store.create(id=session_id, application="demo", backend="local", host="127.0.0.1", port=port,
                 holds_port=True, secret="s", argv=["x"], session_url="ws://x", public={}, **extra)
    return session_id


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_transitions_are_conditional_and_timed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sid = new_row(store)
    assert store.transition(sid, S.STARTING, pid=123)
    assert store.transition(sid, S.READY)
    assert not store.transition(sid, S.STARTING)  # no going back
    assert store.transition(sid, S.ENDED, end_reason="bye")
    assert not store.transition(sid, S.FAILED)  # final stays final
    record = store.get(sid)
    assert record is not None
    assert record.state == S.ENDED and record.pid == 123 and not record.holds_port
    assert list(record.transitions()) == ["submitted", "starting", "ready", "ended"]


def test_racing_writers_only_one_wins(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for _ in range(20):
        sid = new_row(store)
        store.transition(sid, S.STARTING)
        results: list[bool] = []
        barrier = threading.Barrier(2)

        def move(to: SessionState, sid: str = sid, barrier: threading.Barrier = barrier,
                 results: list[bool] = results) -> None:
            barrier.wait()
            results.append(store.transition(sid, to))

        threads = [threading.Thread(target=move, args=(S.READY,)), threading.Thread(target=move, args=(S.FAILED,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # READY then FAILED is legal, FAILED then READY is not: whatever the order, FAILED is last
        final = store.get(sid)
        assert final is not None and final.state == S.FAILED
        assert True in results


def _claim(url: str, port: int, barrier: object, out: object) -> None:
    store = Store(url)
    barrier.wait()  # type: ignore[attr-defined]
    try:
        new_row(store, port=port)
        out.put("won")  # type: ignore[attr-defined]
    except PortTaken:
        out.put("taken")  # type: ignore[attr-defined]


def test_a_port_is_held_by_one_session_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url)  # create the schema once
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(url, 9005, barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = sorted(out.get(timeout=5) for _ in procs)
    assert results == ["taken"] * 5 + ["won"]


def test_a_final_session_releases_its_port(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sid = new_row(store, port=9010)
    try:
        new_row(store, port=9010)
        raise AssertionError("port 9010 was handed out twice")
    except PortTaken:
        pass
    store.transition(sid, S.FAILED, error="x")
    assert store.held_ports("127.0.0.1") == set()
    new_row(store, port=9010)


def test_the_fast_sqlite_read_returns_what_sqlalchemy_returns(tmp_path: Path) -> None:
    """GET reads SQLite without SQLAlchemy's statement layer; every column must come back the same."""
    import datetime as dt

    from pvw_hpc.store import _GET_ONE, _record

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    plain = new_row(store)
    full = new_row(store, port=9002, return_secret=True, log_path="/tmp/log", pid=42, pid_start=123456789012,
                   job_id="12.server", owner="alice", creator="portal", creator_hash="h" * 64, cores=4,
                   job_dir="/jobs/x", token_hash="t" * 64, attach_hash="a" * 64)
    store.update(full, argv=["a", "b c", "é"], public={"x": [1, 2], "y": None}, native_state="RUNNING",
                 scheduler_reason="None", exit_code=3, error="e\nf",
                 start_estimate=dt.datetime(2026, 11, 26, 17, 0, 1, 5, tzinfo=dt.timezone.utc))
    store.transition(full, SessionState.STARTING)
    store.transition(full, SessionState.READY, host="node7", port=40000)
    for session_id in (plain, full):
        with store.engine.connect() as conn:
            expected = _record(conn.execute(_GET_ONE, {"session_id": session_id}).first())
        assert store.get(session_id) == expected
    assert store.get(str(uuid.uuid4())) is None
