"""The real wslink JavaScript client runs the whole SmartConnect flow in headless Chromium.

Nothing is simulated on the client side: Debian's ``chromium`` loads a page
from Apache that uses the npm package ``wslink`` (its ``dist/wslink.js``
bundle, exactly as a ParaViewWeb app ships it). ``SmartConnect`` POSTs its
config as ``text/plain`` to ``/paraview/`` (Apache ``ProxyPass`` to a real
``pvw-hpc serve``), which starts the demo app; the client replaces
``USE_HOST`` in the returned ``sessionURL``, opens the WebSocket through
Apache's ``RewriteMap`` on the launcher's proxy file, says ``wslink.hello``
with the returned secret and calls ``demo.add``. The test reads the outcome
over DevTools and cross-checks Apache's access log and the launcher.

Needs ``apache2``, ``chromium`` and ``nodejs npm`` (Debian packages); the npm
package is installed automatically (see ``tests/support/browser.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import SLURM_DEMO_APP, LauncherFactory, slurm_reason, wait_for
from tests.support.browser import HeadlessChromium, StaticApache, page_dir, skip_reason, wslink_js

pytestmark = [pytest.mark.apache, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]

SESSION_URL = "ws://USE_HOST/proxy?sessionId=${id}&path=ws"
RESULT_TIMEOUT_S = 15.0


def _diagnostics(browser: HeadlessChromium, apache: StaticApache) -> str:
    try:
        events = json.dumps(browser.evaluate("window.__events || null"))
    except Exception as exc:  # the page may be gone; the logs still help
        events = f"<unavailable: {exc!r}>"
    return (
        f"page events: {events}\n"
        f"Apache access log:\n{chr(10).join(apache.access_lines())}\n"
        f"Apache error log:\n{apache.error_log_tail()}\n"
        f"chromium log:\n{browser.log_tail()}"
    )


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_wslink_js_smartconnect_through_apache_in_chromium(launcher: LauncherFactory, backend: str) -> None:
    """The same browser flow with the app as a local process and as a real SLURM job."""
    if backend == "slurm" and slurm_reason() is not None:
        pytest.skip(str(slurm_reason()))
    bundle = wslink_js()  # npm ci into the cache on first use
    if backend == "slurm":
        lau = launcher(session_url=SESSION_URL, clusters={"slurm": {"scheduler": "slurm", "poll_fast_s": 0.5}},
                       apps={"demo": SLURM_DEMO_APP})
    else:
        lau = launcher(session_url=SESSION_URL, ports=3)
    with (
        page_dir(bundle) as www,
        StaticApache(static_dir=www, proxy_file=lau.proxy_file, launcher_port=lau.port) as apache,
        HeadlessChromium() as browser,
    ):
        browser.open(f"{apache.url}/index.html")
        result: dict[str, Any] | None = browser.wait_for("window.__result || null", RESULT_TIMEOUT_S)
        assert result is not None, f"no result in the page within {RESULT_TIMEOUT_S} s\n{_diagnostics(browser, apache)}"
        assert result["ok"], f"the wslink client failed: {result}\n{_diagnostics(browser, apache)}"

        # The RPC went through: hello with the secret succeeded and demo.add answered.
        assert result["add"] == 5
        session_id = result["id"]
        page_host = f"127.0.0.1:{apache.port}"  # location.host, which replaced USE_HOST
        expected_url = f"ws://{page_host}/proxy?sessionId={session_id}&path=ws"
        assert result["sessionURL"] == expected_url
        assert result["url"] == expected_url

        # The launcher lists the session as ready, on the port the WebSocket reached.
        listed = {s["id"]: s for s in lau.sessions()}
        assert session_id in listed, f"{session_id} not in {sorted(listed)}"
        assert listed[session_id]["state"] == "ready"
        assert result["whoami"]["port"] == listed[session_id]["port"]
        assert f"{session_id} 127.0.0.1:{listed[session_id]['port']}" in lau.map_lines()

        # Apache saw one launch POST and the upgraded WebSocket. A tunnel's line is written when it
        # ends; the page closed it after the RPCs.
        ws_line = re.compile(rf'"GET /proxy\?sessionId={re.escape(session_id)}&path=ws HTTP/1\.1" 101 ')
        wait_for(lambda: any(ws_line.search(line) for line in apache.access_lines()), 5,
                 f"the 101 line of the WebSocket in {apache.access_log}")
        lines = apache.access_lines()
        posts = [line for line in lines if '"POST /paraview' in line]
        assert len(posts) == 1, f"expected exactly one launch POST:\n{chr(10).join(lines)}"
        assert '"POST /paraview/ HTTP/1.1" 200 ' in posts[0], posts[0]
        assert any('"GET /wslink.js HTTP/1.1" 200 ' in line for line in lines)
        # No fallback to SmartConnect's DEFAULT_SESSION_URL (…/ws), which would hide a launcher error.
        assert not any(re.search(r'"GET /ws[ ?]', line) for line in lines), "\n".join(lines)
