"""Job files for batch sessions: the rendered script and what the job side reads.

Each session gets ``<cluster.job_dir>/<session id>/`` (mode 0700) holding
``job.sh`` (0700), ``spec.json``, ``secret`` and ``token`` (0600), and later the
job log and ``exit_code``. The folder must be shared between the launcher host
and the nodes, as home or scratch file systems are on clusters.

Templates are Jinja2 with ``StrictUndefined``; every ``{{ }}`` value is
shell-quoted unless marked ``|raw`` (only admin-written prologue lines are),
so a forgotten filter cannot turn into an injection. A cluster's own
``template`` is searched first, then the templates shipped in ``jobscripts/``.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from .batch.base import JobScript
from .clusters import RESOURCE_RULES, ClusterConfig

# placeholders the launcher cannot fill (the node decides); the job side replaces them
SENTINELS = {
    "host": "@@pvw-host@@",
    "port": "@@pvw-port@@",
    "secret": "@@pvw-secret@@",
    "secret_file": "@@pvw-secret-file@@",
}


class RawShell(str):
    """Admin-written shell text that goes into the script unquoted."""


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
    """The Jinja environment for a cluster and the name of its script template."""
    shipped = resources.files("jobscripts")
    loaders: list[jinja2.BaseLoader] = []
    name = f"{cluster.scheduler}.sh.j2"
    if cluster.template:
        site = Path(cluster.template)
        loaders.append(jinja2.FileSystemLoader(str(site.parent)))
        name = site.name
    loaders.append(jinja2.FileSystemLoader(str(shipped)))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined, finalize=_finalize,
        autoescape=False, keep_trailing_newline=True,
    )
    env.filters["raw"] = RawShell
    return env, name


def render_script(cluster: ClusterConfig, session_id: str, job_resources: dict[str, Any]) -> tuple[str, str]:
    """The job script text and the template file it came from."""
    env, name = template_environment(cluster)
    template = env.get_template(name)
    text = template.render(
        job_name=job_name(session_id), files=job_files(cluster, session_id), cluster=cluster, r=job_resources,
    )
    return text, str(template.filename)


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
) -> JobScript:
    """Create the session's job folder; files holding secrets are 0600 from the start."""
    files = job_files(cluster, session_id)
    cluster.job_dir.mkdir(parents=True, exist_ok=True)
    files.dir.mkdir(mode=0o700)
    spec = {
        "session_id": session_id, "argv": argv, "env": env, "ready_line": ready_line, "port": port, "cwd": cwd,
        "callback_url": callback_url, "node_address": cluster.node_address,
    }
    _write(files.spec, json.dumps(spec, indent=1), 0o600)
    _write(files.secret, secret + "\n", 0o600)
    _write(files.token, token + "\n", 0o600)
    _write(files.script, script, 0o700)
    return JobScript(text=script, name=job_name(session_id), path=files.script, workdir=files.dir)


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
