"""Choosing a free host:port for a local session from ``resources``.

Stock hands out ports from memory without checking them, so a port taken by
any other process made the app die with EADDRINUSE and the client wait for
the whole timeout. We skip ports another active session holds (from the
database, so it holds across processes) and, when the host is this machine,
ports that something else is listening on.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator

from .config import Resource

LOCAL_NAMES = frozenset({"localhost", "0.0.0.0", "::", "127.0.0.1", "::1"})


def is_this_machine(host: str) -> bool:
    """True when ``host`` names this machine without a (possibly slow) DNS lookup."""
    if host in LOCAL_NAMES or host in {socket.gethostname(), socket.getfqdn()}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_is_free(host: str, port: int) -> bool:
    """Try to bind ``host:port``; an address this machine does not have counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "127.0.0.1" if host == "localhost" else host
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the apps do (aiohttp sets it): a port in TIME_WAIT after a closed session is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return True
            return False
    return True


def candidates(resources: tuple[Resource, ...], held: dict[str, set[int]]) -> Iterator[tuple[str, int]]:
    """Host:port pairs to try, best first.

    Like stock, the host with the most free ports goes first (ties in config
    order); within a host, ports go in ascending order.
    """
    by_host: dict[str, list[int]] = {}
    for res in resources:
        ports = by_host.setdefault(res.host, [])
        ports.extend(p for p in res.ports if p not in ports)
    free = {host: [p for p in ports if p not in held.get(host, set())] for host, ports in by_host.items()}
    order = sorted(free, key=lambda h: -len(free[h]))  # sort is stable: ties keep config order
    for host in order:
        check = is_this_machine(host)
        for port in free[host]:
            if check and not port_is_free(host, port):
                continue
            yield host, port
