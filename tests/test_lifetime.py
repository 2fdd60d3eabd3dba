"""Session lifetime with a real `pvw-hpc serve`: maximum age, idle time, and purging ended sessions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LauncherFactory, demo_app_config, wait_for
from tests.support.wslink_client import WslinkClient

PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")


@pytest.mark.slow  # waits out a max_age
def test_max_age_ends_the_session_and_list_shows_when(launcher: LauncherFactory) -> None:
    lau = launcher(apps={"short": {**demo_app_config(), "max_age": 3}})
    body = lau.launch("short")
    view = lau.get(body["id"]).json()
    assert view["expires_at"] > view["transitions"]["starting"]
    listed = subprocess.run([PVW_HPC, "list", "--config", str(lau.config_path)], capture_output=True, text=True,
                            check=True).stdout
    assert view["expires_at"] in listed
    wait_for(lambda: lau.state(body["id"]) == "ended", 15, "the maximum age to end the session", interval=0.2)
    assert "maximum age" in lau.get(body["id"]).json()["reason"]
    assert lau.map_lines() == []
    wait_for(lambda: lau.pids_of(body["id"]) == [], 10, "the app to be stopped")


@pytest.mark.slow  # waits out idle timeouts
def test_idle_sessions_end_but_connected_ones_stay(launcher: LauncherFactory) -> None:
    lau = launcher(apps={"demo": {**demo_app_config(), "idle_timeout": 3}})
    body = lau.launch("demo")
    url = f"ws://127.0.0.1:{body['port']}/ws"
    with WslinkClient.open(url, body["secret"]) as client:
        for _ in range(6):  # 6 s connected: longer than the idle timeout
            assert client.call("demo.add", [1, 1]) == 2
            time.sleep(1)
        assert lau.state(body["id"]) == "ready"
    started = time.monotonic()
    wait_for(lambda: lau.state(body["id"]) == "ended", 20, "the idle session to end", interval=0.2)
    assert time.monotonic() - started >= 2.5
    assert "idle" in lau.get(body["id"]).json()["reason"]


def test_ended_sessions_are_purged_with_their_logs(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"keep_ended": 1})
    body = lau.launch("demo")
    log = lau.session_log(body["id"])
    assert log.exists()
    lau.delete(body["id"])
    wait_for(lambda: lau.get(body["id"]).status_code == 404, 15, "the ended session to be purged", interval=0.2)
    assert not log.exists()
    assert body["id"] not in {row[0] for row in lau.db_rows()}
