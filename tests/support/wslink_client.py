"""A small, real, synchronous wslink 2.x WebSocket client for tests.

Why not mock: the point of pvw-hpc's integration tests is to show that a
browser-equivalent client can reach a launched app through the front end.
This client speaks the same wire format as wslink's JS client:

* every message is a **binary** frame;
* its payload is ``msgpack({"wslink": "1.0", "id", "method", "args", "kwargs"})``;
* prefixed by the 12-byte little-endian chunk header (``uint32 id``,
  ``uint32 offset``, ``uint32 total``) -- produced and parsed with
  ``wslink.chunking`` so the format cannot drift from the server's.

The handshake is ``wslink.hello`` with id ``system:c0:0`` and the secret;
RPC ids are ``rpc:<clientID>:<n>``. Messages whose id we are not waiting for
(publish/notification traffic) are ignored.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgpack
from websockets.sync.client import ClientConnection, connect
from wslink.chunking import StreamUnChunker, generate_chunks

HELLO_ID = "system:c0:0"

# Client-side chunk size. Before authentication the server refuses messages
# larger than 512 bytes in total (WSLINK_AUTH_MSG_SIZE), whatever the chunking;
# after hello it advertises its own maxMsgSize. 0 would mean "one chunk".
_CHUNK_SIZE = 4 * 1024 * 1024


def _connect(url: str, timeout: float) -> contextlib.AbstractContextManager[Any]:
    """Return websockets' sync ``connect`` as a context manager.

    websockets 17 deprecates using ``connect()``'s return value directly and
    asks for ``with connect(...)``; ``legacy=False`` opts into that future
    behaviour. Older versions lack the flag but their connection object is a
    context manager too.
    """
    kwargs: dict[str, Any] = {
        "open_timeout": timeout,
        "close_timeout": timeout,
        "max_size": None,
    }
    try:
        return connect(url, legacy=False, **kwargs)
    except TypeError:
        return connect(url, **kwargs)


class WslinkError(RuntimeError):
    """Raised when the server answers with an error (failed hello or RPC).

    ``code``/``message``/``data`` mirror the wslink error object so tests can
    assert on them (e.g. ``code == -32000`` for "Authentication failed").
    """

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        """Build a readable message from wslink's ``{"code", "message", "data"}``."""
        self.method = method
        self.code: int | None = error.get("code")
        self.message: str = str(error.get("message", ""))
        self.data: Any = error.get("data")
        super().__init__(f"{method} failed: [{self.code}] {self.message}")


class WslinkClient:
    """One authenticated wslink session over a synchronous WebSocket.

    Kept separate from :func:`connect_and_call` so tests that need several
    round trips on one connection (or a long-lived one) can use it directly.
    """

    def __init__(
        self,
        ws: ClientConnection,
        timeout: float,
        closer: contextlib.ExitStack | None = None,
    ) -> None:
        """Wrap an open connection; use :meth:`open` to also authenticate.

        ``closer`` owns the connection's context manager when we opened it.
        """
        self._ws = ws
        self._closer = closer
        self._timeout = timeout
        self._unchunker = StreamUnChunker()
        self._next = 0
        self.client_id: str | None = None
        self.hello_result: dict[str, Any] | None = None

    @classmethod
    def open(cls, url: str, secret: str, timeout: float = 10) -> WslinkClient:
        """Connect to ``url`` and authenticate with ``secret``.

        Raises :class:`WslinkError` when the hello is refused, and lets
        ``websockets`` errors (e.g. ``InvalidStatus`` carrying the HTTP status
        of a rejected upgrade) propagate so tests can assert on them.
        """
        stack = contextlib.ExitStack()
        try:
            ws = stack.enter_context(_connect(url, timeout))
            client = cls(ws, timeout, stack)
            client.hello(secret)
        except BaseException:
            stack.close()
            raise
        return client

    def hello(self, secret: str) -> dict[str, Any]:
        """Perform ``wslink.hello``; remembers the server-assigned clientID."""
        result = self._request(HELLO_ID, "wslink.hello", [{"secret": secret}])
        if not isinstance(result, dict) or "clientID" not in result:
            msg = f"unexpected wslink.hello result: {result!r}"
            raise WslinkError("wslink.hello", {"message": msg})
        self.client_id = result["clientID"]
        self.hello_result = result
        return result

    def call(
        self,
        method: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Call one RPC and return its result (raises :class:`WslinkError` on error)."""
        if self.client_id is None:
            msg = "call() before a successful hello()"
            raise RuntimeError(msg)
        self._next += 1
        rpc_id = f"rpc:{self.client_id}:{self._next}"
        return self._request(rpc_id, method, list(args or []), dict(kwargs or {}))

    def close(self) -> None:
        """Close the WebSocket (idempotent)."""
        if self._closer is not None:
            self._closer.close()
        else:
            self._ws.close()

    def __enter__(self) -> WslinkClient:
        """Context-manager support so tests never leak sockets."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Close on leaving the ``with`` block."""
        self.close()

    # -- internals --------------------------------------------------------

    def _request(
        self,
        rpc_id: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request and wait for the reply carrying the same id."""
        payload = msgpack.packb(
            {
                "wslink": "1.0",
                "id": rpc_id,
                "method": method,
                "args": args,
                "kwargs": kwargs or {},
            }
        )
        for chunk in generate_chunks(payload, _CHUNK_SIZE):
            self._ws.send(chunk)
        deadline = time.monotonic() + self._timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                msg = f"no reply to {method} ({rpc_id}) within {self._timeout} s"
                raise TimeoutError(msg)
            frame = self._ws.recv(timeout=remaining)
            if isinstance(frame, str):
                # wslink 2.x never sends text frames; ignore rather than crash.
                continue
            message = self._unchunker.process_chunk(frame)
            if message is None or message.get("id") != rpc_id:
                continue  # partial message, or someone else's traffic
            if "error" in message:
                raise WslinkError(method, message["error"] or {})
            return message.get("result")


def connect_and_call(
    url: str,
    secret: str,
    calls: list[tuple[str, list[Any]]],
    timeout: float = 10,
) -> dict[str, Any]:
    """Connect, authenticate, run ``calls`` in order, and close.

    Returns ``{"hello": <hello result>, "results": [<result per call>]}``.
    Raises :class:`WslinkError` for a refused hello (``code == -32000``,
    "Authentication failed") or a failing RPC.
    """
    with WslinkClient.open(url, secret, timeout=timeout) as client:
        results = [client.call(method, args) for method, args in calls]
        return {"hello": client.hello_result, "results": results}
