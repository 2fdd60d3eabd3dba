"""Is anything listening at host:port? Many addresses at once, one deadline.

Why this exists: a batch scheduler's word on a job and what a browser meets
disagree for a while after a node fails. With a compute node's link cut, SLURM
still reports the job RUNNING for about 30 s; the map would keep routing
browsers to an address that cannot answer. So the poller also connects to
every ready session's node:port now and then. A TCP connect (closed at once,
no HTTP, no WebSocket) is the cheapest question the app can answer, and it
does not count as a client to wslink. All connects run non-blocking side by
side, so a cycle costs one deadline however many sessions are ready.
"""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
import time
from collections.abc import Iterable

Address = tuple[str, int]
_BATCH = 256  # sockets open at once: well below any descriptor limit


def reachable(addresses: Iterable[Address], timeout_s: float = 1.0) -> dict[Address, bool | None]:
    """Connect to every address at once: True for those that accepted within ``timeout_s``, False for the rest.

    Only IP addresses are probed; a host name gives None ("cannot tell"), because
    resolving it would block the poller on DNS for as long as DNS likes.
    """
    pending = list(dict.fromkeys(addresses))
    result: dict[Address, bool | None] = {a: None for a in pending if not _is_ip(a[0])}
    literal = [a for a in pending if a not in result]
    for start in range(0, len(literal), _BATCH):
        result.update(_probe_batch(literal[start:start + _BATCH], timeout_s))
    return result


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _probe_batch(addresses: list[Address], timeout_s: float) -> dict[Address, bool | None]:
    result: dict[Address, bool | None] = dict.fromkeys(addresses, False)
    with selectors.DefaultSelector() as selector:
        for address in addresses:
            try:
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue
            sock.setblocking(False)
            try:
                code = sock.connect_ex(address)
            except OSError:
                sock.close()
                continue
            if code == 0:
                result[address] = True
                sock.close()
            elif code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                selector.register(sock, selectors.EVENT_WRITE, address)
            else:  # refused at once, no route, bad address: not reachable
                sock.close()
        deadline = time.monotonic() + timeout_s
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)  # we registered sockets only
                result[key.data] = ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                selector.unregister(ready)
                ready.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
    return result
