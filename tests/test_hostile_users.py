"""A hostile job user against a real `pvw-hpc serve` (as root) and the local SLURM cluster.

Each test rebuilds one attack that worked before the fix and checks it no longer does:
root-only files read into a session's error, a FIFO that froze the poller, system accounts
as job users, forged routes (callback and marker line), pre-made folders, one shared
anonymous quota, and non-ASCII credentials. The job user is the CI user ``slurmtest``;
jobs run as that user through the same chain a site would use (``runuser -u pvwhpc --
sudo -n -u slurmtest sbatch``, see tests/test_run_as_user.py). The idle-socket attack is
tests/test_hostile_connections.py.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import requests.adapters

from pvw_hpc.auth import hash_token
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_TOKEN,
    PVW_HPC_BIN,
    SLURM_DEMO_APP,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    slurm_reason,
    wait_for,
)
from tests.test_run_as_user import AS_SERVICE, JOB_USER, SUDO_PREFIX, chain_reason

PORTAL = "portal-token-hostile-tests"
IS_ROOT = os.geteuid() == 0
# runs as the job user and never becomes ready: its folder is the attacker's playground
NEVER_READY = {"cmd": ["/bin/sh", "-c", "echo started; exec sleep 300"], "ready_line": "never printed"}
F = TypeVar("F", bound=Callable[..., Any])


def _needs(reason: str | None) -> Callable[[F], F]:
    """Marked ``slurm`` (left out of the fast loop) and skipped, with the reason, where SLURM cannot run."""
    def mark(test: F) -> F:
        return pytest.mark.slurm(pytest.mark.skipif(reason is not None, reason=str(reason))(test))  # type: ignore[no-any-return]
    return mark


needs_chain = _needs(chain_reason())
needs_slurm = _needs(slurm_reason())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the (hostile) job user."""
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=True)


