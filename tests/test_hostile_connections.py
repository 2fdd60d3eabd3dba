"""Idle and slow TCP clients against a real ``pvw-hpc serve`` (``configuration.connections``).

The attack needs no credentials: open a few hundred sockets and send nothing,
or send a request head one byte a second (slowloris). Before the fix, waitress's
``connection_limit`` was ``threads + 100`` and its idle sweep ran after 300 s, so
about 108 such sockets (threads 8) stopped ``/health`` and every API call for
everyone. Here 500 sockets are held for a few seconds while ``/health`` and a real
launch must still answer; then the server must have closed the idle and slow
ones on its own, by ``header_timeout`` and ``idle_timeout``, and refused the
connections one address opened beyond ``per_client`` at once.

Sockets come from several loopback source addresses (127.0.0.2 ...), as many
real clients would, so the per-client cap alone does not explain the result.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from pvw_hpc.connections import ConnectionLimits, MultiSocketServer, check_connections_config, client_key, create_server
from tests.conftest import PVW_HPC_BIN, Launcher, LauncherFactory
from tests.support.apache import MODULES_DIR, ApacheInstance, skip_reason

HEADER_TIMEOUT_S = 5
IDLE_TIMEOUT_S = 3
PER_CLIENT = 60
CONFIG: dict[str, Any] = {"threads": 8, "connections": {"max": 1000, "per_client": PER_CLIENT,
                                                        "header_timeout": HEADER_TIMEOUT_S,
                                                        "idle_timeout": IDLE_TIMEOUT_S}}
IDLE_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 12)]  # 10 x 25 idle sockets: each under per_client
IDLE_PER_ADDRESS = 25
SLOW_ADDRESSES = [f"127.0.0.{n}" for n in range(13, 17)]  # 4 x 25 slowloris sockets
SLOW_PER_ADDRESS = 25
KEEPALIVE_ADDRESS, KEEPALIVE_COUNT = "127.0.0.12", 20  # one request each, then idle
FLOOD_ADDRESS, FLOOD_COUNT = "127.0.0.20", 130  # one address far over per_client
TOTAL_SOCKETS = (len(IDLE_ADDRESSES) * IDLE_PER_ADDRESS + len(SLOW_ADDRESSES) * SLOW_PER_ADDRESS
                 + KEEPALIVE_COUNT + FLOOD_COUNT)
HEALTH_DEADLINE_S = 2.0  # "answers within a couple of seconds"
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200


def ensure_open_files(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE when ``needed`` sockets would not fit (1024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this test needs {needed} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass
class Client:
    """One raw TCP client; ``poll()`` notes when the server closed it (FIN or reset) and what it sent."""

    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    received: bytes = b""
    closed_at: float | None = None

    def __post_init__(self) -> None:
        self.sock.setblocking(False)  # poll() and the dripper must never wait

    def poll(self) -> bool:
        """True once the server has closed this connection; never blocks."""
        while self.closed_at is None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except OSError:  # reset: closed with our bytes unread, as good as a FIN here
                data = b""
            if not data:
                self.closed_at = time.monotonic()
            self.received += data
        return True


def connect(port: int, source: str) -> Client:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))  # completes in the kernel's backlog even if never accepted
    except OSError:
        sock.close()
        raise
    return Client(sock)


def keepalive_client(port: int) -> tuple[http.client.HTTPConnection, Client]:
    """A client that asks one ``/health`` with keep-alive and then sits idle on the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_DEADLINE_S, source_address=(KEEPALIVE_ADDRESS, 0))
    conn.request("GET", "/health")
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and not response.will_close, response.getheaders()
    assert conn.sock is not None
    return conn, Client(conn.sock)


class Dripper(threading.Thread):
    """Slowloris: sends each client's request head one byte a second, never finishing it."""

    def __init__(self, clients: list[Client]) -> None:
        super().__init__(daemon=True)
        self.clients = clients
        self.stop = threading.Event()

    def run(self) -> None:
        for i in range(len(SLOW_HEAD)):
            for client in self.clients:
                with contextlib.suppress(OSError):  # the server closed it: the point of the test
                    client.sock.send(SLOW_HEAD[i:i + 1])
            if self.stop.wait(1.0):
                return


def assert_health_answers(lau: Launcher, times: int = 5) -> None:
    for _ in range(times):
        started = time.monotonic()
        try:
            resp = requests.get(f"{lau.base}/health", timeout=HEALTH_DEADLINE_S)
        except requests.RequestException as exc:
            raise AssertionError(f"/health did not answer within {HEALTH_DEADLINE_S} s "
                                 f"while {TOTAL_SOCKETS} sockets were open: {exc!r}\n{lau.stderr_tail()}") from None
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - started < HEALTH_DEADLINE_S
        time.sleep(0.1)


