"""The seed's first layout for real: Apache, the launcher and the apps on one machine.

Apache forwards ``/paraview`` to the launcher (``ProxyPass``) and routes
``/proxy?sessionId=<id>&path=ws`` to the session's ``host:port`` through a
``RewriteMap txt:`` on the launcher's ``proxy_file``. The client side is done
as the JS clients do it: POST ``text/plain`` to ``/paraview/``, replace
``USE_HOST`` in the returned ``sessionURL`` with the page's host (wslink), or
lowercase the whole URL first (trame), then open the WebSocket and say hello
with the returned secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from websockets.exceptions import InvalidStatus, WebSocketException

from tests.conftest import ADMIN_HEADERS, TEXT_PLAIN, Launcher, LauncherFactory, wait_for
from tests.support.apache import ApacheInstance, skip_reason
from tests.support.wslink_client import WslinkError, connect_and_call

pytestmark = [pytest.mark.apache, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]

SESSION_URL = "ws://USE_HOST/proxy?sessionId=${id}&path=ws"  # trame Docker's default


@pytest.fixture(scope="module")
def front(module_launcher: LauncherFactory) -> Iterator[tuple[Launcher, ApacheInstance]]:
    lau = module_launcher(session_url=SESSION_URL, ports=5)
    apache = ApacheInstance(proxy_file=lau.proxy_file, launcher_port=lau.port)
    try:
        apache.start()
        yield lau, apache
    finally:
        apache.cleanup()


def _page_host(apache: ApacheInstance) -> str:
    return f"127.0.0.1:{apache.port}"  # location.host of a page served by this Apache


def _wslink_decorate(url: str, host: str) -> str:
    return url.replace("USE_HOST", host)


def _trame_decorate(url: str, host: str) -> str:
    return url.lower().replace("use_host", host)


def _launch(apache: ApacheInstance, path: str = "/paraview/") -> dict[str, Any]:
    manager = apache.url + path
    body = json.dumps({"application": "demo", "sessionManagerURL": manager, "useUrl": True, "launcherRetry": []})
    resp = requests.post(manager, data=body.encode(), headers={"Content-Type": TEXT_PLAIN}, timeout=60)
    assert resp.status_code == 200, f"{resp.status_code} {resp.text[:300]}\n{apache.error_log_tail()}"
    answer: dict[str, Any] = resp.json()
    return answer


def _call(apache: ApacheInstance, url: str, secret: str) -> dict[str, Any]:
    try:
        return connect_and_call(url, secret, [("demo.add", [2, 3]), ("demo.whoami", [])])
    except (WslinkError, WebSocketException, OSError) as exc:
        pytest.fail(f"{exc!r} for {url}\nApache error log:\n{apache.error_log_tail()}")


@pytest.mark.parametrize("decorate", [_wslink_decorate, _trame_decorate], ids=["wslink-js", "trame"])
def test_launch_and_rpc_through_apache(front: tuple[Launcher, ApacheInstance], decorate: Any) -> None:
    lau, apache = front
    body = _launch(apache)
    session_id = body["id"]
    assert body["sessionURL"] == f"ws://USE_HOST/proxy?sessionId={session_id}&path=ws"
    assert body["sessionManagerURL"] == apache.url + "/paraview/"
    assert f"{session_id} 127.0.0.1:{body['port']}" in lau.map_lines()

    url = decorate(body["sessionURL"], _page_host(apache))
    # trame lowercases everything ("sessionid" too: the vhost's RewriteCond is [NC]); the id must survive
    assert url.lower() == f"ws://{_page_host(apache)}/proxy?sessionid={session_id}&path=ws"
    assert f"={session_id}&" in url
    out = _call(apache, url, body["secret"])
    assert out["results"][0] == 5
    assert out["results"][1]["port"] == body["port"]

    resp = requests.delete(f"{apache.url}/paraview/{session_id}", timeout=30, headers=ADMIN_HEADERS)
    assert resp.status_code == 200
    wait_for(lambda: session_id not in lau.map_text(), 2, "the map line to go")
    with pytest.raises(InvalidStatus) as info:
        connect_and_call(url, body["secret"], [("demo.add", [1, 1])])
    assert info.value.response.status_code == 400


def test_post_without_trailing_slash_and_get_through_apache(front: tuple[Launcher, ApacheInstance]) -> None:
    lau, apache = front
    body = _launch(apache, path="/paraview")
    view = requests.get(f"{apache.url}/paraview/{body['id']}", timeout=30, headers=ADMIN_HEADERS).json()
    assert view["state"] == "ready"
    assert body["secret"] not in json.dumps(view)
    url = _wslink_decorate(body["sessionURL"], _page_host(apache))
    assert _call(apache, url, body["secret"])["results"][0] == 5
    assert requests.delete(f"{apache.url}/paraview/{body['id']}", timeout=30, headers=ADMIN_HEADERS).status_code == 200


def test_errors_reach_the_client_as_json_through_apache(front: tuple[Launcher, ApacheInstance]) -> None:
    """The JS client only shows a JSON 'error'; Apache must pass the launcher's answer through."""
    _, apache = front
    resp = requests.post(apache.url + "/paraview/", data=b'{"application": "nope"}',
                         headers={"Content-Type": TEXT_PLAIN}, timeout=30)
    assert resp.status_code == 400
    assert "nope" in resp.json()["error"]
