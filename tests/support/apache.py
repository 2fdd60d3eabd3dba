"""A private, throw-away Apache httpd for integration tests (no systemd).

pvw-hpc's front end is Apache with the ParaViewWeb vhost: ``ProxyPass
/paraview`` to the launcher and a ``RewriteMap txt:`` proxy file that maps
``sessionId`` to ``host:port`` for the WebSocket. Tests must exercise that
real path, so this class runs a genuine ``apache2`` with its own config, pid
file, logs and a free port, as a child of the test process.

Pitfalls this class handles (see shared reference ``apache.md``):

* As root Apache refuses ``User root`` and logs noise without ``User``, so
  ``User/Group www-data`` are set when euid is 0 (and omitted otherwise).
* The children (www-data) read the proxy file at request time; every
  directory on its path must be searchable by "others". ``mkdtemp`` and
  pytest's ``tmp_path`` are 0700, so the root dir is made in ``/tmp`` and
  chmod 0755, and the proxy file's ancestors are checked up front: a
  ``PermissionError`` here beats a mysterious 400 for every session.
* The map file must exist when Apache starts, so an empty one is created.
* ``Listen 127.0.0.1:0`` never reveals the port, so we pick one ourselves.
* ``apache2 -k stop`` re-parses the config; we stop by SIGTERM to the PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

APACHE_BIN = "/usr/sbin/apache2"
MODULES_DIR = "/usr/lib/apache2/modules"

# Debian builds core, so, http_core, log_config, unixd ... in; these are not.
_MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_http_module", "mod_proxy_http.so"),
    # Not required on Apache >= 2.4.47 (mod_proxy_http handles ws://), kept
    # for older versions.
    ("proxy_wstunnel_module", "mod_proxy_wstunnel.so"),
    ("rewrite_module", "mod_rewrite.so"),
)

# Keep placeholders out of comments in this template: a substituted comment
# once produced a confusing syntax error. str.format is used, hence {{ }}.
_CONF_TEMPLATE = """\
ServerRoot "{root}"
DefaultRuntimeDir "{root}/run"
PidFile "{root}/run/httpd.pid"
Listen {listen_host}:{port}
ServerName {listen_host}
{user_group}
{load_modules}

ErrorLog "{error_log}"
LogLevel warn
LogFormat "%h %t \\"%r\\" %>s %b %D" short
CustomLog "{access_log}" short

{vhost}
"""

_DEFAULT_VHOST = """\
<VirtualHost 127.0.0.1:{port}>
    ProxyPass /paraview http://127.0.0.1:{launcher_port}/paraview
    RewriteEngine On
    RewriteMap session-to-port txt:{proxy_file}
    RewriteCond %{{QUERY_STRING}} ^sessionId=(.*)&path=(.*)$ [NC]
    RewriteRule ^/proxy.*$ ws://${{session-to-port:%1}}/%2 [P]
