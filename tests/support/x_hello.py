"""A tiny X client app for the display tests (standard library only): proves its X server is private and works.

It reads ``$XAUTHORITY`` (the one-entry file the launcher's job side writes), connects to
``$DISPLAY``'s abstract socket, and sends the X connection setup with that cookie; the
server's answer must be "success". It then prints the display and the ready line the tests'
app config waits for, and sleeps until it is stopped.
"""

import os
import socket
import stat
import struct
import sys
import time


def setup_reply(display: str, name: bytes, data: bytes) -> int:
    """The first byte of the X server's answer to a connection setup (1: success, 0: failed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("\0/tmp/.X11-unix/X" + display.lstrip(":").split(".")[0])
        pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
        sock.sendall(struct.pack("<cxHHHHxx", b"l", 11, 0, len(name), len(data)) + pad(name) + pad(data))
        return sock.recv(8)[0]


def cookie(path: str) -> tuple[bytes, bytes]:
    with open(path, "rb") as fh:
        raw = fh.read()
    fields, at = [], 2
    for _ in range(4):
        size = int.from_bytes(raw[at:at + 2], "big")
        fields.append(raw[at + 2:at + 2 + size])
        at += 2 + size
    return fields[2], fields[3]


def main() -> int:
    display, auth = os.environ["DISPLAY"], os.environ["XAUTHORITY"]
    mode = stat.S_IMODE(os.stat(auth).st_mode)
    name, data = cookie(auth)
    answer = setup_reply(display, name, data)
    print(f"x-hello: DISPLAY={display} auth mode {mode:o} setup reply {answer}", flush=True)
    if answer != 1 or mode != 0o600:
        return 2
    print("x-hello ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
