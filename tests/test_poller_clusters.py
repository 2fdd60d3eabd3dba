"""One poller for several clusters of different schedulers: one batched query per cluster per cycle.

An in-process :class:`Service` holds a SLURM, a PBS and an HTCondor cluster at
once and launches real held jobs on each (they never run, so they stay queued
and cost no CPU). The adapters are the real ones; each one's ``poll`` is
wrapped only to count its calls and the ids it was asked about.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc.config import load_dict
from pvw_hpc.poller import Poller
from pvw_hpc.runtime import Runtime
from pvw_hpc.service import Service
from tests.support.schedulers import BACKENDS, available

pytestmark = [pytest.mark.batch]


@pytest.fixture
def service() -> Iterator[Service]:
    backends = [b for b in available() if b.name in ("slurm", "pbs", "htcondor")]
    if len(backends) < 2:
        pytest.skip("needs at least two of the schedulers up")
    root = Path(tempfile.mkdtemp(prefix="pvw-test-poller-", dir="/tmp"))
    root.chmod(0o755)
    raw: dict[str, Any] = {
        "configuration": {"host": "127.0.0.1", "port": 0, "endpoint": "paraview", "proxy_file": str(root / "proxy.txt"),
                          "sessionURL": "ws://x/proxy?sessionId=${id}", "log_dir": str(root / "logs"), "timeout": 5},
        "resources": [],
        "clusters": {b.name: {**b.cluster, "job_dir": str(root / "jobs" / b.name)} for b in backends},
        "apps": {f"held-{b.name}": b.apps()["held"] for b in backends},
    }
    runtime = Runtime(load_dict(raw, source="tests/test_poller_clusters.py"))  # threads not started: cycles by hand
    svc = runtime.service
    svc.config.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield svc
    finally:
        for record in svc.store.active():
            svc.stop(record.id)
        runtime.close()


def test_one_batched_poll_per_cluster_per_cycle(service: Service) -> None:
    calls: Counter[str] = Counter()
    asked: dict[str, list[set[str]]] = {name: [] for name in service.adapters}
    for name, adapter in service.adapters.items():
        real_poll = adapter.poll

        def counting_poll(job_ids: Any, _name: str = name, _real: Any = real_poll) -> Any:
            calls[_name] += 1
            asked[_name].append(set(job_ids))
            return _real(job_ids)

        adapter.poll = counting_poll  # type: ignore[method-assign]
    for name in service.adapters:
        for _ in range(2):  # two sessions per cluster
            result = service.launch({"application": f"held-{name}"}, wait=False)
            assert result.status == 202, result.record
    expected = {name: {r.job_id for r in service.store.active(backend=name) if r.job_id} for name in service.adapters}
    assert all(len(ids) == 2 for ids in expected.values()), expected
    calls.clear()
    for batches in asked.values():
        batches.clear()
    Poller(service).tick()
    assert calls == Counter({name: 1 for name in service.adapters})  # one call per cluster per cycle
    assert asked == {name: [ids] for name, ids in expected.items()}  # each with all of its jobs at once
    assert set(BACKENDS) >= set(service.adapters)