def wait_closed(clients: list[Client], until: float) -> list[Client]:
    """Poll until every client is closed by the server or ``until`` passes; the ones still open."""
    while True:
        still_open = [c for c in clients if not c.poll()]
        if not still_open or time.monotonic() > until:
            return still_open
        time.sleep(0.05)


@contextlib.contextmanager
def holding(groups: list[list[Client]], conns: list[http.client.HTTPConnection], dripper: Dripper) -> Iterator[None]:
    """Close every socket of ``groups`` (filled while the block runs) and stop the dripper, whatever happens."""
    try:
        yield
    finally:
        dripper.stop.set()
        if dripper.is_alive():
            dripper.join(timeout=5)  # no send() racing the close below
        for group in groups:
            for client in group:
                client.sock.close()
        for conn in conns:
            conn.close()


def test_health_and_launches_survive_500_idle_and_slow_sockets(launcher: LauncherFactory) -> None:
    ensure_open_files(TOTAL_SOCKETS + 256)
    lau = launcher(configuration=CONFIG)
    port = lau.port
    idle: list[Client] = []
    slow: list[Client] = []
    flood: list[Client] = []
    keepalive: list[Client] = []
    conns: list[http.client.HTTPConnection] = []
    dripper = Dripper(slow)
    with holding([idle, slow, flood, keepalive], conns, dripper):
        for source in IDLE_ADDRESSES:
            idle.extend(connect(port, source) for _ in range(IDLE_PER_ADDRESS))
        for source in SLOW_ADDRESSES:
            slow.extend(connect(port, source) for _ in range(SLOW_PER_ADDRESS))
        flood.extend(connect(port, FLOOD_ADDRESS) for _ in range(FLOOD_COUNT))
        dripper.start()
        attack_started = time.monotonic()

        # while all of them are open: /health answers, keep-alive clients are served, a real launch succeeds
        assert_health_answers(lau)
        for _ in range(KEEPALIVE_COUNT):
            conn, client = keepalive_client(port)
            conns.append(conn)
            keepalive.append(client)
        keepalive_served = time.monotonic()
        lau.launch()
        assert_health_answers(lau, times=2)
        assert time.monotonic() - attack_started < HEADER_TIMEOUT_S - 1, "too slow to check under attack"
        assert not [c for c in idle + slow if c.poll()], "the server dropped idle or slow clients before header_timeout"

        # per_client: one address got exactly PER_CLIENT connections; the rest a 503 and a close at once
        wait_closed(flood, attack_started + 1)  # all but PER_CLIENT are closed long before this
        refused = [c for c in flood if c.poll()]
        assert len(refused) == FLOOD_COUNT - PER_CLIENT, f"{len(refused)} of {FLOOD_COUNT} from one address closed"
        replies = [c.received for c in refused if c.received]
        assert replies and all(r.startswith(b"HTTP/1.1 503 ") for r in replies), replies[:1]
        assert json.loads(replies[0].split(b"\r\n\r\n", 1)[1]) == {"error": "too many connections from this address"}

        # idle_timeout: the keep-alive clients are closed about IDLE_TIMEOUT_S after their answer
        left = wait_closed(keepalive, keepalive_served + IDLE_TIMEOUT_S + 2.5)
        assert not left, f"{len(left)} idle keep-alive connections still open after idle_timeout"
        first = min(c.closed_at for c in keepalive if c.closed_at is not None) - keepalive_served
        assert first > IDLE_TIMEOUT_S - 1.5, f"a keep-alive client was closed after {first:.1f} s, before idle_timeout"

        # header_timeout: silent and slowloris clients (and the flood's admitted ones) are closed after it
        admitted = [c for c in flood if c not in refused]
        left = wait_closed(idle + slow + admitted, attack_started + HEADER_TIMEOUT_S + 3)
        assert not left, f"{len(left)} idle or slow connections still open after header_timeout"
        first = min(c.closed_at for c in idle + slow if c.closed_at is not None) - attack_started
        assert first > HEADER_TIMEOUT_S - 1.5, f"an idle or slow client was closed after {first:.1f} s, before header_timeout"
        assert_health_answers(lau, times=1)
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_DEADLINE_S, source_address=(FLOOD_ADDRESS, 0))
        conns.append(fresh)
        fresh.request("GET", "/health")
        assert fresh.getresponse().status == 200, "the flood's address is still counted after its sockets closed"


# the demo app, ready only after a few seconds: its launch blocks far longer than the timeouts
SLOW_START_APP = {"cmd": ["${python_exec}", "-c", "import runpy, sys, time; time.sleep(3); sys.argv = sys.argv[1:]; "
                          "runpy.run_path(sys.argv[0], run_name='__main__')", "${demo_app}", "--host", "${host}",
                          "--port", "${port}", "--authKey", "${secret}", "--timeout", "300"],
                  "ready_line": "Starting factory"}


