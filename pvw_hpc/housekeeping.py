"""Session lifetime: maximum age, idle time, and purging what ended long ago.

* ``apps.<name>.max_age``: a session is stopped this long after it started,
  whatever it is doing (a fair share of a shared machine);
* ``apps.<name>.idle_timeout``: a ready session with no client connection for
  this long is stopped. For local sessions the launcher looks at the machine's
  TCP table; batch sessions are watched by their job side on the node, which
  knows its own connections (``jobscripts/_common/jobside.py``);
* ``configuration.keep_ended``: ended and failed sessions stay listed this long,
  then their rows, session logs and job folders are removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from pathlib import Path

from .loops import BackgroundLoop
from .service import Service
from .states import FINAL_STATES, SessionState
from .store import SessionRecord, utcnow

log = logging.getLogger(__name__)

TICK_S = 2.0
_ESTABLISHED = "01"


def established_ports() -> set[int]:
    """Local ports of this machine with an established TCP connection (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _ESTABLISHED:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


class Housekeeper:
    """One thread of ``pvw-hpc serve``; ``tick()`` runs one pass (tests call it directly)."""

    def __init__(self, service: Service):
        self.service = service
        self._last_seen: dict[str, float] = {}  # session -> monotonic time a client was last connected
        self._loop = BackgroundLoop("pvw-housekeeper", self._step, after_error_s=TICK_S, first_after_s=TICK_S)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _step(self) -> float:
        self.tick()
        return TICK_S

    def _sees_clients(self, backend: str) -> bool:
        """Whether the launcher itself can see a session's clients (local: this machine's TCP table)."""
        found = self.service.backends.get(backend)
        return bool(found is not None and found.sees_clients)

    def tick(self) -> dict[str, int]:
        counts = {"max_age": 0, "idle": 0, "purged": 0}
        now = utcnow()
        connected = None
        for record in self.service.store.active():
            app = self.service.config.apps.get(record.application)
            if app is None:
                continue
            if app.max_age_s and record.starting_at and now - record.starting_at > dt.timedelta(seconds=app.max_age_s):
                self._end(record, f"maximum age of {app.max_age_s:g} s reached")
                counts["max_age"] += 1
                continue
            if app.idle_timeout_s and self._sees_clients(record.backend) and record.state == SessionState.READY:
                connected = established_ports() if connected is None else connected
                if self._idle(record, record.port in connected, app.idle_timeout_s):
                    self._end(record, f"idle: no client for {app.idle_timeout_s:g} s")
                    counts["idle"] += 1
        counts["purged"] = self.purge(now)
        return counts

    def _idle(self, record: SessionRecord, has_client: bool, limit_s: float) -> bool:
        clock = time.monotonic()
        if has_client or record.id not in self._last_seen:
            self._last_seen[record.id] = clock  # a restart of the launcher restarts the idle clock
            return False
        return clock - self._last_seen[record.id] > limit_s

    def _end(self, record: SessionRecord, reason: str) -> None:
        log.info("session %s: %s", record.id, reason)
        self._last_seen.pop(record.id, None)
        self.service.stop(record.id, reason=reason)

    def purge(self, now: dt.datetime | None = None) -> int:
        """Remove sessions that ended more than ``keep_ended`` ago, with their logs and job folders."""
        cutoff = (now or utcnow()) - dt.timedelta(seconds=self.service.config.keep_ended_s)
        old = [r for r in self.service.store.list(FINAL_STATES)
               if (r.ended_at or r.failed_at or r.updated_at) < cutoff]
        config = self.service.config
        for record in old:
            cluster = config.clusters.get(record.backend)
            # only paths this launcher made: <cluster job_dir>/<id> and <log_dir>/<id>.txt
            if cluster is not None and record.job_dir and Path(record.job_dir) == cluster.job_dir / record.id:
                try:  # the folder is the job user's: it may be nested past Python's recursion limit
                    shutil.rmtree(record.job_dir, ignore_errors=True)
                except (RecursionError, OSError) as exc:
                    log.warning("could not remove the job folder %s of session %s: %r", record.job_dir, record.id, exc)
            if record.log_path and Path(record.log_path) == config.log_dir / f"{record.id}.txt":
                Path(record.log_path).unlink(missing_ok=True)
        self.service.store.delete([r.id for r in old])
        return len(old)
