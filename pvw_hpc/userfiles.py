"""Reading files that live in folders other users own, without trusting them.

A batch job's folder belongs to the user the job runs as, and the launcher
(often root) reads the job log, ``exit_code`` and ``end_reason`` from it. Any
of those may have been replaced by the user: a symlink to ``/etc/shadow``
would make root read it for them, a FIFO would block a plain ``open()``
forever, a sparse 1 TB file would fill memory. So every such read here:

* opens the folder and then the file relative to it with ``O_NOFOLLOW``
  (no symlink is followed, neither the file nor the folder) and
  ``O_NONBLOCK`` (opening a FIFO or a device returns at once);
* checks with ``fstat`` that it is a regular file owned by the folder's owner
  (a hard link to someone else's file has another owner) and reads a bounded
  number of bytes;
* treats anything else as "no such file", logged once per path.

:class:`BoundedReader` runs reads on worker threads with a deadline, so a
hung file system (a dead NFS server) stalls one read, never the poller.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
SMALL_FILE_BYTES = 4096  # exit_code, end_reason: a number or one line
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_warned: set[str] = set()
_warned_lock = threading.Lock()


class RefusedFile(OSError):
    """A file that is not what the launcher wrote or expects (a link, a FIFO, someone else's)."""


def _warn_once(path: str, why: str) -> None:
    with _warned_lock:
        if path in _warned:
            return
        if len(_warned) > 10000:  # bounded: a flood of odd files must not grow memory
            _warned.clear()
        _warned.add(path)
    log.warning("not reading %s: %s (treated as absent)", path, why)


def open_checked(path: str | os.PathLike[str]) -> int:
    """An fd for reading ``path``, a regular file owned by its folder's owner; raises OSError otherwise.

    Neither the file nor its folder may be a symlink. Missing files raise
    FileNotFoundError as usual; a refused file raises :class:`RefusedFile`.
    """
    path = Path(path)
    dir_fd = os.open(path.parent, _DIR_FLAGS)
    try:
        try:
            fd = os.open(path.name, _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the last component is a symlink
                raise RefusedFile(errno.ELOOP, "a symbolic link", str(path)) from None
            raise
        folder_uid = os.fstat(dir_fd).st_uid
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif info.st_uid != folder_uid:
        problem = f"owned by uid {info.st_uid}, not by the folder's owner (uid {folder_uid})"
    if problem is not None:
        os.close(fd)
        raise RefusedFile(errno.EPERM, problem, str(path))
    return fd


@contextmanager
def _opened(path: str | os.PathLike[str]) -> Iterator[int | None]:
    """The fd of ``path`` checked by :func:`open_checked`, or None (absent; refused: logged once); closed after."""
    try:
        fd = open_checked(path)
    except RefusedFile as exc:
        _warn_once(str(path), exc.strerror or "refused")
        yield None
        return
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def read_range(path: str | os.PathLike[str], offset: int, limit: int) -> tuple[bytes, int] | None:
    """Up to ``limit`` bytes from ``offset`` and the file's size; None when absent or refused."""
    with _opened(path) as fd:
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            return (os.pread(fd, max(0, min(limit, size - offset)), offset) if offset < size else b""), size
        except OSError:
            return None


def read_tail(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """The last ``limit`` bytes of a file; None when absent or refused."""
    with _opened(path) as fd:
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, min(limit, size), max(0, size - limit))
        except OSError:
            return None


def read_small(path: str | os.PathLike[str], limit: int = SMALL_FILE_BYTES) -> str | None:
    """A small text file (a number, one line) stripped; None when absent, refused or larger than ``limit``."""
    with _opened(path) as fd:
        if fd is None:
            return None
        try:
            if os.fstat(fd).st_size > limit:
                _warn_once(str(path), f"larger than {limit} bytes")
                return None
            return os.pread(fd, limit, 0).decode("utf-8", "replace").strip()
        except OSError:
            return None


class BoundedReader:
    """Runs file reads on a few worker threads; a caller waits at most ``timeout_s`` for its answer.

    A read that does not finish in time answers the default ("unknown"): the
    caller carries on, and the stuck worker is not given more of that path's
    reads while it is still stuck.
    """

    def __init__(self, workers: int = 4, timeout_s: float = 2.0):
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pvw-userfiles")
        self._stuck: dict[str, Future[object]] = {}
        self._lock = threading.Lock()

    def call(self, key: str, fn: Callable[[], T], default: T) -> T:
        """``fn()`` if it answers in time, else ``default``; ``key`` names the file (one stuck read per key)."""
        return self.many([(key, fn)], default)[0]

    def many(self, calls: Iterable[tuple[str, Callable[[], T]]], default: T) -> list[T]:
        """Run several reads at once under one deadline; answers in order, ``default`` where late or stuck."""
        pending: list[tuple[str, Future[T] | None]] = []
        with self._lock:
            self._stuck = {k: f for k, f in self._stuck.items() if not f.done()}
        for key, fn in calls:
            with self._lock:
                if key in self._stuck or len(self._stuck) >= self.workers:
                    # still hanging since an earlier cycle, or every worker is: answer "unknown" at once
                    pending.append((key, None))
                    continue
            pending.append((key, self._pool.submit(fn)))
        deadline = time.monotonic() + self.timeout_s
        answers: list[T] = []
        for key, future in pending:
            if future is None:
                answers.append(default)
                continue
            try:
                answers.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                with self._lock:
                    self._stuck[key] = future  # type: ignore[assignment]
                _warn_once(key, f"no answer within {self.timeout_s:g} s (a hung file system?)")
                answers.append(default)
            except Exception:  # noqa: BLE001 - a read that fails is a file we know nothing about
                log.exception("reading %s failed", key)
                answers.append(default)
        return answers

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

