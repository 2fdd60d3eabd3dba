"""The seed's third layout, stock style: apps on host3 and host4 started over real ssh by a custom script.

Apache on host1; ``pvw-hpc serve`` with the local backend on host2; a private
sshd on host3 and host4 (``tests/support/netns_ssh.py``) with key login for
the dedicated user ``pvwssh``. The app's command is the seed's kind of custom
script (``examples/many-machines/customScript.sh HOST USER PORT PROGRAM ...``):
the launcher picks host and port from ``resources`` and the script starts the
app there over ssh. The map line must carry that host's address, both hosts'
sessions must be reachable through Apache, and DELETE must stop the app on
the remote host, not just the local ssh.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    DEMO_APP,
    REPO_ROOT,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    apache_on_host1,
    shared_folder,
    wait_for,
    ws_roundtrip_on,
)
from tests.support import netns_ssh
from tests.support.apache import ApacheInstance
from tests.support.apache import skip_reason as apache_skip_reason
from tests.support.netns import Hosts
from tests.support.netns_ssh import SshHosts

pytestmark = [
    pytest.mark.netns, pytest.mark.apache,
    pytest.mark.skipif(apache_skip_reason() is not None, reason=str(apache_skip_reason())),
    pytest.mark.skipif(netns_ssh.skip_reason() is not None, reason=str(netns_ssh.skip_reason())),
]

APACHE_PORT = 80  # the example's own ports: inside the namespaces they clash with nothing
CUSTOM_SCRIPT = REPO_ROOT / "examples" / "many-machines" / "customScript.sh"
PORTS_PER_HOST = (9001, 9002, 9003)  # the example's port_range


@pytest.fixture(scope="module")
def layout(netns_hosts: Hosts, module_launcher: LauncherFactory) -> Iterator[tuple[Launcher, ApacheInstance]]:
    """``examples/many-machines`` as shipped: host names, user, shared folder and paths are this machine's."""
    hosts = netns_hosts
    with shared_folder() as shared, SshHosts(hosts, shared / "ssh", on=(3, 4)) as ssh:
        replace = {**{f"host{n}.example.com": hosts.address(n) for n in (1, 2, 3, 4)}, "pvw-user": ssh.user,
                   "/shared/pvw-hpc": str(shared), "*:80": f"{hosts.address(1)}:{APACHE_PORT}"}
        lau = module_launcher.from_example(
            "many-machines/launcher.json", replace,
            properties={"custom_script": str(CUSTOM_SCRIPT), "demo_python": sys.executable, "demo_app": str(DEMO_APP)},
            command_prefix=hosts.argv(2, []), extra_env={"PVW_SSH_CONFIG": str(ssh.client_config)})
        try:
            with apache_on_host1(hosts, "many-machines/apache-vhost.conf", replace, shared, APACHE_PORT) as apache:
                yield lau, apache
        finally:
            module_launcher.cleanup()  # before the sshd stop: DELETE-free teardown still ends remote apps


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def _remote_apps(hosts: Hosts, host: int) -> list[str]:
    """Command lines of demo apps (python .../app.py, not the wrappers around them) inside ``hostN``."""
    pids = subprocess.run(["ip", "netns", "pids", hosts.namespace(host)], capture_output=True, text=True,
                          timeout=30).stdout.split()
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(argv[0]).name.startswith("python") and any(a.endswith("app.py") for a in argv):
            found.append(" ".join(argv))
    return found


def test_sessions_on_host3_and_host4_over_ssh_are_reached_through_apache_and_delete_stops_the_remote_app(
        layout: tuple[Launcher, ApacheInstance], netns_hosts: Hosts) -> None:
    lau, apache = layout
    hosts = netns_hosts
    browser = requests.Session()
    answers: list[dict[str, Any]] = []
    for _ in range(2 * len(PORTS_PER_HOST)):  # host3's ports first, then host4's, as the resources list them
        resp = browser.post(f"{apache.url}/paraview/", data=json.dumps({"application": "demo"}).encode(),
                            headers={"Content-Type": TEXT_PLAIN}, timeout=60)
        assert resp.status_code == 200, f"{resp.status_code} {resp.text[:500]}\n{lau.stderr_tail()}"
        answers.append(resp.json())
    routes = dict(line.split(" ", 1) for line in lau.map_lines())
    # every port of both hosts, the remote host's address in each map line
    assert sorted(routes[a["id"]] for a in answers) == sorted(
        f"{hosts.address(n)}:{p}" for n in (3, 4) for p in PORTS_PER_HOST)
    for answer in answers:
        host, port = routes[answer["id"]].split(":")
        answer["host"], answer["port"] = host, int(port)
        whoami = ws_roundtrip_on(hosts, 1, answer["sessionURL"], answer["secret"])["results"][1]
        assert (whoami["host"], whoami["port"]) == (answer["host"], answer["port"])
        assert whoami["pid"] not in lau.app_pids()  # the app is not a process the launcher started here
    assert len(_remote_apps(hosts, 3)) == len(PORTS_PER_HOST) and len(_remote_apps(hosts, 4)) == len(PORTS_PER_HOST)

    for answer in answers:
        assert browser.delete(f"{apache.url}/paraview/{answer['id']}", timeout=30).status_code == 200
        assert answer["id"] not in dict(line.split(" ", 1) for line in lau.map_lines())
        wait_for(lambda a=answer: not _listening(a["host"], a["port"]), 10, f"the app on {answer['host']} to stop")
    wait_for(lambda: not _remote_apps(hosts, 3) and not _remote_apps(hosts, 4), 10, "no app left on host3/host4")
