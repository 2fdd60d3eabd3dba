"""Authentication and per-user limits against a real `pvw-hpc serve` over HTTP.

Tokens are configured as hashes; requests carry them as bearer tokens. Limits are
checked inside the store's write-locked insert, which the 50-parallel-requests
test puts under real contention.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from pvw_hpc.auth import hash_token
from tests.conftest import ADMIN_HEADERS, ADMIN_TOKEN, TEXT_PLAIN, Launcher, LauncherFactory, wait_for

PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")
PORTAL, READER = "portal-token-for-tests", "reader-token-for-tests"


def auth(anonymous: bool) -> dict:
    return {"anonymous": anonymous, "tokens": [
        {"name": "test-admin", "sha256": hash_token(ADMIN_TOKEN), "roles": ["admin"]},
        {"name": "portal", "sha256": hash_token(PORTAL), "roles": ["launch"], "users": ["*"]},
        {"name": "reader", "sha256": hash_token(READER), "roles": ["read"]},
    ]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(lau: Launcher, body: dict, headers: dict[str, str] | None = None,
         session: requests.Session | None = None) -> requests.Response:
    http = session or requests
    return http.post(lau.url, data=json.dumps(body), timeout=60,
                     headers={"Content-Type": TEXT_PLAIN, **(headers or {})})


def test_tokens_and_roles(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"auth": auth(anonymous=False)})
    anonymous = post(lau, {"application": "demo"})
    assert anonymous.status_code == 401 and "token" in anonymous.json()["error"]
    wrong = post(lau, {"application": "demo"}, bearer("not-a-token"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown or revoked token"
    assert post(lau, {"application": "demo"}, bearer(READER)).status_code == 403  # read cannot launch
    assert post(lau, {"application": "demo", "user": "Bad User"}, bearer(PORTAL)).status_code == 400

    launched = post(lau, {"application": "demo", "user": "alice", "wait": False}, bearer(PORTAL))
    assert launched.status_code == 202
    sid = launched.json()["id"]
    listed = requests.get(lau.endpoint, headers=bearer(PORTAL), timeout=10).json()["sessions"]
    assert [s["id"] for s in listed] == [sid]  # a launch token sees what it launched
    assert requests.get(f"{lau.endpoint}/{sid}", headers=bearer(READER), timeout=10).status_code == 200
    assert requests.delete(f"{lau.endpoint}/{sid}", headers=bearer(READER), timeout=10).status_code == 403
    assert requests.get(f"{lau.endpoint}/{sid}", timeout=10).status_code == 401
    assert requests.delete(f"{lau.endpoint}/{sid}", headers=bearer(PORTAL), timeout=10).json()["state"] == "ended"
    log = (lau.log_dir / "launcher.log").read_text()
    assert PORTAL not in log and READER not in log and ADMIN_TOKEN not in log  # tokens are never logged


def test_anonymous_creators_see_and_stop_only_their_own(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"auth": auth(anonymous=True)})
    browser_a, browser_b = requests.Session(), requests.Session()
    a = post(lau, {"application": "demo"}, session=browser_a).json()
    b = post(lau, {"application": "demo"}, session=browser_b).json()
    assert browser_a.cookies.get("pvw_hpc_creator") and browser_b.cookies.get("pvw_hpc_creator")
    assert browser_a.get(f"{lau.endpoint}/{a['id']}", timeout=10).status_code == 200
    assert browser_a.get(f"{lau.endpoint}/{b['id']}", timeout=10).status_code == 401
    assert browser_b.delete(f"{lau.endpoint}/{a['id']}", timeout=10).status_code == 401
    assert [s["id"] for s in browser_a.get(lau.endpoint, timeout=10).json()["sessions"]] == [a["id"]]
    # the session's own secret also proves it, as for a client that kept only the launch answer
    by_secret = requests.get(f"{lau.endpoint}/{b['id']}", headers={"X-Session-Secret": b["secret"]}, timeout=10)
    assert by_secret.status_code == 200 and "secret" not in by_secret.json()
    assert requests.get(f"{lau.endpoint}/{b['id']}", headers={"X-Session-Secret": a["secret"]},
                        timeout=10).status_code == 401
    admin_list = requests.get(lau.endpoint, headers=ADMIN_HEADERS, timeout=10).json()["sessions"]
    assert {s["id"] for s in admin_list} == {a["id"], b["id"]}
    assert browser_b.delete(f"{lau.endpoint}/{b['id']}", timeout=10).json()["state"] == "ended"
    assert lau.state(a["id"]) == "ready"


def test_fifty_parallel_launches_with_a_limit_of_three_start_exactly_three(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"auth": auth(anonymous=False), "threads": 64,
                                  "limits": {"max_sessions_per_user": 3}}, ports=60)

    def one(_: int) -> requests.Response:
        return post(lau, {"application": "demo", "user": "bob", "wait": False}, bearer(PORTAL))

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 3 + [429] * 47, codes
    refusal = next(a.json() for a in answers if a.status_code == 429)
    assert refusal["limit"] == "max_sessions_per_user" and "3 of 3" in refusal["error"]
    assert len([r for r in lau.db_rows() if r[1] not in ("ended", "failed")]) == 3
    log = (lau.log_dir / "launcher.log").read_text()
    assert "database is locked" not in log
    # another user is not affected, and capacity returns when one ends
    assert post(lau, {"application": "demo", "user": "carol", "wait": False}, bearer(PORTAL)).status_code == 202
    first = next(a.json()["id"] for a in answers if a.status_code == 202)
    lau.delete(first)
    assert post(lau, {"application": "demo", "user": "bob", "wait": False}, bearer(PORTAL)).status_code == 202


def test_per_app_limit_and_compute_hour_budget(launcher: LauncherFactory) -> None:
    lau = launcher(configuration={"auth": auth(anonymous=False), "limits": {
        "max_sessions_per_user_per_app": {"demo": 1}, "compute_hours": 0.0002, "window_hours": 1}})
    first = post(lau, {"application": "demo", "user": "dave"}, bearer(PORTAL))
    assert first.status_code == 200
    again = post(lau, {"application": "demo", "user": "dave"}, bearer(PORTAL))
    assert again.status_code == 429 and again.json()["limit"] == "max_sessions_per_user_per_app"
    time.sleep(1.0)  # 0.0002 core-hours is 0.72 core-seconds
    lau.delete(first.json()["id"])
    over = post(lau, {"application": "demo", "user": "dave"}, bearer(PORTAL))
    assert over.status_code == 429
    body = over.json()
    assert body["limit"] == "compute_hours" and body["used_core_hours"] > 0.0002
    assert body["retry_after_s"] > 0 and body["capacity_returns_at"]
    report = subprocess.run([PVW_HPC, "usage", "--user", "dave", "--json", "--config", str(lau.config_path)],
                            capture_output=True, text=True, check=True)
    row = json.loads(report.stdout)[0]
    assert row["user"] == "dave" and row["active_sessions"] == 0 and row["core_hours"] > 0.0002
    wait_for(lambda: post(lau, {"application": "demo", "user": "erin", "wait": False},
                          bearer(PORTAL)).status_code == 202, 10, "another user to launch")


def test_token_file_changes_take_effect_without_a_restart(launcher: LauncherFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens.json"
    token_file.write_text(json.dumps([{"name": "portal", "sha256": hash_token(PORTAL), "roles": ["launch"]}]))
    lau = launcher(configuration={"auth": {"anonymous": False, "token_file": str(token_file)}})
    assert post(lau, {"application": "demo", "wait": False}, bearer(PORTAL)).status_code == 202
    assert post(lau, {"application": "demo", "wait": False}, bearer(READER)).status_code == 401
    token_file.write_text(json.dumps([{"name": "reader", "sha256": hash_token(READER), "roles": ["launch"]}]))
    assert post(lau, {"application": "demo", "wait": False}, bearer(READER)).status_code == 202
    assert post(lau, {"application": "demo", "wait": False}, bearer(PORTAL)).status_code == 401  # revoked
