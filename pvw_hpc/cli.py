"""The ``pvw-hpc`` command. Each command translates argv into client calls and prints.

Exit codes (also in the README):
  0 success; 1 config problems or an error answer; 2 usage error;
  3 the session failed or was not ready in time; 4 no such session;
  5 the launcher at --url could not be reached.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click
import requests

from .client import HttpClient, LauncherClient, LocalClient
from .config import CONFIG_ENV, ConfigError, check_file, config_path, load_file
from .errors import LaunchError
from .runtime import Runtime
from .service import Service

EXIT_ERROR, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 1, 3, 4, 5

config_option = click.option(
    "--config", "config_file", envvar=CONFIG_ENV, type=click.Path(dir_okay=False),
    help=f"Launcher JSON config (default: ${CONFIG_ENV}).",
)
url_option = click.option(
    "--url", default=None, metavar="URL",
    help="Endpoint of a running launcher, e.g. http://127.0.0.1:8080/paraview; without it, work in-process.",
)
token_option = click.option(
    "--token", envvar="PVW_HPC_TOKEN", default=None, metavar="TOKEN",
    help="Bearer token for --url (default: $PVW_HPC_TOKEN); never printed.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _load(config_file: str | None) -> Any:
    try:
        return load_file(config_path(config_file))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(EXIT_ERROR)


def _prepare_folders(config: Any) -> None:
    """As ``serve`` does: the in-process CLI writes in the same folders, as the same (root) user."""
    from .folders import FolderError, prepare

    try:
        prepare(config)
    except FolderError as exc:
        click.echo(f"pvw-hpc: refusing to write: {exc}", err=True)
        sys.exit(EXIT_ERROR)


class _Connection:
    """A client plus the in-process service to close, if any."""

    def __init__(self, config_file: str | None, url: str | None, *, threads: bool = False,
                 token: str | None = None):
        self.service: Service | None = None
        self.runtime: Runtime | None = None
        if url:
            self.client: LauncherClient = HttpClient(url, token=token)
        else:
            config = _load(config_file)
            if threads:  # a launch needs the monitor, poller and map writer, not a recovery pass (serve owns it)
                _prepare_folders(config)
                self.runtime = Runtime(config).start(recover=False, housekeeping=False)
                self.service = self.runtime.service
            else:
                self.service = Service(config)
            self.client = LocalClient(self.service)

    def __enter__(self) -> LauncherClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        if self.runtime is not None:
            self.runtime.close()
        elif self.service is not None:
            self.service.close()


def _call(fn: Any, *args: Any) -> tuple[int, dict[str, Any]]:
    try:
        return fn(*args)
    except requests.RequestException as exc:
        click.echo(f"error: cannot reach the launcher: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)


def _fail(status: int, body: dict[str, Any]) -> None:
    click.echo(f"error ({status}): {body.get('error', body)}", err=True)
    sys.exit(EXIT_NOT_FOUND if status == 404 else EXIT_ERROR)


@click.group()
@click.version_option(package_name="pvw-hpc")
def main() -> None:
    """pvw-hpc: a restart-safe ParaViewWeb/wslink launcher."""


@main.command()
@config_option
def serve(config_file: str | None) -> None:
    """Run the launcher's REST API (production WSGI server) and its monitor."""
    from .folders import FolderError
    from .serve import serve as run

    try:
        run(_load(config_file))
    except FolderError as exc:
        click.echo(f"pvw-hpc serve: refusing to start: {exc}", err=True)
        sys.exit(EXIT_ERROR)


@main.command()
@config_option
def check(config_file: str | None) -> None:
    """Print every problem in a config with its JSON path; exit 1 if there is an error."""
    try:
        path = config_path(config_file)
    except ConfigError as exc:
        click.echo(str(exc.problems[0]), err=True)
        sys.exit(EXIT_ERROR)
    config, problems = check_file(path)
    for problem in problems:
        click.echo(str(problem))
    if config is None:
        click.echo(f"{path}: {sum(not p.warning for p in problems)} error(s)")
        sys.exit(EXIT_ERROR)
    from .ephemeral import local_range, warnings
    from .folders import problems as folder_problems

    for where, why in warnings(config, local_range()):
        click.echo(f"warning: {where}: {why}")
    unsafe = folder_problems(config)
    for why in unsafe:
        click.echo(f"error: {why}")
    if unsafe:
        click.echo(f"{path}: {len(unsafe)} error(s)")
        sys.exit(EXIT_ERROR)
    click.echo(f"{path}: ok ({len(config.apps)} app(s), {len(config.resources)} resource(s))")


