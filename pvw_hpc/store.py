"""Durable session records: SQLAlchemy 2 over SQLite by default, any SQLAlchemy URL accepted.

The database is the source of truth; the map file and the in-memory process
table are derived from it. Every state change is one conditional UPDATE that
is committed before anything acts on it (``transition``), so two writers -- a
POST thread and the monitor, or two launcher processes -- cannot both win, and a
crash at any moment leaves a record that a restart can act on.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeDecorator

from .states import ACTIVE_STATES, FINAL_STATES, SessionState, sources_of


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Store UTC, return timezone-aware values whatever the backend keeps."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return value.replace(tzinfo=dt.timezone.utc) if value is not None else None


metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("application", String(128), nullable=False),
    Column("backend", String(64), nullable=False, default="local"),
    Column("state", String(16), nullable=False, index=True),
    Column("host", String(255)),
    Column("port", Integer),
    # true while the session owns host:port; the partial unique index makes two
    # launchers (or threads) unable to hand out the same port twice
    Column("holds_port", Boolean, nullable=False, default=False),
    Column("secret", String(128), nullable=False),
    Column("argv", JSON, nullable=False),
    Column("session_url", Text, nullable=False),
    Column("public", JSON, nullable=False),  # the configured `fields` and sessionManagerURL
    Column("return_secret", Boolean, nullable=False, default=False),
    Column("log_path", Text),
    Column("pid", Integer),
    Column("pid_start", BigInteger),  # process start time, so a reused pid is not mistaken
    Column("job_id", String(128)),
    Column("owner", String(64), index=True),  # the user the session runs for (limits, run-as-user)
    Column("creator", String(64)),  # the token name that launched it, or "anonymous"
    Column("creator_hash", String(64)),  # anonymous: sha256 of the browser's creator cookie
    Column("cores", Integer, nullable=False, default=1),  # for compute-hour accounting
    Column("job_dir", Text),
    Column("token_hash", String(64)),  # sha256 of the job's callback token
    Column("attach_hash", String(64)),  # sha256 of the cookie that lets a retried POST re-attach
    Column("native_state", String(64)),  # the scheduler's own state word, e.g. PENDING, NODE_FAIL
    Column("scheduler_reason", Text),
    Column("start_estimate", UTCDateTime),
    Column("exit_code", Integer),
    Column("error", Text),  # why it failed
    Column("end_reason", Text),  # why it ended (DELETE, exit, ...)
    # starts again on another port because the chosen one was taken first: [{try, port, next_port, at}]
    Column("port_retries", JSON),
    *(Column(f"{s.value}_at", UTCDateTime) for s in SessionState),
    Column("updated_at", UTCDateTime, nullable=False),
)
Index(
    "uq_sessions_held_port", sessions.c.host, sessions.c.port, unique=True,
    sqlite_where=sessions.c.holds_port.is_(True), postgresql_where=sessions.c.holds_port.is_(True),
)


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """A snapshot of one row; plain data, safe to pass between threads."""

    id: str
    application: str
    backend: str
    state: SessionState
    host: str | None
    port: int | None
    holds_port: bool
    secret: str
    argv: list[str]
    session_url: str
    public: dict[str, Any]
    return_secret: bool
    log_path: str | None
    pid: int | None
    pid_start: int | None
    job_id: str | None
    owner: str | None
    creator: str | None
    creator_hash: str | None
    cores: int
    job_dir: str | None
    token_hash: str | None
    attach_hash: str | None
    native_state: str | None
    scheduler_reason: str | None
    start_estimate: dt.datetime | None
    exit_code: int | None
    error: str | None
    end_reason: str | None
    port_retries: list[dict[str, Any]] | None
    submitted_at: dt.datetime | None
    queued_at: dt.datetime | None
    starting_at: dt.datetime | None
    ready_at: dt.datetime | None
    ended_at: dt.datetime | None
    failed_at: dt.datetime | None
    updated_at: dt.datetime

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def transitions(self) -> dict[str, str]:
        """State -> ISO time at which it was reached, in life-cycle order."""
        out = {}
        for state in SessionState:
            when = getattr(self, f"{state.value}_at")
            if when is not None:
                out[state.value] = when.isoformat()
        return out


@dataclasses.dataclass(frozen=True)
class TrackedJob:
    """The few columns the poller needs per batch session: read thousands of times a minute."""

    id: str
    state: SessionState
    job_id: str | None
    owner: str | None
    creator: str | None
    creator_hash: str | None
    cores: int
    job_dir: str | None
    log_path: str | None
    native_state: str | None
    scheduler_reason: str | None
    start_estimate: dt.datetime | None
    host: str | None = None  # where a ready session's app listens: probed for reachability
    port: int | None = None


class PortTaken(Exception):
    """Another active session already holds this host:port."""


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """Create an engine; for SQLite: WAL, a busy timeout, and use from many threads."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # one pooled connection per server thread: no reconnect (and PRAGMAs) per request under load
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                           pool_size=pool_size, max_overflow=pool_size)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below), as SQLAlchemy's docs advise
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA busy_timeout=30000")  # wait for other processes' writes
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # BEGIN IMMEDIATE takes the write lock up front: a check-then-insert (quotas) is then
        # atomic across threads and processes, and never fails with "database is locked" half way
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


