"""How many TCP connections the launcher holds, per client and in all, and for how long.

waitress serves idle and half-sent requests without a thread, but every open
connection counts against its connection limit: without bounds, a few hundred
idle sockets (no credentials needed) would stop ``/health`` and every API call
for everyone. ``configuration.connections`` bounds them:

* ``max``: connections held at once (waitress's ``connection_limit``);
* ``per_client``: connections one client address (an IPv6 client: its /64) may
  hold; addresses in ``auth.trusted_proxies`` (Apache, which multiplexes many
  browsers) are exempt;
* ``header_timeout``: seconds a client has to send a whole request head, from
  the accept (a silent socket is closed then too) or, on a keep-alive
  connection, from the first byte of its next request;
* ``idle_timeout``: seconds a keep-alive connection may sit idle between
  requests, and an answer may sit unread. A body must be in within
  ``header_timeout + idle_timeout`` of its request's start (the API's bodies are small).

A request being answered (a blocking POST that waits minutes for its job) is
never cut by these timeouts.

How (waitress 3, ``waitress.server``/``waitress.channel``): :func:`create_server`
builds waitress's TCP servers with :class:`BoundedChannel` as their channel
class and :class:`BoundedServer`'s ``maintenance`` (run every
``CLEANUP_INTERVAL_S``) closing the channels :meth:`BoundedChannel.overdue`
names. One :class:`ClientCounts` is shared by every listening socket, so a
client cannot double its share by using another of the server's addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waitress.adjustments import Adjustments  # type: ignore[import-untyped, unused-ignore]
from waitress.channel import HTTPChannel  # type: ignore[import-untyped, unused-ignore]
from waitress.server import MultiSocketServer, TcpWSGIServer  # type: ignore[import-untyped, unused-ignore]
from waitress.task import ThreadedTaskDispatcher  # type: ignore[import-untyped, unused-ignore]

log = logging.getLogger("pvw_hpc.connections")

CONNECTION_KEYS = ("max", "per_client", "header_timeout", "idle_timeout")


@dataclass(frozen=True)
class ConnectionLimits:
    """``configuration.connections``."""

    max: int = 1000
    per_client: int = 100
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0


def check_connections_config(raw: Any, error: Any, warn: Any) -> ConnectionLimits:
    """Check ``configuration.connections``; problems go to ``error(path, message)``."""
    path = "$.configuration.connections"
    if raw is None:
        return ConnectionLimits()
    if not isinstance(raw, dict):
        error(path, "must be an object {max, per_client, header_timeout, idle_timeout}")
        return ConnectionLimits()
    for key in raw:
        if key not in CONNECTION_KEYS:
            warn(f"{path}.{key}", "unknown key, ignored")
    defaults = ConnectionLimits()
    values: dict[str, Any] = {}
    for key, field_name, kind, least in (("max", "max", int, 10), ("per_client", "per_client", int, 1),
                                         ("header_timeout", "header_timeout_s", float, 1),
                                         ("idle_timeout", "idle_timeout_s", float, 1)):
        value = raw.get(key, getattr(defaults, field_name))
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value >= least
        if not ok:
            error(f"{path}.{key}", f"must be {'an integer' if kind is int else 'a number of seconds'} >= {least}")
            value = getattr(defaults, field_name)
        values[field_name] = kind(value)
    if values["per_client"] > values["max"]:
        error(f"{path}.per_client", "must not be larger than max")
    return ConnectionLimits(**values)


# -- open files ---------------------------------------------------------------------------------

FD_HEADROOM = 256  # the database, logs, listening sockets and the apps' pipes besides the connections


def raise_fd_limit(limits: ConnectionLimits) -> None:
    """Raise the soft RLIMIT_NOFILE so ``limits.max`` connections and the launcher's own files fit.

    Many systems start services with a soft limit of 1024 open files: with the
    default ``max`` of 1000 the launcher would fail accept() (EMFILE) or fail to
    open a session's log long before waitress's connection limit. Only the soft
    limit moves, and only up to what is needed and the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.max + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            target = soft
        else:
            log.info("open-files limit raised from %d to %d for connections.max=%d", soft, target, limits.max)
    if target < want:
        log.warning("connections.max=%d needs about %d open files but only %d are allowed: raise the hard limit "
                    "(LimitNOFILE= in the systemd unit, ulimit -Hn) or lower connections.max", limits.max, want, target)


