"""The seed's first layout from ``examples/one-machine`` as shipped: Apache, pvw-hpc and apps on host1.

``tests/test_apache_layout1.py`` covers the clients of this layout in depth
with the test suite's own config; this runs the shipped example files
themselves (launcher on ``127.0.0.1:8080``, Apache on port 80 with
``ProxyPass /paraview http://localhost:8080/paraview``, apps on ``localhost``) on
a namespace host, where those fixed ports clash with nothing, and talks to it
from host4 as a browser elsewhere on the network would.
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


@pytest.fixture(scope="module")
def layout1(netns_hosts: Hosts, module_launcher: LauncherFactory) -> Iterator[tuple[Launcher, ApacheInstance]]:
    hosts = netns_hosts
    with shared_folder("pvw-one-") as shared:
        replace = {"host1.example.com": hosts.address(1), "/var/lib/pvw-hpc": str(shared),
                   "*:80": f"{hosts.address(1)}:80"}
        lau = module_launcher.from_example("one-machine/launcher.json", replace,
                                           properties={"demo_python": sys.executable, "demo_app": str(DEMO_APP)},
                                           command_prefix=hosts.argv(1, []))
        try:
            with apache_on_host1(hosts, "one-machine/apache-vhost.conf", replace, shared) as apache:
                yield lau, apache
        finally:
            module_launcher.cleanup()


def test_the_one_machine_example_serves_a_browser_on_another_host(layout1: tuple[Launcher, ApacheInstance],
                                                                 netns_hosts: Hosts) -> None:
    lau, apache = layout1
    browser = requests.Session()
    resp = browser.post(f"{apache.url}/paraview/", data=json.dumps({"application": "demo"}).encode(),
                        headers={"Content-Type": TEXT_PLAIN}, timeout=60)
    assert resp.status_code == 200, f"{resp.status_code} {resp.text[:300]}\n{apache.error_log_tail()}"
    answer = resp.json()
    assert answer["sessionURL"] == f"ws://{netns_hosts.address(1)}/proxy?sessionId={answer['id']}&path=ws"
    route = dict(line.split(" ", 1) for line in lau.map_lines())[answer["id"]]
    assert route.startswith("localhost:9")  # the example's resources: localhost, ports 9001-9003
    result = ws_roundtrip_on(netns_hosts, 4, answer["sessionURL"], answer["secret"])
    assert result["results"][0] == 5 and result["results"][1]["port"] == int(route.split(":")[1])
    assert browser.delete(f"{apache.url}/paraview/{answer['id']}", timeout=30).status_code == 200
    wait_for(lambda: answer["id"] not in lau.map_text(), 10, "the route to go")
