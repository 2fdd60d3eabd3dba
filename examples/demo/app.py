"""Minimal wslink demo application launched by pvw-hpc (and by its tests).

It is deliberately a *real* wslink server rather than a stub: the launcher,
the Apache RewriteMap proxy and the WebSocket client are only proven to work
if the thing behind them speaks the genuine wslink 2.x protocol, prints the
genuine ready line (``wslink: Starting factory``, written by wslink itself,
without a newline) and checks the genuine ``wslink.hello`` secret.

Usage::

    python examples/demo/app.py --host 127.0.0.1 --port 9123 --authKey SECRET
    python examples/demo/app.py --port 9123 --authKeyFile /path/to/secret

All flags except ``--authKeyFile`` are wslink's own (see
``wslink.server.add_arguments``). ``--authKeyFile`` mirrors trame: reading the
secret from a file keeps it off the command line, where ``ps`` and batch job
scripts would expose it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from wslink import register
from wslink import server as wslink_server
from wslink.websocket import LinkProtocol, ServerProtocol


class DemoRpc(LinkProtocol):
    """The RPC methods a client (or a test) can call to prove it reached us."""

    def __init__(self, host: str) -> None:
        """Remember the bind host so ``demo.whoami`` can report it."""
        super().__init__()
        self._host = host

    @register("demo.add")
    def add(self, a: Any, b: Any) -> Any:
        """Return ``a + b``: the simplest round trip that checks arguments arrive."""
        return a + b

    @register("demo.whoami")
    def whoami(self) -> dict[str, Any]:
        """Identify this backend, so a caller behind a proxy can tell which one answered.

        The port is asked from wslink at call time because ``--port 0`` lets
        the OS choose it and only the running server knows the real value.
        """
        return {
            "host": self._host,
            "port": wslink_server.get_port(),
            "pid": os.getpid(),
        }

    @register("demo.echo")
    def echo(self, text: Any) -> Any:
        """Return ``text`` unchanged (useful for payload-size and encoding checks)."""
        return text


class DemoServer(ServerProtocol):
    """wslink server protocol wiring the demo RPCs and the secret together.

    wslink instantiates the protocol class itself (``protocol()``), so the
    parsed options are handed over through class attributes set by
    :meth:`configure` before the server starts.
    """

    secret_value: str = "wslink-secret"
    host: str = "localhost"

    @classmethod
    def configure(cls, secret: str, host: str) -> None:
        """Store the options that :meth:`initialize` needs (see class docstring)."""
        cls.secret_value = secret
        cls.host = host

    def initialize(self) -> None:
        """Register the RPCs and set the secret checked by ``wslink.hello``."""
        self.registerLinkProtocol(DemoRpc(self.host))
        self.updateSecret(self.secret_value)


def read_secret_file(path: str) -> str:
    """Read a secret from ``path``, dropping the trailing newline editors add."""
    secret = Path(path).read_text(encoding="utf-8").strip()
    if not secret:
        msg = f"secret file {path!r} is empty"
        raise ValueError(msg)
    return secret


def main(argv: list[str] | None = None) -> None:
    """Parse wslink's standard flags (plus ``--authKeyFile``) and serve until idle/killed."""
    parser = argparse.ArgumentParser(description="pvw-hpc wslink demo app")
    wslink_server.add_arguments(parser)
    parser.add_argument(
        "--authKeyFile",
        default=None,
        help="read the secret from this file; overrides --authKey and keeps it off argv",
    )
    args = parser.parse_args(argv)
    secret = read_secret_file(args.authKeyFile) if args.authKeyFile else args.authKey
    DemoServer.configure(secret=secret, host=args.host)
    wslink_server.start_webserver(options=args, protocol=DemoServer)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as exc:
        # A clear one-line reason in the session log beats a traceback for operators.
        print(f"demo app: {exc}", file=sys.stderr)
        sys.exit(1)
