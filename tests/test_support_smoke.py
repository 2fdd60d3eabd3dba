"""Smoke tests proving the test-support pieces work together, with no mocks.

A real demo wslink app (``examples/demo/app.py``) is spawned, reached first
directly and then through a real private Apache using the ParaViewWeb
RewriteMap vhost, with the real wslink 2.x client in ``tests/support``. If
these fail, every higher-level launcher test would fail for reasons that
have nothing to do with the launcher, so they are worth running first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus, WebSocketException

from tests.support.apache import ApacheInstance, skip_reason
from tests.support.wslink_client import WslinkError, connect_and_call

REPO_ROOT = Path(__file__).resolve().parents[1]

DEMO_APP = REPO_ROOT / "examples" / "demo" / "app.py"
READY = b"wslink: Starting factory"
SECRET = "smoke-secret-7f3a"


@dataclass
class DemoApp:
    """A running demo app: where it listens and how to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def ws_url(self) -> str:
        """Direct WebSocket URL (wslink's default ``ws`` endpoint)."""
        return f"ws://127.0.0.1:{self.port}/ws"


def _free_port() -> int:
    """Free port on 127.0.0.1 (same helper Apache uses)."""
    from tests.support.apache import free_port

    return free_port()


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process by PID and wait; SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait for wslink's ready bytes in the app's stdout log.

    The ready line has no trailing newline, so we match bytes, never lines.
    stdout goes to a file rather than a pipe so that nothing can block the
    app later if it writes more than a pipe buffer.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY in log.read_bytes():
            return
        if proc.poll() is not None:
            out = log.read_bytes().decode(errors="replace")
            pytest.fail(f"demo app exited with {proc.returncode} before ready:\n{out}")
        time.sleep(0.02)
    out = log.read_bytes().decode(errors="replace")
    pytest.fail(f"demo app not ready within {timeout} s; output so far:\n{out}")


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoApp]:
    """Start the demo app on a free port with a known secret; always stop it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(DEMO_APP),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--authKey",
                SECRET,
                "--timeout",
                "120",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # The ready line must come from wslink itself, not an override.
            env={k: v for k, v in os.environ.items() if k != "WSLINK_READY_MSG"},
        )
    try:
        _wait_ready(proc, log, timeout=30)
        yield DemoApp(proc=proc, port=port, log=log)
    finally:
        _stop(proc)


def test_direct_rpc(demo_app: DemoApp) -> None:
    """Right secret: hello succeeds and RPCs return real results."""
    out = connect_and_call(
        demo_app.ws_url,
        SECRET,
        [("demo.add", [2, 3]), ("demo.whoami", []), ("demo.echo", ["héllo"])],
    )
    assert out["hello"]["clientID"].startswith("c")
    add, whoami, echo = out["results"]
    assert add == 5
    assert whoami["port"] == demo_app.port
    assert whoami["pid"] == demo_app.proc.pid
    assert echo == "héllo"


def test_wrong_secret_rejected(demo_app: DemoApp) -> None:
    """Wrong secret: the hello error surfaces as WslinkError (-32000)."""
    with pytest.raises(WslinkError, match="(?i)authentication") as info:
        connect_and_call(demo_app.ws_url, "not-the-secret", [("demo.add", [1, 1])])
    assert info.value.code == -32000


needs_apache = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@pytest.fixture(scope="module")
def apache_with_session(demo_app: DemoApp) -> Iterator[tuple[ApacheInstance, str]]:
    """Apache whose proxy file maps one fresh session id to the demo app."""
    session_id = str(uuid.uuid4())  # lowercase, as launchers must emit
    apache = ApacheInstance()
    try:
        # Written before start, so no request can cache a miss for this mtime.
        apache.proxy_file.write_text(f"{session_id} 127.0.0.1:{demo_app.port}\n")
        apache.proxy_file.chmod(0o644)
        apache.start()
        yield apache, session_id
    finally:
        apache.cleanup()


@needs_apache
def test_rpc_through_apache(
    apache_with_session: tuple[ApacheInstance, str], demo_app: DemoApp
) -> None:
    """The ParaViewWeb path: ws://apache/proxy?sessionId=..&path=ws -> the app."""
    apache, session_id = apache_with_session
    url = f"{apache.ws_url_base}/proxy?sessionId={session_id}&path=ws"
    try:
        out = connect_and_call(url, SECRET, [("demo.add", [2, 3]), ("demo.whoami", [])])
    except (WslinkError, WebSocketException, OSError) as exc:
        pytest.fail(f"{exc!r}\nApache error log:\n{apache.error_log_tail()}")
    assert out["results"][0] == 5
    assert out["results"][1]["port"] == demo_app.port


@needs_apache
def test_unknown_session_is_400(
    apache_with_session: tuple[ApacheInstance, str],
) -> None:
    """An id missing from the map makes Apache refuse the upgrade with 400."""
    apache, _ = apache_with_session
    url = f"{apache.ws_url_base}/proxy?sessionId={uuid.uuid4()}&path=ws"
    with pytest.raises(InvalidStatus) as info:
        connect_and_call(url, SECRET, [("demo.add", [1, 2])])
    assert info.value.response.status_code == 400


@needs_apache
def test_proxy_file_in_private_dir_refused(tmp_path: Path) -> None:
    """pytest's tmp_path is 0700: www-data could not read a map file there."""
    apache = ApacheInstance(proxy_file=tmp_path / "proxy.txt")
    try:
        with pytest.raises(PermissionError, match="not searchable"):
            apache.start()
    finally:
        apache.cleanup()
    assert apache.pid is None