# -- per-client counts --------------------------------------------------------------------------


def client_key(address: str) -> str:
    """The unit one client is counted by: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually owns a whole /64, so counting single IPv6 addresses
    would let one machine open ``per_client`` connections from each of 2**64.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


class ClientCounts:
    """Open connections per client, capped at ``per_client`` except for trusted proxies.

    Apache (in ``auth.trusted_proxies``) carries many browsers over its pool of
    connections, so capping it would refuse legitimate users.
    """

    def __init__(self, per_client: int, trusted: Callable[[str], bool]) -> None:
        self.per_client = per_client
        self.trusted = trusted
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()  # channels open and close on the main loop; the lock keeps that assumption cheap

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``; its key to release later, or None when refused."""
        key = client_key(address)
        with self._lock:
            held = self._open.get(key, 0)
            if held >= self.per_client and not self.trusted(address):
                return None
            self._open[key] = held + 1
        return key

    def release(self, key: str) -> None:
        with self._lock:
            held = self._open.get(key, 0) - 1
            if held > 0:
                self._open[key] = held
            else:
                self._open.pop(key, None)


class Tally:
    """Connections closed on purpose, by reason, logged at most once a ``every_s``.

    A flood of refused or timed-out sockets must not become a flood of log lines.
    """

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.counts: Counter[str] = Counter()
        self._last = -math.inf
        self._lock = threading.Lock()

    def add(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[reason] += 1
            if now - self._last < self.every_s:
                return
            self._last = now
            summary = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items()))
            self.counts.clear()
        log.warning("closed connections (connections.* limits): %s", summary)


# -- waitress -----------------------------------------------------------------------------------

CLEANUP_INTERVAL_S = 1  # how often maintenance() looks for overdue channels: the timeouts' resolution
REFUSAL_BODY = b'{"error": "too many connections from this address"}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(REFUSAL_BODY), REFUSAL_BODY))


class BoundedChannel(HTTPChannel):
    """An HTTP connection that is counted per client and closed when it is overdue.

    Clocks (wall time, as waitress's ``last_activity`` and ``maintenance(now)``):
    ``waiting_since`` is the accept, or the end of the last answer; ``started``
    is when the current request began to arrive (the accept for the first one,
    its first byte for a keep-alive one), None between requests.
    """

    server: BoundedServer

    def __init__(self, server: BoundedServer, sock: Any, addr: Any, adj: Adjustments, map: Any = None) -> None:
        self.client: str | None = None  # set before the base class registers us: del_channel may run early
        self.kept_alive = False
        self.serving = False  # a worker runs service(): from before it takes the request until our clocks moved
        super().__init__(server, sock, addr, adj, map)
        self.waiting_since = self.creation_time
        self.started: float | None = self.creation_time
        self.client = server.counts.admit(str(addr[0]) if addr else "")
        if self.client is None:
            self.refuse()

    def refuse(self) -> None:
        """Answer 503 and close once it is sent (by waitress's own non-blocking write path)."""
        self.server.tally.add("refused: over connections.per_client")
        with self.outbuf_lock:
            self.outbufs[-1].append(REFUSAL)
            self.total_outbufs_len += len(REFUSAL)
        self.close_when_flushed = True  # readable() is now False: nothing more is read from it

    def received(self, data: bytes) -> bool:
        if data and self.started is None:
            self.started = time.time()
        done: bool = super().received(data)
        if self.request is None:
            self.started = None  # whole requests only (they now wait for a worker, or were empty lines)
        return done

    def service(self) -> None:
        """Run a request on a worker thread; the wait for the next one starts when it is answered.

        ``serving`` covers the moment waitress has popped the answered request but
        the clocks still show the old wait: the sweep would otherwise see a long
        (blocking) request as a connection that never sent one.
        """
        self.serving = True
        try:
            super().service()
        finally:
            self.kept_alive = True
            self.waiting_since = time.time()
            self.serving = False

    def overdue(self, now: float, limits: ConnectionLimits) -> str | None:
        """Why this connection should be closed now, or None (never while a worker has a request of it)."""
        if self.serving or self.requests or self.will_close:
            return None
        if self.total_outbufs_len:  # an answer still going out: the client must keep reading
            return "stalled reader" if now - self.last_activity > limits.idle_timeout_s else None
        if self.close_when_flushed:  # answered and flushed: waitress closes it on its next pass
            return None
        request = self.request
        if request is None:
            if self.kept_alive:
                return "idle keep-alive" if now - self.waiting_since > limits.idle_timeout_s else None
            return "no request" if now - self.waiting_since > limits.header_timeout_s else None
        start = self.started if self.started is not None else self.waiting_since
        if not request.headers_finished:
            return "slow request head" if now - start > limits.header_timeout_s else None
        late = now - start > limits.header_timeout_s + limits.idle_timeout_s  # the API's bodies are small
        return "slow request body" if late else None

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        if self.client is not None:
            self.server.counts.release(self.client)
            self.client = None


