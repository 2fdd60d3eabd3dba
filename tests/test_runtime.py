"""The composition root: one ``Runtime`` builds, starts and stops the service and its threads (real demo app)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from pvw_hpc.config import load_dict
from pvw_hpc.runtime import Runtime
from tests.conftest import DEMO_APP, demo_app_config, free_port_range


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("pvw-")}


def test_a_runtime_starts_everything_a_launch_needs_and_stops_it_all(tmp_path: Path) -> None:
    lo, hi = free_port_range(3)
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "timeout": 20,
                             "proxy_file": str(tmp_path / "proxy.txt"), "log_dir": str(tmp_path / "logs"),
                             "sessionURL": "ws://${host}:${port}/ws"},
           "resources": [{"host": "127.0.0.1", "port_range": [lo, hi]}],
           "properties": {"python_exec": sys.executable, "demo_app": str(DEMO_APP)},
           "apps": {"demo": demo_app_config()}}
    before = _threads()
    with Runtime(load_dict(raw, source="tests/test_runtime.py")).start() as runtime:
        assert {"pvw-map-writer", "pvw-local-monitor", "pvw-housekeeper"} <= _threads() - before
        result = runtime.service.launch({"application": "demo"})
        assert result.status == 200, result.record
        assert (tmp_path / "proxy.txt").read_text().startswith(result.session_id)
        assert runtime.service.stop(result.session_id).state.value == "ended"
    assert _threads() - before == set()  # closed in order, nothing left running
