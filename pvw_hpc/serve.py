"""``pvw-hpc serve``: the service's threads plus the Flask app under waitress.

waitress is a production WSGI server (multi-threaded, pure Python): one process
keeps the local backend's children and the monitor in one place, and blocking
POSTs (a launch waits for its app) each hold one of ``threads`` threads.

Stopping the server (SIGTERM, Ctrl-C) leaves the sessions running: the next
start re-attaches to them. Stop sessions with DELETE or ``pvw-hpc cancel``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from . import ephemeral, folders
from .api import create_app
from .api.fast_get import FastSessionGet
from .config import LauncherConfig
from .connections import create_server, raise_fd_limit
from .runtime import Runtime

log = logging.getLogger("pvw_hpc")


class _OwnFileHandler(logging.FileHandler):
    """The launcher's log: appended without following a symlink (O_NOFOLLOW), created 0640."""

    def _open(self):  # type: ignore[no-untyped-def]  # logging's own signature
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def setup_logging(config: LauncherConfig) -> None:
    """Log to stderr and ``<log_dir>/launcher.log`` (the folders are checked by :func:`folders.prepare`)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), _OwnFileHandler(config.log_dir / "launcher.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" is noise here


def serve(config: LauncherConfig) -> None:
    """Run until SIGTERM/SIGINT; prints the listening URL on stdout once it is bound.

    Raises :class:`folders.FolderError` before anything is written when a folder is not safe.
    """
    folders.prepare(config)
    setup_logging(config)
    if config.pin_cpu:  # before any thread starts, so all of them inherit it
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        log.info("pinned to CPU %d (pin_cpu); apps still get every CPU", cpu)
    for where, why in ephemeral.warnings(config, ephemeral.local_range()):
        log.warning("%s: %s", where, why)
    runtime = Runtime(config).start()  # each backend recovers, then the threads start
    service = runtime.service
    app = FastSessionGet(create_app(service=service), service)  # session reads skip Flask (see fast_get.py)
    # idle and slow clients must not crowd out /health and the API (configuration.connections)
    raise_fd_limit(config.connections)
    server = create_server(app, limits=config.connections, trusted=config.auth.is_trusted_proxy,
                           host=config.host, port=config.port, threads=config.threads)
    listen = server.effective_listen
    host, port = listen[0][:2]
    service.listening_url = f"http://{host}:{port}/{config.endpoint}"
    print(f"pvw-hpc: serving {service.listening_url}/", flush=True)
    log.info("serving on %s, config %s, database %s", listen, config.source, config.database_url)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping the server; sessions keep running", signum)
        server.close()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.run()
    finally:
        runtime.close()