class BoundedServer(TcpWSGIServer):
    """waitress's TCP server with :class:`BoundedChannel` connections and their timeouts."""

    channel_class = BoundedChannel
    effective_host: str
    effective_port: str  # getnameinfo's numeric text

    def __init__(self, *args: Any, counts: ClientCounts, limits: ConnectionLimits, tally: Tally, **kw: Any) -> None:
        self.counts = counts  # before the base class starts listening
        self.limits = limits
        self.tally = tally
        super().__init__(*args, **kw)

    @property
    def effective_listen(self) -> list[tuple[str, int]]:
        """The bound address as MultiSocketServer lists its addresses, so callers need not tell them apart."""
        return [(self.effective_host, int(self.effective_port))]

    def maintenance(self, now: float) -> None:
        """waitress's idle sweep (``channel_timeout``), then ours: mark overdue channels to close."""
        super().maintenance(now)  # type: ignore[arg-type, unused-ignore]  # the stubs say int; waitress passes time.time()
        channels: dict[int, Any] = self.active_channels  # type: ignore[assignment, unused-ignore]  # stubs: a dict
        for channel in list(channels.values()):
            reason = channel.overdue(now, self.limits) if isinstance(channel, BoundedChannel) else None
            if reason:
                self.tally.add(f"closed: {reason}")
                channel.will_close = True  # the main loop closes it on its next pass (writable() turns True)


def adjustments(limits: ConnectionLimits, **where: Any) -> Adjustments:
    """waitress settings that match ``limits``; ``where`` is host/port, or waitress's ``listen``, and threads.

    ``connection_limit`` counts every socket in waitress's map (ours plus its
    listening socket and wake-up pipe); poll() because select() fails on file
    descriptors above 1023, which ``max`` connections reach; ``channel_timeout``
    backs up our sweep with waitress's own (it never cuts a request in progress).
    X-Forwarded-For is kept: :meth:`AuthConfig.client_address` believes it only from
    ``auth.trusted_proxies`` (waitress would drop it, having no proxy configured).
    """
    return Adjustments(**where, ident="pvw-hpc", connection_limit=limits.max,
                       cleanup_interval=CLEANUP_INTERVAL_S, asyncore_use_poll=True,
                       clear_untrusted_proxy_headers=False,
                       channel_timeout=math.ceil(max(limits.header_timeout_s, limits.idle_timeout_s)))


def create_server(app: Any, *, limits: ConnectionLimits, trusted: Callable[[str], bool],
                  **where: Any) -> BoundedServer | MultiSocketServer:
    """``waitress.create_server`` for TCP listeners, with bounded connections (see the module doc).

    Like waitress: one server per address ``where`` names (``host`` may resolve
    to several), all in one socket map and one thread pool, wrapped in a
    MultiSocketServer when there are several.
    """
    adj = adjustments(limits, **where)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict[int, Any] = {}
    counts, tally = ClientCounts(limits.per_client, trusted), Tally()
    servers = [BoundedServer(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo,
                             counts=counts, limits=limits, tally=tally) for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listen = [(s.effective_host, int(s.effective_port)) for s in servers]
    return MultiSocketServer(socket_map, adj, listen, dispatcher, servers[-1].log_info)