def run_as_launcher(launcher: LauncherFactory, **extra: Any) -> Launcher:
    """A launcher whose ``runas`` cluster submits as the requesting user; the portal may name JOB_USER only."""
    tokens = [{"name": "portal", "sha256": hash_token(PORTAL), "roles": ["launch"], "users": [JOB_USER]},
              {"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]
    return launcher(
        configuration={"auth": {"anonymous": False, "tokens": tokens}, **extra.pop("configuration", {})},
        clusters={"runas": {"scheduler": "slurm", "poll_fast_s": 0.3, "poll_slow_s": 1,
                            "submit_prefix": [*AS_SERVICE, *SUDO_PREFIX]},
                  "plain": {"scheduler": "slurm", "callback_url": None, "poll_fast_s": 0.3, "poll_slow_s": 1}},
        apps={"never": {**NEVER_READY, "cluster": "runas"},
              "marker-only": {**SLURM_DEMO_APP, "cluster": "plain"}}, **extra)


def launch_as_job_user(lau: Launcher, application: str = "never") -> dict[str, Any]:
    resp = requests.post(lau.url, json={"application": application, "user": JOB_USER, "wait": False},
                         headers=bearer(PORTAL), timeout=60)
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def job_dir(lau: Launcher, cluster: str, session_id: str) -> Path:
    return lau.root / "jobs" / cluster / session_id


@pytest.fixture
def canary() -> Iterator[tuple[Path, str]]:
    """A root-only file (0600, in a 0700 folder) with a secret text, like /etc/shadow or munge.key."""
    folder = Path(tempfile.mkdtemp(prefix="pvw-canary-", dir="/root" if IS_ROOT else None))
    text = f"ROOT-ONLY-{uuid.uuid4().hex}"
    path = folder / "secret.key"
    path.write_text(text + "\n")
    path.chmod(0o600)
    try:
        yield path, text
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- 1. files in the job user's folder -------------------------------------------------------------


@needs_chain
def test_symlinks_in_the_job_folder_do_not_make_root_read_its_files(launcher: LauncherFactory,
                                                                     canary: tuple[Path, str]) -> None:
    secret_path, secret_text = canary
    lau = run_as_launcher(launcher)
    sid = launch_as_job_user(lau)["id"]
    folder = job_dir(lau, "runas", sid)
    wait_for(lambda: lau.state(sid) == "starting", 30, "the job to run")
    # the attack: as the job user, swap job.log and end_reason for links to root's files, then cancel
    as_user(JOB_USER, "ln", "-sfn", str(secret_path), str(folder / "job.log"))
    as_user(JOB_USER, "ln", "-sfn", "/etc/shadow", str(folder / "end_reason"))
    job_id = lau.get(sid).json()["job_id"]
    as_user(JOB_USER, "scancel", job_id)
    wait_for(lambda: lau.state(sid) == "failed", 30, "the cancelled job to fail the session")
    body = lau.get(sid).json()
    shadow_first = Path("/etc/shadow").read_text().splitlines()[0] if Path("/etc/shadow").exists() else "\0"
    shown = json.dumps(body)
    assert secret_text not in shown and "root:" not in body["error"] and shadow_first not in shown, body["error"]
    assert "CANCELLED" in body["error"]
    assert "not reading" in (lau.log_dir / "launcher.log").read_text()  # logged, once per file


@needs_chain
def test_a_fifo_as_job_log_does_not_freeze_the_poller(launcher: LauncherFactory) -> None:
    lau = run_as_launcher(launcher)
    victim = launch_as_job_user(lau)["id"]
    folder = job_dir(lau, "runas", victim)
    wait_for(lambda: lau.state(victim) == "starting", 30, "the job to run")
    log = folder / "job.log"
    as_user(JOB_USER, "rm", "-f", str(log))
    as_user(JOB_USER, "mkfifo", "-m", "600", str(log))
    assert stat.S_ISFIFO(log.lstat().st_mode)
    # another session that only the poller can make ready (no callback: the marker line in its log)
    other = requests.post(lau.url, json={"application": "marker-only"}, headers=ADMIN_HEADERS, timeout=60)
    assert other.status_code == 200, other.text
    assert lau.get(other.json()["id"]).json()["state"] == "ready"
    # and the poller still follows the victim's job: cancelled outside, the session ends
    as_user(JOB_USER, "scancel", lau.get(victim).json()["job_id"])
    wait_for(lambda: lau.state(victim) == "failed", 30, "the poller to notice the cancel")


# -- 2. requested users ----------------------------------------------------------------------------------


@needs_chain
@pytest.mark.parametrize("account", ["munge", "slurm", "daemon", "nobody", "root"])
def test_system_accounts_are_refused_before_any_row(launcher: LauncherFactory, account: str) -> None:
    lau = run_as_launcher(launcher)
    admin = requests.post(lau.url, json={"application": "never", "user": account, "wait": False},
                          headers=ADMIN_HEADERS, timeout=60)
    assert admin.status_code == 403, admin.text
    assert "system or service account" in admin.json()["error"] or "uid" in admin.json()["error"]
    assert lau.db_rows() == [] and lau.job_ids() == []


@needs_chain
def test_a_token_names_only_the_users_its_entry_allows(launcher: LauncherFactory) -> None:
    lau = run_as_launcher(launcher)
    other_user = requests.post(lau.url, json={"application": "marker-only", "user": "alice", "wait": False},
                               headers=bearer(PORTAL), timeout=60)
    assert other_user.status_code == 403 and "may not launch for user 'alice'" in other_user.json()["error"]
    assert lau.db_rows() == []
    assert launch_as_job_user(lau)["id"]  # the user it names is fine


@needs_chain
def test_a_dotted_name_is_judged_at_the_request_not_by_a_failed_job(launcher: LauncherFactory) -> None:
    """One user-name rule: 'alice.smith' is a name everywhere; with no such account it is refused before any row."""
    lau = run_as_launcher(launcher)
    dotted = requests.post(lau.url, json={"application": "never", "user": "alice.smith", "wait": False},
                           headers=ADMIN_HEADERS, timeout=60)
    assert dotted.status_code == 403 and "not an account" in dotted.json()["error"], dotted.text
    malformed = requests.post(lau.url, json={"application": "never", "user": "Alice.Smith", "wait": False},
                              headers=ADMIN_HEADERS, timeout=60)
    assert malformed.status_code == 400
    assert lau.db_rows() == [] and lau.job_ids() == []


# -- 3. routes ---------------------------------------------------------------------------------------------


def _token(folder: Path) -> str:
    return (folder / "token").read_text().strip()


@needs_chain
def test_forged_routes_are_refused(launcher: LauncherFactory) -> None:
    lau = run_as_launcher(launcher)
    sid = launch_as_job_user(lau)["id"]
    folder = job_dir(lau, "runas", sid)
    wait_for(lambda: lau.state(sid) == "starting", 30, "the job to run")
    token = as_user(JOB_USER, "cat", str(folder / "token")).stdout.strip()  # the job user owns it
    low = 20000
    forged = [("127.0.0.1", 22), ("127.0.0.1", lau.port), ("192.0.2.123", low + 5), ("10.99.0.1", low + 5),
              ("0.0.0.0", low + 5)]
    for host, port in forged:
        resp = requests.post(f"{lau.endpoint}/{sid}/ready", json={"host": host, "port": port},
                             headers=bearer(token), timeout=30)
        assert resp.status_code == 403 and "refused" in resp.json()["error"], (host, port, resp.text)
    # the same as marker lines in the log the job user owns
    lines = "".join(f"\nPVW-HPC-READY {sid} {host}:{port}\n" for host, port in forged)
    as_user(JOB_USER, "sh", "-c", f"printf '%s' '{lines}' >> {folder / 'job.log'}")
    wait_for(lambda: "refused the marker 10.99.0.1" in (lau.log_dir / "launcher.log").read_text(), 20,
             "the poller to read and refuse the markers")
    info = lau.get(sid).json()
    assert info["state"] == "starting" and info["host"] is None and lau.map_lines() == []
    # what stays possible, by design: a port of the cluster's range on the job's own node
    resp = requests.post(f"{lau.endpoint}/{sid}/ready", json={"host": "127.0.0.1", "port": low + 7},
                         headers=bearer(token), timeout=30)
    assert resp.status_code == 200 and resp.json()["state"] == "ready"
    assert lau.get(sid).json()["port"] == low + 7  # a GET waits for the map rewrite the change requested
    assert lau.map_lines() == [f"{sid} 127.0.0.1:{low + 7}"]


@needs_slurm
def test_loopback_routes_need_allow_loopback(launcher: LauncherFactory) -> None:
    """Without allow_loopback the local cluster's genuine jobs (which report 127.0.0.1) never become ready."""
    lau = launcher(timeout=6, clusters={"strict": {"scheduler": "slurm", "allow_loopback": False,
                                                   "poll_fast_s": 0.3}},
                   apps={"demo": {**SLURM_DEMO_APP, "cluster": "strict"}})
    resp = lau.post({"application": "demo"})
    assert resp.status_code == 503 and resp.json()["state"] in ("starting", "queued"), resp.text
    sid = resp.json()["id"]
    wait_for(lambda: "refused the callback 127.0.0.1" in (lau.log_dir / "launcher.log").read_text(), 20,
             "the callback to be refused")
    assert lau.get(sid).json()["host"] is None and lau.map_lines() == []


@needs_slurm
def test_a_ready_route_the_rules_now_refuse_is_not_probed_as_alive(launcher: LauncherFactory) -> None:
    lau = launcher(clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.3, "probe_every_s": 1}},
                   apps={"demo": SLURM_DEMO_APP})
    sid = lau.launch()["id"]
    port = lau.get(sid).json()["port"]
    assert 20000 <= port <= 32767  # the job side picked it from the default port_range
    # the admin narrows port_range so that this route falls outside it, and restarts the launcher
    lau.config["clusters"]["slurm"]["port_range"] = [port + 1, port + 100]
    lau.config_path.write_text(json.dumps(lau.config))
    lau.restart()
    wait_for(lambda: lau.state(sid) == "failed", 30, "the probe to fail the session whose route is refused")
    assert "is outside the cluster's port_range" in lau.get(sid).json()["error"]
    assert lau.map_lines() == []


