"""Which ``host:port`` a batch session may be routed to.

The job side tells the launcher where its app listens (a callback with the
session's token, or a marker line in the job log). Both come from the job's
user, who owns the token and the log, so neither can be believed as it is: a
forged ``127.0.0.1:22`` would make Apache carry browsers to the front end's
sshd. A claimed route is accepted only when

* its port lies in the cluster's ``port_range`` (where the job side picks ports);
* its address is the job's own node, as the scheduler names it (the name
  itself, its FQDN, or an address the name resolves to), or lies in the
  cluster's ``node_networks`` (an admin's allow-list, e.g. a second network);
* it is not loopback, unspecified or multicast, nor one of this machine's own
  addresses, unless the cluster sets ``allow_loopback`` (its nodes are this
  machine: a one-machine test cluster); and never the launcher's own port.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import time
from collections.abc import Iterable
from typing import Any

from .clusters import ClusterConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RESOLVE_TTL_S = 60.0
_resolved: dict[str, tuple[float, frozenset[IPAddress], str | None]] = {}


def expand_nodes(node: str) -> list[str]:
    """A scheduler's node text as names: ``n[1-3,7]`` -> n1 n2 n3 n7; ``a,b`` -> a b; PBS ``a/0+b/1`` -> a b."""
    names: list[str] = []
    for part in re.split(r"[+,](?![^\[]*\])", node):
        part = part.split("/", 1)[0].strip()
        match = re.fullmatch(r"([^\[\]]*)\[([0-9,\-]+)\](.*)", part)
        if not match:
            if part:
                names.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                continue
            for n in range(int(lo), int(hi or lo) + 1):
                if len(names) > 4096:  # a pathological range: enough names to match the job's node
                    return names
                names.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return names


def _lookup(name: str, flags: int = 0) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP, flags=flags)


def _cached(name: str) -> tuple[frozenset[IPAddress], str | None]:
    """A node name's addresses and canonical name (cached a minute, at most a few thousand names).

    Only names the scheduler reports are looked up, never a name a job makes up: a job cannot
    make the launcher wait on a resolver of its choosing.
    """
    now = time.monotonic()
    cached = _resolved.get(name)
    if cached is not None and now - cached[0] < _RESOLVE_TTL_S:
        return cached[1], cached[2]
    try:
        infos = _lookup(name, socket.AI_CANONNAME)
        found = frozenset(normal(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos)
        canonical = next((str(info[3]) for info in infos if info[3]), None)
    except (OSError, ValueError, UnicodeError):
        if cached is not None:  # a resolver hiccup: keep the last good answer
            return cached[1], cached[2]
        found, canonical = frozenset(), None
    if len(_resolved) > 4096:
        _resolved.clear()
    _resolved[name] = (now, found, canonical)
    return found, canonical


def resolve(name: str) -> frozenset[IPAddress]:
    """The addresses a node name resolves to (empty when it does not resolve)."""
    return _cached(name)[0]


def normal(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (``::ffff:127.0.0.1`` is loopback)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=1024)
def is_own_address(ip: IPAddress) -> bool:
    """True for loopback and every address of this machine (a socket can bind it: secondary ones too)."""
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
            return True
    except OSError:
        return False


class RoutePolicy:
    """The route rule for one cluster; :meth:`refusal` says why a claimed route is refused, or None."""

    def __init__(self, cluster: ClusterConfig, launcher_port: int | None = None):
        self.cluster = cluster
        self.launcher_port = launcher_port

    def refusal(self, node: str | None, host: str, port: int) -> str | None:
        """The whole rule: port range, address kind, and that ``host`` is the job's node."""
        names = expand_nodes(node) if node else []
        try:
            literal: IPAddress | None = normal(ipaddress.ip_address(host))
        except ValueError:
            literal = None
        if literal is None:
            if not any(_same_host(host, name) or _same_host(host, _cached(name)[1] or name) for name in names):
                return f"{host} is not the job's node ({node or 'not known yet'})"
            addresses = resolve(host)  # one of the node's own names: the site's DNS, not the job's
            if not addresses:
                return f"{host} does not resolve"
        else:
            addresses = frozenset({literal})
        for ip in addresses:
            why = self.static_refusal(str(ip), port) or self._node_refusal(ip, names, node)
            if why:
                return why
        return None

    def static_refusal(self, host: str, port: int) -> str | None:
        """The part of the rule that needs no name lookup: port range and address kind (the probe's recheck)."""
        lo, hi = self.cluster.port_range
        if not lo <= port <= hi:
            return f"port {port} is outside the cluster's port_range {lo}-{hi}"
        try:
            ip = normal(ipaddress.ip_address(host))
        except ValueError:
            return None  # a name: it was checked against the node when it was accepted
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            return f"{ip} is not a host address"
        if is_own_address(ip):
            if not self.cluster.allow_loopback:
                return (f"{ip} is this launcher's machine (loopback or one of its addresses); set allow_loopback "
                        "on a cluster whose nodes are this machine")
            if port == self.launcher_port:
                return f"{ip}:{port} is the launcher itself"
        return None

    def _node_refusal(self, ip: IPAddress, names: Iterable[str], node: str | None) -> str | None:
        if any(ip in net for net in self.cluster.node_networks):
            return None
        if self.cluster.allow_loopback and ip.is_loopback:
            return None  # the nodes are this machine
        if any(ip in resolve(name) for name in names):
            return None
        return (f"{ip} is not an address of the job's node ({node or 'not known yet'}) nor in the cluster's "
                "node_networks")


def _same_host(claimed: str, node: str) -> bool:
    """``claimed`` is ``node`` or its short form (``node7`` for ``node7.example.com``).

    Never a longer name made from it (``node7.attacker.example``): that would be resolved by a
    name server the job's user chooses.
    """
    claimed, node = claimed.lower().rstrip("."), node.lower().rstrip(".")
    return claimed == node or claimed == node.split(".", 1)[0]
