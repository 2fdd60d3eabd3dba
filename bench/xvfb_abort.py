"""Why pvpython sometimes aborts with ``bad X server connection`` under Xvfb, measured three ways in one run.

The abort (issue 13, requirement 3): ``vtkXOpenGLRenderWindow: bad X server
connection. DISPLAY=:N. Aborting.`` (SIGABRT: -6 from Popen, 134 in a shell),
more often with one Xvfb per process and under CPU contention.

The claim tested here: it is Xvfb's default *server reset*. When the last
client that completed its connection setup disconnects, the X server resets
(unless started with ``-noreset``), and a reset kills every other connection,
including one whose setup is still in flight. ParaView 5.11 opens the display
as a probe and closes it (``vtkPVRenderingCapabilitiesInformation::
GetLocalCapabilities``) and connects again at once for the render window (0.2
ms later under strace); when Xvfb handles the close first, the new connection
is dropped, ``XOpenDisplay`` returns NULL and VTK aborts. Debian's pvpython
also runs hwloc's GL plugin at MPI start, which opens and closes displays :0 to
:9 whatever ``DISPLAY`` says: with several Xvfbs on one machine every pvpython
also makes the *other* sessions' X servers reset. ``HWLOC_COMPONENTS=-gl``
turns that probe off.

A: the X protocol alone, no ParaView. Against a default Xvfb, one with a
   "keeper" (a client that stays connected, so the last client never leaves)
   and one with ``-noreset``, all at nice 19 beside two busy loops: N rounds of
   connect + setup request -> reply -> close, connect again at once -> reply,
   close, pause. The outcome of each connection is counted: ok, closed before
   the setup reply (EOF or ECONNRESET), connect error, failed:<reason>, timeout.
B: ParaView. 10 Xvfbs (``-displayfd``, the display number read from the pipe
   up to its newline, with a timeout), then 10 ``pvpython render.py`` at once
   (Sphere, Show, Render); aborts counted, 3 rounds per arm: default,
   ``-noreset``, default + keeper, default with ``HWLOC_COMPONENTS=-gl``,
   ``-terminate`` (the server exits when its last client leaves) with and
   without hwloc's probe, and one shared ``-noreset`` Xvfb for all 10; also
   how many X servers exited on their own.
C: the issue's proof target at the pvpython level: rounds of 10 real
   Visualizer launches at once (``pvpython -dr pvw-visualizer.py --host
   127.0.0.1 --port P --data DIR --authKey K --timeout 30``), each with its own
   Xvfb, ``-noreset`` against the default, rounds interleaved; ready
   (``Starting factory``) vs aborted; each is stopped (SIGTERM, wait) once ready.

Needs what ``examples/paraview/setup`` installs (``$PVW_PARAVIEW_PREFIX``,
default /opt/pvw-hpc/paraview). The numbers are reported, not asserted: exit 0
whatever they say, 1 when something broke, 130 when interrupted. Every process
started here (Xvfb, pvpython, the busy loops) carries a marker in its
environment and is stopped at the end, also on Ctrl-C or SIGTERM.

Usage::

    .venv/bin/python bench/xvfb_abort.py [--socket-rounds 300] [--pv-rounds 3] [--vis-rounds 5] [--parallel 10]
                                         [--parts ABC]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import BenchError, ProcessTracker  # noqa: E402

PREFIX = Path(os.environ.get("PVW_PARAVIEW_PREFIX", "/opt/pvw-hpc/paraview"))
WSLINK_DIR = PREFIX / "wslink-1.12.4"
VISUALIZER = PREFIX / "visualizer-3.2.0" / "server" / "pvw-visualizer.py"
DATA_DIR = PREFIX / "data"
ABORT_TEXT = b"bad X server connection"
SCREEN = ["-screen", "0", "1280x1024x24", "-nolisten", "tcp"]
RENDER_PY = "from paraview.simple import *\nSphere()\nShow()\nRender()\n"
XVFB_START_S = 15.0
PV_TIMEOUT_S = 180.0
SETTLE_S = 0.03  # the pause between socket rounds: a reset started by the round's last close can finish


# -- X servers and the X protocol ---------------------------------------------------------------------


@dataclass
class Xvfb:
    proc: subprocess.Popen[bytes]
    display: int
    log: Path
    keeper: socket.socket | None = None


def spawn_xvfbs(tracker: ProcessTracker, root: Path, flags: Sequence[str], count: int,
                nice: bool = False) -> list[Xvfb]:
    """Start ``count`` Xvfbs at once with ``-displayfd``; return once each has written its display number."""
    pending: list[tuple[subprocess.Popen[bytes], int, Path]] = []
    try:
        for _ in range(count):
            read_end, write_end = os.pipe()
            log = root / f"xvfb-{len(list(root.glob('xvfb-*')))}.log"
            argv = [*(["nice", "-n", "19"] if nice else []), "Xvfb", "-displayfd", str(write_end), *SCREEN, *flags]
            try:
                with open(log, "wb") as err:
                    proc = tracker.spawn(argv, pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=err,
                                         env=tracker.env())
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            pending.append((proc, read_end, log))
        return [Xvfb(proc, read_display(proc, fd, log), log) for proc, fd, log in pending]
    finally:
        for _, fd, _ in pending:
            with contextlib.suppress(OSError):
                os.close(fd)


def read_display(proc: subprocess.Popen[bytes], fd: int, log: Path) -> int:
    """The display number Xvfb writes to its -displayfd pipe, read up to the newline (XVFB_START_S at most)."""
    deadline = time.monotonic() + XVFB_START_S
    got = b""
    while not got.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"Xvfb (pid {proc.pid}) wrote no display number within {XVFB_START_S:.0f} s"
                             f"\n{_common.tail(log)}")
        chunk = os.read(fd, 32)
        if not chunk:
            raise BenchError(f"Xvfb (pid {proc.pid}) exited ({proc.poll()}) before it was ready\n{_common.tail(log)}")
        got += chunk
    return int(got)


def stop(tracker: ProcessTracker, proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM a process group we started, wait up to ``grace_s``, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    tracker.kill_group(proc)


def stop_xvfbs(tracker: ProcessTracker, servers: Sequence[Xvfb]) -> None:
    for server in servers:
        if server.keeper is not None:
            server.keeper.close()
    for server in servers:
        stop(tracker, server.proc)


def settle_orphans(tracker: ProcessTracker, timeout_s: float = 10.0) -> None:
    """Wait for what pvpython left behind to leave on its own: Open MPI's singleton ``orted``.

    Each pvpython starts one in a session of its own (``orted --set-sid
    --singleton-died-pipe``), so it escapes the process group we kill; it exits
    soon after its pvpython. Whatever is still there after ``timeout_s`` is
    killed, and reported, by the final cleanup.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tracked = {proc.pid for proc in tracker.groups}
        if all(pid in tracked for pid in tracker.marked_pids()):
            return
        time.sleep(0.05)