# -- 5. folders ---------------------------------------------------------------------------------------------


def _config_with_log_dir(lau: Launcher, log_dir: Path) -> Path:
    config = json.loads(lau.config_path.read_text().split("\n", 1)[1])
    config["configuration"]["log_dir"] = str(log_dir)
    path = lau.root / "unsafe.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.skipif(not IS_ROOT, reason="needs root and another user")
def test_folders_another_user_made_are_refused(launcher: LauncherFactory) -> None:
    if chain_reason() is not None and "user" in str(chain_reason()):
        pytest.skip(str(chain_reason()))
    lau = launcher(start=False)
    # the attack: a local user pre-creates the folder (in sticky /tmp) with a link where root will write
    evil = Path(tempfile.mkdtemp(prefix="pvw-evil-", dir="/tmp"))
    target = Path(tempfile.mkdtemp(prefix="pvw-target-", dir="/root"))
    try:
        uid = pwd.getpwnam(JOB_USER).pw_uid
        os.chown(evil, uid, uid)
        os.symlink(target / "owned-by-root-now", evil / "launcher.log")
        for log_dir, needle in ((evil, f"{evil} is owned by {JOB_USER}"),
                                (evil / "logs", f"{evil} is owned by {JOB_USER}")):
            config = _config_with_log_dir(lau, log_dir)
            served = subprocess.run([str(PVW_HPC_BIN), "serve", "--config", str(config)], capture_output=True,
                                    text=True, timeout=30)
            assert served.returncode == 1 and needle in served.stderr and "refusing to start" in served.stderr
            checked = subprocess.run([str(PVW_HPC_BIN), "check", "--config", str(config)], capture_output=True,
                                     text=True, timeout=30)
            assert checked.returncode == 1 and needle in checked.stdout
        assert not (target / "owned-by-root-now").exists()  # root wrote nothing through the link
        os.chown(evil, 0, 0)
        evil.chmod(0o777)  # no sticky bit: anyone may replace entries
        config = _config_with_log_dir(lau, evil / "logs")
        served = subprocess.run([str(PVW_HPC_BIN), "serve", "--config", str(config)], capture_output=True,
                                text=True, timeout=30)
        assert served.returncode == 1 and "writable by others (mode 0777)" in served.stderr
    finally:
        shutil.rmtree(evil, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


def test_no_shipped_example_keeps_its_files_in_a_world_writable_folder() -> None:
    from pvw_hpc import folders
    from pvw_hpc.config import load_file

    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*/launcher*.json")):
        config = load_file(path)
        for folder in folders.launcher_folders(config):
            if folder.path.is_relative_to(Path.cwd()):
                continue  # a relative path (the demo's demo-run/): inside the checkout, wherever that is
            levels = [folder.path, *folder.path.parents]
            assert not any(str(level) in ("/tmp", "/var/tmp", "/dev/shm") for level in levels), (path, folder)


# -- 6. anonymous limits -------------------------------------------------------------------------------------


def _post_from(lau: Launcher, source: str, body: dict[str, Any], session: requests.Session | None = None,
               headers: dict[str, str] | None = None) -> requests.Response:
    """POST from a given loopback source address (each is a different client to the launcher)."""
    http = session or requests.Session()
    adapter = requests.adapters.HTTPAdapter()
    adapter.init_poolmanager(1, 1, source_address=(source, 0))
    http.mount("http://", adapter)
    return http.post(lau.url, data=json.dumps(body), headers={"Content-Type": TEXT_PLAIN, **(headers or {})},
                     timeout=60)


def test_anonymous_quota_is_per_browser_and_per_address(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"limits": {"max_sessions_per_user": 2, "max_anonymous_per_address": 3}},
                   ports=30)
    greedy, other = requests.Session(), requests.Session()
    for _ in range(2):
        assert _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False}, greedy).status_code == 202
    third = _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False}, greedy)
    assert third.status_code == 429 and third.json()["limit"] == "max_sessions_per_user"
    # another browser on the same machine is not blocked by the first one's quota
    assert _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False}, other).status_code == 202
    # dropping the cookie makes a new browser each time: the address limit still holds
    fresh = _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False})
    assert fresh.status_code == 429 and fresh.json()["limit"] == "max_anonymous_per_address"
    # another address is another client; a forged X-Forwarded-For from an untrusted peer changes nothing
    assert _post_from(lau, "127.0.0.2", {"application": "demo", "wait": False}).status_code == 202
    spoofed = _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False},
                         headers={"X-Forwarded-For": "203.0.113.9"})
    assert spoofed.status_code == 429


