"""The seed's third layout, HPC style: a real two-node SLURM cluster on namespace hosts.

host1 runs Apache; host2 runs slurmctld and ``pvw-hpc serve``; host3 and host4
each run a slurmd (``tests/support/netns_slurm.py``). Sessions are jobs that
land on either node, report their node's own address, and are reached through
Apache on host1 from a WebSocket client on host1. The fault test cuts host3's
link while sessions run there and checks what the launcher makes of SLURM's
late and partial view of it.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import (
    ADMIN_HEADERS,
    DEMO_APP,
    TEXT_PLAIN,
    Launcher,
    LauncherFactory,
    apache_on_host1,
    shared_folder,
    wait_for,
    ws_roundtrip_on,
)
from tests.support import netns_slurm
from tests.support.apache import ApacheInstance
from tests.support.apache import skip_reason as apache_skip_reason
from tests.support.netns import Hosts
from tests.support.netns_slurm import CPUS_PER_NODE, NetnsSlurm

pytestmark = [
    pytest.mark.netns, pytest.mark.slurm, pytest.mark.apache,
    pytest.mark.skipif(apache_skip_reason() is not None, reason=str(apache_skip_reason())),
    pytest.mark.skipif(netns_slurm.skip_reason() is not None, reason=str(netns_slurm.skip_reason())),
]

APACHE_PORT = 80  # the example's own ports: inside the namespaces they clash with nothing


def adjust(config: dict[str, Any]) -> None:
    """What the tests change in ``examples/many-machines/launcher-slurm.json``, and why.

    Faster polls and probes, so a test waits seconds, not minutes; a second
    cluster (the same SLURM) whose probes give up after 4 s, to see a session
    ended by its probe before SLURM notices anything; apps pinned to a node.
    """
    cluster = config["clusters"]["pvwnet"]
    cluster.update({"poll_fast_s": 0.5, "poll_slow_s": 2, "probe_every_s": 2})
    config["clusters"]["pvwnet-probe"] = {**cluster, "unreachable_after_s": 4,
                                          "job_dir": cluster["job_dir"] + "-probe"}
    demo = config["apps"]["demo"]
    for name, node, on in (("demo-host3", 3, "pvwnet"), ("demo-host4", 4, "pvwnet"), ("probe-host3", 3, "pvwnet-probe")):
        config["apps"][name] = {**demo, "cluster": on, "resources": {"extra_directives": [f"--nodelist=host{node}"]}}


class Layout:
    """The launcher, Apache and the cluster of one module, with the steps the tests repeat."""

    def __init__(self, hosts: Hosts, slurm: NetnsSlurm, launcher: Launcher, apache: ApacheInstance) -> None:
        self.hosts, self.slurm, self.launcher, self.apache = hosts, slurm, launcher, apache

    def launch(self, app: str) -> dict[str, Any]:
        body = json.dumps({"application": app}).encode()
        resp = requests.post(f"{self.apache.url}/paraview/", data=body, headers={"Content-Type": TEXT_PLAIN}, timeout=90)
        assert resp.status_code == 200, f"{resp.status_code} {resp.text[:500]}\n{self.apache.error_log_tail()}"
        answer: dict[str, Any] = resp.json()
        return answer

    def session(self, session_id: str) -> dict[str, Any]:
        resp = self.launcher.get(session_id, headers=ADMIN_HEADERS)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def job_id(self, session_id: str) -> str:
        with sqlite3.connect(self.launcher.db_path) as db:
            row = db.execute("SELECT job_id FROM sessions WHERE id = ?", (session_id,)).fetchone()
        assert row and row[0], f"session {session_id} has no job id"
        return str(row[0])

    def routes(self) -> dict[str, str]:
        return dict(line.split(" ", 1) for line in self.launcher.map_lines())

    def reaches(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Hello + RPCs from host1 through Apache; returns whoami."""
        result = ws_roundtrip_on(self.hosts, 1, answer["sessionURL"], answer["secret"])
        assert result["results"][0] == 5
        whoami: dict[str, Any] = result["results"][1]
        return whoami


@pytest.fixture(scope="module")
def layout(netns_hosts: Hosts, module_launcher: LauncherFactory) -> Iterator[Layout]:
    hosts = netns_hosts
    with shared_folder() as shared:
        slurm = NetnsSlurm(hosts, shared / "slurm")
        try:
            slurm.up()
            replace = {**{f"host{n}.example.com": hosts.address(n) for n in (1, 2, 3, 4)},
                       "/shared/pvw-hpc": str(shared), "*:80": f"{hosts.address(1)}:{APACHE_PORT}"}
            lau = module_launcher.from_example(
                "many-machines/launcher-slurm.json", replace,
                properties={"demo_python": sys.executable, "demo_app": str(DEMO_APP)},
                command_prefix=hosts.argv(2, []), extra_env={"SLURM_CONF": str(slurm.conf)}, adjust=adjust)
            with apache_on_host1(hosts, "many-machines/apache-vhost.conf", replace, shared, APACHE_PORT) as apache:
                yield Layout(hosts, slurm, lau, apache)
        finally:
            for node in netns_slurm.NODES:
                hosts.set_link(node, True)
            module_launcher.cleanup()  # its scancel reaches this cluster through the launcher's SLURM_CONF
            slurm.down()


