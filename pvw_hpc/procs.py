"""Linux process facts the local backend needs to survive its own restarts.

A restarted launcher finds its old sessions' processes by pid. A pid alone can
be reused by an unrelated process, so each session also records the process's
start time (``/proc/<pid>/stat`` field 22, clock ticks since boot); a pid is
"ours" only when both match.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def is_alive(pid: int, expected_start: int | None) -> bool:
    """True when ``pid`` runs, is not a zombie, and (if given) started at ``expected_start``."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return expected_start is None or int(fields[19]) == expected_start


def terminate_group(pid: int, expected_start: int | None, grace_s: float = 5.0) -> None:
    """SIGTERM the session's process group, SIGKILL whatever is left after ``grace_s``.

    Each session runs in its own process group (``start_new_session``), so a
    wrapper script and the app it starts (the seed's ssh form) stop together.
    """
    if not is_alive(pid, expected_start):
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_alive(pid, expected_start):
            break
        time.sleep(0.02)
    _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def pids_with_env(name: str, values: str | Collection[str]) -> list[int]:
    """Pids whose environment holds ``name=<one of values>``, in one scan of /proc.

    How a process we lost track of is found again (its session id travels in its environment).
    """
    wanted = {f"{name}={v}".encode() for v in ([values] if isinstance(values, str) else values)}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                if not wanted.isdisjoint(fh.read().split(b"\0")):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found
