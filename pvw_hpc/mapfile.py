"""The session map file that Apache's ``RewriteMap txt:`` reads.

Format (stock): one ``<id> <host>:<port>`` line per READY session. The file is
derived state: it is always rebuilt whole from the database, never edited.

How it is written, and why (measured in shared/reference/apache.md):

* temp file in the same folder + ``rename``: in-place rewrites made 1-70 % of
  WebSocket connects fail while a write was in progress; rename gave none;
* mode 0644 set on the open file before the rename: Apache's children run as
  www-data, and a later chmod does not help because the failed read is cached;
* fsync, then an mtime strictly newer than the old file's: Apache caches lookups
  (misses too) keyed on the mtime, so an unchanged mtime serves stale answers;
* an ``flock`` on ``<file>.lock``: ``pvw-hpc flush-map`` and a running launcher
  may write at the same time.

:class:`MapWriter` coalesces bursts: many sessions becoming ready together cause
one or two writes, and callers that need their line in place (a POST about to
answer 200) wait for a write that started after their request.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .validate import host_port, is_session_id, is_valid_host, is_valid_port

log = logging.getLogger(__name__)

Route = tuple[str, str, int]


class BadRoute(ValueError):
    """A route that must not reach the map file."""


def format_routes(routes: Iterable[Route]) -> str:
    """The file's text; raises :class:`BadRoute` for anything that could corrupt a line."""
    lines = []
    for session_id, host, port in routes:
        if not is_session_id(session_id):
            raise BadRoute(f"bad session id {session_id!r}")
        if not is_valid_host(host):
            raise BadRoute(f"bad host {host!r} for session {session_id}")
        if not is_valid_port(port):
            raise BadRoute(f"bad port {port!r} for session {session_id}")
        lines.append(f"{session_id} {host_port(host, port)}\n")
    return "".join(lines)


def _safe_routes(routes: Iterable[Route]) -> list[Route]:
    """Drop (and log) invalid routes so one bad row cannot take every session's route away."""
    good = []
    for route in routes:
        try:
            format_routes([route])
        except BadRoute as exc:
            log.error("map file: skipping %s", exc)
            continue
        good.append(route)
    return good


def write_map_file(path: Path, routes: Iterable[Route]) -> bool:
    """Atomically replace ``path`` with ``routes``; False when the content was already current."""
    text = format_routes(_safe_routes(routes))
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_name(path.name + ".lock"),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(lock_fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = path.stat()
            if old.st_mode & 0o777 == 0o644 and path.read_text() == text:
                return False
            old_mtime_ns = old.st_mtime_ns
        except FileNotFoundError:
            old_mtime_ns = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
            mtime_ns = max(time.time_ns(), old_mtime_ns + 1_000_000)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


class MapWriter:
    """Coalesces map rewrites into a background thread; ``sync()`` waits for one to finish."""

    def __init__(self, path: Path, routes: Callable[[], list[Route]], periodic_s: float = 5.0):
        self.path = path
        self.periodic_s = periodic_s  # also rewrite (if it differs) this often: repairs outside edits
        self._routes = routes
        self._cond = threading.Condition()
        self._requested = 0
        self._written = 0
        self._failed_gen = 0
        self._changing = 0  # state changes under way that will request a rewrite (see changing())
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pvw-map-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def request(self) -> int:
        """Ask for a rewrite; returns a generation number to wait for."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around a state change that may change the routes and requests a rewrite before it ends.

        Between the row's commit and its ``request()`` a reader would otherwise see the new state
        while nothing is pending yet, and answer it with the old map on disk.
        """
        with self._cond:
            self._changing += 1
        try:
            yield
        finally:
            with self._cond:
                self._changing -= 1
                self._cond.notify_all()

    def pending(self) -> bool:
        """True while a requested rewrite has not reached the disk yet, or a state change is about to ask for one."""
        with self._cond:
            return self._thread is not None and (self._written < self._requested or self._changing > 0)

    def wait_pending(self, timeout_s: float = 10.0) -> bool:
        """Wait for the rewrites already requested, without asking for another (cheap for readers)."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._changing > 0:  # their requests come before they end
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            target = self._requested
            while self._written < target and self._failed_gen < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._written >= target

    def sync(self, timeout_s: float = 10.0) -> bool:
        """Request a rewrite and wait until it is on disk. Writes inline if no thread runs."""
        if self._thread is None:
            self.write_now()
            return True
        gen = self.request()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._written < gen and self._failed_gen < gen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._written >= gen

    def write_now(self) -> bool:
        return write_map_file(self.path, self._routes())

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stop and self._written >= self._requested:
                    self._cond.wait(self.periodic_s)
                if self._stop:
                    return
                target = self._requested
            try:
                self.write_now()
            except Exception:  # a full disk must not kill the writer; the next request retries
                log.exception("could not write map file %s", self.path)
                with self._cond:
                    self._failed_gen = target
                    self._cond.notify_all()
                time.sleep(0.5)
                continue
            with self._cond:
                self._written = target
                self._cond.notify_all()