_COLUMNS = [c.name for c in sessions.columns]


_GET_ONE = select(sessions).where(sessions.c.id == bindparam("session_id"))  # built once: GET is the hot path


def _record(row: Any) -> SessionRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["state"] = SessionState(data["state"])
    return SessionRecord(**data)


# -- the hot read on SQLite, without SQLAlchemy's statement machinery -------------------------

_SQLITE_GET_ONE = f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE id = ?"


def _sqlite_datetime(value: str | None) -> dt.datetime | None:
    """SQLAlchemy's SQLite DateTime text (``YYYY-MM-DD HH:MM:SS[.ffffff]``, UTC) as an aware datetime."""
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc) if value is not None else None


def _converter(column: Column[Any]) -> Callable[[Any], Any] | None:
    """How a raw SQLite value of ``column`` becomes what SQLAlchemy would have returned (None: as is)."""
    if column.name == "state":
        return SessionState
    if isinstance(column.type, JSON):
        return lambda v: json.loads(v) if v is not None else None
    if isinstance(column.type, Boolean):
        return lambda v: bool(v) if v is not None else None
    if isinstance(column.type, UTCDateTime):
        return _sqlite_datetime
    return None


_SQLITE_CONVERTERS = [(i, conv) for i, c in enumerate(sessions.columns) if (conv := _converter(c)) is not None]


def _record_from_sqlite(row: tuple[Any, ...]) -> SessionRecord:
    values = list(row)
    for index, convert in _SQLITE_CONVERTERS:
        values[index] = convert(values[index])
    return SessionRecord(**dict(zip(_COLUMNS, values, strict=True)))


