"""pvw-hpc job side: runs on the compute node inside the batch job (python3, standard library only).

It reads ``$PVW_JOB_DIR/spec.json`` written by the launcher, picks a free port on
this node (unless the app pins one), fills in host, port and secret, runs the
app with its output piped through here into the job log, and watches that
output for the ready line as bytes (wslink prints it without a newline). When
it appears it (a) writes a marker line ``PVW-HPC-READY <session> <host>:<port>``
into the job log, which the launcher's poller reads from the shared folder
when nodes cannot reach the launcher, and (b) calls back
``POST <callback_url>/<session>/ready`` with a per-session token. When the app
exits it writes the exit code to ``$PVW_JOB_DIR/exit_code``.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

MARKER = "PVW-HPC-READY"
SENTINELS = ("@@pvw-host@@", "@@pvw-port@@", "@@pvw-secret@@", "@@pvw-secret-file@@")


def node_address(mode, callback_url):
    """The address the front end should use to reach this node."""
    import urllib.parse  # imported late: every ms before the app starts delays the session
    if mode == "hostname":
        return socket.gethostname()
    if mode == "fqdn":
        return socket.getfqdn()
    if callback_url:  # the address of the interface that routes to the launcher (UDP connect sends nothing)
        host = urllib.parse.urlparse(callback_url).hostname
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))
                return probe.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port(port_range):
    """A port of ``port_range`` free on every interface of this node now (the app binds it a moment later).

    The launcher accepts routes only inside the cluster's port_range, so the port comes from it:
    tried in order from a random start (two sessions starting together rarely try the same one).
    """
    lo, hi = port_range
    span = hi - lo + 1
    start = int.from_bytes(os.urandom(4), "big") % span
    for i in range(min(span, 4096)):
        port = lo + (start + i) % span
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in %d-%d on this node" % (lo, hi))


def read_own(path, limit=1 << 20):
    """A file the launcher wrote for this job: never through a symlink, never a FIFO, bounded in size.

    The folder is the job user's; whatever else runs as that user may have replaced a file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise OSError("%s is not a regular file of at most %d bytes" % (path, limit))
        return os.read(fd, limit).decode()
    finally:
        os.close(fd)


def fill(text, values):
    for sentinel, value in zip(SENTINELS, values):
        text = text.replace(sentinel, value)
    return text


def write_atomic(path, text):
    """Replace ``path`` with ``text``: a new file (O_EXCL, no symlink followed) renamed over it."""
    tmp = "%s.%s.tmp" % (path, os.urandom(6).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def call_back(url, token, host, port):
    """Tell the launcher where we are; failures are fine, the marker line is the fallback."""
    import urllib.request  # ~30 ms to import: only once the app is up
    body = json.dumps({"host": host, "port": port}).encode()
    for attempt in range(3):
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
                return
        except Exception as exc:  # noqa: BLE001 - any failure: retry, then rely on the marker
            sys.stderr.write("pvw-hpc: callback attempt %d failed: %s\n" % (attempt + 1, exc))
            time.sleep(0.5 * (attempt + 1))


def has_client(port):
    """True when this node has an established TCP connection on ``port`` (the app's clients)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def watch_idle(proc, port, limit_s, job_dir, out, write_lock):
    """Stop the app after ``limit_s`` seconds without a client: the launcher cannot see the node's sockets."""
    last = time.monotonic()
    while proc.poll() is None:
        time.sleep(min(2.0, limit_s / 4))
        if has_client(port):
            last = time.monotonic()
        elif time.monotonic() - last > limit_s:
            reason = "idle: no client for %g s" % limit_s
            write_atomic(os.path.join(job_dir, "end_reason"), reason + "\n")
            with write_lock:
                out.write(("\npvw-hpc: %s, stopping the app\n" % reason).encode())
                out.flush()
            proc.terminate()
            return


def main():
    job_dir = os.environ["PVW_JOB_DIR"]
    spec = json.loads(read_own(os.path.join(job_dir, "spec.json")))
    secret_file = os.path.join(job_dir, "secret")
    secret = read_own(secret_file, 4096).strip()
    token = read_own(os.path.join(job_dir, "token"), 4096).strip()
    try:  # a requeued job runs again: the last run's exit code is not this run's
        os.unlink(os.path.join(job_dir, "exit_code"))
    except OSError:
        pass
    host = node_address(spec["node_address"], spec.get("callback_url"))
    try:
        port = spec.get("port") or free_port(spec.get("port_range") or (20000, 32767))
    except OSError as exc:
        sys.stdout.write("pvw-hpc: %s\n" % exc)
        sys.stdout.flush()
        write_atomic(os.path.join(job_dir, "exit_code"), "1\n")
        return 1
    values = (host, str(port), secret, secret_file)
    argv = [fill(part, values) for part in spec["argv"]]
    env = dict(os.environ)
    env.update({key: fill(value, values) for key, value in spec.get("env", {}).items()})
    out = sys.stdout.buffer
    out.write(("pvw-hpc: session %s: starting %s on %s:%d\n" % (spec["session_id"], argv[0], host, port)).encode())
    out.flush()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=spec.get("cwd") or None)
    except OSError as exc:
        out.write(("pvw-hpc: cannot start %s: %s\n" % (argv[0], exc)).encode())
        out.flush()
        write_atomic(os.path.join(job_dir, "exit_code"), "127\n")
        return 127

    # load the HTTP client while the app starts, so the callback does not wait for the import
    threading.Thread(target=__import__, args=("urllib.request",), daemon=True).start()

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)

    announced = threading.Event()
    write_lock = threading.Lock()

    def announce():
        if announced.is_set():
            return
        announced.set()
        with write_lock:
            out.write(("\n%s %s %s:%d\n" % (MARKER, spec["session_id"], host, port)).encode())
            out.flush()
        if spec.get("callback_url"):
            url = "%s/%s/ready" % (spec["callback_url"], spec["session_id"])
            threading.Thread(target=call_back, args=(url, token, host, port), daemon=True).start()
        if spec.get("idle_timeout_s"):
            threading.Thread(target=watch_idle, daemon=True,
                             args=(proc, port, spec["idle_timeout_s"], job_dir, out, write_lock)).start()

    needle = spec["ready_line"].encode() if spec.get("ready_line") else None
    if needle is None:  # no ready line: ready once the port accepts connections
        def probe():
            while proc.poll() is None and not announced.is_set():
                try:
                    with socket.create_connection((host, port), timeout=0.5):
                        announce()
                        return
                except OSError:
                    time.sleep(0.05)
        threading.Thread(target=probe, daemon=True).start()

    tail = b""
    stream = proc.stdout.fileno()
    while True:
        try:
            chunk = os.read(stream, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        with write_lock:
            out.write(chunk)
            out.flush()
        if needle is not None and not announced.is_set():
            window = tail + chunk
            if needle in window:
                announce()
            else:
                tail = window[-(len(needle) - 1):] if len(needle) > 1 else b""
    code = proc.wait()
    code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as the shell reports it
    write_atomic(os.path.join(job_dir, "exit_code"), "%d\n" % code)
    return code


if __name__ == "__main__":
    sys.exit(main())
