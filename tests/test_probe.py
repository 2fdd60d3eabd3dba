"""``pvw_hpc.probe.reachable``: many TCP connects at once against real sockets on this machine."""

from __future__ import annotations

import socket

from pvw_hpc.probe import reachable


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, int(sock.getsockname()[1])


def test_listening_ports_answer_closed_ones_do_not() -> None:
    open_a, port_a = _listener()
    open_b, port_b = _listener()
    closed, port_c = _listener()
    closed.close()  # nothing listens there any more: refused at once
    try:
        answers = reachable([("127.0.0.1", port_a), ("127.0.0.1", port_c), ("127.0.0.1", port_b)], timeout_s=1)
    finally:
        open_a.close()
        open_b.close()
    assert answers == {("127.0.0.1", port_a): True, ("127.0.0.1", port_c): False, ("127.0.0.1", port_b): True}


def test_more_addresses_than_one_batch_all_get_an_answer_and_duplicates_are_asked_once() -> None:
    listeners = [_listener() for _ in range(300)]  # more than one batch of sockets
    try:
        answers = reachable([("127.0.0.1", port) for _, port in listeners] * 2, timeout_s=2)
    finally:
        for sock, _ in listeners:
            sock.close()
    assert len(answers) == 300 and all(answers.values())


def test_a_host_name_is_not_probed_so_dns_cannot_stall_the_poller() -> None:
    assert reachable([("localhost", 1), ("node7.example", 22)], timeout_s=0.5) == {
        ("localhost", 1): None, ("node7.example", 22): None}
    assert reachable([], timeout_s=0.5) == {}
