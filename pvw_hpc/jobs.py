"""Job files for batch sessions: the rendered script and what the job side reads.

Each session gets ``<cluster.job_dir>/<session id>/`` (mode 0700) holding
``job.sh`` (0700), ``spec.json``, ``secret`` and ``token`` (0600), and later the
job log and ``exit_code``. The folder must be shared between the launcher host
and the nodes, as home or scratch file systems are on clusters.

Templates are Jinja2 with ``StrictUndefined``; every ``{{ }}`` value is
shell-quoted unless marked ``|raw`` (only admin-written prologue lines are),
so a forgotten filter cannot turn into an injection. A cluster's own
``template`` is searched first, then the templates shipped in ``jobscripts/``.

When jobs run as the requesting user (``submit_prefix``), the session folder
and its files belong to that user and their primary group, with the same
modes, so only they (and root) can read the secret and the token; the job
writes its log and ``exit_code`` there as that user. Giving files away needs
root (CAP_CHOWN), and ``job_dir`` and every folder above it must let the user
pass (mode 0711 or 0755; ``write_job_files`` checks the mode bits and refuses
otherwise, as a job there could not even start).
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import shlex
import shutil
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from . import batch
from .batch.base import JobScript
from .clusters import RESOURCE_RULES, ClusterConfig, is_valid_user
from .limits import walltime_seconds

# placeholders the launcher cannot fill (the node decides); the job side replaces them
SENTINELS = {
    "host": "@@pvw-host@@",
    "port": "@@pvw-port@@",
    "secret": "@@pvw-secret@@",
    "secret_file": "@@pvw-secret-file@@",
}


class JobFilesError(OSError):
    """The job folder cannot be made for the requested owner (an OSError: the service already catches those)."""


class RawShell(str):
    """Admin-written shell text that goes into the script unquoted."""


# for adapters that submit a description, not a script (``submits_description``): the job body beside it
BODY_TEMPLATE = "_common/job.sh.j2"


def _finalize_line(value: Any) -> Any:
    """Values in a submit description: written as they are, but never a second line or a control character.

    A submit description is not a shell script, so quoting would be wrong; what
    reaches it is validated (resources, the admin's paths, our ids), and this
    refuses anything that could start a command of its own.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"refusing to render {value!r} into a submit description")
    text = str(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"refusing to render a control character into a submit description: {text!r}")
    return text


def _finalize(value: Any) -> Any:
    if isinstance(value, RawShell):
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"refusing to render {value!r} into a job script")
    if isinstance(value, (int, float)):
        return str(value)
    return shlex.quote(str(value))


@dataclass(frozen=True)
class JobFiles:
    dir: Path

    @property
    def script(self) -> Path:
        return self.dir / "job.sh"

    @property
    def log(self) -> Path:
        return self.dir / "job.log"

    @property
    def body(self) -> Path:
        """The job body as a script of its own, for schedulers that submit a description, not a script."""
        return self.dir / "body.sh"

    @property
    def spec(self) -> Path:
        return self.dir / "spec.json"

    @property
    def secret(self) -> Path:
        return self.dir / "secret"

    @property
    def token(self) -> Path:
        return self.dir / "token"

    @property
    def exit_code(self) -> Path:
        return self.dir / "exit_code"


def job_files(cluster: ClusterConfig, session_id: str) -> JobFiles:
    return JobFiles(cluster.job_dir / session_id)


def job_name(session_id: str) -> str:
    """The scheduler's job name carries our session id, so a restart can find unrecorded jobs."""
    return f"pvw-{session_id}"


def template_environment(cluster: ClusterConfig) -> tuple[jinja2.Environment, str]:
    """The Jinja environment for a cluster and the name of its script template (the adapter's, or the site's)."""
    adapter = batch.adapter_class(cluster.scheduler, cluster.access)
    return _template_environment(adapter.template, adapter.submits_description, cluster.template)


