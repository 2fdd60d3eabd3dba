"""One small helper for the launcher's background threads (poller, housekeeper, local monitor).

Each of them is "run one step, sleep until the next one is due or someone wakes
me, never die of one bad step, stop promptly when asked"; written once here
instead of a hand-rolled Event/Thread/join per class.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundLoop:
    """A daemon thread calling ``step()``, which returns the seconds until it should run again.

    ``wake()`` runs the next step at once; an exception in a step is logged and the
    loop waits ``after_error_s`` before the next one.
    """

    def __init__(self, name: str, step: Callable[[], float], after_error_s: float = 5.0, first_after_s: float = 0.0):
        self.name = name
        self._first_after_s = first_after_s  # wait this long before the first step
        self._step = step
        self._after_error_s = after_error_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        if self._first_after_s and self._stop.wait(self._first_after_s):
            return
        while not self._stop.is_set():
            try:
                interval = self._step()
            except Exception:  # one bad step must not end the loop (and with it the launcher's duty)
                log.exception("%s: step failed", self.name)
                interval = self._after_error_s
            self._wake.wait(interval)
            self._wake.clear()
