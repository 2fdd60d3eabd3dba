"""Load and check a launcher config: the stock wslink JSON, plus pvw-hpc's own keys.

A stock config must load unchanged, so the stock sections and keys keep their
meaning (see the README's config table). Every problem is collected with its
JSON path instead of stopping at the first one, so ``pvw-hpc check`` can show
an admin everything that is wrong in one run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from . import jsonc
from .auth import AuthConfig, check_auth
from .clusters import ClusterConfig, check_clusters, check_resources
from .connections import ConnectionLimits, check_connections_config
from .limits import Limits, check_limits_config
from .validate import APP_NAME_RE, ENDPOINT_RE, is_valid_host

CONFIG_ENV = "PVW_HPC_CONFIG"

# configuration keys with a default when absent (stock requires them all; we are lenient)
CONFIGURATION_DEFAULTS: dict[str, Any] = {
    "host": "localhost",
    "port": 8080,
    "endpoint": "paraview",
    "content": "",
    "timeout": 25,
    "fields": [],
    "sanitize": {},
}
STOCK_CONFIGURATION_KEYS = frozenset(
    {"host", "port", "endpoint", "content", "proxy_file", "sessionURL", "timeout", "log_dir",
     "fields", "sanitize", "upload_dir"}
)
OUR_CONFIGURATION_KEYS = frozenset({"database", "threads", "auth", "limits", "keep_ended", "pin_cpu", "connections"})
APP_KEYS = frozenset({"cmd", "ready_line", "timeout", "env", "cwd", "cluster", "resources", "port",
                      "max_age", "idle_timeout", "display"})
# apps.<name>.display: "xvfb" starts a private X server for each session (see jobscripts/_common/jobside.py)
DISPLAYS = ("xvfb",)
TOP_LEVEL_KEYS = frozenset({"configuration", "apps", "properties", "resources", "sessionData", "clusters"})

# names the launcher sets itself; a client cannot supply them
LAUNCHER_KEYS = frozenset({"id", "host", "port", "secret", "application", "user", "secret_file"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, located by a JSON path such as ``$.apps.viz.cmd[2]``."""

    path: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning" if self.warning else "error"
        return f"{kind}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        errors = [str(p) for p in problems if not p.warning]
        super().__init__(f"{source}: " + "; ".join(errors))


@dataclass(frozen=True)
class SanitizeRule:
    """Stock ``sanitize`` rule: ``inList`` or ``regexp`` (``re.match``, anchored at the start only)."""

    key: str
    kind: str
    allowed: tuple[Any, ...] = ()
    pattern: re.Pattern[str] | None = None

    def accepts(self, value: str) -> bool:
        if self.kind == "inList":
            return value in self.allowed or value in [str(a) for a in self.allowed]
        assert self.pattern is not None
        return self.pattern.match(value) is not None


@dataclass(frozen=True)
class Resource:
    """A host and the inclusive port range the local backend may hand out on it."""

    host: str
    port_lo: int
    port_hi: int

    @property
    def ports(self) -> range:
        return range(self.port_lo, self.port_hi + 1)


@dataclass(frozen=True)
class AppConfig:
    """One entry of ``apps``: the argv template and how to tell it is ready."""

    name: str
    cmd: tuple[str, ...]
    ready_line: str | None = None
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    cluster: str | None = None  # None: the local backend
    resources: Mapping[str, Any] = field(default_factory=dict)  # job resources over the cluster's defaults
    port: int | None = None  # pin the app's port on the node (batch apps); default: a free one
    max_age_s: float | None = None  # end a session this long after it started, whatever it does
    idle_timeout_s: float | None = None  # end a ready session after this long without a client connection
    display: str | None = None  # "xvfb": a private X server per session, started and stopped with the app