@functools.lru_cache(maxsize=64)
def _template_environment(shipped: str, submits_description: bool,
                          site_template: str | None) -> tuple[jinja2.Environment, str]:
    """One environment per (scheduler, site template): each launch renders with compiled templates.

    Jinja's file loaders check the files' mtimes, so an edited site template is still picked up.
    """
    loaders: list[jinja2.BaseLoader] = []
    name = shipped
    if site_template:
        site = Path(site_template)
        loaders.append(jinja2.FileSystemLoader(str(site.parent)))
        name = site.name
    loaders.append(jinja2.FileSystemLoader(str(resources.files("jobscripts"))))
    return _environment(loaders, submit_description=submits_description), name


@functools.lru_cache(maxsize=1)
def _body_environment() -> jinja2.Environment:
    """The shipped templates with shell quoting, for ``body.sh``."""
    return _environment([jinja2.FileSystemLoader(str(resources.files("jobscripts")))])


def _environment(loaders: list[jinja2.BaseLoader], submit_description: bool = False) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
        finalize=_finalize_line if submit_description else _finalize, autoescape=False, keep_trailing_newline=True,
    )
    env.filters["raw"] = RawShell
    env.filters["seconds"] = time_seconds
    env.filters["hms"] = lambda value: _hms(time_seconds(value))
    env.filters["megabytes"] = megabytes
    return env


def time_seconds(value: int | str) -> int:
    """A validated ``time`` resource in seconds, read as the limits read a request's walltime.

    Templates for schedulers that spell walltimes differently (PBS ``HH:MM:SS``,
    HTCondor seconds) convert with the ``seconds`` and ``hms`` filters; ``0`` stays 0.
    """
    return walltime_seconds(value) or 0


def _hms(total: int) -> str:
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def megabytes(value: str) -> int:
    """A ``memory`` resource (``4G``, ``4000M``, ``4000`` = MB as sbatch reads it) in whole megabytes."""
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    unit = value[-1].upper() if value[-1].isalpha() else "M"
    number = int(value[:-1] if value[-1].isalpha() else value)
    return max(1, round(number * scale[unit]))


def render_script(cluster: ClusterConfig, session_id: str, job_resources: dict[str, Any]) -> tuple[str, str]:
    """The job script (or submit description) text and the template file it came from."""
    env, name = template_environment(cluster)
    template = env.get_template(name)
    text = template.render(
        job_name=job_name(session_id), session_id=session_id, files=job_files(cluster, session_id), cluster=cluster,
        r=job_resources,
    )
    return text, str(template.filename)


def render_body(cluster: ClusterConfig, session_id: str, job_resources: dict[str, Any]) -> str | None:
    """``body.sh`` for schedulers that submit a description rather than a script (HTCondor); else None."""
    if not batch.adapter_class(cluster.scheduler, cluster.access).submits_description:
        return None
    return _body_environment().get_template(BODY_TEMPLATE).render(files=job_files(cluster, session_id), cluster=cluster,
                                                  r=job_resources)


def merged_resources(cluster: ClusterConfig, app_resources: dict[str, Any]) -> dict[str, Any]:
    """The cluster's defaults with the app's overrides on top (environment merged key by key)."""
    merged: dict[str, Any] = {key: None for key in RESOURCE_RULES}  # templates see every key
    merged.update({**cluster.defaults, **app_resources})
    merged["environment"] = {**cluster.defaults.get("environment", {}), **app_resources.get("environment", {})}
    merged["extra_directives"] = merged["extra_directives"] or []
    merged["prologue"] = merged["prologue"] or []
    return merged