def test_sessions_land_on_both_nodes_and_are_reached_on_their_node_through_apache(layout: Layout) -> None:
    hosts = layout.hosts
    answers = [layout.launch("demo") for _ in range(2 * CPUS_PER_NODE)]  # twice what one node holds
    nodes = {a["host"] for a in answers}
    assert nodes == {hosts.address(3), hosts.address(4)}, answers
    routes = layout.routes()
    for answer in answers:
        job = layout.job_id(answer["id"])
        node = layout.slurm.job_node(job)
        assert answer["host"] == hosts.address(int(node[-1])), (answer, node)  # the job reported its own node
        assert routes[answer["id"]] == f"{answer['host']}:{answer['port']}"
        whoami = layout.reaches(answer)
        assert (whoami["host"], whoami["port"]) == (answer["host"], answer["port"])
    for answer in answers:
        assert layout.launcher.delete(answer["id"], headers=ADMIN_HEADERS).status_code == 200
    jobs = [layout.job_id(a["id"]) for a in answers]
    wait_for(lambda: all(layout.slurm.job_state(j) in ("CANCELLED", "GONE") for j in jobs), 30, "jobs cancelled")
    assert not set(layout.routes()) & {a["id"] for a in answers}


@pytest.mark.slow
def test_a_node_cut_off_ends_its_sessions_spares_the_other_node_and_takes_new_ones_when_back(layout: Layout) -> None:
    hosts, slurm, lau = layout.hosts, layout.slurm, layout.launcher
    a = layout.launch("demo-host3")  # ended by SLURM's verdict (NODE_FAIL ~30 s after the cut)
    b = layout.launch("probe-host3")  # its cluster gives up on a silent app after 4 s
    c = layout.launch("demo-host4")  # must not notice anything
    assert (a["host"], b["host"], c["host"]) == (hosts.address(3), hosts.address(3), hosts.address(4))
    layout.reaches(c)
    time.sleep(3)  # at least one probe answered from here, so silence can be judged
    hosts.set_link(3, False)
    cut = time.monotonic()
    try:
        try:
            failed_b = wait_for(lambda: (s := layout.session(b["id"]))["state"] == "failed" and s, 25, "b failed by probe")
        except AssertionError:
            print(lau.stderr_tail(60))
            raise
        assert "did not answer" in failed_b["error"] and "cancelled" in failed_b["error"], failed_b
        # GET waits for pending map rewrites, so the route is gone by now (1 s covers the instant between
        # the state's commit and the rewrite request)
        wait_for(lambda: b["id"] not in layout.routes(), 1, "b's route to go")
        assert layout.session(a["id"])["state"] == "ready"  # SLURM still says RUNNING; a's app is judged by it
        lau.kill9()  # a launcher restart in the middle changes nothing
        lau.start()
        failed_a = wait_for(lambda: (s := layout.session(a["id"]))["state"] == "failed" and s, 90, "a failed")
        assert "NODE_FAIL" in failed_a["error"], failed_a
        print(f"b failed {failed_b['error'][:60]!r}; a failed after {time.monotonic() - cut:.1f} s: {failed_a['error']!r}")
        wait_for(lambda: a["id"] not in layout.routes(), 1, "a's route to go")
        routes = layout.routes()
        assert b["id"] not in routes
        assert routes[c["id"]] == f"{c['host']}:{c['port']}"
        assert layout.session(c["id"])["state"] == "ready"
        layout.reaches(c)  # host4's session was never disturbed
    finally:
        hosts.set_link(3, True)
    slurm.resume(3)
    slurm.wait_nodes({"host3": "idle"}, timeout=60)
    job_b = layout.job_id(b["id"])
    assert slurm.job_state(job_b) == "CANCELLED"  # the launcher cancelled the job of the session it ended
    fresh = [layout.launch("demo") for _ in range(CPUS_PER_NODE + 1)]  # host4 has one CPU left
    on_host3 = [f for f in fresh if f["host"] == hosts.address(3)]
    assert on_host3, fresh
    whoami = layout.reaches(on_host3[0])
    assert whoami["host"] == hosts.address(3)
    assert set(layout.routes()) == {c["id"], *(f["id"] for f in fresh)}  # the map is exactly the ready set
    for answer in (c, *fresh):
        lau.delete(answer["id"], headers=ADMIN_HEADERS)