@main.command()
@click.argument("application")
@click.option("--explain", is_flag=True, help="Also say which template file was used (on stderr).")
@config_option
def render(application: str, explain: bool, config_file: str | None) -> None:
    """Print the exact job script a launch of APPLICATION would submit."""
    service = Service(_load(config_file))
    try:
        script, template = service.render_job(application)
    except LaunchError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_ERROR)
    finally:
        service.close()
    if explain:
        click.echo(f"# template: {template}", err=True)
    click.echo(script, nl=False)


@main.command("apache-config")
@click.option("--server-name", default="localhost", help="ServerName of the vhost.")
@click.option("--listen", default="*:80", help="VirtualHost address.")
@config_option
def apache_config(server_name: str, listen: str, config_file: str | None) -> None:
    """Print an Apache vhost for this config: ProxyPass to the launcher, RewriteMap on the map file."""
    from .apache import vhost

    click.echo(vhost(_load(config_file), server_name=server_name, listen=listen), nl=False)


@main.command()
@click.option("--user", default=None, help="Only this user.")
@config_option
@json_option
def usage(user: str | None, config_file: str | None, as_json: bool) -> None:
    """Report each user's live sessions and core-hours used in the limits' window."""
    service = Service(_load(config_file))
    try:
        report = service.usage(user)
    finally:
        service.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'USER':20} {'ACTIVE':>6} {'CORE-HOURS':>11} {'BUDGET':>8} {'WINDOW':>7}")
    for row in report:
        budget = "-" if row["budget_core_hours"] is None else f"{row['budget_core_hours']:g}"
        click.echo(f"{row['user']:20} {row['active_sessions']:>6} {row['core_hours']:>11.4f} {budget:>8} "
                   f"{row['window_hours']:>6g}h")


@main.command("new-token")
@click.argument("name")
@click.option("--role", "roles", multiple=True, type=click.Choice(["launch", "read", "admin"]), required=True)
@click.option("--user", "users", multiple=True, metavar="NAME_OR_PATTERN",
              help="A user this token may launch for (repeat; patterns such as 'lab-*'); default: only NAME.")
def new_token_cmd(name: str, roles: tuple[str, ...], users: tuple[str, ...]) -> None:
    """Make a bearer token: prints it once, and the entry to put in auth.tokens (only its hash)."""
    from .auth import RESERVED_TOKEN_NAMES, USER_RE, hash_token, new_token

    if not USER_RE.match(name) or name in RESERVED_TOKEN_NAMES:
        click.echo(f"pvw-hpc new-token: {name!r} cannot name a token (a short lower-case name; "
                   f"{', '.join(sorted(RESERVED_TOKEN_NAMES))} are reserved)", err=True)
        sys.exit(EXIT_ERROR)
    token = new_token()
    click.echo(f"token (give it to the portal; it is not stored): {token}")
    entry: dict[str, Any] = {"name": name, "sha256": hash_token(token), "roles": sorted(set(roles))}
    if users:
        entry["users"] = list(users)
    click.echo(json.dumps(entry))


@main.command("flush-map")
@config_option
def flush_map(config_file: str | None) -> None:
    """Rebuild the map file from the database."""
    config = _load(config_file)
    _prepare_folders(config)
    service = Service(config)
    try:
        count = service.flush_map()
    finally:
        service.close()
    click.echo(f"{service.config.proxy_file}: {count} route(s)")


@main.command("list")
@config_option
@url_option
@token_option
@json_option
def list_cmd(config_file: str | None, url: str | None, as_json: bool, token: str | None) -> None:
    """List sessions."""
    with _Connection(config_file, url, token=token) as client:
        status, body = _call(client.list)
    if status != 200:
        _fail(status, body)
    sessions = body["sessions"]
    if as_json:
        click.echo(json.dumps(sessions, indent=2))
        return
    click.echo(f"{'ID':36}  {'APPLICATION':16} {'STATE':9} {'HOST:PORT':24} {'SINCE':32} EXPIRES")
    for s in sessions:
        since = s["transitions"].get(s["state"], "")
        where = f"{s['host']}:{s['port']}" if s.get("host") else "-"
        expires = s.get("expires_at") or ("idle " + f"{s['idle_timeout_s']:g}s" if s.get("idle_timeout_s") else "-")
        click.echo(f"{s['id']:36}  {s['application']:16} {s['state']:9} {where:24} {since:32} {expires}")