def test_a_launch_slower_than_the_timeouts_is_answered(launcher: LauncherFactory) -> None:
    """A request a worker is answering is never cut, however long it blocks (here 3 s against 1 s timeouts)."""
    lau = launcher(apps={"slow": SLOW_START_APP},
                   configuration={"threads": 4, "connections": {"header_timeout": 1, "idle_timeout": 1}})
    started = time.monotonic()
    lau.launch("slow")
    assert time.monotonic() - started > 2.5


def test_connections_config_is_checked() -> None:
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []

    def check(raw: Any) -> ConnectionLimits:
        return check_connections_config(raw, lambda p, m: errors.append((p, m)), lambda p, m: warnings.append((p, m)))

    assert check(None) == ConnectionLimits() and not errors
    assert check({"max": 50, "per_client": 5, "header_timeout": 2.5, "idle_timeout": 30}) == \
        ConnectionLimits(max=50, per_client=5, header_timeout_s=2.5, idle_timeout_s=30.0)
    assert not errors
    for raw, path in (([], "$.configuration.connections"), ({"max": 5}, "$.configuration.connections.max"),
                      ({"max": True}, "$.configuration.connections.max"),
                      ({"per_client": 0}, "$.configuration.connections.per_client"),
                      ({"per_client": 1.5}, "$.configuration.connections.per_client"),
                      ({"header_timeout": "10"}, "$.configuration.connections.header_timeout"),
                      ({"idle_timeout": 0.5}, "$.configuration.connections.idle_timeout"),
                      ({"max": 10, "per_client": 11}, "$.configuration.connections.per_client")):
        errors.clear()
        check(raw)
        assert [p for p, _ in errors] == [path], (raw, errors)
    check({"maximum": 10})
    assert [p for p, _ in warnings] == ["$.configuration.connections.maximum"]


def _hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def test_one_count_across_listening_sockets_and_trusted_proxies_are_exempt() -> None:
    """Two listening addresses (a MultiSocketServer) share one count per client; a trusted proxy has no cap."""
    limits = ConnectionLimits(max=100, per_client=3, header_timeout_s=30, idle_timeout_s=30)
    server = create_server(_hello, limits=limits, trusted=lambda address: address == "127.0.0.9",
                           listen="127.0.0.1:0 127.0.0.2:0", threads=1)
    assert isinstance(server, MultiSocketServer)
    (_, port1), (_, port2) = server.effective_listen
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    clients: list[Client] = []
    try:
        def open_from(source: str, port: int) -> Client:
            sock = socket.create_connection(("127.0.0.1" if port == port1 else "127.0.0.2", port), timeout=5,
                                            source_address=(source, 0))
            clients.append(Client(sock))
            return clients[-1]

        capped = [open_from("127.0.0.5", port1) for _ in range(2)] + [open_from("127.0.0.5", port2)]
        extra = open_from("127.0.0.5", port2)  # the 4th from one client, on the other socket
        proxy = [open_from("127.0.0.9", port1) for _ in range(10)]
        assert not wait_closed([extra], time.monotonic() + 2) and extra.received.startswith(b"HTTP/1.1 503 ")
        time.sleep(0.3)
        assert not [c for c in capped + proxy if c.poll()]
        capped[0].sock.close()  # a slot frees when the server has seen that connection close
        time.sleep(0.3)
        again = open_from("127.0.0.5", port2)
        time.sleep(0.3)
        assert not again.poll()
    finally:
        for client in clients:
            client.sock.close()
        server.close()
        runner.join(5)


def test_ipv6_clients_are_counted_per_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("192.0.2.7") == "192.0.2.7"


@pytest.mark.apache
@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_apache_config_bounds_slow_clients_and_apache_accepts_it(launcher: LauncherFactory) -> None:
    lau = launcher(start=False)
    vhost = subprocess.run([str(PVW_HPC_BIN), "apache-config", "--config", str(lau.config_path),
                            "--listen", "127.0.0.1:8080"], capture_output=True, text=True, check=True).stdout
    assert "<IfModule reqtimeout_module>" in vhost
    assert "RequestReadTimeout header=20-40,MinRate=500 body=20,MinRate=500" in vhost
    assert vhost.index("RequestReadTimeout") < vhost.index("</VirtualHost>")
    assert f"/paraview ttl={ConnectionLimits().idle_timeout_s // 2:.0f}\n" in vhost  # pooled < launcher's idle_timeout
    # apache2 -t with the module loaded: the directive is valid where the vhost puts it
    with_module = f"LoadModule reqtimeout_module {MODULES_DIR}/mod_reqtimeout.so\n{vhost}"
    apache = ApacheInstance(proxy_file=lau.proxy_file, vhost=with_module)
    try:
        apache.write_config()
    finally:
        apache.cleanup()
