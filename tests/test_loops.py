"""The background-loop helper the poller, the housekeeper and the local monitor run on (real threads)."""

from __future__ import annotations

import threading
import time

from pvw_hpc.loops import BackgroundLoop


def test_steps_run_at_their_interval_wake_runs_one_at_once_and_a_bad_step_does_not_end_it() -> None:
    calls: list[float] = []
    failed = threading.Event()

    def step() -> float:
        calls.append(time.monotonic())
        if len(calls) == 2:
            failed.set()
            raise RuntimeError("one bad step")
        return 30.0  # far away: only wake() brings the next one

    loop = BackgroundLoop("test-loop", step, after_error_s=0.05)
    loop.start()
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.wake()  # -> step 2 raises; the loop goes on after 0.05 s with step 3
        assert failed.wait(5)
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 3 and calls[2] - calls[1] < 1
        time.sleep(0.2)
        assert len(calls) == 3  # then it sleeps its 30 s
    finally:
        started = time.monotonic()
        loop.stop()
        assert time.monotonic() - started < 2 and not loop.running  # stop does not wait out the interval
