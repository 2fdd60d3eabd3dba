"""Run on a namespace host: open a session's WebSocket, say hello, make two RPCs, print JSON.

The seed's layouts put the browser's WebSocket on the front-end host, so the
tests run the client there (``Hosts.run(1, [python, -m, tests.support.ws_roundtrip, URL])``)
instead of from the test process. The secret comes on stdin, not argv.
Exit 0 with ``{"hello": ..., "results": [5, {whoami}]}``; exit 1 with ``{"error": ...}``.
"""

from __future__ import annotations

import json
import sys

from tests.support.wslink_client import connect_and_call


def main() -> int:
    url, secret = sys.argv[1], sys.stdin.read().strip()
    try:
        answer = connect_and_call(url, secret, [("demo.add", [2, 3]), ("demo.whoami", [])], timeout=15)
    except Exception as exc:  # reported to the test, which prints it with the Apache log
        print(json.dumps({"error": repr(exc)}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
