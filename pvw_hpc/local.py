"""The local backend: each session is a child process of the launcher's machine.

One monitor thread watches every live local session: it scans the logs of
starting sessions for the ready line every 10 ms (stock polls once a second),
notices exits, and enforces the start timeout. Output goes straight to
``<log_dir>/<id>.txt`` (not through a pipe), so the apps keep running when the
launcher is killed, and a restarted launcher re-attaches to them by pid and
process start time.

A port found free may be taken before the app binds it (an outgoing connection
gets an ephemeral port from the same numbers). An app that exits before ready
saying its address is in use is started again on another port of ``resources``,
at most ``PORT_TRIES`` starts in all, each written in its log; the backend that
spawned it picks the port (``relaunch``), this monitor restarts the process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from . import port_retries, procs, userfiles
from .loops import BackgroundLoop
from .states import SessionState
from .store import SessionRecord, Store

log = logging.getLogger(__name__)

SESSION_ENV = "PVW_HPC_SESSION_ID"
ALL_CPUS = frozenset(os.sched_getaffinity(0))  # before `serve` may pin itself: what the apps get
FAST_TICK_S = 0.01  # while anything is starting
SLOW_TICK_S = 0.1  # only ready sessions: an exit is noticed well within 1 s
LOG_TAIL_BYTES = 4096
PORT_TRIES = port_retries.MAX_TRIES  # starts in all: the first and up to three on other ports
IN_USE_WORDS = (b"address already in use", b"eaddrinuse", b"errno 98")  # as the job side reads them

Move = Callable[..., bool]  # Lifecycle.move: the only way a session's state changes


@dataclasses.dataclass(frozen=True)
class Relaunch:
    """Where and how to start a session's app again: the row already holds ``host:port``."""

    host: str
    port: int
    argv: list[str]
    env: Mapping[str, str]
    cwd: str | None


# (session id, ports tried so far, this try's number) -> the next start, or None when no port is left
Relauncher = Callable[[str, list[int], int], "Relaunch | None"]


