"""``apps.<name>.display: "xvfb"``: one private X server per session, started and stopped with the app.

Real parts: Debian's Xvfb, the job side's own wrapper, a real X connection setup from the app
(``tests/support/x_hello.py`` answers "ready" only when its X server accepts the session's
cookie), the local backend through an in-process ``Runtime`` and a real SLURM job through a
real ``pvw-hpc serve``. Checked: each session gets its own display, a connection without the
cookie is refused, and no Xvfb is left once the session is stopped.
"""

from __future__ import annotations

import shutil
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvw_hpc import procs
from pvw_hpc.config import ConfigError, load_dict
from pvw_hpc.local import SESSION_ENV
from pvw_hpc.runtime import Runtime
from tests.conftest import Launcher, LauncherFactory, free_port_range, slurm_reason, wait_for

X_HELLO = Path(__file__).parent / "support" / "x_hello.py"
APP = {"cmd": [sys.executable, str(X_HELLO), "--port", "${port}"], "ready_line": "x-hello ready", "display": "xvfb"}

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="no Xvfb (examples/paraview/setup installs it)")


def _xvfbs(env_name: str, value: str) -> list[int]:
    """Pids of the Xvfb processes whose environment has ``env_name=value``."""
    out = []
    for pid in procs.pids_with_env(env_name, value):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "Xvfb":
                out.append(pid)
        except OSError:
            continue
    return out


def _display_of(log: str) -> str:
    line = next(line for line in log.splitlines() if line.startswith("x-hello: DISPLAY="))
    return line.split()[1].split("=", 1)[1]


def _refuses_without_cookie(display: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("\0/tmp/.X11-unix/X" + display.lstrip(":"))
        sock.sendall(struct.pack("<cxHHHHxx", b"l", 11, 0, 0, 0))
        return sock.recv(8)[0] == 0  # 0: "failed" (no authorization)


def test_a_display_other_than_xvfb_is_a_config_error(tmp_path: Path) -> None:
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview",
                             "proxy_file": str(tmp_path / "p.txt"), "sessionURL": "ws://x/${id}",
                             "log_dir": str(tmp_path / "l")},
           "resources": [{"host": "127.0.0.1", "port_range": [9100, 9101]}],
           "apps": {"viz": {"cmd": ["app"], "display": "vnc"}}}
    with pytest.raises(ConfigError) as failed:
        load_dict(raw, source="test")
    assert any(p.path == "$.apps.viz.display" and "xvfb" in p.message for p in failed.value.problems)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Runtime]:
    lo, hi = free_port_range(4)
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "timeout": 30,
                             "proxy_file": str(tmp_path / "proxy.txt"), "log_dir": str(tmp_path / "logs"),
                             "sessionURL": "ws://${host}:${port}/ws"},
           "resources": [{"host": "127.0.0.1", "port_range": [lo, hi]}], "apps": {"x": APP}}
    with Runtime(load_dict(raw, source="tests/test_display.py")).start() as runtime:
        yield runtime


def test_each_local_session_gets_its_own_x_server_and_none_is_left(local: Runtime) -> None:
    sessions = [local.service.launch({"application": "x"}) for _ in range(2)]
    assert [s.status for s in sessions] == [200, 200], [s.record for s in sessions]
    displays = []
    for result in sessions:
        log = Path(str(result.record.log_path)).read_text()
        displays.append(_display_of(log))
        assert "private X server" in log and "setup reply 1" in log and "auth mode 600" in log
        assert len(_xvfbs(SESSION_ENV, result.session_id)) == 1  # its own, in its process group
        assert _refuses_without_cookie(displays[-1])
    assert displays[0] != displays[1]
    for result in sessions:
        local.service.stop(result.session_id)
    wait_for(lambda: not any(_xvfbs(SESSION_ENV, s.session_id) for s in sessions), 10, "the X servers to stop")
    assert all(_gone(display) for display in displays)


def _gone(display: str) -> bool:
    """Nothing accepts on the display's abstract socket any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect("\0/tmp/.X11-unix/X" + display.lstrip(":"))
        except OSError:
            return True
    return False


slurm = pytest.mark.skipif(slurm_reason() is not None, reason=str(slurm_reason()))


@pytest.fixture(scope="module")
def slurm_x(module_launcher: LauncherFactory) -> Launcher:
    return module_launcher(
        session_url="ws://USE_HOST/proxy?sessionId=${id}&path=ws", timeout=60,
        clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.5, "poll_slow_s": 2,
                            "defaults": {"partition": "debug", "time": "00:10:00", "cpus": 1}}},
        apps={"x": {**APP, "cluster": "slurm"}},
    )


@pytest.mark.slurm
@slurm
def test_a_slurm_job_gets_a_private_x_server_stopped_with_it(slurm_x: Launcher) -> None:
    response = slurm_x.post({"application": "x"})
    assert response.status_code == 200, response.text
    session_id = response.json()["id"]
    job_dir = slurm_x.root / "jobs" / "slurm" / session_id
    log = (job_dir / "job.log").read_text()
    assert "private X server" in log and "setup reply 1" in log, log
    display = _display_of(log)
    assert len(_xvfbs("PVW_JOB_DIR", str(job_dir))) == 1 and _refuses_without_cookie(display)
    assert slurm_x.delete(session_id).json()["state"] == "ended"
    wait_for(lambda: not _xvfbs("PVW_JOB_DIR", str(job_dir)) and _gone(display), 30, "the job's X server to stop")

