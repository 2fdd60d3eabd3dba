"""The real ParaView Visualizer, launched by pvw-hpc and used from its own web client in headless Chromium.

Real parts only: Debian's pvpython 5.11 with wslink 1.12.4, the npm Visualizer 3.2.0 client
(its ``dist/`` served by Apache, as ``pvw-hpc apache-config`` writes it for
``configuration.content``), a private Xvfb per session (``display: "xvfb"``), a real
``pvw-hpc serve`` behind Apache's ProxyPass and RewriteMap. The client POSTs to
``/paraview/``, connects to the session through ``/proxy``, the test opens ``wavelet.vti`` in
its file browser and checks that the rendered view is not blank (thousands of distinct
colours), saves a screenshot as a test artifact, and DELETE stops the session and its route.
Parts are installed by ``examples/paraview/setup`` (``scripts/setup`` runs it).
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LauncherFactory, wait_for
from tests.support.apache import free_port
from tests.support.browser import HeadlessChromium, StaticApache
from tests.support.browser import skip_reason as browser_skip_reason
from tests.support.schedulers import BACKENDS

PREFIX = Path(os.environ.get("PVW_PARAVIEW_PREFIX", "/opt/pvw-hpc/paraview"))
VISUALIZER = PREFIX / "visualizer-3.2.0"
ARTIFACTS = Path(os.environ.get("PVW_TEST_ARTIFACTS", "/tmp/pvw-test-artifacts"))


def _why_not() -> str | None:
    missing = [what for what, ok in (("pvpython", shutil.which("pvpython")), ("Xvfb", shutil.which("Xvfb")),
                                      ("the Visualizer", (VISUALIZER / "dist" / "index.html").is_file()),
                                      ("the test data", (PREFIX / "data" / "wavelet.vti").is_file())) if not ok]
    if missing:
        return f"missing {', '.join(missing)} (examples/paraview/setup)"
    return browser_skip_reason()


# slow: each case starts pvpython and Chromium and waits for a rendered frame (20-50 s here)
pytestmark = [pytest.mark.apache, pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]

APP: dict[str, Any] = {
    "cmd": ["/usr/bin/pvpython", "-dr", f"{VISUALIZER}/server/pvw-visualizer.py", "--host", "${host}",
            "--port", "${port}", "--data", str(PREFIX / "data"), "--authKey", "${secret}", "--timeout", "300"],
    "env": {"PYTHONPATH": str(PREFIX / "wslink-1.12.4")},
    "ready_line": "Starting factory",
    "display": "xvfb",
    "timeout": 90,
}

# distinct colours of the largest image or canvas on the page (the remote view), or -1 when there is none
COUNT_COLOURS = """(() => {
  const views = [...document.querySelectorAll('img, canvas')].filter(e => e.width * e.height > 40000);
  if (!views.length) return -1;
  const view = views.sort((a, b) => b.width * b.height - a.width * a.height)[0];
  const c = document.createElement('canvas'); c.width = view.width; c.height = view.height;
  const g = c.getContext('2d'); g.drawImage(view, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; const seen = new Set();
  for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  return seen.size;
})()"""


def _click(browser: HeadlessChromium, selector: str, timeout: float) -> None:
    found = browser.wait_for(f"(() => {{ const e = document.querySelector({selector!r}); "
                             "if (!e) return null; e.click(); return true; })()", timeout)
    assert found, f"no {selector} in the page within {timeout} s"


def _choose(browser: HeadlessChromium, index: int, value: str, timeout: float = 30) -> None:
    """Pick ``value`` in the panel's ``index``-th select (React listens for a bubbling change event)."""
    chosen = browser.wait_for(
        "(() => { const s = [...document.querySelectorAll('select[class*=\"ColorByWidget-input\"]')]"
        f"[{index}]; if (!s || ![...s.options].some(o => o.value === {value!r})) return null; "
        "Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype, 'value').set.call(s, "
        f"{value!r}); s.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()", timeout)
    assert chosen, f"no option {value!r} in select {index}"
    shown = browser.wait_for("(() => { const s = [...document.querySelectorAll('select[class*=\"ColorByWidget-input\"]')]"
                             f"[{index}]; return s && s.value === {value!r}; }})()", timeout)
    assert shown, f"select {index} did not take {value!r} (the server answers the change)"


def _screenshot(browser: HeadlessChromium, name: str) -> Path:
    shot = browser.command("Page.captureScreenshot", {"format": "png"}, timeout=30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


@pytest.mark.parametrize("backend", [pytest.param("local", id="local"),
                                     pytest.param("slurm", id="slurm", marks=pytest.mark.slurm),
                                     pytest.param("pbs", id="pbs", marks=pytest.mark.pbs)])
def test_the_visualizer_renders_a_dataset_through_apache(launcher: LauncherFactory, backend: str) -> None:
    """The same scientist's steps with pvpython as a local process, a SLURM job and a PBS job."""
    clusters = None
    app = APP
    if backend != "local":
        scheduler = BACKENDS[backend]
        reason = scheduler.skip_reason()  # under CI a failure
        if reason:
            pytest.skip(reason)
        clusters = {backend: {**scheduler.cluster, "defaults": {**scheduler.cluster.get("defaults", {}), "memory": "2G"}}}
        app = {**APP, "cluster": backend}
    apache_port = free_port()
    lau = launcher(session_url=f"ws://127.0.0.1:{apache_port}/proxy?sessionId=${{id}}&path=ws", timeout=90,
                   apps={"visualizer": app}, ports=5, clusters=clusters)
    with (
        StaticApache(static_dir=VISUALIZER / "dist", proxy_file=lau.proxy_file, launcher_port=lau.port,
                     port=apache_port) as apache,
        HeadlessChromium() as browser,
    ):
        browser.open(f"{apache.url}/index.html")
        _click(browser, 'i[data-idx="1"]', 60)  # the Files tab: shown once the client is connected
        _click(browser, 'li[data-name="wavelet.vti"]', 30)
        # the Representation and Color selects of the open source's panel, as a scientist sets them
        _choose(browser, 0, "Surface")
        _choose(browser, 1, "POINTS:|:RTData")
        colours = wait_for(lambda: (browser.evaluate(COUNT_COLOURS) or 0) > 1000 and browser.evaluate(COUNT_COLOURS),
                           60, "a rendered view with thousands of colours")
        shot = _screenshot(browser, f"visualizer-{backend}.png")
        sessions = lau.sessions()
        assert len(sessions) == 1 and sessions[0]["state"] == "ready", sessions
        assert sessions[0].get("cluster") == (None if backend == "local" else backend)  # it really ran there
        session_id = sessions[0]["id"]
        assert f"{session_id} 127.0.0.1:{sessions[0]['port']}" in lau.map_lines()
        print(f"{backend}: {colours} distinct colours; screenshot {shot}", file=sys.stderr)
        assert lau.delete(session_id).json()["state"] == "ended"
        assert not any(line.startswith(session_id) for line in lau.map_lines())
