"""The real wslink JavaScript client in headless Chromium, for end-to-end tests.

Three pieces, each usable on its own and each a context manager that cleans
up after itself even when the test fails:

* :func:`wslink_js` installs the npm package ``wslink`` (pinned in
  ``tests/support/js/package.json`` + ``package-lock.json``) with ``npm ci``
  into a cache outside the repository and returns its UMD bundle
  ``dist/wslink.js``; :func:`page_dir` copies the bundle next to
  ``tests/support/js/index.html`` into a directory Apache can serve.
* :class:`StaticApache` is :class:`~tests.support.apache.ApacheInstance` plus
  a ``DocumentRoot``, so the page comes from the same origin as ``/paraview``
  and ``/proxy`` (what SmartConnect assumes: ``location.origin``/``USE_HOST``).
* :class:`HeadlessChromium` runs Debian's ``chromium`` headless with a fresh
  profile and evaluates JavaScript in the page over the DevTools protocol.

Pitfalls handled here (see the shared reference ``apache.md``):

* ``chromium --dump-dom`` dumps right after the load event, before the
  launcher POST and the WebSocket RPCs finish. Instead we start with
  ``--remote-debugging-port=0``, read the port from ``DevToolsActivePort`` in
  the profile directory, and poll ``Runtime.evaluate`` over the DevTools
  WebSocket (the Python ``websockets`` client sends no ``Origin`` header, so
  no ``--remote-allow-origins`` is needed).
* Running as root needs ``--no-sandbox``; the dbus errors chromium prints
  on stderr are harmless.
* Chromium forks a zygote, renderers and utility processes. It is started in
  its own session and carries an environment marker, so :meth:`stop` finds
  and kills every process it left, by PID, and checks that none survives.
* As root, Apache's children (www-data) serve the page, so the document root
  and every ancestor must be searchable by others: the page directory is made
  in ``/tmp`` with mode 0755, not in pytest's 0700 ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import ClientConnection, connect

from tests.support.apache import APACHE_BIN, MODULES_DIR, ApacheInstance, check_traversable
from tests.support.apache import skip_reason as apache_skip_reason

JS_DIR = Path(__file__).resolve().parent / "js"
PAGE = JS_DIR / "index.html"
PACKAGE_FILES = (JS_DIR / "package.json", JS_DIR / "package-lock.json")

JS_CACHE_ENV = "PVW_HPC_JS_CACHE"
DEFAULT_JS_CACHE = Path("/tmp/pvw-hpc-js")
NPM_TIMEOUT_S = 300.0

CHROMIUM_BIN = "chromium"  # Debian's package and binary name
CHROMIUM_MARKER_ENV = "PVW_HPC_CHROMIUM_ROOT"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # required as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)

INSTALL_HINT = "apt-get install -y chromium nodejs npm"


def skip_reason() -> str | None:
    """Why the browser test cannot run here (a missing system tool), or ``None``."""
    reason = apache_skip_reason()
    if reason is not None:
        return reason
    if shutil.which(CHROMIUM_BIN) is None:
        return f"{CHROMIUM_BIN} not installed ({INSTALL_HINT})"
    if shutil.which("npm") is None or shutil.which("node") is None:
        return f"node/npm not installed ({INSTALL_HINT})"
    return None


# -- the npm package --------------------------------------------------------------------------


def pinned_wslink_version() -> str:
    """The exact ``wslink`` version pinned in ``tests/support/js/package.json``."""
    package = json.loads(PACKAGE_FILES[0].read_text(encoding="utf-8"))
    return str(package["dependencies"]["wslink"])


def _installed_version(prefix: Path) -> str | None:
    try:
        meta = json.loads((prefix / "node_modules" / "wslink" / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(meta.get("version"))


def wslink_js(cache: Path | None = None) -> Path:
    """Return ``dist/wslink.js`` of the pinned npm ``wslink``, running ``npm ci`` first if needed.

    The install lives in ``<cache>/<hash of package.json + lock>/`` (cache:
    ``$PVW_HPC_JS_CACHE`` or ``/tmp/pvw-hpc-js``), outside the repository, so
    changing the pin gets a fresh install and nothing lands in git. It is
    built in a temporary sibling and renamed into place under a file lock, so
    concurrent test runs neither race nor see a half-installed tree. Raises
    ``RuntimeError`` with npm's output when the install fails.
    """
    base = cache if cache is not None else Path(os.environ.get(JS_CACHE_ENV, str(DEFAULT_JS_CACHE)))
    digest = hashlib.sha256(b"\0".join(p.read_bytes() for p in PACKAGE_FILES)).hexdigest()[:16]
    target = base / digest
    bundle = Path("node_modules") / "wslink" / "dist" / "wslink.js"
    version = pinned_wslink_version()
    if (target / bundle).is_file() and _installed_version(target) == version:
        return target / bundle
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / bundle).is_file() and _installed_version(target) == version:
            return target / bundle  # another run installed it while we waited
        shutil.rmtree(target, ignore_errors=True)  # a damaged earlier install
        work = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=base))
        try:
            for path in PACKAGE_FILES:
                shutil.copy2(path, work / path.name)
            cmd = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
            try:
                done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"{' '.join(cmd)} (in {work}) took more than {NPM_TIMEOUT_S} s") from exc
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} (in {work}) failed with exit {done.returncode}:\n"
                    f"{done.stdout.strip()}\n{done.stderr.strip()}"
                )
            installed = _installed_version(work)
            if installed != version or not (work / bundle).is_file():
                raise RuntimeError(f"npm installed wslink {installed} in {work}, expected {version} with {bundle}")
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target / bundle


@contextlib.contextmanager
def page_dir(bundle: Path) -> Iterator[Path]:
    """A fresh directory holding ``index.html`` and ``wslink.js``, readable by Apache's www-data.

    Yields the directory and removes it afterwards.
    """
    root = Path(tempfile.mkdtemp(prefix="pvw-page-", dir="/tmp"))
    try:
        root.chmod(0o755)  # mkdtemp makes 0700; www-data must traverse it
        for source, name in ((PAGE, "index.html"), (bundle, "wslink.js")):
            shutil.copyfile(source, root / name)
            (root / name).chmod(0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- Apache serving the page ------------------------------------------------------------------

# mod_mime opens <ServerRoot>/conf/mime.types unless told otherwise, and only at start-up
# (``apache2 -t`` passes without it); the two types the page needs are added explicitly.
_STATIC_MODULES = "LoadModule mime_module {modules}/mod_mime.so\nTypesConfig /dev/null\n"

_STATIC_VHOST = """\
    DocumentRoot "{static_dir}"
    <Directory "{static_dir}">
        Require all granted
    </Directory>
    AddType text/html .html
    AddType text/javascript .js
    AddCharset utf-8 .html .js
