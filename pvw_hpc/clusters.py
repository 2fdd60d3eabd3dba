"""pvw-hpc's own config section ``clusters``, and the job resources apps may ask for.

A cluster names its scheduler, how to reach it, the shared folder where job
files live, and default resources; an app bound to it (``apps.<name>.cluster``)
may override those resources. Every resource value is checked here against a
strict pattern, because it ends up in a ``#SBATCH``-style directive line that
no shell quoting protects.

``submit_prefix`` makes jobs run as the requesting user: a list of strings
put in front of ``sbatch`` (and of that job's ``scancel``) with ``${user}``
replaced by the user name, e.g. ``["sudo", "-n", "-u", "${user}"]`` with a
sudoers rule like ``pvwhpc ALL=(%hpcusers) NOPASSWD: /usr/bin/sbatch,
/usr/bin/scancel``. It is argv, never a shell line, and the user name is
checked by :func:`is_valid_user` where it is substituted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from . import batch
from .auth import IPNetwork, check_networks
from .batch.base import USER_PLACEHOLDER, Report
from .batch.base import is_valid_user as is_valid_user  # the jobs module checks run-as names with it
from .validate import CLUSTER_NAME_RE

LOCAL_BACKEND = "local"  # the local backend's name in a session's backend column: no cluster may take it
NODE_ADDRESS_MODES = ("ip", "hostname", "fqdn")
# where the job side picks its app's port on the node: below Linux's default ephemeral range (32768-60999),
# so outgoing connections on the node do not take it; a route outside it is refused
DEFAULT_PORT_RANGE = (20000, 32767)

_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,64}\Z")
_TIME = re.compile(r"^(?:\d+-)?\d{1,4}(?::\d{1,2}){0,2}\Z")
_MEMORY = re.compile(r"^\d{1,9}[KMGT]?\Z")
_GRES = re.compile(r"^[A-Za-z0-9_:.,=/-]{1,128}\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_LINE = re.compile(r"^[^\x00-\x1f\x7f]*\Z")  # one line, no control characters

# resource key -> (check, what it must look like)
RESOURCE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "partition": (lambda v: isinstance(v, str) and bool(_NAME.match(v)), "a name of letters, digits, _.+-"),
    "account": (lambda v: isinstance(v, str) and bool(_NAME.match(v)), "a name of letters, digits, _.+-"),
    "qos": (lambda v: isinstance(v, str) and bool(_NAME.match(v)), "a name of letters, digits, _.+-"),
    "time": (lambda v: (_is_int(v) and v > 0) or (isinstance(v, str) and bool(_TIME.match(v))),
             "as sbatch --time reads it: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "nodes": (lambda v: _is_int(v) and 1 <= v <= 100000, "an integer >= 1"),
    "cpus": (lambda v: _is_int(v) and 1 <= v <= 100000, "an integer >= 1"),
    "gpus": (lambda v: _is_int(v) and 0 <= v <= 1024, "an integer >= 0"),
    "memory": (lambda v: isinstance(v, str) and bool(_MEMORY.match(v)), "a size such as 4G or 4000M"),
    "gres": (lambda v: isinstance(v, str) and bool(_GRES.match(v)), "a gres string such as gpu:a100:1"),
    "extra_directives": (lambda v: _lines(v), "a list of one-line strings"),
    "prologue": (lambda v: _lines(v), "a list of one-line shell commands"),
    "environment": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _ENV_NAME.match(k)
                                                            and isinstance(x, str) and _LINE.match(x)
                                                            for k, x in v.items()),
                    "an object of NAME: one-line string"),
}


@dataclass(frozen=True)
class ClusterConfig:
    """One entry of ``clusters``."""

    name: str
    scheduler: str
    job_dir: Path
    access: str = "cli"
    template: str | None = None
    callback_url: str | None = None
    python: str = "python3"
    node_address: str = "ip"
    requeue: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    poll_fast_s: float = 1.0
    poll_slow_s: float = 10.0
    command_timeout_s: float = 30.0
    # the account jobs run as when it is not the launcher's and not the requester's (HTCondor's token
    # identity, slurmrestd's token user): job folders are given to it so the job can read and write them
    job_user: str | None = None
    # ready sessions' node:port are connected to this often (0: never); one that does not answer for
    # unreachable_after_s is ended and its job cancelled, whatever the scheduler still says
    probe_every_s: float = 10.0
    unreachable_after_s: float = 60.0
    commands: Mapping[str, str] = field(default_factory=dict)
    # the adapter's own keys, as its settings check returned them (batch/<adapter>/settings.py)
    settings: Any = None
    # argv before sbatch/scancel to run them as the requesting user, with ${user} in it; empty:
    # jobs run as the launcher's user
    submit_prefix: tuple[str, ...] = ()
    # routes the job side may claim (see routes.py): ports, extra node networks, loopback for a one-machine cluster
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    node_networks: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False


# the keys every cluster may have; each adapter adds its own (``settings_keys``)
CLUSTER_KEYS = frozenset({
    "scheduler", "access", "job_dir", "template", "callback_url", "python", "node_address", "requeue",
    "defaults", "poll_fast_s", "poll_slow_s", "command_timeout_s", "commands", "submit_prefix",
    "probe_every_s", "unreachable_after_s", "job_user", "port_range", "node_networks", "allow_loopback",
})


def check_resources(raw: Any, path: str, error: Report) -> dict[str, Any]:
    """Check a resources object (cluster ``defaults`` or an app's ``resources``)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        error(path, "must be an object of job resources")
        return {}
    out = {}
    for key, value in raw.items():
        rule = RESOURCE_RULES.get(key)
        if rule is None:
            error(f"{path}.{key}", f"unknown resource; known: {', '.join(RESOURCE_RULES)}")
        elif not rule[0](value):
            error(f"{path}.{key}", f"must be {rule[1]}, got {value!r}")
        else:
            out[key] = value
    return out


def check_clusters(raw: Any, report_error: Report, warn: Report) -> dict[str, ClusterConfig]:
    """Check the ``clusters`` section; problems go to ``report_error``/``warn`` with their JSON path."""
    seen: list[str] = []

    def error(path: str, message: str) -> None:
        seen.append(path)
        report_error(path, message)

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        error("$.clusters", "must be an object of named clusters")
        return {}
    clusters = {}
    for name, c in raw.items():
        path = f"$.clusters.{name}"
        if not CLUSTER_NAME_RE.match(name) or name == LOCAL_BACKEND:
            # a session's backend column holds the cluster name; "local" means the local backend there
            error(path, f"{name!r} cannot name a cluster: letters, digits, '_', '.', '-' (not starting with "
                        f"'.' or '-'), at most 64, and not {LOCAL_BACKEND!r} (the local backend's name)")
            continue
        if not isinstance(c, dict):
            error(path, "must be an object with 'scheduler' and 'job_dir'")
            continue
        before = len(seen)
        modes = batch.access_modes()
        scheduler = c.get("scheduler")
        if scheduler not in modes:
            error(f"{path}.scheduler", f"must be one of {', '.join(modes)}, got {scheduler!r}")
            continue
        access = c.get("access", modes[scheduler][0])
        if access not in modes[scheduler]:
            error(f"{path}.access", f"must be one of {', '.join(modes[scheduler])}, got {access!r}")
            continue
        adapter = batch.adapter_class(scheduler, access)
        for key in c:
            owners = [f"{o.scheduler} ({o.access})" for o in batch.ADAPTERS if key in o.settings_keys]
            if key in CLUSTER_KEYS or key in adapter.settings_keys:
                continue
            if owners:  # a key of another scheduler: the admin meant something, and it would be ignored
                error(f"{path}.{key}", f"only for {' or '.join(owners)} clusters, not {scheduler} ({access})")
            else:
                warn(f"{path}.{key}", "unknown key, ignored")
        job_dir = c.get("job_dir")
        if not isinstance(job_dir, str) or not job_dir.startswith("/"):
            error(f"{path}.job_dir", "must be an absolute path to a folder the nodes share with the launcher")
        template = c.get("template")
        if template is not None and not isinstance(template, str):
            error(f"{path}.template", "must be the path of a Jinja2 job-script template")
        callback = c.get("callback_url")
        if callback is not None and callback != "auto" and (
                not isinstance(callback, str) or not re.match(r"^https?://[^\s]+\Z", callback)):
            error(f"{path}.callback_url",
                  "must be 'auto' or an http(s) URL of the launcher's endpoint as the nodes see it")
        python = c.get("python", "python3")
        if not isinstance(python, str) or not _LINE.match(python) or not python:
            error(f"{path}.python", "must be the python3 command on the nodes")
        node_address = c.get("node_address", "ip")
        if node_address not in NODE_ADDRESS_MODES:
            error(f"{path}.node_address", f"must be one of {', '.join(NODE_ADDRESS_MODES)}")
        requeue = c.get("requeue", False)
        if not isinstance(requeue, bool):
            error(f"{path}.requeue", "must be true or false")
        timings = {}
        for key, default in (("poll_fast_s", 1.0), ("poll_slow_s", 10.0), ("command_timeout_s", 30.0)):
            value = c.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                error(f"{path}.{key}", "must be a positive number of seconds")
                value = default
            timings[key] = float(value)
        for key, default, least in (("probe_every_s", 10.0, 0.0), ("unreachable_after_s", 60.0, 1.0)):
            value = c.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least:
                error(f"{path}.{key}", "must be a number of seconds >= 0 (0: never probe)" if least == 0
                      else "must be a number of seconds >= 1 (one slow connect is not an outage)")
                value = default
            timings[key] = float(value)
        commands = c.get("commands", {})
        if not isinstance(commands, dict) or not all(isinstance(v, str) for v in commands.values()):
            error(f"{path}.commands", "must map command names (sbatch, squeue, ...) to executables")
            commands = {}
        elif commands and not adapter.takes_commands:
            warn(f"{path}.commands", f"ignored: {scheduler} with access {access!r} runs no commands")
        settings = adapter.check_settings(c, path, error, warn)
        job_user = c.get("job_user")
        if job_user is not None and not is_valid_user(job_user):
            error(f"{path}.job_user", "must be a user name (lowercase letters, digits, _ and -; not root)")
        elif job_user is not None and not adapter.takes_job_user:
            # elsewhere the launcher itself submits: a job_user would only own the files, not run the job
            error(f"{path}.job_user", "only for clusters whose jobs run as the identity the launcher authenticates "
                                      "as (htcondor, slurm access 'rest'); use submit_prefix to run as the requester")
        if job_user is not None and c.get("submit_prefix"):
            error(f"{path}.job_user", "jobs run either as the requesting user (submit_prefix) or as job_user")
        defaults = check_resources(c.get("defaults"), f"{path}.defaults", error)
        port_range = c.get("port_range", list(DEFAULT_PORT_RANGE))
        if (not isinstance(port_range, list) or len(port_range) != 2
                or not all(_is_int(p) and 1024 <= p <= 65535 for p in port_range) or port_range[0] > port_range[1]):
            error(f"{path}.port_range", f"must be [low, high] with 1024 <= low <= high <= 65535, got {port_range!r}")
            port_range = list(DEFAULT_PORT_RANGE)
        node_networks = check_networks(c.get("node_networks", []), f"{path}.node_networks", error)
        allow_loopback = c.get("allow_loopback", False)
        if not isinstance(allow_loopback, bool):
            error(f"{path}.allow_loopback", "must be true or false")
        submit_prefix = check_submit_prefix(c.get("submit_prefix"), adapter.takes_submit_prefix,
                                            f"{path}.submit_prefix", error, warn)
        if len(seen) != before:
            continue
        clusters[name] = ClusterConfig(
            name=name, scheduler=scheduler, job_dir=Path(str(job_dir)), access=access, template=template,
            callback_url=callback.rstrip("/") if callback else None, python=python, node_address=node_address,
            requeue=requeue, defaults=defaults, commands=dict(commands), settings=settings, submit_prefix=submit_prefix,
            job_user=job_user, port_range=(port_range[0], port_range[1]),
            node_networks=node_networks, allow_loopback=allow_loopback is True, **timings,
        )
    for cls in batch.ADAPTERS:
        users = [c for c in clusters.values() if (c.scheduler, c.access) == (cls.scheduler, cls.access)]
        if users:
            cls.check_clusters(users, error)
    return clusters


def check_submit_prefix(raw: Any, takes_prefix: bool, path: str, error: Report, warn: Report) -> tuple[str, ...]:
    """Check ``submit_prefix``: argv strings with ``${user}`` in them, nothing else to expand.

    Only ``${user}`` is replaced, so any other ``${...}`` is refused instead of being passed
    on literally. The command itself (the first word) must be fixed by the admin, never a
    user name. ``sudo`` without ``-n`` would fail anyway (commands get no terminal) but
    with a less clear message, hence the warning.
    """
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v and _LINE.match(v) for v in raw):
        error(path, "must be a list of non-empty one-line strings, e.g. [\"sudo\", \"-n\", \"-u\", \"${user}\"]")
        return ()
    if not takes_prefix:
        error(path, "only works where the launcher runs the submit command (access 'cli'); "
                    "elsewhere the scheduler authenticates who submits")
        return ()
    if not any(USER_PLACEHOLDER in part for part in raw):
        error(path, "must contain ${user} (the user the job runs as), e.g. [\"sudo\", \"-n\", \"-u\", \"${user}\"]")
        return ()
    if USER_PLACEHOLDER in raw[0]:
        error(path, "the first word is the command to run (e.g. sudo), not ${user}")
        return ()
    leftover = [part for part in raw if "${" in part.replace(USER_PLACEHOLDER, "")]
    if leftover:
        error(path, f"only ${{user}} is replaced; remove the other placeholders in {leftover!r}")
        return ()
    if Path(raw[0]).name == "sudo" and "-n" not in raw and "--non-interactive" not in raw:
        warn(path, "sudo without -n: add -n so a missing sudoers rule fails with a clear message")
    return tuple(raw)


def _lines(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and _LINE.match(v) for v in value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