</VirtualHost>
"""


def skip_reason() -> str | None:
    """Return why Apache tests cannot run here, or ``None`` if they can."""
    if not os.path.exists(APACHE_BIN):
        return f"{APACHE_BIN} not installed (apt-get install apache2)"
    return None


def free_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1.

    There is a small race (someone else may grab it before use), which is
    acceptable for tests and far better than fixed ports, which collided.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_traversable(path: Path) -> None:
    """Raise ``PermissionError`` unless "others" can reach ``path``.

    Apache's children run as www-data and open the RewriteMap file on each
    request; if any ancestor lacks o+x the lookup silently fails and every
    session gets HTTP 400. Only meaningful when running as root, but cheap
    and harmless otherwise.
    """
    path = path.resolve()
    for directory in reversed(path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            msg = (
                f"{directory} (mode {stat.filemode(mode)}) is not searchable by "
                f"others, so Apache's www-data children cannot read {path}; "
                "use a directory under /tmp with mode 0755 (not pytest's tmp_path)"
            )
            raise PermissionError(msg)
    if path.exists() and not path.stat().st_mode & stat.S_IROTH:
        msg = f"{path} is not readable by others (www-data needs mode 0644)"
        raise PermissionError(msg)


class ApacheInstance:
    """A private Apache httpd running in the foreground as our child.

    Use as a context manager (``with ApacheInstance(...) as apache:``) so it
    is stopped and its directory removed even when a test fails.
    """

    def __init__(
        self,
        proxy_file: str | os.PathLike[str] | None = None,
        launcher_port: int = 9000,
        port: int | None = None,
        start_timeout: float = 10.0,
        vhost: str | None = None,
        listen_host: str = "127.0.0.1",
        command_prefix: list[str] | None = None,
    ) -> None:
        """Create the instance directory (not started yet).

        ``proxy_file`` defaults to ``<root>/proxy.txt``; ``launcher_port`` is
        where ``/paraview`` is forwarded; ``port`` defaults to a free one.
        ``vhost`` replaces the built-in ``<VirtualHost>`` block (e.g. the output
        of ``pvw-hpc apache-config --listen 127.0.0.1:<port>``). ``listen_host`` and
        ``command_prefix`` run it on another (namespace) host: the prefix goes
        before ``apache2`` and must ``exec`` it, so our child is Apache itself.
        """
        self.listen_host = listen_host
        self._command_prefix = list(command_prefix or [])
        self._vhost = vhost
        self._root = Path(tempfile.mkdtemp(prefix="pvw-apache-", dir="/tmp"))
        # mkdtemp makes 0700; www-data must be able to traverse it.
        self._root.chmod(0o755)
        self.proxy_file = (
            Path(proxy_file) if proxy_file is not None else self._root / "proxy.txt"
        )
        self.launcher_port = launcher_port
        self._port = port if port is not None else free_port()
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self._root / "httpd.conf"

    # -- properties -------------------------------------------------------

    @property
    def root(self) -> Path:
        """The instance directory (config, run/, logs/)."""
        return self._root

    @property
    def port(self) -> int:
        """The TCP port Apache listens on (127.0.0.1)."""
        return self._port

    @property
    def url(self) -> str:
        """Base HTTP URL, e.g. for ``POST {url}/paraview/``."""
        return f"http://{self.listen_host}:{self._port}"

    @property
    def ws_url_base(self) -> str:
        """Base WebSocket URL; append ``/proxy?sessionId=<id>&path=ws``."""
        return f"ws://{self.listen_host}:{self._port}"

    @property
    def error_log(self) -> Path:
        """Apache's error log (first place to look when a request fails)."""
        return self._root / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        """Apache's access log (one line per request with its status)."""
        return self._root / "logs" / "access.log"

    @property
    def stderr_log(self) -> Path:
        """Apache's own stderr (messages emitted before ErrorLog is open)."""
        return self._root / "logs" / "stderr.log"

    @property
    def pid(self) -> int | None:
        """PID of the running Apache parent, or ``None`` if not running."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle --------------------------------------------------------

    def write_config(self) -> Path:
        """Write httpd.conf (and an empty proxy file if missing), then ``apache2 -t``.

        Raises ``RuntimeError`` with Apache's stderr if the syntax check fails,
        and ``PermissionError`` if www-data could not read the proxy file.
        """
        (self._root / "run").mkdir(exist_ok=True)
        (self._root / "logs").mkdir(exist_ok=True)
        if not self.proxy_file.exists():
            # The map file must exist at startup or Apache refuses the config.
            self.proxy_file.parent.mkdir(parents=True, exist_ok=True)
            self.proxy_file.touch()
            self.proxy_file.chmod(0o644)
        check_traversable(self.proxy_file)

        as_root = os.geteuid() == 0
        user_group = "User www-data\nGroup www-data" if as_root else ""
        load_modules = "\n".join(
            f"LoadModule {name} {MODULES_DIR}/{so}" for name, so in _MODULES
        )
        vhost = self._vhost or _DEFAULT_VHOST.format(
            port=self._port,
            launcher_port=self.launcher_port,
            proxy_file=self.proxy_file.resolve(),
        )
        self.conf_path.write_text(
            _CONF_TEMPLATE.format(
                vhost=vhost,
                root=self._root,
                port=self._port,
                listen_host=self.listen_host,
                user_group=user_group,
                load_modules=load_modules,
                error_log=self.error_log,
                access_log=self.access_log,
            ),
            encoding="utf-8",
        )
        check = subprocess.run(
            [APACHE_BIN, "-t", "-f", str(self.conf_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            msg = (
                f"apache2 -t rejected {self.conf_path} (exit {check.returncode}):\n"
                f"{check.stderr.strip()}"
            )
            raise RuntimeError(msg)
        return self.conf_path

    def start(self) -> ApacheInstance:
        """Write the config, start Apache in the foreground, wait for the port.

        Fails with ``RuntimeError`` (including the error-log tail) if Apache
        exits or does not answer within ``start_timeout``.
        """
        if self._proc is not None:
            msg = "Apache instance already started"
            raise RuntimeError(msg)
        self.write_config()
        # stderr goes to a file, not a pipe: nobody drains a pipe while the
        # tests run, and a full pipe would block Apache.
        with self.stderr_log.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [*self._command_prefix, APACHE_BIN, "-f", str(self.conf_path), "-D", "FOREGROUND"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = self.stderr_log.read_text(encoding="utf-8", errors="replace")
                code = self._proc.returncode
                self._proc = None
                msg = (
                    f"apache2 exited with code {code} during startup\n"
                    f"stderr:\n{stderr.strip()}\n"
                    f"error log tail:\n{self.error_log_tail()}"
                )
                raise RuntimeError(msg)
            # The port alone is not proof: another process may hold it (then
            # our Apache fails to bind and exits). Our PID in the pid file,
            # written after the listeners are bound, tells them apart.
            if self._pid_file_is_ours() and self._port_answers():
                return self
            time.sleep(0.02)
        self.stop()
        msg = (
            f"apache2 did not answer on port {self._port} within "
            f"{self._start_timeout} s\nerror log tail:\n{self.error_log_tail()}"
        )
        raise RuntimeError(msg)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Apache with SIGTERM to its PID and wait (SIGKILL as last resort).

        Never ``apache2 -k stop``: it re-parses the config and can fail while
        leaving the server running.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Stop Apache and remove the instance directory."""
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def error_log_tail(self, lines: int = 20) -> str:
        """Last ``lines`` lines of the error log ('' if none), for failure messages."""
        try:
            text = self.error_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _pid_file_is_ours(self) -> bool:
        """True once Apache has written its PID file with our child's PID."""
        try:
            text = (self._root / "run" / "httpd.pid").read_text(encoding="ascii")
        except FileNotFoundError:
            return False
        return self._proc is not None and text.strip() == str(self._proc.pid)

    def _port_answers(self) -> bool:
        """True once a TCP connect to our port succeeds."""
        try:
            with socket.create_connection((self.listen_host, self._port), timeout=0.2):
                return True
        except OSError:
            return False

    def __enter__(self) -> ApacheInstance:
        """Start on entering the ``with`` block."""
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *_exc: object) -> None:
        """Stop and clean up, whatever happened inside the block."""
        self.cleanup()