"""


class StaticApache(ApacheInstance):
    """:class:`ApacheInstance` that also serves ``static_dir`` at ``/``.

    ``/paraview`` (ProxyPass) and ``/proxy`` (RewriteRule) keep precedence;
    every other path is a file of ``static_dir``. The base config is written
    by :meth:`ApacheInstance.write_config` and extended here (``mod_mime``,
    ``DocumentRoot``), then syntax-checked again.
    """

    def __init__(self, static_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        """``static_dir`` must be readable by others (www-data); ``kwargs`` go to ApacheInstance."""
        super().__init__(**kwargs)
        self.static_dir = Path(static_dir).resolve()

    def write_config(self) -> Path:
        """Write the seed vhost, add the document root, check the syntax again."""
        conf = super().write_config()
        check_traversable(self.static_dir / "index.html")
        text = conf.read_text(encoding="utf-8")
        vhost_end = "</VirtualHost>"
        if text.count(vhost_end) != 1 or "\n<VirtualHost " not in text:
            raise RuntimeError(f"unexpected layout of {conf}; cannot add the document root")
        text = text.replace("\n<VirtualHost ", "\n" + _STATIC_MODULES.format(modules=MODULES_DIR) + "\n<VirtualHost ", 1)
        text = text.replace(vhost_end, _STATIC_VHOST.format(static_dir=self.static_dir) + vhost_end, 1)
        conf.write_text(text, encoding="utf-8")
        check = subprocess.run([APACHE_BIN, "-t", "-f", str(conf)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"apache2 -t rejected {conf} (exit {check.returncode}):\n{check.stderr.strip()}")
        return conf

    def access_lines(self) -> list[str]:
        """The access log's lines so far ([] before the first request)."""
        try:
            return self.access_log.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []


# -- headless Chromium ------------------------------------------------------------------------


class DevToolsError(RuntimeError):
    """The DevTools protocol answered with an error, or the page threw."""


def _ws_connect(url: str, timeout: float) -> contextlib.AbstractContextManager[ClientConnection]:
    """websockets' sync ``connect`` as a context manager, never through an environment proxy.

    websockets 17 deprecates using the plain return value (``legacy=False`` opts
    into the context manager) and, since 15, honours ``*_proxy`` variables
    unless ``proxy=None``. Older versions lack both keywords; their connection
    is a context manager too.
    """
    try:
        return connect(url, legacy=False, proxy=None, open_timeout=timeout, max_size=None)
    except TypeError:
        return connect(url, open_timeout=timeout, max_size=None)


