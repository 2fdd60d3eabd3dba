"""Port ranges that overlap the kernel's ephemeral ports, which outgoing connections take.

Any outgoing TCP connection on a host gets a local port from
``/proc/sys/net/ipv4/ip_local_port_range``. A session port chosen inside that
range can be taken by such a connection between the moment it was found free
and the moment the app binds it; the app then dies with "address already in
use" (and is started again on another port, see ``port_retries``). Linux's
default range is 32768-60999; some machines (this project's own test machine)
use 1024-65535, so every range overlaps there. ``pvw-hpc check`` and ``serve``
warn about each overlap, read on the launcher's host: for clusters it is a hint
(the nodes may be set differently; the job side checks the node's own range and
says so in the job log).
"""

from __future__ import annotations

from pathlib import Path

from .config import LauncherConfig

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_DEFAULT = (32768, 60999)


def local_range(path: Path = RANGE_FILE) -> tuple[int, int] | None:
    """This host's ephemeral port range, or None when it cannot be read (not Linux)."""
    try:
        lo, hi = (int(v) for v in path.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    return lo, hi


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else None


def warnings(config: LauncherConfig, ephemeral: tuple[int, int] | None) -> list[tuple[str, str]]:
    """(JSON path, message) for every configured port range inside ``ephemeral``."""
    if ephemeral is None:
        return []
    where = f"this host's ephemeral ports {ephemeral[0]}-{ephemeral[1]} ({RANGE_FILE})"
    found = []
    for i, res in enumerate(config.resources):
        shared = overlap((res.port_lo, res.port_hi), ephemeral)
        if shared:
            found.append((f"$.resources[{i}]", f"ports {shared[0]}-{shared[1]} of {res.host} are inside {where}: an "
                          "outgoing connection may take a session's port before its app binds it (it is then "
                          "started again on another port); prefer ports outside that range"))
    for name, cluster in config.clusters.items():
        shared = overlap(cluster.port_range, ephemeral)
        if shared:
            found.append((f"$.clusters.{name}.port_range",
                          f"ports {shared[0]}-{shared[1]} are inside {where}; if the nodes use the same range, "
                          "choose a port_range outside it (the job side prefers the ports outside it and warns in "
                          "the job log)"))
    return found
