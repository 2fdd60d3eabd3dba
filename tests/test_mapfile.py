"""The map file Apache reads: exact format, atomic replacement, mode, mtime, coalescing."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from pvw_hpc.mapfile import BadRoute, MapWriter, format_routes, write_map_file


def sid() -> str:
    return str(uuid.uuid4())


def test_format_is_the_stock_line_format() -> None:
    a, b = sid(), sid()
    assert format_routes([(a, "127.0.0.1", 9001), (b, "node7.cluster", 9002)]) == (
        f"{a} 127.0.0.1:9001\n{b} node7.cluster:9002\n"
    )
    assert format_routes([(a, "::1", 9001)]) == f"{a} [::1]:9001\n"


@pytest.mark.parametrize("route", [
    ("not-an-id", "127.0.0.1", 9001),
    (sid(), "evil host", 9001),
    (sid(), "h\nx 1.2.3.4", 9001),
    (sid(), "h#x", 9001),
    (sid(), "127.0.0.1", 0),
    (sid(), "127.0.0.1", 70000),
    (sid(), "127.0.0.1", "9001"),
    (sid().upper(), "127.0.0.1", 9001),
])
def test_anything_that_could_corrupt_a_line_is_refused(route: tuple) -> None:
    with pytest.raises(BadRoute):
        format_routes([route])


def test_write_is_atomic_world_readable_and_newer(tmp_path: Path) -> None:
    path = tmp_path / "proxy.txt"
    path.write_text("old\n")
    future = time.time_ns() + 10_000_000_000
    os.utime(path, ns=(future, future))  # an mtime ahead of the clock must still be beaten
    old = path.stat()
    os.umask(0o077)
    try:
        a = sid()
        assert write_map_file(path, [(a, "127.0.0.1", 9001)])
    finally:
        os.umask(0o022)
    new = path.stat()
    assert path.read_text() == f"{a} 127.0.0.1:9001\n"
    assert new.st_mode & 0o777 == 0o644
    assert new.st_ino != old.st_ino  # replaced by rename, never rewritten in place
    assert new.st_mtime_ns > old.st_mtime_ns
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".proxy")] == []


def test_invalid_rows_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "proxy.txt"
    good = sid()
    write_map_file(path, [("bad id", "h", 1), (good, "127.0.0.1", 9001)])
    assert path.read_text() == f"{good} 127.0.0.1:9001\n"


def test_successive_writes_always_get_a_newer_mtime(tmp_path: Path) -> None:
    path = tmp_path / "proxy.txt"
    last = 0
    for i in range(50):
        write_map_file(path, [(sid(), "127.0.0.1", 9000 + i)])
        mtime = path.stat().st_mtime_ns
        assert mtime > last
        last = mtime


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.txt"
    contents = [[(sid(), "127.0.0.1", 9000 + j) for j in range(i % 7 + 1)] for i in range(40)]
    valid = {format_routes(c) for c in contents}
    write_map_file(path, contents[0])
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(10):
        for c in contents:
            write_map_file(path, c)
    stop.set()
    reader.join()
    assert seen and all(text in valid for text in seen)


def test_writer_coalesces_bursts(tmp_path: Path) -> None:
    path = tmp_path / "proxy.txt"
    calls = 0
    routes = [(sid(), "127.0.0.1", 9001)]

    def current() -> list:
        nonlocal calls
        calls += 1
        time.sleep(0.05)  # a slow read makes the burst pile up behind the first write
        return routes

    writer = MapWriter(path, current, periodic_s=60)
    writer.start()
    try:
        for _ in range(50):
            writer.request()
        assert writer.sync()
    finally:
        writer.stop()
    assert path.read_text() == format_routes(routes)
    assert calls <= 3


def test_a_reader_waits_for_a_state_change_that_has_not_asked_for_its_rewrite_yet(tmp_path: Path) -> None:
    """Between a row's commit and its request a reader saw the new state and nothing pending.

    Seen under load: a session answered "ended" while its route was still in the map. A change
    under way (``changing()``) is pending, and a reader's wait covers the rewrite it then asks for.
    """
    path = tmp_path / "proxy.txt"
    routes: list = [(sid(), "127.0.0.1", 9001)]
    writer = MapWriter(path, lambda: list(routes), periodic_s=60)
    writer.start()
    try:
        assert writer.sync()
        answered: list[str] = []
        with writer.changing():
            assert writer.pending()
            reader = threading.Thread(target=lambda: answered.append(path.read_text() if writer.wait_pending() else "x"))
            reader.start()
            time.sleep(0.2)  # the commit: the reader must still be waiting
            assert answered == []
            routes.clear()
            writer.request()
        reader.join(5)
        assert answered == [""]  # it read the map written after the change, not the one before
        assert not writer.pending()
    finally:
        writer.stop()
