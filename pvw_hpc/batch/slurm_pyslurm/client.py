"""The launcher's side of the pyslurm worker (:mod:`.worker`): one process, one request at a time, a deadline each.

:class:`PyslurmWorker` starts the worker on first use (``sys.executable`` running worker.py,
its own process group, the launcher's environment), checks its ``version`` reply, and sends it
one request at a time. A request that does not get its reply by its deadline kills the
worker's process group and fails; a worker that ended (killed, crashed, libslurm's ``fatal()``)
is started again by the next request. A start that failed (pyslurm missing, built for another
Slurm, ``import pyslurm`` ending or hanging) is remembered for ``START_RETRY_S`` and answered
from memory meanwhile: not one process per poll.

Waiting for a reply releases the GIL, so a blocked libslurm call blocks only the worker.

``PyslurmWorker.in_process(module)`` is a fast seam beside the real tests: the worker's request
handler run in this process against ``module`` (a fake pyslurm), every request and reply through
JSON as over the pipe, without a process or a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from ..base import BatchError

log = logging.getLogger(__name__)

INSTALL_HINT = ("install the '[pyslurm]' extra from the vendored pyslurm: scripts/install-pyslurm "
                "(pip install --find-links <vendor folder> '.[pyslurm]'; no PyPI release builds against Slurm 22.05)")
API_VERSION = (22, 5)  # pyslurm must be built for the Slurm it talks to
START_RETRY_S = 60.0  # after a failed start, the next one waits this long (not one process per poll)
STDERR_LINES = 20  # the worker's last stderr lines kept for messages
EXIT_GRACE_S = 1.0  # close(): how long an idle worker gets to end on stdin's end before SIGKILL
# run by path, not imported here: ``python -m`` of it then finds no half-imported copy in sys.modules
WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
# the pyslurm call each request makes, for messages
CALLS = {"load": "Jobs.load", "submit": "JobSubmitDescription.submit", "cancel": "Job.cancel", "version": "version"}
READ_ONLY = frozenset({"load", "version"})  # asked again of a new worker when the old one ended during the request


class WorkerTimeout(Exception):
    """No reply by the deadline."""


class WorkerGone(Exception):
    """The worker ended; ``sent``: whether it may have read the request first."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class WorkerError(Exception):
    """The worker's ``error`` reply: ``kind``, ``text`` and, for ``rpc``, libslurm's ``errno``."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        self.kind = str(error.get("kind") or "value")
        self.text = str(error.get("text") or "no reason given")
        errno = error.get("errno")
        self.errno = errno if isinstance(errno, int) else None
        self.type = str(error.get("type") or "")
        super().__init__(self.text)


class Transport(Protocol):
    """One worker: exchanges one request dict for its reply dict."""

    pid: int | None

    def exchange(self, request: Mapping[str, Any], deadline: float) -> dict[str, Any]:
        """Send ``request``, return the reply; :class:`WorkerTimeout` past ``deadline`` (monotonic), :class:`WorkerGone`."""

    def alive(self) -> bool:
        """Whether it can still answer."""

    def why_gone(self) -> str:
        """How it ended (exit status, last stderr lines), for messages."""

    def close(self, kill: bool = False) -> None:
        """Stop it: stdin's end (and SIGKILL to its group after EXIT_GRACE_S), or SIGKILL at once."""

    def kill(self) -> None:
        """SIGKILL, from a thread other than the one exchanging (which then sees it end, and closes it)."""


# -- the worker as a process ------------------------------------------------------------------


class _Spawner:
    """Starts workers from one thread that lives as long as the launcher.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that started a process ends, not its process:
    a worker started by a short-lived request thread would be killed with it.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, start: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="pyslurm-worker-spawner", daemon=True)
                self._thread.start()
        done: Future[Any] = Future()
        self._requests.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller, which raises it
                done.set_exception(exc)


_SPAWNER = _Spawner()


class ProcessTransport:
    """The worker as a child process: JSON lines over its stdin and stdout, its stderr drained."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        argv = [*command, str(os.getpid())]
        self.proc: subprocess.Popen[bytes] = _SPAWNER.run(lambda: subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            env=dict(env) if env is not None else None, start_new_session=True))  # its own group, to kill whole
        self.pid: int | None = self.proc.pid
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self._buffer = bytearray()
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._stdin, self._stdout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._poll = select.poll()  # not select(): a launcher may hold descriptors above FD_SETSIZE
        self._poll.register(self._stdout, select.POLLIN)
        self._drain = threading.Thread(target=self._drain_stderr, args=(self.proc.stderr,), daemon=True,
                                       name=f"pyslurm-worker-{self.pid}-stderr")
        self._drain.start()

    def _drain_stderr(self, stream: Any) -> None:
        """libslurm's and the worker's words: kept for messages and logged at debug level."""
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    self.stderr_tail.append(line)
                    log.debug("pyslurm worker %s: %s", self.pid, line)

    def exchange(self, request: Mapping[str, Any], deadline: float) -> dict[str, Any]:
        data = memoryview(json.dumps(request).encode() + b"\n")
        try:
            while data:  # the worker reads each request whole before it answers: the pipe empties
                data = data[os.write(self._stdin, data):]
        except OSError as exc:  # EPIPE: it ended before reading this request
            raise WorkerGone(f"cannot write to the worker: {exc}", sent=False) from None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                try:
                    reply = json.loads(line)
                except ValueError:
                    raise WorkerGone(f"the worker wrote {line[:200]!r}, not a JSON reply", sent=True) from None
                if not isinstance(reply, dict):
                    raise WorkerGone(f"the worker wrote {line[:200]!r}, not a reply", sent=True)
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout()
            if not self._poll.poll(max(1, int(remaining * 1000 + 0.999))):  # waits without the GIL
                continue
            chunk = os.read(self._stdout, 1 << 20)
            if not chunk:
                raise WorkerGone("the worker ended before it answered", sent=True)
            self._buffer += chunk

    def alive(self) -> bool:
        return self.proc.poll() is None

    def why_gone(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        self._drain.join(timeout=1)  # its last words
        code = self.proc.returncode
        status = ("still running" if code is None else f"killed by signal {-code}" if code < 0 else f"exit {code}")
        said = "; ".join(list(self.stderr_tail)[-3:]) or "nothing on stderr"
        return f"{status}: {said}"

    def close(self, kill: bool = False) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]  # its end of the loop
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=EXIT_GRACE_S)
        if self.proc.poll() is None:  # busy in libslurm, or asked to
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()  # type: ignore[union-attr]
        self._drain.join(timeout=1)

    def kill(self) -> None:
        if self.proc.returncode is None:  # not reaped yet, so its pid (= its group's id) is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: anything it started too


