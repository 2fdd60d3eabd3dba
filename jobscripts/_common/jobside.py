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

A free port is only free until someone binds it: between our check and the
app's bind any outgoing connection on the node may take it (the kernel hands
out ephemeral ports from ``ip_local_port_range``). So ports are chosen outside
that range when the cluster's ``port_range`` allows, and an app that exits
before ready saying its address is in use is started again on another port, at
most ``PORT_TRIES`` times; each retry is a line in the job log and a marker
``PVW-HPC-RETRY <session> <try> <old port> <new port> <unix time>`` the poller
records (the callback carries the same list).

An app with ``"display": "xvfb"`` gets a private X server: one Xvfb per session,
started before the app and stopped after it (see :func:`start_xvfb`). The local
backend runs the same code as a wrapper (``jobside.py --xvfb -- <argv>``).
"""

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

MARKER = "PVW-HPC-READY"
RETRY_MARKER = "PVW-HPC-RETRY"
PORT_TRIES = 4  # starts of the app in all: the first and up to three on other ports
EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
IN_USE_WORDS = (b"address already in use", b"eaddrinuse", b"errno 98")  # what apps print when bind fails
# a test hook (set through the cluster's resources.environment): hold the first chosen port, as a
# connection taking it between our check and the app's bind would
OCCUPY_HOOK = "PVW_HPC_TEST_OCCUPY_FIRST_PORT"
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


def ephemeral_range(path=EPHEMERAL):
    """This node's ephemeral port range (lo, hi), or None when it cannot be read."""
    try:
        with open(path) as fh:
            lo, hi = (int(v) for v in fh.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return None


def port_order(port_range, ephemeral, avoid=()):
    """The ports of ``port_range`` to try (lazily), those outside the ephemeral range first, each part from a
    random start.

    A random start: two sessions starting together rarely try the same port. Ports inside the
    ephemeral range come last, so a range that overlaps it still works, just with more races.
    Lazy, because the app waits for this: the first free port is usually the first one tried.
    """
    lo, hi = port_range
    parts = [(lo, hi)]
    if ephemeral and lo <= ephemeral[1] and ephemeral[0] <= hi:
        inside = (max(lo, ephemeral[0]), min(hi, ephemeral[1]))
        parts = [part for part in ((lo, inside[0] - 1), (inside[1] + 1, hi)) if part[0] <= part[1]] + [inside]
    for first, last in parts:
        span = last - first + 1
        start = int.from_bytes(os.urandom(4), "big") % span
        for i in range(span):
            port = first + (start + i) % span
            if port not in avoid:
                yield port


def free_port(port_range, ephemeral=None, avoid=()):
    """A port of ``port_range`` free on every interface of this node now (the app binds it a moment later).

    The launcher accepts routes only inside the cluster's port_range, so the port comes from it.
    """
    for tried, port in enumerate(port_order(port_range, ephemeral, avoid)):
        if tried == 4096:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in %d-%d on this node" % tuple(port_range))


def said_in_use(output):
    """True when the app's output says its listening address was taken."""
    lowered = output.lower()
    return any(word in lowered for word in IN_USE_WORDS)


def occupy(port):
    """The test hook: a listening socket on ``port``, held until the job ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", port))
    sock.listen(1)
    return sock


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


def call_back(url, token, host, port, retries=()):
    """Tell the launcher where we are; failures are fine, the marker line is the fallback."""
    import urllib.request  # ~30 ms to import: only once the app is up
    body = {"host": host, "port": port}
    if retries:
        body["port_retries"] = list(retries)
    body = json.dumps(body).encode()
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


XVFB_SCREEN = "1280x1024x24"
XVFB_START_S = 20.0


def xauthority(path):
    """A 0600 Xauthority file with one MIT-MAGIC-COOKIE-1 for any display (family FamilyWild, no number)."""
    def field(data):
        return len(data).to_bytes(2, "big") + data
    record = (0xFFFF).to_bytes(2, "big") + field(b"") + field(b"") + field(b"MIT-MAGIC-COOKIE-1") + field(os.urandom(16))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(record)


def start_xvfb(folder):
    """A private Xvfb for one session: (process, DISPLAY, XAUTHORITY); raises OSError when it does not start.

    ``-noreset``: by default Xvfb resets when its last client disconnects and kills a client
    that is still connecting at that moment; ParaView opens the display, closes it and opens it
    again at once while it checks its rendering capabilities, and aborted with "bad X server
    connection" whenever the reset won that race (more often the busier the machine).
    ``-displayfd``: Xvfb picks a free display and writes its number, then a newline, once it
    accepts clients; no probe connection is made (a probe's disconnect would itself be the last).
    ``-auth``: only holders of this session's cookie may connect; ``-nolisten tcp``: no network.
    """
    auth = os.path.join(folder, "Xauthority")
    try:  # a requeued job starts again in the same folder
        os.unlink(auth)
    except FileNotFoundError:
        pass
    xauthority(auth)
    errors = open(os.path.join(folder, "xvfb.log"), "wb")
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", XVFB_SCREEN, "-nolisten", "tcp",
                                 "-noreset", "-auth", auth], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                pass_fds=(write_end,))
    finally:
        os.close(write_end)
        errors.close()
    number, deadline = b"", time.monotonic() + XVFB_START_S
    try:
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                proc.kill()
                raise OSError("Xvfb did not start within %g s" % XVFB_START_S)
            chunk = os.read(read_end, 16)
            if not chunk:
                code = proc.wait()
                with open(os.path.join(folder, "xvfb.log"), "rb") as fh:
                    said = fh.read()[-500:].decode("utf-8", "replace").strip()
                raise OSError("Xvfb exited with %s before it was ready: %s" % (code, said or "no output"))
            number += chunk
    finally:
        os.close(read_end)
    return proc, ":%d" % int(number), auth


def stop_xvfb(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def with_xvfb(argv):
    """The local backend's wrapper: run ``argv`` with a private Xvfb, stop it after; exit with the app's code."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="pvw-xvfb-")
    try:
        try:
            xvfb, display, auth = start_xvfb(folder)
        except OSError as exc:
            sys.stderr.write("pvw-hpc: %s\n" % exc)
            return 1
        sys.stderr.write("pvw-hpc: private X server %s for this session\n" % display)
        sys.stderr.flush()
        try:
            app = subprocess.Popen(argv, env={**os.environ, "DISPLAY": display, "XAUTHORITY": auth})
        except OSError as exc:
            stop_xvfb(xvfb)
            sys.stderr.write("pvw-hpc: cannot start %s: %s\n" % (argv[0], exc))
            return 127

        def forward(signum, _frame):
            if app.poll() is None:
                app.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        code = app.wait()
        stop_xvfb(xvfb)
        return 128 - code if code < 0 else code
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_line(out, write_lock, text):
    with write_lock:
        out.write(("pvw-hpc: %s\n" % text).encode())
        out.flush()


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
    out, write_lock = sys.stdout.buffer, threading.Lock()
    host = node_address(spec["node_address"], spec.get("callback_url"))
    port_range = spec.get("port_range") or (20000, 32767)
    ephemeral = None if spec.get("port") else ephemeral_range()
    if ephemeral and port_range[0] <= ephemeral[1] and ephemeral[0] <= port_range[1]:
        log_line(out, write_lock, "warning: the cluster's port_range %d-%d overlaps this node's ephemeral ports "
                 "%d-%d (%s): outgoing connections may take a chosen port first" % (tuple(port_range) + ephemeral
                                                                                  + (EPHEMERAL,)))
    held = []  # the test hook's sockets, kept open until the job ends
    tried, retries = [], []
    xvfb = None
    if spec.get("display") == "xvfb":
        try:
            xvfb, display, auth = start_xvfb(job_dir)
        except OSError as exc:
            log_line(out, write_lock, str(exc))
            write_atomic(os.path.join(job_dir, "exit_code"), "1\n")
            return 1
        log_line(out, write_lock, "private X server %s for this session" % display)
        spec["env"] = {**spec.get("env", {}), "DISPLAY": display, "XAUTHORITY": auth}
    try:
        return run_tries(spec, job_dir, host, port_range, ephemeral, secret, secret_file, token, out, write_lock,
                         held, tried, retries)
    finally:
        if xvfb is not None:
            stop_xvfb(xvfb)


def run_tries(spec, job_dir, host, port_range, ephemeral, secret, secret_file, token, out, write_lock, held, tried,
              retries):
    """Start the app, again on another port when its port was taken first; write and return its exit code."""
    for attempt in range(1, PORT_TRIES + 1):
        try:
            port = spec.get("port") or free_port(port_range, ephemeral, avoid=tried)
        except OSError as exc:
            log_line(out, write_lock, str(exc))
            write_atomic(os.path.join(job_dir, "exit_code"), "1\n")
            return 1
        if tried:
            log_line(out, write_lock, "\nport %d was taken before the app could bind it (address already in use): "
                     "starting it again on port %d (try %d of %d)" % (tried[-1], port, attempt, PORT_TRIES))
            now = time.time()
            retries.append({"try": attempt, "port": tried[-1], "next_port": port, "at": now})
            with write_lock:
                out.write(("%s %s %d %d %d %.3f\n" % (RETRY_MARKER, spec["session_id"], attempt, tried[-1], port,
                                                       now)).encode())
                out.flush()
        tried.append(port)
        if attempt == 1 and os.environ.get(OCCUPY_HOOK):
            held.append(occupy(port))
        code, ready, in_use = run_app(spec, job_dir, host, port, secret, secret_file, token, out, write_lock,
                                      retries)
        if code is None:  # it could not be started at all
            write_atomic(os.path.join(job_dir, "exit_code"), "127\n")
            return 127
        if ready or not in_use or spec.get("port") or attempt == PORT_TRIES:
            break
    code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as the shell reports it
    write_atomic(os.path.join(job_dir, "exit_code"), "%d\n" % code)
    return code


def run_app(spec, job_dir, host, port, secret, secret_file, token, out, write_lock, retries):
    """Run the app once on ``port``: (exit code or None if it did not start, was it ready, did it say in use)."""
    values = (host, str(port), secret, secret_file)
    argv = [fill(part, values) for part in spec["argv"]]
    env = dict(os.environ)
    env.pop(OCCUPY_HOOK, None)
    env.update({key: fill(value, values) for key, value in spec.get("env", {}).items()})
    log_line(out, write_lock, "session %s: starting %s on %s:%d" % (spec["session_id"], argv[0], host, port))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=spec.get("cwd") or None)
    except OSError as exc:
        log_line(out, write_lock, "cannot start %s: %s" % (argv[0], exc))
        return None, False, False

    # load the HTTP client while the app starts, so the callback does not wait for the import
    threading.Thread(target=__import__, args=("urllib.request",), daemon=True).start()

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)

    announced = threading.Event()

    def announce():
        if announced.is_set():
            return
        announced.set()
        with write_lock:
            out.write(("\n%s %s %s:%d\n" % (MARKER, spec["session_id"], host, port)).encode())
            out.flush()
        if spec.get("callback_url"):
            url = "%s/%s/ready" % (spec["callback_url"], spec["session_id"])
            threading.Thread(target=call_back, args=(url, token, host, port, retries), daemon=True).start()
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
    early = b""  # what the app printed before it was ready (bounded): does it say its port was taken?
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
        if not announced.is_set():
            early = (early + chunk)[-65536:]
        if needle is not None and not announced.is_set():
            window = tail + chunk
            if needle in window:
                announce()
            else:
                tail = window[-(len(needle) - 1):] if len(needle) > 1 else b""
    code = proc.wait()
    ready = announced.is_set()
    return code, ready, not ready and said_in_use(early)


if __name__ == "__main__":
    if sys.argv[1:3] == ["--xvfb", "--"] and len(sys.argv) > 3:
        sys.exit(with_xvfb(sys.argv[3:]))
    sys.exit(main())