class Store:
    """All reads and writes of session rows."""

    def __init__(self, url: str, pool_size: int = 5):
        self.url = url
        self.engine = make_engine(url, pool_size)
        self._sqlite = self.engine.dialect.name == "sqlite"
        metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Additive schema changes: a database made by an older version gains the new columns."""
        have = {c["name"] for c in inspect(self.engine).get_columns("sessions")}
        missing = [c for c in sessions.columns if c.name not in have]
        if not missing:
            return
        with self.engine.begin() as conn:
            for column in missing:
                kind = column.type.compile(dialect=self.engine.dialect)
                conn.execute(text(f"ALTER TABLE sessions ADD COLUMN {column.name} {kind}"))

    def close(self) -> None:
        self.engine.dispose()

    def create(self, guard: Callable[[Connection], None] | None = None, **values: Any) -> SessionRecord:
        """Insert a new ``submitted`` row; raises :class:`PortTaken` when host:port is held.

        ``guard`` runs inside the same write-locked transaction just before the insert
        (per-user limits): what it counts cannot change until the row is in.
        """
        now = utcnow()
        values = {**values, "state": SessionState.SUBMITTED.value, "submitted_at": now, "updated_at": now}
        try:
            with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
                if guard is not None:
                    if conn.dialect.name == "postgresql":  # serialise one user's launches
                        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (values["owner"],))
                    guard(conn)
                conn.execute(insert(sessions).values(**values))
        except IntegrityError as exc:
            if values.get("holds_port"):
                raise PortTaken(f"{values.get('host')}:{values.get('port')}") from exc
            raise
        record = self.get(values["id"])
        assert record is not None
        return record

    def get(self, session_id: str) -> SessionRecord | None:
        """One session by id: the hot path of every GET (see :meth:`_get_sqlite`)."""
        if self._sqlite:
            return self._get_sqlite(session_id)
        with self.engine.connect() as conn:
            row = conn.execute(_GET_ONE, {"session_id": session_id}).first()
        return _record(row) if row is not None else None

    def _get_sqlite(self, session_id: str) -> SessionRecord | None:
        """The same read on the pool's own DBAPI connection: one SELECT, no BEGIN, no statement compiling.

        A single SELECT in autocommit mode reads one consistent snapshot; at the GET
        rates portals reach this is most of a session read's cost saved. Values are
        converted as SQLAlchemy's column types would (``tests/test_store.py`` compares both).
        """
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                row = cursor.execute(_SQLITE_GET_ONE, (session_id,)).fetchone()
            finally:
                cursor.close()
        finally:
            conn.close()  # back to the pool
        return _record_from_sqlite(row) if row is not None else None

    def count_active(self) -> dict[str, int]:
        """State -> number of active sessions, counted by the database (``/health`` stays cheap)."""
        query = (select(sessions.c.state, func.count()).where(sessions.c.state.in_([s.value for s in ACTIVE_STATES]))
                 .group_by(sessions.c.state))
        with self.engine.connect() as conn:
            return {state: count for state, count in conn.execute(query)}

    def list(self, states: Iterable[SessionState] | None = None, backend: str | None = None) -> list[SessionRecord]:
        query = select(sessions).order_by(sessions.c.submitted_at, sessions.c.id)
        if states is not None:
            query = query.where(sessions.c.state.in_([s.value for s in states]))
        if backend is not None:
            query = query.where(sessions.c.backend == backend)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def active(self, backend: str | None = None) -> builtins.list[SessionRecord]:
        return self.list(ACTIVE_STATES, backend=backend)

    def tracked(self, backend: str) -> builtins.list[TrackedJob]:
        """Active sessions of one cluster, narrow (no JSON columns, few timestamps)."""
        cols = [sessions.c[f.name] for f in dataclasses.fields(TrackedJob)]
        query = select(*cols).where(
            sessions.c.backend == backend, sessions.c.state.in_([s.value for s in ACTIVE_STATES])
        )
        with self.engine.connect() as conn:
            return [TrackedJob(r[0], SessionState(r[1]), *r[2:]) for r in conn.execute(query)]

    def update_many(self, changes: builtins.list[tuple[str, dict[str, Any]]]) -> None:
        """Change non-state fields of many sessions in one transaction (the poller's bookkeeping)."""
        if not changes:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            for session_id, fields in changes:
                if "state" in fields:
                    raise ValueError("use transition() to change state")
                conn.execute(update(sessions).where(sessions.c.id == session_id).values(**fields, updated_at=now))

    def held_ports(self, host: str) -> set[int]:
        query = select(sessions.c.port).where(sessions.c.host == host, sessions.c.holds_port.is_(True))
        with self.engine.connect() as conn:
            return {row[0] for row in conn.execute(query)}

    def ready_routes(self) -> builtins.list[tuple[str, str, int]]:
        """(id, host, port) of every READY session, oldest first: the map file's content."""
        query = (
            select(sessions.c.id, sessions.c.host, sessions.c.port)
            .where(sessions.c.state == SessionState.READY.value)
            .order_by(sessions.c.ready_at, sessions.c.id)
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(query)]

    def transition(self, session_id: str, to: SessionState, **fields: Any) -> bool:
        """Move a session to ``to`` if its current state allows it; False if another writer won.

        The check and the write are one UPDATE ... WHERE state IN (...), so it is
        atomic across threads and processes. Reaching a final state releases the port.
        """
        sources: Sequence[SessionState] = sorted(sources_of(to))
        now = utcnow()
        values = {**fields, "state": to.value, f"{to.value}_at": now, "updated_at": now}
        if to in FINAL_STATES:
            values["holds_port"] = False
        stmt = (
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.state.in_([s.value for s in sources]))
            .values(**values)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def delete(self, session_ids: Iterable[str]) -> None:
        """Forget sessions for good (purging); only final ones are ever passed."""
        ids = list(session_ids)
        if ids:
            with self.engine.begin() as conn:
                conn.execute(sessions.delete().where(sessions.c.id.in_(ids),
                                                     sessions.c.state.in_([s.value for s in FINAL_STATES])))

    def move_port(self, session_id: str, host: str, port: int, **fields: Any) -> None:
        """Hold ``host:port`` instead of the session's current one (and set ``fields``) in one update.

        Raises :class:`PortTaken` when another active session holds it: the unique index decides,
        as it does for :meth:`create`.
        """
        if "state" in fields:
            raise ValueError("use transition() to change state")
        stmt = update(sessions).where(sessions.c.id == session_id).values(
            host=host, port=port, holds_port=True, **fields, updated_at=utcnow())
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt)
        except IntegrityError as exc:
            raise PortTaken(f"{host}:{port}") from exc

    def update(self, session_id: str, **fields: Any) -> None:
        """Change non-state fields (pid, log path...)."""
        if "state" in fields:
            raise ValueError("use transition() to change state")
        stmt = update(sessions).where(sessions.c.id == session_id).values(**fields, updated_at=utcnow())
        with self.engine.begin() as conn:
            conn.execute(stmt)