class InProcessTransport:
    """The worker's request handler in this process, against ``module``; JSON both ways, as over the pipe."""

    pid: int | None = None

    def __init__(self, module: Any) -> None:
        from .worker import Worker, encode

        self.handler, self.encode = Worker(module), encode

    def exchange(self, request: Mapping[str, Any], deadline: float) -> dict[str, Any]:
        reply = self.handler.answer(json.loads(json.dumps(request)))
        return json.loads(self.encode(reply))  # type: ignore[no-any-return]

    def alive(self) -> bool:
        return True

    def why_gone(self) -> str:
        return "in process"

    def close(self, kill: bool = False) -> None:
        pass

    def kill(self) -> None:
        pass


# -- the client ---------------------------------------------------------------------------------


class PyslurmWorker:
    """One worker, started on first use and after it ended; one request at a time, each with its deadline.

    ``command``: how to run the worker (the launcher's pid is appended); ``env``: its
    environment (default the launcher's); ``transport``: makes the worker (tests: an
    :class:`InProcessTransport`).
    """

    def __init__(self, *, command: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 transport: Callable[[], Transport] | None = None, retry_s: float = START_RETRY_S) -> None:
        self.command = list(command) if command is not None else [sys.executable, WORKER_PATH]
        self.env = dict(env) if env is not None else None
        self._make = transport or (lambda: ProcessTransport(self.command, self.env))
        self.retry_s = retry_s
        self.version: dict[str, Any] | None = None  # the running worker's version reply
        self.starts = 0  # workers started that answered (a restart adds one)
        self.start_attempts = 0  # workers started, whether or not they answered
        self._lock = threading.Lock()
        self._transport: Transport | None = None
        self._closed: Transport | None = None  # killed by close() during a request: that request is not asked again
        self._start_failed: tuple[float, str] | None = None
        self._next_id = 0
        _CLIENTS.add(self)

    @classmethod
    def in_process(cls, module: Any) -> PyslurmWorker:
        """A fast seam beside the real tests: the handler against ``module`` in this process (no deadline)."""
        return cls(transport=lambda: InProcessTransport(module))

    @property
    def pid(self) -> int | None:
        """The running worker's pid (None: none running, or in process)."""
        transport = self._transport
        return transport.pid if transport is not None else None

    def request(self, op: str, timeout_s: float, **args: Any) -> Any:
        """The worker's ``ok`` value for ``op``; :class:`WorkerError` for its ``error`` reply.

        :class:`BatchError` when there is no answer: the worker could not start (remembered for
        ``retry_s``), took longer than ``timeout_s`` (it is killed; ``unreachable``), or ended
        during the request (``unreachable``: whether the controller got a submit or cancel is
        unknown). A worker found ended is replaced first; one that ends before it read the
        request (or during a read-only one) is replaced and asked again, within the same
        deadline. Waiting for another thread's request counts in ``timeout_s``; a worker's
        start has its own.
        """
        deadline = time.monotonic() + timeout_s
        what = CALLS.get(op, op)
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            raise BatchError(f"pyslurm {what}: the worker is still busy with another request after {timeout_s:g} s",
                             [f"pyslurm {what}"], unreachable=True)
        try:
            return self._request(op, what, args, timeout_s, deadline)
        finally:
            self._lock.release()

    def _request(self, op: str, what: str, args: Mapping[str, Any], timeout_s: float, deadline: float) -> Any:
        for attempt in (1, 2):
            transport = self._started(timeout_s)
            self._next_id += 1
            ask = self._next_id
            try:
                reply = transport.exchange({"id": ask, "op": op, **args}, deadline)
            except WorkerGone as gone:
                why = f"{gone}, {transport.why_gone()}"
                self._discard(transport, kill=True)
                again = attempt == 1 and transport is not self._closed and (not gone.sent or op in READ_ONLY)
                if again:  # a new worker gets it (a read-only one: again)
                    log.warning("pyslurm worker ended (%s); starting another for this %s", why, what)
                    continue
                raise BatchError(f"pyslurm {what}: the worker ended during the request ({why}); "
                                 "the next request starts another", [f"pyslurm {what}"], unreachable=True) from None
            except WorkerTimeout:
                log.warning("pyslurm %s: no answer in %g s; stopping the worker (pid %s)", what, timeout_s, transport.pid)
                self._discard(transport, kill=True)
                raise BatchError(f"pyslurm {what} did not answer in {timeout_s:g} s (is slurmctld answering?); "
                                 "the worker was stopped", [f"pyslurm {what}"], unreachable=True) from None
            if reply.get("id") != ask:
                self._discard(transport, kill=True)
                raise BatchError(f"pyslurm {what}: the worker answered request {reply.get('id')!r}, not {ask}",
                                 [f"pyslurm {what}"])
            if "error" in reply:
                raise WorkerError(reply["error"] if isinstance(reply["error"], Mapping) else {"text": reply["error"]})
            return reply.get("ok")
        raise AssertionError("unreachable")  # pragma: no cover  # the loop returns or raises

    def check(self, timeout_s: float) -> dict[str, Any]:
        """Start the worker now if it is not running; its version reply, or :class:`BatchError` saying why not."""
        with self._lock:
            self._started(timeout_s)
            return dict(self.version or {})

    def _started(self, timeout_s: float) -> Transport:
        """The running worker, or a new one that answered ``version`` for this Slurm (under the lock)."""
        transport = self._transport
        if transport is not None:
            if transport.alive():
                return transport
            log.warning("pyslurm worker %s ended (%s); starting another", transport.pid, transport.why_gone())
            self._discard(transport, kill=True)
        failed = self._start_failed
        if failed is not None and time.monotonic() - failed[0] < self.retry_s:
            raise BatchError(failed[1])
        self.start_attempts += 1
        try:
            transport = self._make()
        except OSError as exc:
            return self._start_failure(None, f"cannot start the pyslurm worker ({self.command[0]}): {exc}")
        try:
            reply = transport.exchange({"id": 0, "op": "version"}, time.monotonic() + timeout_s)
        except WorkerTimeout:
            return self._start_failure(transport, (
                f"import pyslurm did not finish in {timeout_s:g} s in the pyslurm worker (libslurm retries for 60 s "
                "when it cannot read slurm.conf; is SLURM_CONF right?)"))
        except WorkerGone as gone:
            return self._start_failure(transport, f"the pyslurm worker ended while importing pyslurm "
                                                  f"({transport.why_gone()}; {gone})")
        error = reply.get("error")
        if isinstance(error, Mapping):
            text = str(error.get("text"))
            hint = f"; {INSTALL_HINT}" if error.get("kind") == "import" else ""
            return self._start_failure(transport, f"{text}{hint}")
        ok = reply.get("ok")
        version: dict[str, Any] = ok if isinstance(ok, dict) else {}
        api = tuple(version.get("api") or ())
        if api[:2] != API_VERSION:
            return self._start_failure(transport, (
                f"pyslurm {version.get('version')} {api} is built for another Slurm; this adapter needs pyslurm "
                f"{API_VERSION[0]}.{API_VERSION[1]} (Slurm 22.05)"))
        self._transport, self._start_failed, self.version = transport, None, version
        self.starts += 1
        log.info("pyslurm worker started (pid %s, pyslurm %s)", transport.pid, version.get("version"))
        return transport

    def _start_failure(self, transport: Transport | None, why: str) -> Transport:
        if transport is not None:
            transport.close(kill=True)
        self._start_failed = (time.monotonic(), why)
        raise BatchError(why)

    def _discard(self, transport: Transport, kill: bool) -> None:
        if self._transport is transport:
            self._transport = None
        transport.close(kill=kill)

    def close(self) -> None:
        """Stop the worker (a later request starts another): stdin's end when idle, SIGKILL when busy."""
        if not self._lock.acquire(blocking=False):  # a request in flight: it sees the worker end, and cleans up
            transport = self._transport
            if transport is not None:
                self._closed = transport
                transport.kill()
            return
        try:
            transport = self._transport
            if transport is not None:
                self._discard(transport, kill=False)
        finally:
            self._lock.release()


_CLIENTS: weakref.WeakSet[PyslurmWorker] = weakref.WeakSet()
_shared: PyslurmWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> PyslurmWorker:
    """The launcher process's one worker, which every pyslurm cluster's adapter uses."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PyslurmWorker()
        return _shared


@atexit.register
def _close_all() -> None:
    """Workers end with the launcher: at its orderly exit here, else by stdin's end or PR_SET_PDEATHSIG."""
    for client in list(_CLIENTS):
        with contextlib.suppress(Exception):
            client.close()