def with_display(display: str | None, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` with the app's display: a private Xvfb through the job side's wrapper."""
    if display != "xvfb":
        return argv
    jobside = resources.files("jobscripts").joinpath("_common", "jobside.py")
    return [sys.executable, str(jobside), "--xvfb", "--", *argv]


def log_tail(path: str | None, lines: int = 10) -> str:
    """The last lines of a session log, for error messages (a job log is its user's file: see userfiles)."""
    data = userfiles.read_tail(path, LOG_TAIL_BYTES) if path else None
    if not data:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


@dataclasses.dataclass
class _Watch:
    """What the monitor knows about one live session."""

    session_id: str
    pid: int
    pid_start: int | None
    log_path: str
    ready_line: bytes | None
    host: str
    port: int
    deadline: float  # monotonic; only while starting
    state: SessionState
    popen: subprocess.Popen[bytes] | None = None
    offset: int = 0
    tail: bytes = b""
    relaunch: Relauncher | None = None  # None: not started by us in this run (adopted), never restarted
    tries: int = 1
    try_offset: int = 0  # where this start's output begins in the log
    ports_tried: list[int] = dataclasses.field(default_factory=list)


class LocalBackend:
    """Spawns, watches and stops local session processes."""

    name = "local"

    def __init__(self, store: Store, move: Move):
        self.store = store
        self.move = move
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._loop = BackgroundLoop("pvw-local-monitor", self._step)
        # a test hook: runs just before an app is started on (host, port), e.g. to take that port first
        self.before_start: Callable[[str, int], None] | None = None

    # -- life cycle of the monitor -------------------------------------------------------

    def start_monitor(self) -> None:
        self._loop.start()

    def stop_monitor(self) -> None:
        self._loop.stop(timeout_s=5)

    # -- sessions ---------------------------------------------------------------------------

    def spawn(
        self,
        record: SessionRecord,
        *,
        argv: list[str],
        env: Mapping[str, str],
        cwd: str | None,
        ready_line: str | None,
        timeout_s: float,
        relaunch: Relauncher | None = None,
    ) -> None:
        """Start the app; the row is STARTING with its pid before this returns.

        Raises ``OSError`` when the program cannot be started; the caller fails the session.
        ``relaunch`` picks another port when the app exits saying its port was taken.
        """
        assert record.log_path and record.host and record.port
        Path(record.log_path).parent.mkdir(parents=True, exist_ok=True)
        # a new file of our own: never through a link, never one someone made for us
        fd = os.open(record.log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            popen = self._popen(record.id, fd, record.host, record.port, argv, env, cwd)
        finally:
            os.close(fd)
        pid_start = procs.start_time(popen.pid)
        moved = self.move(record.id, SessionState.STARTING, current=SessionState.SUBMITTED, pid=popen.pid,
                          pid_start=pid_start)
        watch = _Watch(
            session_id=record.id, pid=popen.pid, pid_start=pid_start, log_path=record.log_path,
            ready_line=ready_line.encode() if ready_line else None, host=record.host, port=record.port,
            deadline=time.monotonic() + timeout_s, state=SessionState.STARTING, popen=popen,
            relaunch=relaunch, ports_tried=[record.port],
        )
        if not moved:  # cancelled while we were starting it
            procs.terminate_group(popen.pid, pid_start)
            popen.wait()
            return
        with self._lock:
            self._watches[record.id] = watch
        self._loop.wake()

    def _popen(self, session_id: str, fd: int, host: str, port: int, argv: list[str], env: Mapping[str, str],
               cwd: str | None) -> subprocess.Popen[bytes]:
        """The app's process, its output appended to the log ``fd``."""
        if self.before_start is not None:
            self.before_start(host, port)
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
            cwd=cwd, env={**os.environ, **env, SESSION_ENV: session_id},
            start_new_session=True,  # own process group: stops as a whole, survives our restart
        )
        if os.sched_getaffinity(0) != ALL_CPUS:  # the launcher is pinned (pin_cpu); its apps are not
            try:
                os.sched_setaffinity(popen.pid, ALL_CPUS)
            except OSError:
                pass  # it already exited: the monitor will see that
        return popen

    def stop(self, record: SessionRecord) -> int | None:
        """Stop the process of a session already moved to a final state.

        Returns its exit code when it was our child (an adopted process's code is unknowable).
        """
        with self._lock:
            watch = self._watches.pop(record.id, None)
        if record.pid is not None:
            procs.terminate_group(record.pid, record.pid_start)
        if watch is not None and watch.popen is not None:
            return watch.popen.wait(timeout=10)
        return None

    def adopt(self, record: SessionRecord, ready_line: str | None, timeout_s: float) -> bool:
        """Re-attach to a session's process after a launcher restart; False if it is gone."""
        if record.pid is None or not procs.is_alive(record.pid, record.pid_start):
            return False
        started = record.starting_at.timestamp() if record.starting_at else time.time()
        remaining = timeout_s - (time.time() - started)
        watch = _Watch(
            session_id=record.id, pid=record.pid, pid_start=record.pid_start, log_path=record.log_path or "",
            ready_line=ready_line.encode() if ready_line else None, host=record.host or "",
            port=record.port or 0, deadline=time.monotonic() + remaining, state=record.state,
        )
        with self._lock:
            self._watches[record.id] = watch
        self._loop.wake()
        return True

    def watched(self) -> set[str]:
        with self._lock:
            return set(self._watches)

    # -- monitor ---------------------------------------------------------------------------

    def _step(self) -> float:
        """One pass of the monitor: check every watched session; fast while any is starting."""
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            try:
                self._check(watch)
            except Exception:  # one odd session must not stop the monitor
                log.exception("monitor: checking session %s", watch.session_id)
        return FAST_TICK_S if any(w.state == SessionState.STARTING for w in watches) else SLOW_TICK_S

    def _check(self, watch: _Watch) -> None:
        if watch.state == SessionState.STARTING and self._is_ready(watch):
            if self.move(watch.session_id, SessionState.READY, current=SessionState.STARTING):
                watch.state = SessionState.READY
            return
        exit_code = self._exit_code(watch)
        if exit_code is not False:
            self._finish_exited(watch, exit_code)
        elif watch.state == SessionState.STARTING and time.monotonic() > watch.deadline:
            self._fail(watch, f"not ready before the timeout; see the session log {watch.log_path}")
            # stopping may take the whole SIGTERM grace period: not on the monitor's thread
            threading.Thread(target=self._terminate, args=(watch,), name="pvw-stop", daemon=True).start()

    def _exit_code(self, watch: _Watch) -> int | None | bool:
        """The exit code (None when unknown) if the process is gone, else False."""
        if watch.popen is not None:
            code = watch.popen.poll()
            return False if code is None else code
        return False if procs.is_alive(watch.pid, watch.pid_start) else None

    def _finish_exited(self, watch: _Watch, exit_code: int | None) -> None:
        if watch.state == SessionState.STARTING and self._port_was_taken(watch) and self._start_again(watch):
            return
        with self._lock:
            self._watches.pop(watch.session_id, None)
        if watch.state == SessionState.STARTING:
            # it may have printed the ready line just before exiting: it still never served
            tail = log_tail(watch.log_path)
            code = "an unknown code" if exit_code is None else f"code {exit_code}"
            error = f"the process exited with {code} before it was ready; session log {watch.log_path}"
            if tail:
                error += f"; last lines:\n{tail}"
            self.move(watch.session_id, SessionState.FAILED, current=watch.state, exit_code=exit_code, error=error)
        else:
            self.move(watch.session_id, SessionState.ENDED, current=watch.state, exit_code=exit_code)

    def _port_was_taken(self, watch: _Watch) -> bool:
        """This start's output (its last 64 KiB) says the app could not bind its port."""
        if watch.relaunch is None or watch.tries >= PORT_TRIES or not watch.log_path:
            return False
        try:
            size = os.stat(watch.log_path).st_size
        except OSError:
            return False
        read = userfiles.read_range(watch.log_path, max(watch.try_offset, size - (1 << 16)), 1 << 16)
        if read is None:
            return False
        lowered = read[0].lower()
        return any(word in lowered for word in IN_USE_WORDS)

    def _start_again(self, watch: _Watch) -> bool:
        """Start the app of a session whose port was taken on another port; False when that cannot be done."""
        assert watch.relaunch is not None
        plan = watch.relaunch(watch.session_id, list(watch.ports_tried), watch.tries + 1)
        if plan is None:
            return False
        note = (f"\npvw-hpc: port {watch.port} was taken before the app could bind it (address already in use): "
                f"starting it again on port {plan.port} (try {watch.tries + 1} of {PORT_TRIES})\n")
        try:
            fd = os.open(watch.log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                os.write(fd, note.encode())
                offset = os.fstat(fd).st_size
                popen = self._popen(watch.session_id, fd, plan.host, plan.port, plan.argv, plan.env, plan.cwd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("session %s: could not start the app again: %s", watch.session_id, exc)
            return False
        pid_start = procs.start_time(popen.pid)
        self.store.update(watch.session_id, pid=popen.pid, pid_start=pid_start)
        watch.pid, watch.pid_start, watch.popen = popen.pid, pid_start, popen
        watch.host, watch.port, watch.tries = plan.host, plan.port, watch.tries + 1
        watch.offset = watch.try_offset = offset
        watch.tail = b""
        watch.ports_tried.append(plan.port)
        log.info("session %s: port taken, app started again on %s:%d (try %d)", watch.session_id, plan.host,
                 plan.port, watch.tries)
        current = self.store.get(watch.session_id)
        if current is None or current.is_final:  # stopped while we restarted it: the stop saw the old pid
            procs.terminate_group(popen.pid, pid_start)
        return True

    @staticmethod
    def _terminate(watch: _Watch) -> None:
        procs.terminate_group(watch.pid, watch.pid_start)
        if watch.popen is not None:
            watch.popen.wait(timeout=10)

    def _fail(self, watch: _Watch, error: str) -> None:
        with self._lock:
            self._watches.pop(watch.session_id, None)
        self.move(watch.session_id, SessionState.FAILED, current=watch.state, error=error)

    def _is_ready(self, watch: _Watch) -> bool:
        if watch.ready_line is None:
            return _port_answers(watch.host, watch.port)
        try:
            fd = os.open(watch.log_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            while True:
                chunk = os.pread(fd, 1 << 20, watch.offset)
                if not chunk:
                    return False
                watch.offset += len(chunk)
                window = watch.tail + chunk
                if watch.ready_line in window:
                    return True
                watch.tail = window[-(len(watch.ready_line) - 1):] if len(watch.ready_line) > 1 else b""
        finally:
            os.close(fd)


def _port_answers(host: str, port: int) -> bool:
    """Readiness for apps without a ready line: the port accepts a TCP connection."""
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "localhost") else host, port), timeout=0.2):
            return True
    except OSError:
        return False


def find_unrecorded(session_id: str) -> list[int]:
    """Pids of a session's processes that a crash kept us from recording (found by environment)."""
    return procs.pids_with_env(SESSION_ENV, session_id)
