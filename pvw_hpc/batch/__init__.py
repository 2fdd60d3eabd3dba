"""Scheduler adapters: one module per scheduler behind the interface in ``base``.

Adapters are registered by name and imported only when a cluster uses them, so
an optional dependency of one scheduler never breaks the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..clusters import ClusterConfig
    from .base import BatchAdapter

# (scheduler, access) -> "module:factory"
ADAPTERS: dict[tuple[str, str], str] = {
    ("slurm", "cli"): "pvw_hpc.batch.slurm:SlurmAdapter.from_cluster",
    ("slurm", "rest"): "pvw_hpc.batch.slurm_rest:SlurmRestAdapter.from_cluster",
    ("pbs", "cli"): "pvw_hpc.batch.pbs:PbsAdapter.from_cluster",
    ("htcondor", "bindings"): "pvw_hpc.batch.htcondor:HTCondorAdapter.from_cluster",
}


def make_adapter(cluster: ClusterConfig) -> BatchAdapter:
    target = ADAPTERS[(cluster.scheduler, cluster.access)]
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(cluster)  # type: ignore[operator,no-any-return]