def _pids_of(marker: bytes, pgid: int) -> list[int]:
    """Live (non-zombie) processes carrying ``marker`` in their environment or in group ``pgid``.

    Both are needed: chromium's crashpad handlers daemonize (new session,
    parent 1) but keep the environment, while the zygote and its renderers
    stay in the group but get a scrubbed environment.
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rfind(b")") + 2 :].split()  # state, ppid, pgrp, ...
            if fields[0] in (b"Z", b"X"):
                continue
            if int(fields[2]) == pgid:
                found.append(int(name))
                continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return found


class HeadlessChromium:
    """Debian ``chromium`` headless on a throw-away profile, driven over DevTools.

    ``with HeadlessChromium() as browser: browser.open(url)`` then
    :meth:`evaluate` / :meth:`wait_for`; leaving the block kills every
    chromium process it started and removes the profile.
    """

    def __init__(self, binary: str | None = None, start_timeout: float = 20.0) -> None:
        self.binary = binary or shutil.which(CHROMIUM_BIN) or CHROMIUM_BIN
        self.start_timeout = start_timeout
        self.root = Path(tempfile.mkdtemp(prefix="pvw-chromium-", dir="/tmp"))
        self.profile = self.root / "profile"
        self.log_path = self.root / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.devtools_port: int | None = None
        self._ws: ClientConnection | None = None
        self._ws_stack = contextlib.ExitStack()
        self._next_id = 0

    @property
    def _marker(self) -> bytes:
        return f"{CHROMIUM_MARKER_ENV}={self.root}".encode()

    def open(self, url: str) -> HeadlessChromium:
        """Start chromium on ``url`` and connect to that page's DevTools target."""
        if self.proc is not None:
            raise RuntimeError("chromium already started")
        self.profile.mkdir()
        argv = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url]
        env = {**os.environ, CHROMIUM_MARKER_ENV: str(self.root)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.devtools_port = self._wait(self._read_devtools_port, "DevToolsActivePort")
        target = self._wait(lambda: self._page_target(url), f"a DevTools page target for {url}")
        self._ws = self._ws_stack.enter_context(_ws_connect(target, self.start_timeout))
        return self

    def _wait(self, probe: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.start_timeout
        while True:
            value = probe()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} from chromium within {self.start_timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _read_devtools_port(self) -> int | None:
        # Two lines, "<port>\n/devtools/browser/<id>"; it may be seen half-written.
        try:
            lines = (self.profile / "DevToolsActivePort").read_text(encoding="ascii").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        if len(lines) < 2 or not lines[0].strip().isdigit():
            return None
        return int(lines[0])

    def _page_target(self, url: str) -> str | None:
        with requests.Session() as http:
            http.trust_env = False  # loopback: no *_proxy from the environment
            try:
                targets = http.get(f"http://127.0.0.1:{self.devtools_port}/json/list", timeout=5).json()
            except (requests.RequestException, ValueError):
                return None
        for target in targets:
            if target.get("type") == "page" and str(target.get("url", "")).startswith(url):
                return str(target["webSocketDebuggerUrl"])
        return None

    def command(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Send one DevTools command to the page and return its ``result``."""
        if self._ws is None:
            raise RuntimeError("chromium not started")
        self._next_id += 1
        msg_id = self._next_id
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            answer = json.loads(self._ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            if answer.get("id") != msg_id:
                continue  # an event; none are enabled, but be safe
            if "error" in answer:
                raise DevToolsError(f"{method}: {answer['error']}")
            result: dict[str, Any] = answer["result"]
            return result

    def evaluate(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page and return its JSON value."""
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; return it, or ``None`` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                return None
            time.sleep(interval)

    def log_tail(self, lines: int = 20) -> str:
        """The end of chromium's stdout/stderr, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill chromium and every process it forked (by PID), and check none is left."""
        self._ws = None
        with contextlib.suppress(Exception):
            self._ws_stack.close()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (the group, or children that moved elsewhere): SIGKILL by PID.
        left: list[int] = []
        for _ in range(3):
            # A group id is not reused while the group has members, so killpg(proc.pid) is safe
            # after the leader was reaped; the others are signalled only while they are ours.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in _pids_of(self._marker, proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while (left := _pids_of(self._marker, proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not left:
                break
        if left:
            raise RuntimeError(f"chromium processes survived cleanup: {left}")

    def cleanup(self) -> None:
        """Stop chromium and remove the profile and log."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()
