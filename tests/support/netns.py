"""Four "hosts" on one machine: Linux network namespaces on a private test subnet.

The seed's two- and many-machine layouts only break for real when the app
listens on another host's address, so their tests need hosts with their own
addresses. A network namespace per host gives exactly that, in well under a
second, as root, without touching anything outside what this module creates:

* a bridge ``<prefix>br`` in the root namespace carrying ``<net>.254/24`` —
  given *before* anything starts, and checked with ``ip route get``, so that
  traffic for the test subnet stays on the bridge and never takes the default
  route off the machine;
* per host ``hostN``: a namespace ``<prefix>N`` with ``eth0`` = ``<net>.N`` on a
  veth into the bridge, no default route (a wrong address fails at once);
* a hosts file naming host1..host4, bind-mounted over ``/etc/hosts`` only in
  the mount namespace of the commands run "on" a host (the real one is never
  changed), and a hostname per command (a UTS namespace), so ``hostname`` and
  ``getent hosts $(hostname)`` on "host3" give ``host3`` and its address.

:meth:`Hosts.argv` builds the command that runs something on a host. It uses
``nsenter --net`` rather than ``ip netns exec`` because the latter remounts
``/sys`` and hides the cgroup mounts that slurmd needs. Every layer ``exec``\\ s,
so the PID a caller gets is the PID of its program.

Teardown (:meth:`Hosts.down`) kills whatever still runs inside the namespaces
(orphaned job steps of fault tests ignore SIGTERM), deletes the namespaces,
veths and bridge, and removes ``/run/netns`` if this module created it. ``up``
first tears down leftovers of an earlier run that was killed, so a crashed
test session never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
HOSTS = (1, 2, 3, 4)
# created when /run/netns did not exist before us; teardown then removes the directory again
_CREATED_MARKER = "created-run-netns"


def skip_reason() -> str | None:
    """Why namespace hosts cannot be built here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    return None