def test_anonymous_behind_a_trusted_proxy_counts_the_forwarded_address(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"limits": {"max_anonymous_per_address": 1},
                                  "auth": {"anonymous": True, "trusted_proxies": ["127.0.0.1"], "tokens": [
                                      {"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]}]}})
    for client in ("203.0.113.1", "203.0.113.2"):
        resp = _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False},
                          headers={"X-Forwarded-For": client})
        assert resp.status_code == 202, resp.text
    again = _post_from(lau, "127.0.0.1", {"application": "demo", "wait": False},
                       headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.1"})  # the proxy's own hop counts
    assert again.status_code == 429 and again.json()["limit"] == "max_anonymous_per_address"


def test_a_token_named_anonymous_is_refused(launcher: LauncherFactory) -> None:
    lau = launcher(start=False)
    config = json.loads(lau.config_path.read_text().split("\n", 1)[1])
    config["configuration"]["auth"]["tokens"].append(
        {"name": "anonymous", "sha256": hash_token("would-own-every-anonymous-session"), "roles": ["launch"]})
    path = lau.root / "anon.json"
    path.write_text(json.dumps(config))
    checked = subprocess.run([str(PVW_HPC_BIN), "check", "--config", str(path)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 1 and "'anonymous' is reserved" in checked.stdout
    served = subprocess.run([str(PVW_HPC_BIN), "serve", "--config", str(path)], capture_output=True, text=True,
                            timeout=30)
    assert served.returncode == 1 and "'anonymous' is reserved" in served.stderr


# -- 7. credentials as bytes ----------------------------------------------------------------------------------


def test_non_ascii_secrets_and_tokens_are_401_not_500(launcher: LauncherFactory) -> None:
    lau = launcher()
    sid = lau.launch()["id"]
    # raw bytes on the wire, as an attacker sends them (no client library re-encoding)
    for name, value in ((b"X-Session-Secret", b"\xc3\xa9t\xc3\xa9"), (b"X-Session-Secret", b"\xff\xfe"),
                        (b"Authorization", b"Bearer \xc3\xa9")):
        for method in (b"GET", b"DELETE"):
            status = _raw_request(lau, method, f"/paraview/{sid}".encode(), name, value)
            assert status == 401, (method, name, value, status)
        assert _raw_request(lau, b"GET", b"/paraview", name, value) in (200, 401)
    assert "Traceback" not in (lau.log_dir / "launcher.log").read_text()
    assert lau.state(sid) == "ready"


def _raw_request(lau: Launcher, method: bytes, path: bytes, header: bytes, value: bytes) -> int:
    with socket.create_connection(("127.0.0.1", lau.port), timeout=10) as sock:
        sock.sendall(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b": " + value
                     + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])
