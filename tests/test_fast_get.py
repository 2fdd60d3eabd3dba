"""``GET /<endpoint>/<id>`` answered without Flask gives exactly what the Flask route gives.

``pvw-hpc serve`` puts :class:`FastSessionGet` in front of the Flask app (every
other test that GETs a session goes through it); here both are driven in
process with werkzeug's test client on one real service and SQLite file, and
every answer - status, JSON, content type - must be the same.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.test import Client

from pvw_hpc.api import create_app
from pvw_hpc.api.fast_get import FastSessionGet
from pvw_hpc.auth import hash_token
from pvw_hpc.config import load_dict
from pvw_hpc.runtime import Runtime

ADMIN, READER = "admin-token-for-this-test", "reader-token-for-this-test"


@pytest.fixture
def clients() -> Iterator[tuple[Client, Client, str, str]]:
    root = Path(tempfile.mkdtemp(prefix="pvw-test-fast-", dir="/tmp"))
    raw = {"configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview",
                             "proxy_file": str(root / "proxy.txt"), "sessionURL": "ws://x/proxy?sessionId=${id}",
                             "log_dir": str(root / "logs"), "fields": ["host", "port"],
                             "auth": {"anonymous": True, "tokens": [
                                 {"name": "ops", "sha256": hash_token(ADMIN), "roles": ["admin"]},
                                 {"name": "portal", "sha256": hash_token(READER), "roles": ["launch"]}]}},
           "resources": [{"host": "127.0.0.1", "port_range": [9100, 9200]}],
           "apps": {"demo": {"cmd": ["true"]}}}
    runtime = Runtime(load_dict(raw, source="tests/test_fast_get.py"))  # no thread started: the reads are the test
    service = runtime.service
    service.config.log_dir.mkdir(parents=True, exist_ok=True)
    session_id, secret = str(uuid.uuid4()), "s" * 32
    service.store.create(id=session_id, application="demo", backend="local", holds_port=True, host="127.0.0.1",
                         port=9101, secret=secret, argv=["true"], session_url="ws://x", public={"host": "127.0.0.1"},
                         return_secret=True, log_path=None, creator="anonymous", creator_hash=hash_token("cookie-1"))
    app = create_app(service=service)
    try:
        yield Client(app), Client(FastSessionGet(app, service)), session_id, secret
    finally:
        runtime.close()


@pytest.mark.parametrize("case", ["admin", "reader-not-owner", "anonymous", "secret", "wrong-secret", "bad-token",
                                  "not-bearer", "unknown-id", "creator-cookie", "other-cookie"])
def test_the_fast_path_answers_as_the_flask_route(clients: tuple[Client, Client, str, str], case: str) -> None:
    flask_client, fast_client, session_id, secret = clients
    headers: dict[str, str] = {
        "admin": {"Authorization": f"Bearer {ADMIN}"},
        "reader-not-owner": {"Authorization": f"Bearer {READER}"},
        "anonymous": {},
        "secret": {"X-Session-Secret": secret},
        "wrong-secret": {"X-Session-Secret": "x" * 32},
        "bad-token": {"Authorization": "Bearer nope"},
        "not-bearer": {"Authorization": "Basic abc"},
        "unknown-id": {"Authorization": f"Bearer {ADMIN}"},
        "creator-cookie": {},
        "other-cookie": {},
    }[case]
    cookies = {"creator-cookie": {"pvw_hpc_creator": "cookie-1"},
               "other-cookie": {"pvw_hpc_creator": "cookie-2", "other": "1"}}.get(case, {})
    for client in (flask_client, fast_client):  # the test client sends its own cookie jar as the Cookie header
        for name, value in cookies.items():
            client.set_cookie(name, value)
    path = f"/paraview/{uuid.uuid4() if case == 'unknown-id' else session_id}"
    expected = flask_client.get(path, headers=headers)
    got = fast_client.get(path, headers=headers)
    assert (got.status_code, got.get_json(), got.mimetype) == (expected.status_code, expected.get_json(),
                                                               expected.mimetype)
    assert got.status_code == {"admin": 200, "secret": 200, "creator-cookie": 200, "unknown-id": 404,
                               "reader-not-owner": 403, "bad-token": 401, "not-bearer": 401}.get(case, 401)


def test_everything_else_goes_to_flask(clients: tuple[Client, Client, str, str]) -> None:
    flask_client, fast_client, session_id, _secret = clients
    for method, path in (("GET", "/paraview"), ("GET", f"/paraview/{session_id}?x=1"), ("GET", "/paraview/not-an-id"),
                         ("DELETE", "/paraview/not-an-id"), ("GET", "/health")):
        expected = flask_client.open(path, method=method, headers={"Authorization": f"Bearer {ADMIN}"})
        got = fast_client.open(path, method=method, headers={"Authorization": f"Bearer {ADMIN}"})
        assert (got.status_code, got.get_json()) == (expected.status_code, expected.get_json()), (method, path)


def test_an_odd_cookie_of_another_site_does_not_hide_the_creator_cookie() -> None:
    from werkzeug.wrappers import Request

    from pvw_hpc.api.fast_get import _cookies

    environ = {"HTTP_COOKIE": "a=b c; x@y=1; pvw_hpc_creator=cookie-1"}
    assert _cookies(environ)["pvw_hpc_creator"] == "cookie-1"
    assert dict(_cookies(environ)) == dict(Request(environ).cookies)  # as the Flask route reads them
