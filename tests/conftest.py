"""Shared fixtures: a real ``pvw-hpc serve`` process with the real wslink demo app.

The ``launcher`` fixture (and ``module_launcher``, its module-scoped twin) is a
factory. Each call writes a stock-style launcher config into a fresh directory
under ``/tmp`` (mode 0755, so a private Apache running its children as
www-data can read the proxy file), starts ``pvw-hpc serve`` on port 0 in its
own process group, reads the URL it prints once bound, and hands back a
:class:`Launcher` with small HTTP helpers.

Nothing may outlive a test, even a failing one: every launcher process gets an
environment marker (``PVW_HPC_TEST_ROOT=<its directory>``) that the apps it
starts inherit, so teardown finds and kills them all by scanning
``/proc/<pid>/environ`` (also matching ``PVW_HPC_SESSION_ID`` against the ids
in the launcher's SQLite file), then checks that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import requests

from pvw_hpc import jsonc
from pvw_hpc.auth import hash_token
from tests.support import netns
from tests.support.apache import ApacheInstance
from tests.support.netns import Hosts

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_APP = REPO_ROOT / "examples" / "demo" / "app.py"
PVW_HPC_BIN = Path(sys.executable).parent / "pvw-hpc"
READY_LINE = "Starting factory"
MARKER_ENV = "PVW_HPC_TEST_ROOT"
SESSION_ENV = "PVW_HPC_SESSION_ID"
TEXT_PLAIN = "text/plain;charset=UTF-8"  # what a browser XHR sends with a string body
ADMIN_TOKEN = "pvw-hpc-test-admin-token"  # noqa: S105 - a test credential, hashed into every test config
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HTTP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 20.0

T = TypeVar("T")


def demo_cmd(idle_timeout: int = 300) -> list[str]:
    """The stock-style argv of the demo app (the secret is a whole element, so it is returned)."""
    return ["${python_exec}", "${demo_app}", "--host", "${host}", "--port", "${port}",
            "--authKey", "${secret}", "--timeout", str(idle_timeout)]


# Runs the demo app with one extra positional value in front of the wslink flags: it prints
# the value it received (so a test can see what reached the command) and drops it.
_WRAPPER = ("import runpy, sys; print('received:', repr(sys.argv[2]), flush=True); "
            "sys.argv = sys.argv[1:2] + sys.argv[3:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def demo_cmd_with(template: str) -> list[str]:
    """Demo app argv that also carries ``template`` (e.g. ``"${file}"``) as a command argument."""
    return ["${python_exec}", "-c", _WRAPPER, "${demo_app}", template, "--host", "${host}", "--port", "${port}",
            "--authKey", "${secret}", "--timeout", "300"]


def demo_app_config(idle_timeout: int = 300) -> dict[str, Any]:
    return {"cmd": demo_cmd(idle_timeout), "ready_line": READY_LINE}


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return False
    state = data[data.rfind(")") + 2:].split()[0]
    return state not in ("Z", "X")


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


# -- ports ------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive ports, all free now and not given to another launcher of this run."""
    rng = random.Random()
    for _ in range(500):
        lo = rng.randrange(20000, 60000 - count)
        ports = range(lo, lo + count)
        if any(p in _handed_out for p in ports):
            continue
        if all(_port_free(p) for p in ports):
            _handed_out.update(ports)
            return lo, lo + count - 1
    raise RuntimeError(f"no range of {count} free ports found")


# -- the launcher -----------------------------------------------------------------------------


