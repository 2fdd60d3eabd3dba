"""A real two-node SLURM cluster across namespace hosts: slurmctld on host2, slurmd on host3 and host4.

The seed's many-machine layout, HPC style, puts the launcher beside the
controller and the apps on compute nodes with their own addresses. This
builds exactly that with the distribution's Slurm 22.05 (the same binaries as
``schedulers/slurm``) on :class:`support.netns.Hosts`:

* a private ``munged`` on a socket in our state folder (``AuthInfo=socket=``),
  so the machine's own munge and single-node cluster are never touched; a unix
  socket works across network namespaces because the filesystem is shared;
* ``slurm.conf`` with per-node spool, pid and log files (``%n``): both slurmd
  share one disk, and slurmd finds "its old self" by pid file;
* ``JobRequeue=0``: a job on a failed node ends NODE_FAIL instead of being
  requeued silently and restarted minutes later on a new port;
* ``SlurmdTimeout=10``: a cut node is ``down*`` about 30 s after the cut.

Every daemon runs "on" its host through :meth:`Hosts.argv`, so jobs inherit
the node's hostname and hosts file, and ``hostname``/``getent`` on a node give
its own address. Clients need ``SLURM_CONF`` (:attr:`NetnsSlurm.env`), or they
would talk to the machine's single-node cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .netns import Hosts, alive

CONTROLLER = 2
NODES = (3, 4)
CPUS_PER_NODE = 2


def skip_reason() -> str | None:
    """Why the two-node cluster cannot run here, or ``None``."""
    for tool in ("slurmctld", "slurmd", "munged", "mungekey", "sinfo"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (run schedulers/slurm/up once)"
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class NetnsSlurm:
    """The cluster's files under ``root``; :meth:`up` starts it, :meth:`down` stops it and its jobs."""

    def __init__(self, hosts: Hosts, root: Path) -> None:
        self.hosts = hosts
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.munge_dir = root / "munge"
        self.socket = self.munge_dir / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> NetnsSlurm:
        for sub in ("etc", "ctld", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self._start_munge()
        self._write_conf()
        self.hosts.run(CONTROLLER, [_daemon("slurmctld"), "-c", "-f", str(self.conf)], env=self.env)
        for node in NODES:
            self.start_slurmd(node)
        self.wait_nodes({f"host{n}": "idle" for n in NODES}, timeout=30)
        return self

    def down(self) -> None:
        """Cancel every job, stop the daemons by pid file; ``Hosts.down`` kills orphaned steps later."""
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=10)
            subprocess.run(["scancel", "-u", "root"], env=self.env, capture_output=True, timeout=10)
        for pid_file in [*(self.root / "run" / f"slurmd-host{n}.pid" for n in NODES),
                         self.root / "run" / "slurmctld.pid", self.munge_dir / "munged.pid"]:
            _stop_by_pid_file(pid_file)

    # -- nodes --------------------------------------------------------------------------------

    def start_slurmd(self, node: int) -> None:
        pid_file = self.root / "run" / f"slurmd-host{node}.pid"
        pid_file.unlink(missing_ok=True)
        self.hosts.run(node, [_daemon("slurmd"), "-N", f"host{node}", "-f", str(self.conf)], env=self.env)
        deadline = time.monotonic() + 10
        while not _read_pid(pid_file):  # slurmd forks before it writes its pid file
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmd on host{node} wrote no pid file:\n{self._log_tail(f'slurmd-host{node}')}")
            time.sleep(0.02)

    def stop_slurmd(self, node: int) -> None:
        _stop_by_pid_file(self.root / "run" / f"slurmd-host{node}.pid")

    def resume(self, node: int) -> None:
        """Bring a node that SLURM marked down back at once (it would take up to a minute alone)."""
        self.scontrol("update", f"nodename=host{node}", "state=resume", check=False)

    def node_states(self) -> dict[str, str]:
        out = self.command(["sinfo", "-h", "-N", "-o", "%N=%T"]).stdout
        return dict(line.split("=", 1) for line in out.split() if "=" in line)

    def wait_nodes(self, want: dict[str, str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError, RuntimeError):
                states = self.node_states()
                if all(states.get(node) == state for node, state in want.items()):
                    return states
            time.sleep(0.1)
        raise RuntimeError(f"nodes did not reach {want} within {timeout} s: {states}\n{self._log_tail('slurmctld')}")

    # -- client commands ----------------------------------------------------------------------

    def command(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster, from the root namespace (via the bridge)."""
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.command(["scontrol", *args], check=check)

    def job_node(self, job_id: str) -> str:
        return self.command(["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()

    def job_state(self, job_id: str) -> str:
        """The job's state as ``scontrol`` reports it (still known for MinJobAge after it ended)."""
        out = self.scontrol("show", "job", job_id, check=False).stdout
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "GONE"

    # -- internals ----------------------------------------------------------------------------

    def _start_munge(self) -> None:
        _stop_by_pid_file(self.munge_dir / "munged.pid")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)  # munged refuses a socket folder others cannot traverse
        key = self.munge_dir / "munge.key"
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={key}"],
                           check=True, capture_output=True, timeout=30)
        subprocess.run(
            ["runuser", "-u", "munge", "--", _daemon("munged"), f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            check=True, capture_output=True, timeout=30)

    def _write_conf(self) -> None:
        r = self.root
        nodes = "\n".join(
            f"NodeName=host{n} NodeAddr={self.hosts.address(n)} NodeHostname=host{n} CPUs={CPUS_PER_NODE} "
            f"Boards=1 SocketsPerBoard=1 CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 RealMemory=2000 "
            "State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""\
# written by tests/support/netns_slurm.py: a two-node cluster on namespace hosts
ClusterName=pvwnet
SlurmctldHost=host{CONTROLLER}({self.hosts.address(CONTROLLER)})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation={r}/ctld
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.log
MailProg=/bin/true
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=10
JobRequeue=0
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=pvw Nodes=host[3-4] Default=YES MaxTime=INFINITE State=UP
""")

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.root / "log" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stop_by_pid_file(path: Path, timeout: float = 10.0) -> None:
    pid = _read_pid(path)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)

