"""Fast checks, on real files and real name resolution, of the rules the hostile-user tests exercise end to end.

tests/test_hostile_users.py runs each attack against a real ``pvw-hpc serve``; these pin
the individual rules (which file is read, which route is accepted, which account or
folder is refused) so a regression names the rule that broke.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from pathlib import Path

import pytest

from pvw_hpc import folders, userfiles
from pvw_hpc.accounts import AccountRule
from pvw_hpc.auth import AuthConfig, check_networks
from pvw_hpc.clusters import ClusterConfig
from pvw_hpc.routes import RoutePolicy, expand_nodes

IS_ROOT = os.geteuid() == 0


# -- files in a user's folder ------------------------------------------------------------------------


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "exit_code").write_text("3\n")
    assert userfiles.read_small(tmp_path / "exit_code") == "3"
    assert userfiles.read_range(tmp_path / "exit_code", 0, 100) == (b"3\n", 2)
    assert userfiles.read_tail(tmp_path / "exit_code", 1) == b"\n"
    assert userfiles.read_small(tmp_path / "missing") is None


def test_links_fifos_and_huge_files_are_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere"
    secret.write_text("root-only\n")
    (tmp_path / "link").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "huge", "wb") as fh:
        fh.truncate(1 << 40)  # sparse: 1 TiB that costs nothing on disk
    started = time.monotonic()
    for name in ("link", "fifo"):
        assert userfiles.read_small(tmp_path / name) is None
        assert userfiles.read_range(tmp_path / name, 0, 1 << 20) is None
        assert userfiles.read_tail(tmp_path / name, 4096) is None
    assert time.monotonic() - started < 1  # the FIFO did not block
    assert userfiles.read_small(tmp_path / "huge") is None
    data, size = userfiles.read_range(tmp_path / "huge", 0, 1 << 20) or (b"", 0)
    assert len(data) == 1 << 20 and size == 1 << 40  # only a bounded window is read


def test_a_linked_folder_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "job.log").write_text("x\n")
    (tmp_path / "alias").symlink_to(real)
    assert userfiles.read_small(tmp_path / "alias" / "job.log") is None
    assert userfiles.read_small(real / "job.log") == "x"


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_a_file_someone_else_owns_is_not_read(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(tmp_path, nobody, nobody)  # the folder is the job user's
    (tmp_path / "mine").write_text("1\n")
    os.chown(tmp_path / "mine", nobody, nobody)
    (tmp_path / "roots").write_text("2\n")  # e.g. a hard link to a root file
    assert userfiles.read_small(tmp_path / "mine") == "1"
    assert userfiles.read_small(tmp_path / "roots") is None


def test_a_read_that_hangs_answers_the_default_in_time() -> None:
    reader = userfiles.BoundedReader(workers=2, timeout_s=0.3)
    release = threading.Event()
    try:
        started = time.monotonic()
        assert reader.call("stuck", lambda: release.wait(30) and "late", "unknown") == "unknown"
        assert time.monotonic() - started < 1
        # the stuck key gets no second worker while it hangs; other files are still read
        assert reader.many([("stuck", lambda: "again"), ("fine", lambda: "ok")], "unknown") == ["unknown", "ok"]
    finally:
        release.set()
        reader.close()


# -- routes ---------------------------------------------------------------------------------------------


def _policy(**kw: object) -> RoutePolicy:
    cluster = ClusterConfig(name="c", scheduler="slurm", job_dir=Path("/srv/jobs"), **kw)  # type: ignore[arg-type]
    return RoutePolicy(cluster, launcher_port=8080)


def test_expand_nodes() -> None:
    assert expand_nodes("n[01-03,7]") == ["n01", "n02", "n03", "n7"]
    assert expand_nodes("a,b[1-2]") == ["a", "b1", "b2"]
    assert expand_nodes("node7/0+node8/1") == ["node7", "node8"]


def test_only_the_jobs_node_and_port_range() -> None:
    strict = _policy(port_range=(20000, 20100), node_networks=check_networks(["10.20.0.0/16"], "$", print))
    assert strict.refusal("localhost", "127.0.0.1", 20001) is not None  # loopback without allow_loopback
    assert strict.refusal(None, "10.20.3.4", 20001) is None  # an admin's node network
    assert "port_range" in str(strict.refusal(None, "10.20.3.4", 22))
    assert "not an address of the job's node" in str(strict.refusal("localhost", "203.0.113.5", 20001))
    assert "not the job's node" in str(strict.refusal("node7", "othernode", 20001))
    assert strict.refusal(None, "0.0.0.0", 20001) is not None
    local = _policy(port_range=(20000, 20100), allow_loopback=True)
    assert local.refusal("localhost", "127.0.0.1", 20001) is None
    assert local.refusal("localhost", "localhost", 20001) is None  # the node's own name
    assert local.refusal(None, "127.0.0.1", 20050) is None  # the nodes are this machine
    assert "launcher itself" in str(_policy(port_range=(8000, 9000), allow_loopback=True).refusal(
        "localhost", "127.0.0.1", 8080))


# -- accounts, proxies, folders ------------------------------------------------------------------------------


def test_system_accounts_are_refused_and_labels_are_not() -> None:
    rule = AccountRule()
    for account in ("root", "daemon", "nobody", "munge", "bin"):
        assert rule.refusal(account, runs_as=False), account
    assert rule.refusal("no-such-user-pvw", runs_as=False) is None  # a label
    assert "not an account" in str(rule.refusal("no-such-user-pvw", runs_as=True))
    login = _a_login_user()
    if login is not None:
        assert rule.refusal(login, runs_as=True) is None
        assert "not in group" in str(AccountRule(group="no-such-group-pvw").refusal(login, runs_as=False))
        assert "outside 2000..3000" in str(AccountRule(min_uid=2000, max_uid=3000).refusal(login, runs_as=False)
                                           if pwd.getpwnam(login).pw_uid < 2000 else "outside 2000..3000")


def _a_login_user() -> str | None:
    for entry in pwd.getpwall():
        if 1000 <= entry.pw_uid <= 60000:
            return entry.pw_name
    return None


def test_forwarded_for_is_read_only_from_trusted_proxies() -> None:
    auth = AuthConfig(trusted_proxies=check_networks(["127.0.0.1", "10.0.0.0/8"], "$", print))
    assert auth.client_address("192.0.2.1", "203.0.113.9") == "192.0.2.1"  # not a proxy: its header is ignored
    assert auth.client_address("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    assert auth.client_address("127.0.0.1", "198.51.100.1, 203.0.113.9, 10.1.1.1") == "203.0.113.9"
    assert auth.client_address("127.0.0.1", "not-an-ip") == "127.0.0.1"


def test_folder_rules(tmp_path: Path) -> None:
    safe = tmp_path / "safe"
    folders.ensure(folders.Folder(safe / "logs", "configuration.log_dir"))
    assert (safe / "logs").is_dir() and folders.problem(safe / "logs", "x") is None
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by others" in str(folders.problem(shared / "logs", "configuration.log_dir"))
    shared.chmod(0o1777)  # sticky, like /tmp: fine as an ancestor, not as the folder itself
    assert folders.problem(shared / "logs", "x") is None
    assert "writable by others" in str(folders.problem(shared, "x"))


def test_names_a_job_makes_up_and_mapped_addresses_are_refused() -> None:
    local = _policy(port_range=(20000, 20100), allow_loopback=True)
    # a longer name made from the node's would be resolved by a name server the job's user picks
    assert "not the job's node" in str(local.refusal("localhost", "localhost.attacker.example", 20001))
    strict = _policy(port_range=(20000, 20100))
    assert "this launcher's machine" in str(strict.refusal("localhost", "::ffff:127.0.0.1", 20001))
    assert strict.static_refusal("::ffff:127.0.0.1", 20001) is not None  # the probe's recheck sees it too


def test_placeholder_and_dynamic_uids_are_refused_even_without_a_deny_list() -> None:
    rule = AccountRule(deny=frozenset())
    assert "placeholder or dynamic" in str(rule.refusal("nobody", runs_as=False))
    assert "outside" in str(rule.refusal("daemon", runs_as=False))


def test_a_system_group_may_write_an_ancestor(tmp_path: Path) -> None:
    parent = tmp_path / "var-log"
    parent.mkdir()
    parent.chmod(0o775)  # Ubuntu's /var/log: root:syslog 0775 (here root's own group, gid 0)
    assert folders.problem(parent / "pvw-hpc", "configuration.log_dir") is None
    assert "writable by its group" in str(folders.problem(parent, "configuration.log_dir"))