class Launcher:
    """One ``pvw-hpc serve`` process (restartable) on its own config, plus HTTP helpers."""

    def __init__(self, root: Path, config: dict[str, Any], command_prefix: list[str] | None = None,
                 extra_env: dict[str, str] | None = None):
        self.root = root
        # run "pvw-hpc serve" through this (e.g. on a namespace host); it must exec, keeping the pid
        self.command_prefix = list(command_prefix or [])
        self.extra_env = dict(extra_env or {})
        self.config = config
        self.config_path = root / "launcher.json"
        self.proxy_file = Path(config["configuration"]["proxy_file"])
        self.log_dir = Path(config["configuration"]["log_dir"])
        self.db_path = self.log_dir / "pvw-hpc.sqlite"
        self.stdout_path = root / "launcher.stdout"
        self.stderr_path = root / "launcher.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""  # the endpoint URL printed by serve, e.g. http://127.0.0.1:PORT/paraview/
        text = json.dumps(config, indent=2)
        self.config_path.write_text(f"// written by tests/conftest.py (stock launcher format)\n{text}\n")

    # -- process ------------------------------------------------------------------------

    def start(self) -> Launcher:
        assert self.proc is None or self.proc.poll() is not None, "launcher already running"
        env = {k: v for k, v in os.environ.items() if k not in ("WSLINK_READY_MSG", "PVW_HPC_CONFIG")}
        env[MARKER_ENV] = str(self.root)
        env.update(self.extra_env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*self.command_prefix, str(PVW_HPC_BIN), "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=self.root,
                start_new_session=True,  # its own process group
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("pvw-hpc: serving "):
                    self.url = line.split("serving ", 1)[1].strip()
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"pvw-hpc serve exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"pvw-hpc serve printed no URL within {START_TIMEOUT_S} s:\n{self.stderr_tail()}")

    def kill9(self) -> None:
        """SIGKILL the launcher (its process group only: the apps have their own)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful stop; the sessions keep running by design), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill9()

    def restart(self) -> Launcher:
        """Start a new launcher process on the same config (stopping the old one if it runs)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- HTTP -----------------------------------------------------------------------------

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT`` (no path)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT/paraview`` (no trailing slash)."""
        return self.url.rstrip("/")

    def post(self, body: bytes | dict[str, Any] | list[Any] | str, content_type: str = TEXT_PLAIN,
             url: str | None = None, headers: dict[str, str] | None = None) -> requests.Response:
        """POST ``body`` (a dict is JSON-encoded) as a browser would: text/plain unless told."""
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        return requests.post(url or self.url, data=data, headers={"Content-Type": content_type, **(headers or {})},
                             timeout=HTTP_TIMEOUT_S)

    def launch(self, application: str = "demo", **extra: Any) -> dict[str, Any]:
        """POST a launch and insist on 200; returns the JSON body."""
        resp = self.post({"application": application, **extra})
        assert resp.status_code == 200, f"launch of {application!r} answered {resp.status_code}: {resp.text}"
        body: dict[str, Any] = resp.json()
        return body

    def get(self, session_id: str, headers: dict[str, str] | None = None) -> requests.Response:
        """GET a session as the test admin (pass ``headers={}`` to ask anonymously)."""
        return requests.get(f"{self.endpoint}/{session_id}", timeout=HTTP_TIMEOUT_S,
                            headers=ADMIN_HEADERS if headers is None else headers)

    def delete(self, session_id: str, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.delete(f"{self.endpoint}/{session_id}", timeout=HTTP_TIMEOUT_S,
                               headers=ADMIN_HEADERS if headers is None else headers)

    def state(self, session_id: str) -> str:
        resp = self.get(session_id)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["state"])

    def sessions(self) -> list[dict[str, Any]]:
        resp = requests.get(self.endpoint, timeout=HTTP_TIMEOUT_S, headers=ADMIN_HEADERS)
        assert resp.status_code == 200, resp.text
        listed: list[dict[str, Any]] = resp.json()["sessions"]
        return listed

    # -- files ----------------------------------------------------------------------------

    def map_text(self) -> str:
        try:
            return self.proxy_file.read_text()
        except FileNotFoundError:
            return ""

    def map_lines(self) -> list[str]:
        return self.map_text().splitlines()

    def session_log(self, session_id: str) -> Path:
        return self.log_dir / f"{session_id}.txt"

    def db_rows(self) -> list[tuple[str, str, int | None]]:
        """(id, state, pid) of every row of the launcher's SQLite file, read directly."""
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return [(r[0], r[1], r[2]) for r in conn.execute("SELECT id, state, pid FROM sessions")]
        except sqlite3.OperationalError:
            return []  # no table yet
        finally:
            conn.close()

    def job_ids(self) -> list[str]:
        """Scheduler job ids of this launcher's batch sessions."""
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return [r[0] for r in conn.execute("SELECT job_id FROM sessions WHERE job_id IS NOT NULL")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def active_ids(self) -> set[str]:
        return {sid for sid, state, _ in self.db_rows() if state not in ("ended", "failed")}

    # -- processes ------------------------------------------------------------------------

    def app_pids(self) -> dict[int, str]:
        """pid -> session id of every live process this launcher's sessions started."""
        marker = f"{MARKER_ENV}={self.root}".encode()
        known = {sid for sid, _, _ in self.db_rows()}
        found: dict[int, str] = {}
        launcher_pid = self.proc.pid if self.proc is not None else -1
        for pid in _pids():
            if pid in (os.getpid(), launcher_pid):
                continue
            env = _environ(pid)
            session = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(f"{SESSION_ENV}=".encode())), None)
            if (marker in env or (session is not None and session in known)) and pid_alive(pid):
                found[pid] = session or ""
        return found

    def pids_of(self, session_id: str) -> list[int]:
        return [pid for pid, sid in self.app_pids().items() if sid == session_id]

    def cleanup(self) -> None:
        """Kill the launcher and every app it started, check none is left, remove the directory."""
        self.kill9()
        jobs = self.job_ids()
        if jobs and shutil.which("scancel"):
            # the launcher's own SLURM_CONF (a namespace cluster): job ids are per cluster
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30, env={**os.environ, **self.extra_env})
        leftovers: dict[int, str] = {}
        for _ in range(3):
            for pid in self.app_pids():
                for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
                    try:
                        kill(pid)
                    except OSError:
                        pass
            try:
                wait_for(lambda: not self.app_pids(), 5, "the apps to die")
                leftovers = {}
                break
            except AssertionError:
                leftovers = self.app_pids()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leftovers, f"processes survived cleanup: {leftovers}"