def write_job_files(
    cluster: ClusterConfig,
    session_id: str,
    *,
    script: str,
    argv: list[str],
    env: dict[str, str],
    ready_line: str | None,
    port: int | None,
    cwd: str | None,
    secret: str,
    token: str,
    callback_url: str | None,
    owner: str | None = None,
    idle_timeout_s: float | None = None,
    body: str | None = None,
    display: str | None = None,
) -> JobScript:
    """Create the session's job folder; files holding secrets are 0600 from the start.

    ``owner``: the user the job runs as (``submit_prefix``); the folder and its files are
    then theirs (uid and primary gid) and the returned script carries ``user=owner``.
    Each file is handed over right after it is created, and the folder last: until then
    it is root's 0700, so the user never sees a half-written folder and nobody can swap
    a file under us. On failure nothing is left behind. Raises :class:`JobFilesError`
    (an unknown or refused user, a job_dir the user cannot reach, or no right to chown).
    """
    files = job_files(cluster, session_id)
    ids = _owner_ids(owner) if owner is not None else None
    cluster.job_dir.mkdir(parents=True, exist_ok=True)
    if owner is not None and ids is not None:
        _check_reachable(cluster.job_dir, owner, *ids)
    files.dir.mkdir(mode=0o700)
    spec = {
        "session_id": session_id, "argv": argv, "env": env, "ready_line": ready_line, "port": port, "cwd": cwd,
        "callback_url": callback_url, "node_address": cluster.node_address, "idle_timeout_s": idle_timeout_s,
        "port_range": list(cluster.port_range), "display": display,
    }
    try:
        _write(files.spec, json.dumps(spec, indent=1), 0o600, ids)
        _write(files.secret, secret + "\n", 0o600, ids)
        _write(files.token, token + "\n", 0o600, ids)
        _write(files.script, script, 0o700, ids)
        if body is not None:
            _write(files.body, body, 0o700, ids)
        if ids is not None:
            os.chown(files.dir, ids[0], ids[1])
    except BaseException as exc:
        shutil.rmtree(files.dir, ignore_errors=True)
        if isinstance(exc, PermissionError) and ids is not None:
            raise JobFilesError(f"cannot give the job folder to user {owner!r}: {exc.strerror} "
                                "(running jobs as the requesting user needs a launcher running as root)") from exc
        raise
    return JobScript(text=script, name=job_name(session_id), path=files.script, workdir=files.dir, user=owner)


def job_owner(job_dir: str | Path) -> str | None:
    """The user a session's job folder was given to, or None when it is the launcher's own (or gone).

    For checks and tools only: the service takes a job's owner from the session row
    (``owner`` on ``submit_prefix`` clusters), never from a ``stat`` of the user's folder.
    """
    try:
        uid = os.stat(job_dir).st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
    return name if is_valid_user(name) else None


def _owner_ids(owner: str) -> tuple[int, int, frozenset[int]]:
    """uid, primary gid and all group ids of ``owner``; JobFilesError for a refused or unknown name."""
    if not is_valid_user(owner):
        raise JobFilesError(f"refusing to make job files for user {owner!r}: not a valid user name "
                            "(lowercase letters, digits, _ and -, at most 32, not root)")
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise JobFilesError(f"cannot make job files for user {owner!r}: no such user on the launcher host") from None
    return entry.pw_uid, entry.pw_gid, frozenset(os.getgrouplist(owner, entry.pw_gid))


def _check_reachable(folder: Path, owner: str, uid: int, gid: int, groups: frozenset[int]) -> None:
    """Refuse when ``owner`` cannot pass through ``folder`` or a folder above it (mode bits; ACLs not read).

    Without search (x) permission on every level the job could not open its own script,
    and sbatch would fail with a far less helpful message.
    """
    for level in (folder, *folder.parents):
        info = level.stat()
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            try:
                group = grp.getgrgid(info.st_gid).gr_name
            except KeyError:
                group = str(info.st_gid)
            raise JobFilesError(
                f"user {owner!r} cannot reach the job folders: {level} is mode {stat.S_IMODE(info.st_mode):04o} "
                f"(owner uid {info.st_uid}, group {group}); make it 0711 or 0755 so jobs can run as their users")


def _write(path: Path, text: str, mode: int, ids: tuple[int, int, frozenset[int]] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        if ids is not None:
            os.fchown(fd, ids[0], ids[1])
        fh.write(text)