@dataclass(frozen=True)
class LauncherConfig:
    """A checked config. Field names follow the stock keys; ``_s`` marks seconds."""

    host: str
    port: int
    endpoint: str
    content: str
    proxy_file: Path
    session_url: str
    timeout_s: float
    log_dir: Path
    fields: tuple[str, ...]
    sanitize: Mapping[str, SanitizeRule]
    properties: Mapping[str, str]
    session_data: Mapping[str, str]
    apps: Mapping[str, AppConfig]
    resources: tuple[Resource, ...]
    database_url: str
    threads: int
    clusters: Mapping[str, ClusterConfig] = field(default_factory=dict)
    pin_cpu: bool = False  # run the launcher's threads on one CPU (less GIL ping-pong); apps keep all CPUs
    keep_ended_s: float = 7 * 86400  # ended sessions stay listed this long, then rows, logs and job files go
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    source: str = "<dict>"

    def app_timeout_s(self, app: AppConfig) -> float:
        return app.timeout_s if app.timeout_s is not None else self.timeout_s


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file from ``--config`` or ``$PVW_HPC_CONFIG``."""
    value = explicit or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError("<none>", [Problem("$", f"no config file: pass --config or set {CONFIG_ENV}")])
    return Path(value)


def check_file(path: str | os.PathLike[str]) -> tuple[LauncherConfig | None, list[Problem]]:
    """Read and check a config file; returns the config (None on errors) and all problems."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem("$", f"cannot read {path}: {exc}")]
    try:
        raw = jsonc.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem("$", f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")]
    return check_dict(raw, source=str(path))


def load_file(path: str | os.PathLike[str]) -> LauncherConfig:
    """Like :func:`check_file` but raises :class:`ConfigError` when anything is wrong."""
    config, problems = check_file(path)
    if config is None:
        raise ConfigError(str(path), problems)
    return config


def load_dict(raw: Any, source: str = "<dict>") -> LauncherConfig:
    config, problems = check_dict(raw, source=source)
    if config is None:
        raise ConfigError(source, problems)
    return config


def check_dict(raw: Any, source: str = "<dict>") -> tuple[LauncherConfig | None, list[Problem]]:
    """Check a parsed config; see :func:`check_file`."""
    checker = _Checker()
    config = checker.run(raw, source)
    errors = [p for p in checker.problems if not p.warning]
    return (None if errors else config), checker.problems


class _Checker:
    """Walks the raw dict once, recording problems and building typed values."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, warning=True))

    def run(self, raw: Any, source: str) -> LauncherConfig | None:
        if not isinstance(raw, dict):
            self.error("$", "the config must be a JSON object")
            return None
        for key in raw:
            if key not in TOP_LEVEL_KEYS:
                self.warn(f"$.{key}", "unknown section, ignored")
        conf = self._section(raw, "configuration", required=True)
        apps_raw = self._section(raw, "apps", required=True)
        props_raw = self._section(raw, "properties", required=False)
        session_data_raw = self._section(raw, "sessionData", required=False)
        resources = self._resources(raw.get("resources"))
        c = {**CONFIGURATION_DEFAULTS, **conf}
        for key in conf:
            if key not in STOCK_CONFIGURATION_KEYS | OUR_CONFIGURATION_KEYS:
                self.warn(f"$.configuration.{key}", "unknown key, ignored")
        if "upload_dir" in conf:
            self.warn("$.configuration.upload_dir", "legacy key of the twisted launcher, ignored")

        host = self._host(c.get("host"), "$.configuration.host")
        port = c.get("port")
        if not _is_int(port) or not 0 <= port <= 65535:
            self.error("$.configuration.port", f"must be an integer 0..65535 (0 picks a free port), got {port!r}")
        endpoint = c.get("endpoint")
        if isinstance(endpoint, str):
            endpoint = endpoint.strip("/")
        if not isinstance(endpoint, str) or not ENDPOINT_RE.match(endpoint):
            self.error("$.configuration.endpoint", f"must be one URL path segment such as 'paraview', got {endpoint!r}")
        content = c.get("content")
        if not isinstance(content, str):
            self.error("$.configuration.content", "must be a string (a directory, or empty)")
        elif content and not Path(content).is_dir():
            self.warn("$.configuration.content", f"directory {content!r} does not exist; nothing will be served at /")
        proxy_file = self._required_str(c, "proxy_file")
        session_url = self._required_str(c, "sessionURL")
        log_dir = self._required_str(c, "log_dir")
        timeout = c.get("timeout")
        if isinstance(timeout, str) and timeout.strip().isdigit():  # stock int()-converts
            timeout = int(timeout)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            self.error("$.configuration.timeout", f"must be a positive number of seconds, got {timeout!r}")
        fields = c.get("fields")
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            self.error("$.configuration.fields", "must be a list of strings")
            fields = []
        sanitize = self._sanitize(c.get("sanitize"))
        properties = self._properties(props_raw)
        for name in properties:
            if name in LAUNCHER_KEYS:
                self.warn(f"$.properties.{name}", "shadows a value the launcher sets itself; the launcher's value wins")
        session_data = self._session_data(session_data_raw)
        clusters = check_clusters(raw.get("clusters"), self.error, self.warn)
        apps = self._apps(apps_raw)
        for name, app in apps.items():
            if app.cluster is not None and app.cluster not in clusters:
                self.error(f"$.apps.{name}.cluster", f"no cluster {app.cluster!r} in $.clusters")
            elif app.cluster is not None and app.port is not None:
                lo, hi = clusters[app.cluster].port_range
                if not lo <= app.port <= hi:
                    self.error(f"$.apps.{name}.port", f"must lie in cluster {app.cluster!r}'s port_range {lo}-{hi} "
                                                      "(routes outside it are refused)")
        auth = check_auth(conf.get("auth"), self.error)
        keep_ended = conf.get("keep_ended", 7 * 86400)
        if not isinstance(keep_ended, (int, float)) or isinstance(keep_ended, bool) or keep_ended < 0:
            self.error("$.configuration.keep_ended", "must be a number of seconds >= 0")
            keep_ended = 7 * 86400
        limits = check_limits_config(conf.get("limits"), set(apps), self.error)
        connections = check_connections_config(conf.get("connections"), self.error, self.warn)
        if any(app.cluster is None for app in apps.values()) and not resources:
            self.error("$.resources", "local apps (no 'cluster') need at least one {host, port_range}")
        database = c.get("database")
        if database is None and isinstance(log_dir, str):
            database = f"sqlite:///{Path(log_dir).resolve() / 'pvw-hpc.sqlite'}"
        if not isinstance(database, str) or "://" not in database:
            self.error("$.configuration.database", f"must be an SQLAlchemy URL such as sqlite:///path, got {database!r}")
        threads = c.get("threads", 32)
        if not _is_int(threads) or not 1 <= threads <= 1024:
            self.error("$.configuration.threads", f"must be an integer 1..1024, got {threads!r}")

        if any(not p.warning for p in self.problems):
            return None
        # every value below was checked above (an error returned None): only the types are told here
        return LauncherConfig(
            host=host, port=int(port or 0), endpoint=str(endpoint), content=str(content),
            proxy_file=Path(proxy_file), session_url=session_url, timeout_s=float(timeout or 0),
            log_dir=Path(log_dir), fields=tuple(fields), sanitize=sanitize, properties=properties,
            session_data=session_data, apps=apps, resources=resources, database_url=database,
            threads=threads, clusters=clusters, auth=auth, limits=limits, keep_ended_s=float(keep_ended),
            pin_cpu=conf.get("pin_cpu") is True, connections=connections,
            source=source,
        )

    # -- sections -------------------------------------------------------------------------

    def _section(self, raw: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
        value = raw.get(name)
        if value is None:
            if required:
                self.error(f"$.{name}", "missing required section")
            return {}
        if not isinstance(value, dict):
            self.error(f"$.{name}", "must be a JSON object")
            return {}
        return value

    def _required_str(self, conf: dict[str, Any], key: str) -> str:
        value = conf.get(key)
        if not isinstance(value, str) or not value:
            self.error(f"$.configuration.{key}", "missing required string" if value is None else "must be a non-empty string")
            return ""
        return value

    def _host(self, value: Any, path: str) -> str:
        if isinstance(value, str) and "$" in value:
            self.error(path, f"{value!r} still holds a placeholder; put the real address here")
        elif not is_valid_host(value):
            self.error(path, f"must be a host name or IP address, got {value!r}")
        return value if isinstance(value, str) else ""

    def _resources(self, raw: Any) -> tuple[Resource, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error("$.resources", "must be a list of {host, port_range}")
            return ()
        out = []
        for i, item in enumerate(raw):
            path = f"$.resources[{i}]"
            if not isinstance(item, dict):
                self.error(path, "must be an object {host, port_range}")
                continue
            host = self._host(item.get("host"), f"{path}.host")
            rng = item.get("port_range")
            if (not isinstance(rng, list) or len(rng) != 2 or not all(_is_int(p) and 1 <= p <= 65535 for p in rng)
                    or rng[0] > rng[1]):
                self.error(f"{path}.port_range", f"must be [low, high] with 1 <= low <= high <= 65535, got {rng!r}")
                continue
            out.append(Resource(host, rng[0], rng[1]))
        return tuple(out)

    def _sanitize(self, raw: Any) -> dict[str, SanitizeRule]:
        if not isinstance(raw, dict):
            self.error("$.configuration.sanitize", "must be an object of rules")
            return {}
        rules = {}
        for key, rule in raw.items():
            path = f"$.configuration.sanitize.{key}"
            if not isinstance(rule, dict):
                self.error(path, "must be an object with 'type'")
                continue
            kind = rule.get("type")
            if kind == "inList":
                allowed = rule.get("list")
                if not isinstance(allowed, list):
                    self.error(f"{path}.list", "inList rule needs a 'list'")
                    continue
                rules[key] = SanitizeRule(key, kind, allowed=tuple(allowed))
            elif kind == "regexp":
                pattern = rule.get("regexp")
                try:
                    compiled = re.compile(pattern) if isinstance(pattern, str) else None
                except re.error as exc:
                    self.error(f"{path}.regexp", f"does not compile: {exc}")
                    continue
                if compiled is None:
                    self.error(f"{path}.regexp", "regexp rule needs a 'regexp' string")
                    continue
                if not str(pattern).endswith("$"):
                    self.warn(f"{path}.regexp", "not anchored with '$': re.match checks only the start of the value")
                rules[key] = SanitizeRule(key, kind, pattern=compiled)
            else:
                self.error(f"{path}.type", f"must be 'inList' or 'regexp', got {kind!r}")
        return rules

    def _properties(self, raw: dict[str, Any]) -> dict[str, str]:
        out = {}
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                self.error(f"$.properties.{key}", "must be a string or a number")
                continue
            out[key] = str(value)
        return out

    def _session_data(self, raw: dict[str, Any]) -> dict[str, str]:
        out = {}
        for key, value in raw.items():
            if not isinstance(value, str):
                self.error(f"$.sessionData.{key}", "must be a string template")
                continue
            out[key] = value
        return out

    def _apps(self, raw: dict[str, Any]) -> dict[str, AppConfig]:
        if not raw:
            self.error("$.apps", "no application is defined")
        apps = {}
        for name, app in raw.items():
            path = f"$.apps.{name}"
            if not APP_NAME_RE.match(name):
                self.error(path, "application names must be letters, digits, '_', '.', '-'")
                continue
            if not isinstance(app, dict):
                self.error(path, "must be an object with 'cmd'")
                continue
            for key in app:
                if key not in APP_KEYS:
                    self.warn(f"{path}.{key}", "unknown key, ignored")
            cmd = app.get("cmd")
            if not isinstance(cmd, list) or not cmd:
                self.error(f"{path}.cmd", "must be a non-empty list of strings (an argv; no shell)")
                continue
            bad = [i for i, part in enumerate(cmd) if not isinstance(part, str)]
            for i in bad:
                self.error(f"{path}.cmd[{i}]", f"must be a string, got {cmd[i]!r}")
            ready_line = app.get("ready_line")
            if ready_line is not None and (not isinstance(ready_line, str) or not ready_line):
                self.error(f"{path}.ready_line", "must be a non-empty string")
            elif ready_line is None:
                self.warn(f"{path}.ready_line",
                          "not set: the session is ready when its port accepts connections")
            timeout = app.get("timeout")
            if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
                self.error(f"{path}.timeout", "must be a positive number of seconds")
            env = app.get("env", {})
            if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
                self.error(f"{path}.env", "must be an object of string values")
                env = {}
            cwd = app.get("cwd")
            if cwd is not None and not isinstance(cwd, str):
                self.error(f"{path}.cwd", "must be a string")
            cluster = app.get("cluster")
            if cluster is not None and not isinstance(cluster, str):
                self.error(f"{path}.cluster", "must be the name of an entry of $.clusters")
            resources = check_resources(app.get("resources"), f"{path}.resources", self.error)
            if app.get("resources") and cluster is None:
                self.warn(f"{path}.resources", "job resources only apply to apps with a 'cluster'")
            port = app.get("port")
            if port is not None and not (_is_int(port) and 1 <= port <= 65535):
                self.error(f"{path}.port", "must be a TCP port 1..65535")
            lifetimes = {}
            for key in ("max_age", "idle_timeout"):
                value = app.get(key)
                if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                    self.error(f"{path}.{key}", "must be a positive number of seconds")
                    value = None
                lifetimes[key] = float(value) if value is not None else None
            display = app.get("display")
            if display is not None and display not in DISPLAYS:
                self.error(f"{path}.display", "must be \"xvfb\" (a private X server for each session) or absent "
                                              "(the app's own DISPLAY, or none: EGL/OSMesa builds need none)")
                display = None
            if bad:
                continue
            apps[name] = AppConfig(
                name=name, cmd=tuple(cmd), ready_line=ready_line if isinstance(ready_line, str) else None,
                timeout_s=float(timeout) if isinstance(timeout, (int, float)) else None,
                env=dict(env), cwd=cwd if isinstance(cwd, str) else None,
                cluster=cluster if isinstance(cluster, str) else None, resources=resources,
                port=port if _is_int(port) else None,
                max_age_s=lifetimes["max_age"], idle_timeout_s=lifetimes["idle_timeout"], display=display,
            )
        return apps


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