@main.command()
@click.argument("session_id")
@config_option
@url_option
@token_option
@json_option
def status(session_id: str, config_file: str | None, url: str | None, as_json: bool, token: str | None) -> None:
    """Show one session."""
    with _Connection(config_file, url, token=token) as client:
        code, body = _call(client.get, session_id)
    if code != 200:
        _fail(code, body)
    _print_session(body, as_json)


@main.command()
@click.argument("session_id")
@config_option
@url_option
@token_option
@json_option
def cancel(session_id: str, config_file: str | None, url: str | None, as_json: bool, token: str | None) -> None:
    """Stop a session (as DELETE does)."""
    with _Connection(config_file, url, token=token) as client:
        code, body = _call(client.stop, session_id)
    if code != 200:
        _fail(code, body)
    _print_session(body, as_json)


@main.command()
@click.argument("application")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Add a request key (repeatable).")
@click.option("--timeout", type=float, default=None, help="Seconds to wait for ready (default: the app's timeout + 5).")
@click.option("--keep", is_flag=True, help="Leave the session running when this command exits.")
@config_option
@url_option
@token_option
@json_option
def submit(application: str, sets: tuple[str, ...], timeout: float | None, keep: bool,
           config_file: str | None, url: str | None, as_json: bool, token: str | None) -> None:
    """Start one session, show its states as they are reached, print its URL.

    Without --keep the command then waits (Ctrl-C to end) and stops the session on exit.
    """
    payload: dict[str, Any] = {"application": application, "wait": False}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        payload[key] = value
    with _Connection(config_file, url, threads=True, token=token) as client:
        start = time.monotonic()
        code, body = _call(client.launch, payload)
        if code not in (200, 202):
            _fail(code, body)
            return
        session_id, secret = body["id"], body.get("secret")
        limit = timeout if timeout is not None else _default_wait(client, body)
        body = _follow(client, session_id, start, limit, quiet=as_json)
        ready = body.get("state") == "ready"
        if secret and ready:
            body["secret"] = secret
        if as_json:
            click.echo(json.dumps(body, indent=2))
        elif ready:
            click.echo(f"sessionURL: {body['sessionURL']}")
            if secret:
                click.echo(f"secret: {secret}")
        if not ready:
            if body.get("state") not in ("ended", "failed"):
                client.stop(session_id)
            click.echo(f"error: session {session_id} is {body.get('state')}: {body.get('error', '')}", err=True)
            sys.exit(EXIT_FAILED)
        if keep:
            return
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill (or `timeout`) stops it as Ctrl-C does
        try:
            if not as_json:
                click.echo("running; Ctrl-C stops the session (use --keep to leave it running)")
            while _call(client.get, session_id)[1].get("state") == "ready":
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            client.stop(session_id)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _default_wait(client: LauncherClient, body: dict[str, Any]) -> float:
    if isinstance(client, LocalClient):
        app = client.service.config.apps[body["application"]]
        return client.service.config.app_timeout_s(app) + 5
    return 600.0


def _follow(client: LauncherClient, session_id: str, start: float, limit: float, quiet: bool) -> dict[str, Any]:
    """Poll until ready or final, printing each state once with its elapsed time."""
    seen: set[str] = set()
    body: dict[str, Any] = {}
    while time.monotonic() - start < limit:
        code, body = _call(client.get, session_id)
        if code != 200:
            _fail(code, body)
        for state in body.get("transitions", {}):
            if state not in seen:
                seen.add(state)
                if not quiet:
                    click.echo(f"{time.monotonic() - start:7.3f}s  {state}")
        if body.get("state") in ("ready", "ended", "failed"):
            return body
        time.sleep(0.02)
    return body


def _print_session(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    for key in ("id", "application", "state", "host", "port", "sessionURL", "error", "reason", "exit_code"):
        if body.get(key) is not None:
            click.echo(f"{key}: {body[key]}")
    for state, when in body.get("transitions", {}).items():
        click.echo(f"  {state:10} {when}")


if __name__ == "__main__":
    main()
