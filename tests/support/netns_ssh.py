"""A private sshd "on" namespace hosts, for the seed's ssh-to-the-compute-host layout.

The seed's many-machine example launches each session through a custom
script that ssh-es to the compute host and starts the app there. Whether a
stopped session really stops the *remote* app only shows with a real sshd,
a real client and a real network hop, so this module runs genuine OpenSSH
servers inside :class:`~tests.support.netns.Hosts` namespaces, without the
system sshd and without touching ``/etc/ssh``:

* a dedicated unprivileged user ``pvwssh`` (created once with ``useradd``);
  its password field is ``*``, not useradd's default ``!``: with
  ``UsePAM no`` OpenSSH treats a ``!`` password as a locked account and
  refuses even key logins;
* everything else lives in a state directory: one ed25519 host key shared by
  all hosts, a client key pair, ``authorized_keys``, a ``known_hosts`` naming
  every host by address and by name (so the client can insist on
  ``StrictHostKeyChecking yes``), a client config for ``ssh -F``, and per
  host an ``sshd_config``, pid file and log;
* ``sshd -D -e`` is started "on" each host with :meth:`Hosts.popen` (so it is
  our child and its PID is sshd's own), listening on that host's address,
  port 22; :meth:`SshHosts.start` returns once the port accepts TCP.

Pitfalls handled here:

* sshd needs its privilege-separation directory ``/run/sshd``; without
  systemd nobody creates it, so we do (an empty 0755 directory).
* sshd reads ``authorized_keys`` as the target user, so the state directory
  and its parents must be traversable by others (``/tmp`` is; ``mkdtemp`` and
  pytest's ``tmp_path`` are 0700, hence a fixed 0755 directory under /tmp).
  ``StrictModes no`` because that directory is root's, not the user's.
* The remote user must be able to run the app's interpreter. The test venv's
  ``python`` links to an interpreter under ``/root`` (pyenv), and ``/root`` is
  0700. Changing ``/root`` is not ours to do, so, in sshd's *private* mount
  namespace only, the closed ancestor is covered by a 0755 stand-in that
  holds bind mounts of just the paths in ``share`` (by default the running
  interpreter's installation). A compute node with Python in ``/usr`` or
  ``/opt`` looks the same to the remote user.
* ``ClientAliveInterval`` makes sshd notice a client that vanished without
  closing the connection (a pulled cable), so the session's stdin reaches EOF
  and the remote wrapper of ``examples/many-machines/customScript.sh`` stops
  the app; without it only TCP keepalive (hours) would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.netns import Hosts, alive, proc_stat, run_command

SSHD = "/usr/sbin/sshd"
USER = "pvwssh"
PRIVSEP_DIR = Path("/run/sshd")
PORT = 22


def skip_reason() -> str | None:
    """Why private sshds cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "sshd on namespace hosts needs root"
    if not Path(SSHD).exists():
        return f"{SSHD} is missing (openssh-server)"
    for tool in ("ssh", "ssh-keygen", "useradd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def ensure_user(name: str = USER) -> pwd.struct_passwd:
    """Create the unprivileged login user if missing; make sure sshd does not see it as locked.

    ``UsePAM no`` makes OpenSSH refuse accounts whose password starts with
    ``!`` (useradd's default), even for public keys; ``*`` means "no password"
    without "locked".
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        run_command(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", name])
        return pwd.getpwnam(name)
    shadow = run_command(["getent", "shadow", name], check=False).stdout.split(":")
    if len(shadow) > 1 and shadow[1].startswith("!"):
        run_command(["usermod", "--password", "*", name])
    return entry


def closed_ancestor(path: Path) -> Path | None:
    """The outermost directory on ``path``'s way that others cannot traverse, if any."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


class SshHosts:
    """Private sshds for ``user`` on the chosen namespace hosts; see the module docstring.

    Attributes a test uses: :attr:`client_config` (for ``ssh -F`` or the
    ``PVW_SSH_CONFIG`` of ``customScript.sh``), :attr:`user`, :attr:`identity`,
    :attr:`known_hosts`, and :meth:`log` per host.
    """

    def __init__(self, hosts: Hosts, state_dir: Path, on: Sequence[int] = (3, 4), user: str = USER,
                 share: Sequence[Path] = (Path(sys.base_prefix),), log_level: str = "VERBOSE",
                 alive_interval_s: int = 2, alive_count: int = 3) -> None:
        self.hosts = hosts
        self.state_dir = state_dir
        self.on = tuple(on)
        self.user = user
        self.share = tuple(Path(p).resolve() for p in share)
        self.log_level = log_level
        self.alive_interval_s = alive_interval_s
        self.alive_count = alive_count
        self.host_key = state_dir / "ssh_host_ed25519_key"
        self.identity = state_dir / "id_ed25519"
        self.authorized_keys = state_dir / "authorized_keys"
        self.known_hosts = state_dir / "known_hosts"
        self.client_config = state_dir / "ssh_config"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- per-host paths -----------------------------------------------------------------------

    def sshd_config(self, host: int) -> Path:
        return self.state_dir / f"sshd_config.host{host}"

    def pid_file(self, host: int) -> Path:
        return self.state_dir / f"sshd.host{host}.pid"

    def log(self, host: int) -> Path:
        """sshd's own log (``-e``: stderr) for ``hostN``; read it when a login is refused."""
        return self.state_dir / f"sshd.host{host}.log"

    # -- client side --------------------------------------------------------------------------

    def ssh_argv(self, target: int, argv: Sequence[str]) -> list[str]:
        """``ssh`` argv that runs ``argv`` (quoted for the remote shell) as :attr:`user` on ``hostN``."""
        return ["ssh", "-F", str(self.client_config), "-T", f"{self.user}@{self.hosts.address(target)}", "--",
                shlex.join(argv)]

    def ssh(self, from_host: int, target: int, argv: Sequence[str], timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``target`` over ssh from ``from_host`` and wait (stdin is /dev/null)."""
        done = subprocess.run(self.hosts.argv(from_host, self.ssh_argv(target, argv)), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"ssh host{from_host} -> host{target}: {shlex.join(argv)} exited "
                               f"{done.returncode}: {done.stderr.strip()}")
        return done

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> SshHosts:
        """Prepare user, keys and configs, start one sshd per host and wait until each accepts TCP."""
        ensure_user(self.user)
        self._prepare_dirs()
        self._keys()
        self._client_files()
        try:
            for host in self.on:
                self._start_one(host, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM every sshd we started and its per-connection children, SIGKILL after ``grace_s``.

        A listening sshd that exits leaves its connections running, so those are
        signalled too; each closes its channels and the remote wrapper of
        ``customScript.sh`` sees EOF and stops its app, as on a real disconnect.
        """
        sessions = [pid for proc in self.procs.values() if proc.poll() is None for pid in _children(proc.pid)]
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace_s)
        deadline = time.monotonic() + grace_s
        while any(alive(pid) for pid in sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in sessions:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> SshHosts:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        """State dir and its missing parents 0755 (sshd reads authorized_keys as the user)."""
        missing = [p for p in (self.state_dir, *self.state_dir.parents) if not p.exists()]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for path in (*missing, self.state_dir):
            path.chmod(0o755)
        blocked = closed_ancestor(self.state_dir / "x")
        if blocked is not None:
            raise PermissionError(f"{blocked} is not traversable by others; {self.user} could not read "
                                  f"{self.authorized_keys}")
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            PRIVSEP_DIR.chmod(0o755)

    def _keys(self) -> None:
        """One host key for all hosts and one client key, reused when a previous run left them."""
        for key, comment in ((self.host_key, "pvw-test-host"), (self.identity, "pvw-test-client")):
            if not key.exists() or not key.with_suffix(".pub").exists():
                key.unlink(missing_ok=True)
                key.with_suffix(".pub").unlink(missing_ok=True)
                run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
            key.chmod(0o600)
            key.with_suffix(".pub").chmod(0o644)

    def _client_files(self) -> None:
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        names = "".join(f"{self.hosts.address(h)},{self.hosts.name(h)} {host_pub}\n" for h in self.on)
        _write(self.known_hosts, names)
        _write(self.authorized_keys, self.identity.with_suffix(".pub").read_text())
        _write(self.client_config, f"""\
# written by tests/support/netns_ssh.py: a hermetic client (no ~/.ssh, no /etc/ssh/ssh_config)
Host *
    User {self.user}
    Port {PORT}
    IdentityFile {self.identity}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    BatchMode yes
    ConnectTimeout 5
    ServerAliveInterval {self.alive_interval_s}
    ServerAliveCountMax {self.alive_count}
    ControlMaster no
    ControlPath none
    ForwardAgent no
    ForwardX11 no
    RequestTTY no
    LogLevel ERROR
""")

    def _write_sshd_config(self, host: int) -> Path:
        config = self.sshd_config(host)
        _write(config, f"""\
# written by tests/support/netns_ssh.py for host{host}; /etc/ssh is never read
ListenAddress {self.hosts.address(host)}
Port {PORT}
HostKey {self.host_key}
PidFile {self.pid_file(host)}
AuthorizedKeysFile {self.authorized_keys}
AuthorizedPrincipalsFile none
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin no
AllowUsers {self.user}
StrictModes no
LogLevel {self.log_level}
PermitUserEnvironment no
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
PrintMotd no
PrintLastLog no
UseDNS no
ClientAliveInterval {self.alive_interval_s}
ClientAliveCountMax {self.alive_count}
MaxStartups 50:30:100
""")
        return config

    def _mount_script(self, host: int) -> str:
        """Shell lines that make each ``share`` path reachable in sshd's private mount namespace."""
        lines: list[str] = []
        covered: dict[Path, Path] = {}
        for path in self.share:
            blocked = closed_ancestor(path)
            if blocked is None:
                continue
            standin = covered.setdefault(blocked, self.state_dir / f"standin.host{host}" / blocked.relative_to("/"))
            target = standin / path.relative_to(blocked)
            target.mkdir(parents=True, exist_ok=True)
            for directory in (target, *target.parents):
                if directory == self.state_dir:
                    break
                directory.chmod(0o755)
            lines.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(target))}")
        # rbind: the stand-in carries the bind mounts made into it just above
        lines += [f"mount --rbind {shlex.quote(str(s))} {shlex.quote(str(b))}" for b, s in covered.items()]
        return " && ".join(lines)

    def _start_one(self, host: int, timeout_s: float) -> None:
        config = self._write_sshd_config(host)
        run_command([SSHD, "-t", "-f", str(config)])  # a config error fails here with sshd's message
        argv = [SSHD, "-D", "-e", "-f", str(config)]
        mounts = self._mount_script(host)
        if mounts:
            argv = ["/bin/sh", "-c", f'{mounts} && exec "$@"', "sshd-on-host", *argv]
        log = open(self.log(host), "ab")  # handed to the child, closed right after
        try:
            self.procs[host] = self.hosts.popen(host, argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT)
        finally:
            log.close()
        address = self.hosts.address(host)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.procs[host].poll() is not None:
                raise RuntimeError(f"sshd on host{host} exited {self.procs[host].returncode}: "
                                   f"{self.log(host).read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((address, PORT), timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd on host{host} did not accept on {address}:{PORT} within {timeout_s}s")
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (sshd's per-connection processes), from one scan of /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
