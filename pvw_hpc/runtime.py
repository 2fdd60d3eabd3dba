"""The composition root: one place builds and owns everything a running launcher has.

``serve``, the CLI's in-process mode and tests that want a launcher without a
server use it, so the service, its backends and map writer, the poller and the
housekeeper are wired, started and stopped in one order everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType

from .batch.base import BatchAdapter
from .config import LauncherConfig
from .housekeeping import Housekeeper
from .poller import Poller
from .service import Service
from .store import Store

log = logging.getLogger(__name__)


class Runtime:
    """The service and its threads for one config; ``start()`` then ``close()`` (or use it as a context)."""

    def __init__(self, config: LauncherConfig, store: Store | None = None,
                 adapters: Mapping[str, BatchAdapter] | None = None):
        """Builds everything, starts nothing: tests may drive ``poller.tick()`` by hand before (or without) ``start``."""
        self.service = Service(config, store, adapters)
        self.poller = Poller(self.service)
        self.housekeeper = Housekeeper(self.service)

    def start(self, *, recover: bool = True, housekeeping: bool = True) -> Runtime:
        """Recover what the last run left (each backend), then start the map writer, backends, poller, housekeeper.

        ``recover=False``: the CLI's one-shot ``submit`` beside a running ``serve``, which owns recovery.
        """
        service = self.service
        if recover:
            service.start()
        else:
            service.config.log_dir.mkdir(parents=True, exist_ok=True)
            service.map.start()
            for backend in service.backends.values():
                backend.start()
        self.poller.start()
        if housekeeping:
            self.housekeeper.start()
        return self

    def close(self) -> None:
        """Stop in the reverse order; sessions keep running (the next start re-attaches to them)."""
        self.housekeeper.stop()
        self.poller.stop()
        self.service.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
