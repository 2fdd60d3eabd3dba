"""Two ways for the CLI to reach the service: in this process, or a running launcher over HTTP.

Both expose the same four calls and return the same JSON, so every CLI command
works either way and a launch from the CLI takes the same path as a POST.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import requests

from .api.views import launch_body, lifetime_view, session_view
from .errors import LaunchError
from .service import Service


class LauncherClient(Protocol):
    def launch(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...
    def get(self, session_id: str) -> tuple[int, dict[str, Any]]: ...
    def list(self) -> tuple[int, dict[str, Any]]: ...
    def stop(self, session_id: str) -> tuple[int, dict[str, Any]]: ...


class LocalClient:
    """Calls the service directly; errors become the same (status, body) pairs as over HTTP."""

    def __init__(self, service: Service):
        self.service = service

    def launch(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            result = self.service.launch(payload)
        except LaunchError as exc:
            return exc.status, exc.body()
        return result.status, launch_body(result, self.service.config)

    def get(self, session_id: str) -> tuple[int, dict[str, Any]]:
        return self._call(lambda: lifetime_view(self.service.get(session_id), self.service.config))

    def list(self) -> tuple[int, dict[str, Any]]:
        return 200, {"sessions": [lifetime_view(r, self.service.config) for r in self.service.list()]}

    def stop(self, session_id: str) -> tuple[int, dict[str, Any]]:
        return self._call(lambda: session_view(self.service.stop(session_id, "stopped by pvw-hpc cancel")))

    @staticmethod
    def _call(fn: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        try:
            return 200, fn()
        except LaunchError as exc:
            return exc.status, exc.body()


class HttpClient:
    """Talks to ``pvw-hpc serve`` (or any launcher with this API) at its endpoint URL."""

    def __init__(self, url: str, timeout_s: float = 600.0, token: str | None = None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = requests.Session()  # keeps the creator cookie: an anonymous submit can follow its session
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def launch(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._send("POST", self.url + "/", json=payload)

    def get(self, session_id: str) -> tuple[int, dict[str, Any]]:
        return self._send("GET", f"{self.url}/{session_id}")

    def list(self) -> tuple[int, dict[str, Any]]:
        return self._send("GET", self.url + "/")

    def stop(self, session_id: str) -> tuple[int, dict[str, Any]]:
        return self._send("DELETE", f"{self.url}/{session_id}")

    def _send(self, method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        response = self.http.request(method, url, timeout=self.timeout_s, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        return response.status_code, body if isinstance(body, dict) else {"value": body}