class LauncherFactory:
    """``factory(**overrides)`` builds, starts and remembers launchers; ``cleanup()`` ends them all."""

    def __init__(self) -> None:
        self.launchers: list[Launcher] = []

    def __call__(
        self,
        *,
        apps: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        sanitize: dict[str, Any] | None = None,
        fields: list[str] | None = None,
        timeout: float | None = None,
        session_data: dict[str, str] | None = None,
        session_url: str | None = None,
        ports: int = 20,
        configuration: dict[str, Any] | None = None,
        clusters: dict[str, Any] | None = None,
        resources: list[dict[str, Any]] | None = None,
        command_prefix: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        start: bool = True,
    ) -> Launcher:
        root = Path(tempfile.mkdtemp(prefix="pvw-test-", dir="/tmp"))
        root.chmod(0o755)  # Apache's www-data children must reach the proxy file
        lo, hi = free_port_range(ports)
        conf: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "endpoint": "paraview",
            "proxy_file": str(root / "proxy.txt"),
            "sessionURL": session_url or "ws://${host}:${port}/ws",
            "timeout": timeout if timeout is not None else 20,
            "log_dir": str(root / "logs"),
            "fields": fields if fields is not None else ["host", "port"],
            "sanitize": sanitize or {},
            # anonymous launches (the stock browser flow) plus an admin token the helpers use to read and stop
            "auth": {"anonymous": True,
                     "tokens": [{"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]},
            **(configuration or {}),
        }
        config: dict[str, Any] = {
            "configuration": conf,
            "resources": resources if resources is not None else [{"host": "127.0.0.1", "port_range": [lo, hi]}],
            "properties": {"python_exec": sys.executable, "demo_app": str(DEMO_APP), **(properties or {})},
            "apps": {"demo": demo_app_config(), **(apps or {})},
        }
        if session_data is not None:
            config["sessionData"] = session_data
        if clusters is not None:  # batch clusters: job folders go under this launcher's root
            config["clusters"] = {
                # the test clusters' nodes are this machine: their jobs report loopback routes
                name: {"job_dir": str(root / "jobs" / name), "callback_url": "auto", "python": "/usr/bin/python3",
                       "allow_loopback": True, **cluster}
                for name, cluster in clusters.items()
            }
        launcher = Launcher(root, config, command_prefix, extra_env)
        self.launchers.append(launcher)
        if start:
            launcher.start()
        return launcher

    def from_example(self, name: str, replace: dict[str, str], properties: dict[str, Any] | None = None,
                     command_prefix: list[str] | None = None, extra_env: dict[str, str] | None = None,
                     adjust: Callable[[dict[str, Any]], None] | None = None) -> Launcher:
        """Start a shipped example config (``examples/<name>``) as it is, with ``replace`` applied to its text.

        Only what cannot be the same on this machine changes: host names and
        shared folders (through ``replace``), paths of the log folder and the
        programs (``properties``), and the test admin token the helpers read with.
        ``adjust`` may change the parsed config further; a test says why it does.
        """
        root = Path(tempfile.mkdtemp(prefix="pvw-test-", dir="/tmp"))
        root.chmod(0o755)
        text = (REPO_ROOT / "examples" / name).read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        config: dict[str, Any] = jsonc.loads(text)
        config["configuration"]["log_dir"] = str(root / "logs")
        config["configuration"]["auth"] = {
            "anonymous": True, "tokens": [{"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]}
        config["properties"].update(properties or {})
        if adjust is not None:
            adjust(config)
        launcher = Launcher(root, config, command_prefix, extra_env)
        self.launchers.append(launcher)
        return launcher.start()

    def cleanup(self) -> None:
        errors = []
        for launcher in self.launchers:
            try:
                launcher.cleanup()
            except Exception as exc:  # clean up the others before reporting
                errors.append(f"{launcher.root}: {exc}")
        self.launchers.clear()
        assert not errors, "; ".join(errors)


@pytest.fixture
def launcher() -> Iterator[LauncherFactory]:
    factory = LauncherFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[LauncherFactory]:
    factory = LauncherFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


# -- SLURM ------------------------------------------------------------------------------------


def slurm_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None when the local cluster answers."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (run schedulers/slurm/up)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"the local SLURM cluster is not up (run schedulers/slurm/up): {probe.stderr.strip()}"
    return None


# the demo app as a SLURM job; the secret reaches it through a file, not argv
SLURM_DEMO_APP: dict[str, Any] = {
    "cluster": "slurm",
    "cmd": ["${python_exec}", "${demo_app}", "--host", "${host}", "--port", "${port}",
            "--authKeyFile", "${secret_file}", "--timeout", "120"],
    "ready_line": "Starting factory",
}



# -- namespace hosts (the seed's two- and many-machine layouts) ------------------------------


@pytest.fixture(scope="session")
def netns_hosts() -> Iterator[Hosts]:
    """host1..host4 as network namespaces on a private subnet; torn down even when tests fail."""
    reason = netns.skip_reason()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(Path(os.environ.get("PVW_TEST_NETNS_ROOT", "/tmp/pvw-test-netns")),
                  prefix=os.environ.get("PVW_TEST_NETNS_PREFIX", "pvwt"), net=os.environ.get("PVW_TEST_NET", "10.250.0"))
    try:
        yield hosts.up()
    finally:
        hosts.release()


def example_vhost(name: str, replace: dict[str, str]) -> str:
    """A shipped example vhost (``examples/<name>``) with ``replace`` applied (addresses, shared folder)."""
    text = (REPO_ROOT / "examples" / name).read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def shared_folder(prefix: str = "pvw-shared-") -> Iterator[Path]:
    """The seed's "shared network drive" on one machine: a 0755 folder under /tmp (Apache's www-data reads it)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def apache_on_host1(hosts: Hosts, vhost_example: str, replace: dict[str, str], shared: Path,
                    port: int = 80) -> Iterator[ApacheInstance]:
    """A shipped example vhost run by Apache on host1, reading the map file in ``shared``; stopped afterwards."""
    apache = ApacheInstance(proxy_file=shared / "proxy.txt", port=port, vhost=example_vhost(vhost_example, replace),
                            listen_host=hosts.address(1), command_prefix=hosts.argv(1, []))
    try:
        yield apache.start()
    finally:
        apache.cleanup()


def ws_roundtrip_on(hosts: Hosts, host: int, url: str, secret: str) -> dict[str, Any]:
    """Hello + two RPCs from ``hostN`` (the browser's side of the seed's layouts); raises with the error."""
    done = hosts.run(host, [sys.executable, "-m", "tests.support.ws_roundtrip", url], input=secret, check=False,
                     cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"ws_roundtrip on host{host} printed nothing useful: {done.stderr[-2000:]}") from None
    if done.returncode != 0:
        raise AssertionError(f"WebSocket from host{host} to {url} failed: {answer.get('error')}")
    return answer
