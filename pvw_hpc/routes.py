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

import fcntl
import functools
import ipaddress
import re
import socket
import struct
import time
from collections.abc import Iterable

from .clusters import ClusterConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RESOLVE_TTL_S = 60.0
_SIOCGIFADDR = 0x8915
_resolved: dict[str, tuple[float, frozenset[IPAddress]]] = {}


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


def resolve(name: str) -> frozenset[IPAddress]:
    """The addresses a node name resolves to (cached for a minute; empty when it does not resolve)."""
    now = time.monotonic()
    cached = _resolved.get(name)
    if cached is not None and now - cached[0] < _RESOLVE_TTL_S:
        return cached[1]
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        found = frozenset(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos)
    except (OSError, ValueError, UnicodeError):
        found = frozenset()
    _resolved[name] = (now, found)
    return found


@functools.lru_cache(maxsize=1)
def own_addresses() -> frozenset[IPAddress]:
    """This machine's interface addresses (IPv4 by ioctl, IPv6 from /proc), read once."""
    found: set[IPAddress] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.add(ipaddress.IPv4Address(packed[20:24]))
            except OSError:
                continue
    try:
        with open("/proc/net/if_inet6") as fh:
            for line in fh:
                found.add(ipaddress.IPv6Address(bytes.fromhex(line.split()[0])))
    except (OSError, ValueError):
        pass
    return frozenset(found)


def _is_local(ip: IPAddress) -> bool:
    return ip.is_loopback or ip in own_addresses()


class RoutePolicy:
    """The route rule for one cluster; :meth:`refusal` says why a claimed route is refused, or None."""

    def __init__(self, cluster: ClusterConfig, launcher_port: int | None = None):
        self.cluster = cluster
        self.launcher_port = launcher_port

    def refusal(self, node: str | None, host: str, port: int) -> str | None:
        lo, hi = self.cluster.port_range
        if not lo <= port <= hi:
            return f"port {port} is outside the cluster's port_range {lo}-{hi}"
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        names = expand_nodes(node) if node else []
        if literal is None:
            if not any(_same_host(host, name) for name in names):
                return f"{host} is not the job's node ({node or 'not known yet'})"
            addresses = resolve(host)
            if not addresses:
                return f"{host} does not resolve"
        else:
            addresses = frozenset({literal})
        for ip in addresses:
            why = self._address_refusal(ip, port, names, literal is not None)
            if why:
                return why
        return None

    def _address_refusal(self, ip: IPAddress, port: int, names: Iterable[str], check_node: bool) -> str | None:
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            return f"{ip} is not a host address"
        if _is_local(ip):
            if not self.cluster.allow_loopback:
                return f"{ip} is this launcher's machine (loopback or one of its addresses); set allow_loopback " \
                       "on a cluster whose nodes are this machine"
            if port == self.launcher_port:
                return f"{ip}:{port} is the launcher itself"
        if any(ip in net for net in self.cluster.node_networks):
            return None
        if not check_node:
            return None  # a name equal to the node's: checked by name
        if self.cluster.allow_loopback and ip.is_loopback:
            return None  # the nodes are this machine
        if any(ip in resolve(name) for name in names):
            return None
        where = ", ".join(names) if names else "not known yet"
        return f"{ip} is not an address of the job's node ({where}) nor in the cluster's node_networks"


def _same_host(claimed: str, node: str) -> bool:
    claimed, node = claimed.lower().rstrip("."), node.lower()
    return claimed == node or claimed.startswith(node + ".")
