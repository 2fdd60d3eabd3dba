"""The seed's second layout, for real: Apache on host1; the launcher and its apps on host2.

host1 and host2 are network namespaces with their own addresses
(``tests/support/netns.py``). ``pvw-hpc serve`` runs on host2 with the local
backend and writes the map file into a folder that host1's Apache reads too
(the seed's "shared network drive": here both hosts see one filesystem). The
app listens on host2's address, so the map line must carry it; ``sessionURL``
names host1, and the WebSocket client runs on host1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import (
    DEMO_APP,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    apache_on_host1,
    shared_folder,
    wait_for,
    ws_roundtrip_on,
)
from tests.support.apache import ApacheInstance
from tests.support.apache import skip_reason as apache_skip_reason
from tests.support.netns import Hosts

pytestmark = [pytest.mark.netns, pytest.mark.apache,
              pytest.mark.skipif(apache_skip_reason() is not None, reason=str(apache_skip_reason()))]

APACHE_PORT = 80  # the example's own ports: inside the namespaces they clash with nothing
LAUNCHER_PORT = 8080


@pytest.fixture(scope="module")
def layout2(netns_hosts: Hosts, module_launcher: LauncherFactory) -> Iterator[tuple[Launcher, ApacheInstance]]:
    """``examples/two-machines`` as shipped: only host names and the shared folder are this machine's."""
    hosts = netns_hosts
    with shared_folder() as shared:
        replace = {"host1.example.com": hosts.address(1), "host2.example.com": hosts.address(2),
                   "/shared/pvw-hpc": str(shared), "*:80": f"{hosts.address(1)}:{APACHE_PORT}"}
        lau = module_launcher.from_example("two-machines/launcher.json", replace,
                                           properties={"demo_python": sys.executable, "demo_app": str(DEMO_APP)},
                                           command_prefix=hosts.argv(2, []))
        try:
            with apache_on_host1(hosts, "two-machines/apache-vhost.conf", replace, shared, APACHE_PORT) as apache:
                yield lau, apache
        finally:
            module_launcher.cleanup()


def test_launcher_on_host2_serves_sessions_that_a_client_on_host1_reaches_through_apache(
        layout2: tuple[Launcher, ApacheInstance], netns_hosts: Hosts) -> None:
    lau, apache = layout2
    hosts = netns_hosts
    assert lau.url == f"http://{hosts.address(2)}:{LAUNCHER_PORT}/paraview/"  # bound on host2's address
    body = json.dumps({"application": "demo"}).encode()
    browser = requests.Session()  # keeps the creator cookie, as a browser does
    answers = []
    for _ in range(2):
        resp = browser.post(f"{apache.url}/paraview/", data=body, headers={"Content-Type": TEXT_PLAIN}, timeout=60)
        assert resp.status_code == 200, f"{resp.status_code} {resp.text[:300]}\n{apache.error_log_tail()}"
        answers.append(resp.json())
    routes = dict(line.split(" ", 1) for line in lau.map_lines())
    assert len({routes[a["id"]] for a in answers}) == 2  # two ports on host2, two map lines
    for answer in answers:
        assert answer["sessionURL"] == f"ws://{hosts.address(1)}/proxy?sessionId={answer['id']}&path=ws"
        host, port = routes[answer["id"]].split(":")
        assert host == hosts.address(2)  # the app's own host, not 127.0.0.1 and not host1
        result = ws_roundtrip_on(hosts, 1, answer["sessionURL"], answer["secret"])
        assert result["results"][0] == 5
        assert (result["results"][1]["host"], result["results"][1]["port"]) == (host, int(port))
    # the WebSocket went through Apache's tunnel (101), not around it
    assert " 101 " in apache.access_log.read_text()
    for answer in answers:
        assert browser.delete(f"{apache.url}/paraview/{answer['id']}", timeout=30).status_code == 200
        wait_for(lambda a=answer: all(not line.startswith(a["id"]) for line in lau.map_lines()), 10, "route gone")
    resp = requests.get(f"{apache.url}/proxy?sessionId={answers[0]['id']}&path=ws", timeout=30)
    assert resp.status_code == 400  # no route once the session ended