def x_hello(display: int, timeout_s: float = 10.0) -> tuple[str, socket.socket | None]:
    """Connect to ``:display`` (abstract socket) and do the connection setup; (outcome, open socket when ok).

    Setup request: little-endian, protocol 11.0, no authorization. Reply byte
    0: 1 success, 0 failed (byte 1 = reason length), 2 authenticate; bytes
    6:8 the length of the rest in 4-byte units.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(f"\0/tmp/.X11-unix/X{display}")
    except OSError:
        sock.close()
        return "conn err", None
    try:
        sock.sendall(struct.pack("<cxHHHHxx", b"l", 11, 0, 0, 0))
        head = _recv_exactly(sock, 8)
        body = _recv_exactly(sock, struct.unpack("<H", head[6:8])[0] * 4) if head else None
    except ConnectionResetError:
        head = body = None
    except TimeoutError:
        sock.close()
        return "timeout", None
    except OSError as exc:
        sock.close()
        return f"error ({exc.errno})", None
    if head is None or body is None:
        sock.close()
        return "closed", None
    if head[0] != 1:
        sock.close()
        return f"failed:{body[:head[1]].decode('latin-1')}", None
    return "ok", sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None when the server closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- A: the socket level -----------------------------------------------------------------------------


@dataclass
class SocketArm:
    label: str
    flags: tuple[str, ...]
    keeper: bool
    server: Xvfb | None = None
    first: Counter[str] = field(default_factory=Counter)
    second: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def part_a(tracker: ProcessTracker, root: Path, rounds: int) -> None:
    arms = [SocketArm("default", (), False), SocketArm("default + keeper", (), True),
            SocketArm("-noreset", ("-noreset",), False)]
    busy = [tracker.spawn([sys.executable, "-c", "while True: pass"], env=tracker.env()) for _ in range(2)]
    servers: list[Xvfb] = []
    try:
        for arm in arms:
            arm.server = spawn_xvfbs(tracker, root, arm.flags, 1, nice=True)[0]
            servers.append(arm.server)
            if arm.keeper:
                outcome, arm.server.keeper = x_hello(arm.server.display)
                if arm.server.keeper is None:
                    raise BenchError(f"the keeper could not connect to :{arm.server.display}: {outcome}")
        for _ in range(rounds):
            for arm in arms:  # interleaved: the load and the machine's drift hit all arms alike
                assert arm.server is not None
                started = time.monotonic()
                outcome, sock = x_hello(arm.server.display)
                arm.first[outcome] += 1
                if sock is not None:
                    sock.close()
                outcome, sock = x_hello(arm.server.display)  # at once: this is ParaView's probe-then-window
                arm.second[outcome] += 1
                if sock is not None:
                    sock.close()
                arm.seconds += time.monotonic() - started
                time.sleep(SETTLE_S)
    finally:
        stop_xvfbs(tracker, servers)
        for proc in busy:
            tracker.kill_group(proc)
    print(f"A. X protocol only: connect + setup -> reply -> close -> connect again at once -> reply -> close, "
          f"{SETTLE_S * 1000:.0f} ms pause;")
    print(f"   {rounds} rounds per arm, interleaved; each Xvfb at nice 19 beside 2 busy loops (2 cores)")
    kinds = ["ok", "closed", "conn err", "timeout"]
    others = sorted({k for arm in arms for c in (arm.first, arm.second) for k in c if k not in kinds})
    cols = kinds + others
    width = max(len(k) for k in cols) + 2
    block = width * len(cols)
    print(f"   {'Xvfb':18} |{'1st: after the pause':^{block}}|{'2nd: right after a close':^{block}}"
          f"| ms/round")
    print(f"   {'':18} |{''.join(f'{k:>{width}}' for k in cols)}|{''.join(f'{k:>{width}}' for k in cols)}|")
    for arm in arms:
        one = "".join(f"{arm.first.get(k, 0):>{width}}" for k in cols)
        two = "".join(f"{arm.second.get(k, 0):>{width}}" for k in cols)
        print(f"   {arm.label:18} |{one}|{two}| {arm.seconds / rounds * 1000:8.1f}")
    print("   closed = the server closed the connection before its setup reply (EOF or ECONNRESET); conn err = connect() failed")
    print()


# -- B and C: ParaView -------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "ok"/"ready", "abort" (SIGABRT with the message), or "other: ..."
    seconds: float


def classify(rc: int | None, output: bytes, ready: bool) -> str:
    if ready:
        return "ready"
    if rc in (-signal.SIGABRT, 128 + signal.SIGABRT) and ABORT_TEXT in output:
        return "abort"
    if rc == 0:
        return "ok"
    if rc is not None and rc < 0:
        return f"other: {signal.Signals(-rc).name} ({rc})"
    lines = re.sub(r"\x1b\[[0-9;]*m", "", output.decode("utf-8", "replace")).strip().splitlines()
    return f"other: rc={rc} {lines[-1][:80] if lines else ''}"


def pv_env(tracker: ProcessTracker, display: int, extra: dict[str, str]) -> dict[str, str]:
    env = tracker.env({"DISPLAY": f":{display}", "PYTHONUNBUFFERED": "1", **extra})
    env.pop("XAUTHORITY", None)
    return env


def run_renders(tracker: ProcessTracker, root: Path, render_py: Path, flags: Sequence[str], parallel: int,
                keeper: bool, shared: bool, extra_env: dict[str, str]) -> tuple[list[Outcome], float, int]:
    """One round of B: X servers up, ``parallel`` pvpython render.py at once, each classified; all stopped.

    Returns the outcomes, the round's wall time and how many X servers had exited on their own by its end.
    """
    servers = spawn_xvfbs(tracker, root, flags, 1 if shared else parallel)
    try:
        if keeper:
            for server in servers:
                outcome, server.keeper = x_hello(server.display)
                if server.keeper is None:
                    raise BenchError(f"the keeper could not connect to :{server.display}: {outcome}")
        procs = []
        started = time.monotonic()
        for i in range(parallel):
            server = servers[0 if shared else i]
            log = root / f"render-{len(list(root.glob('render-*')))}.log"
            with open(log, "wb") as out:
                procs.append((tracker.spawn(["pvpython", str(render_py)], stdout=out, stderr=subprocess.STDOUT,
                                            env=pv_env(tracker, server.display, extra_env)), log))
        outcomes = []
        for proc, log in procs:
            try:
                rc: int | None = proc.wait(timeout=max(1.0, started + PV_TIMEOUT_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - started
            outcomes.append(Outcome(classify(rc, log.read_bytes(), False) if rc is not None else "other: timeout",
                                    took))
            stop(tracker, proc, grace_s=1.0)
        gone = sum(server.proc.poll() is not None for server in servers)
        return outcomes, time.monotonic() - started, gone
    finally:
        stop_xvfbs(tracker, servers)
        settle_orphans(tracker)


def part_b(tracker: ProcessTracker, root: Path, rounds: int, parallel: int) -> None:
    render_py = root / "render.py"
    render_py.write_text(RENDER_PY)
    arms: list[tuple[str, tuple[str, ...], bool, bool, dict[str, str]]] = [
        (f"{parallel} Xvfb, default", (), False, False, {}),
        (f"{parallel} Xvfb, -noreset", ("-noreset",), False, False, {}),
        (f"{parallel} Xvfb, default + keeper", (), True, False, {}),
        (f"{parallel} Xvfb, default, HWLOC_COMPONENTS=-gl", (), False, False, {"HWLOC_COMPONENTS": "-gl"}),
        # the server exits when its last client leaves: every abort here is the probe's close beating the window
        (f"{parallel} Xvfb, -terminate", ("-terminate",), False, False, {}),
        (f"{parallel} Xvfb, -terminate, HWLOC_COMPONENTS=-gl", ("-terminate",), False, False,
         {"HWLOC_COMPONENTS": "-gl"}),
        ("1 shared Xvfb, -noreset", ("-noreset",), False, True, {}),
    ]
    results: dict[str, list[tuple[list[Outcome], float, int]]] = {label: [] for label, *_ in arms}
    for _ in range(rounds):
        for label, flags, keeper, shared, extra in arms:  # interleaved rounds
            results[label].append(run_renders(tracker, root, render_py, flags, parallel, keeper, shared, extra))
    print(f"B. {parallel} x `pvpython render.py` at once (Sphere(); Show(); Render()), {rounds} rounds per arm, "
          f"interleaved")
    print(f"   {'X servers':44} | {'aborts per round':>16} | {'aborts':>8} | {'ok':>4} | other | X exited | s/round")
    for label, _flags, _keeper, shared, _extra in arms:
        per_round = [sum(o.kind == "abort" for o in outs) for outs, _, _ in results[label]]
        everything = [o for outs, _, _ in results[label] for o in outs]
        n = len(everything)
        other = Counter(o.kind for o in everything if o.kind.startswith("other"))
        servers = (1 if shared else parallel) * len(results[label])
        gone = sum(g for _, _, g in results[label])
        walls = statistics.median(w for _, w, _ in results[label])
        print(f"   {label:44} | {' '.join(map(str, per_round)):>16} | {sum(per_round):>3}/{n:<4} | "
              f"{sum(o.kind == 'ok' for o in everything):>4} | {sum(other.values()):>5} | {gone:>3}/{servers:<4} | "
              f"{walls:7.1f}")
        for kind, count in other.items():
            print(f"   {'':44}   {count} x {kind}")
    print("   abort = exit by SIGABRT (-6) with 'vtkXOpenGLRenderWindow: bad X server connection';"
          " X exited = X servers that had exited on their own by the round's end")
    print()


PORT_TAKEN = b"[Errno 98]"  # EADDRINUSE: another process on the machine took the port between our check and the bind


def run_visualizers(tracker: ProcessTracker, root: Path, flags: Sequence[str],
                    parallel: int) -> tuple[list[Outcome], int]:
    """One round of C: ``parallel`` Visualizers at once, each with its own Xvfb; ready or not, each is stopped.

    A launch that exits because its port was taken meanwhile (the machine's
    ephemeral range may cover ours) is started again on another port, up to 3
    times: that is not the failure measured here. Returns the outcomes and how
    many such restarts there were.
    """
    servers = spawn_xvfbs(tracker, root, flags, parallel)
    low, _ = _common.find_port_range(parallel)
    running: list[tuple[subprocess.Popen[bytes], Path, float, Xvfb, int]] = []
    outcomes: list[Outcome] = []
    port_restarts = 0

    def launch(server: Xvfb, port: int, restarts: int) -> None:
        log = root / f"visualizer-{len(list(root.glob('visualizer-*')))}.log"
        argv = ["pvpython", "-dr", str(VISUALIZER), "--host", _common.HOST, "--port", str(port),
                "--data", str(DATA_DIR), "--authKey", secrets.token_hex(16), "--timeout", "30"]
        with open(log, "wb") as out:
            proc = tracker.spawn(argv, stdout=out, stderr=subprocess.STDOUT,
                                 env=pv_env(tracker, server.display, {"PYTHONPATH": str(WSLINK_DIR)}))
        running.append((proc, log, time.monotonic(), server, restarts))

    try:
        for i, server in enumerate(servers):
            launch(server, low + i, 0)
        deadline = time.monotonic() + PV_TIMEOUT_S
        while running:
            for item in list(running):
                proc, log, started, server, restarts = item
                output = log.read_bytes()
                ready = _common.READY_LINE.encode() in output
                rc = proc.poll()
                if ready or rc is not None or time.monotonic() > deadline:
                    stop(tracker, proc)  # ready: SIGTERM and wait, like a session's end
                    running.remove(item)
                    if not ready and rc is not None and PORT_TAKEN in output and restarts < 3:
                        port_restarts += 1
                        launch(server, _common.free_port(), restarts + 1)
                        continue
                    took = time.monotonic() - started
                    kind = classify(rc, output, ready) if (ready or rc is not None) else "other: timeout"
                    outcomes.append(Outcome(kind, took))
            time.sleep(0.02)
        return outcomes, port_restarts
    finally:
        for proc, *_ in running:
            stop(tracker, proc, grace_s=1.0)
        stop_xvfbs(tracker, servers)
        settle_orphans(tracker)


def part_c(tracker: ProcessTracker, root: Path, rounds: int, parallel: int) -> None:
    arms = [("one Xvfb each, -noreset", ("-noreset",)), ("one Xvfb each, default", ())]
    results: dict[str, list[list[Outcome]]] = {label: [] for label, _ in arms}
    restarts: Counter[str] = Counter()
    for _ in range(rounds):
        for label, flags in arms:
            outcomes, restarted = run_visualizers(tracker, root, flags, parallel)
            results[label].append(outcomes)
            restarts[label] += restarted
    print(f"C. real Visualizer launches (pvpython -dr pvw-visualizer.py ... --authKey K --timeout 30), "
          f"{parallel} at a time, {rounds} rounds per arm, interleaved")
    print(f"   {'X servers':26} | {'aborts per round':>16} | {'ready':>7} | {'aborts':>7} | other | "
          f"ready s: median   max")
    for label, _ in arms:
        outs = [o for r in results[label] for o in r]
        per_round = [sum(o.kind == "abort" for o in r) for r in results[label]]
        ready = [o.seconds for o in outs if o.kind == "ready"]
        other = Counter(o.kind for o in outs if o.kind not in ("ready", "abort"))
        med = f"{statistics.median(ready):6.2f} {max(ready):6.2f}" if ready else f"{'-':>6} {'-':>6}"
        print(f"   {label:26} | {' '.join(map(str, per_round)):>16} | {len(ready):>3}/{len(outs):<3} | "
              f"{sum(per_round):>7} | {sum(other.values()):>5} |         {med}")
        for kind, count in other.items():
            print(f"   {'':26}   {count} x {kind}")
        if restarts[label]:
            print(f"   {'':26}   {restarts[label]} x restarted on another port (address in use: not counted)")
    print("   ready = printed 'Starting factory'; each was then stopped (SIGTERM, wait)")
    print()


# -- the run -----------------------------------------------------------------------------------------


def require_setup() -> None:
    missing = [tool for tool in ("Xvfb", "pvpython") if not _which(tool)]
    missing += [str(p) for p in (WSLINK_DIR, VISUALIZER, DATA_DIR / "wavelet.vti") if not p.exists()]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run examples/paraview/setup")


def _which(tool: str) -> bool:
    return any(os.access(Path(d) / tool, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep) if d)


@contextlib.contextmanager
def tracked() -> Iterator[tuple[ProcessTracker, Path]]:
    tracker = ProcessTracker()
    with _common.cleaned_tempdir("pvw-xvfb-abort-", tracker.cleanup, (signal.SIGINT,)) as root:
        yield tracker, root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket-rounds", type=int, default=300, help="A: rounds per arm (default 300)")
    parser.add_argument("--pv-rounds", type=int, default=3, help="B: rounds per arm (default 3)")
    parser.add_argument("--vis-rounds", type=int, default=5, help="C: rounds per arm (default 5)")
    parser.add_argument("--parallel", type=int, default=10, help="B and C: processes at once (default 10)")
    parser.add_argument("--parts", default="ABC", help="which parts to run (default ABC)")
    args = parser.parse_args()

    def body() -> None:
        require_setup()
        versions = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\\n", "xvfb", "paraview"],
                                  capture_output=True, text=True, check=False).stdout.split("\n")
        print(f"xvfb_abort: {', '.join(v for v in versions if v)}; {os.cpu_count()} cores; prefix {PREFIX}")
        print()
        with tracked() as (tracker, root):
            started = time.monotonic()
            if "A" in args.parts.upper():
                part_a(tracker, root, args.socket_rounds)
            if "B" in args.parts.upper():
                part_b(tracker, root, args.pv_rounds, args.parallel)
            if "C" in args.parts.upper():
                part_c(tracker, root, args.vis_rounds, args.parallel)
            print(f"took {time.monotonic() - started:.0f} s")

    return _common.run_bench(body)


if __name__ == "__main__":
    sys.exit(main())