def run_command(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a set-up command here (not on a host); ``check`` raises with its stderr when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


class Hosts:
    """host1..host4 as namespaces ``<prefix>1..4`` on ``<net>.0/24``; see the module docstring."""

    def __init__(self, root: Path, prefix: str = "pvwt", net: str = "10.250.0") -> None:
        self.root = root
        self.prefix = prefix
        self.net = net
        self.subnet = ipaddress.ip_network(f"{net}.0/24")
        self.bridge = f"{prefix}br"
        self.bridge_address = f"{net}.254"
        self.hosts_file = root / "etc" / "hosts"
        self._lock: int | None = None  # one test run at a time may own these namespaces

    # -- naming -------------------------------------------------------------------------------

    def namespace(self, host: int) -> str:
        return f"{self.prefix}{host}"

    def address(self, host: int) -> str:
        """The IPv4 address of ``hostN`` (``<net>.N``)."""
        return f"{self.net}.{host}"

    def name(self, host: int) -> str:
        return f"host{host}"

    # -- running things on a host -------------------------------------------------------------

    def argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` on ``hostN`` (its network, hostname and hosts file)."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net={NETNS_DIR / self.namespace(host)}", "--",
                "unshare", "--mount", "--uts", "--propagation", "slave", "--",
                "/bin/sh", "-c", script, "on-host", str(self.hosts_file), self.name(host), *argv]

    def run(self, host: int, argv: Sequence[str], timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None, input: str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``hostN`` and wait; ``check`` raises with its stderr on failure."""
        done = subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout, env=env,
                              input=input, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"on host{host}: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def popen(self, host: int, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``hostN`` in the background (its PID is the program's own)."""
        return subprocess.Popen(self.argv(host, argv), **kwargs)  # type: ignore[call-overload]

    def set_link(self, host: int, up: bool) -> None:
        """Cut (``up=False``) or restore ``hostN``'s only link, as a pulled cable would."""
        run_command(["ip", "link", "set", f"{self.prefix}{host}b", "up" if up else "down"])

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> Hosts:
        """Build the bridge, namespaces and hosts file (leftovers of a killed run are removed first)."""
        self._take_lock()
        self.down()
        self._refuse_if_subnet_in_use()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        names = "".join(f"{self.address(h)} {self.name(h)}\n" for h in HOSTS)
        self.hosts_file.write_text(f"127.0.0.1 localhost\n{names}{self.bridge_address} {self.prefix}-bridge\n")
        self.hosts_file.chmod(0o644)
        if not NETNS_DIR.exists():
            (self.root / _CREATED_MARKER).touch()
        # the bridge's address first: from then on the subnet is a connected route on the bridge
        run_command(["ip", "link", "add", self.bridge, "type", "bridge"])
        run_command(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        run_command(["ip", "link", "set", self.bridge, "up"])
        self._check_route_stays_local()
        for host in HOSTS:
            ns, outside, inside = self.namespace(host), f"{self.prefix}{host}b", f"{self.prefix}{host}n"
            run_command(["ip", "netns", "add", ns])
            run_command(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
            run_command(["ip", "link", "set", inside, "netns", ns])
            run_command(["ip", "-n", ns, "link", "set", inside, "name", "eth0"])
            run_command(["ip", "link", "set", outside, "master", self.bridge, "up"])
            run_command(["ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0"])
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
            run_command(["ip", "-n", ns, "link", "set", "eth0", "up"])
        return self

    def down(self) -> None:
        """Kill everything inside our namespaces, delete them, the veths and the bridge. Idempotent."""
        namespaces = [self.namespace(h) for h in HOSTS if (NETNS_DIR / self.namespace(h)).exists()]
        self._kill_inside(namespaces)
        for ns in namespaces:
            run_command(["ip", "netns", "del", ns], check=False)
        for host in HOSTS:
            if Path(f"/sys/class/net/{self.prefix}{host}b").exists():
                run_command(["ip", "link", "del", f"{self.prefix}{host}b"], check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            run_command(["ip", "link", "del", self.bridge], check=False)
        marker = self.root / _CREATED_MARKER
        if marker.exists() and NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            run_command(["umount", str(NETNS_DIR)], check=False)
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
            marker.unlink()

    def release(self) -> None:
        """Tear down and let another run have the namespaces."""
        try:
            self.down()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    # -- internals ----------------------------------------------------------------------------

    def _take_lock(self) -> None:
        """Fail at once, clearly, when another test run owns namespaces of this prefix (it would lose them)."""
        if self._lock is not None:
            return
        fd = os.open(f"/tmp/{self.prefix}-netns.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another test run is using the namespace hosts {self.prefix}1..4; "
                               "wait for it, or set PVW_TEST_NETNS_PREFIX and PVW_TEST_NET") from None
        self._lock = fd

    def _refuse_if_subnet_in_use(self) -> None:
        """Never share a subnet with something real: its traffic would be ours to disturb."""
        for line in run_command(["ip", "-4", "route", "show"]).stdout.splitlines():
            target = line.split()[0]
            if target == "default":
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.ip_network(target, strict=False).overlaps(self.subnet):
                    raise RuntimeError(f"{self.subnet} is already routed on this machine ({line.strip()}); "
                                       "set PVW_TEST_NET to a free /24")

    def _check_route_stays_local(self) -> None:
        for host in HOSTS:
            route = run_command(["ip", "-4", "route", "get", self.address(host)]).stdout
            if f"dev {self.bridge}" not in route:
                raise RuntimeError(f"{self.address(host)} would not stay on {self.bridge}: {route.strip()}")

    def _kill_inside(self, namespaces: list[str]) -> None:
        """SIGTERM, then SIGKILL, every process still in our namespaces (they can only be ours)."""
        def pids() -> set[int]:
            found: set[int] = set()
            for ns in namespaces:
                out = run_command(["ip", "netns", "pids", ns], check=False).stdout
                found.update(int(p) for p in out.split() if p.isdigit())
            return {p for p in found if alive(p)}

        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            for pid in pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while pids() and time.monotonic() < deadline:
                time.sleep(0.05)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first, then the parent), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 here reaps lazily)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")
