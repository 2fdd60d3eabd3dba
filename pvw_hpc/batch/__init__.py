"""Scheduler adapters: one folder per way of reaching a scheduler, behind the interface in ``base``.

Each folder holds its adapter (``adapter.py``) and, when it has config keys of its own, their
check (``settings.py``); its job-script template is ``jobscripts/<template>``. This registry is
the one list of them: the cluster checks read the schedulers and access modes from it, and
``make_adapter`` builds a cluster's adapter. An adapter imports an optional library (the
HTCondor bindings, pyslurm) only when it is first used, so importing them all here is free
and a missing extra breaks only the clusters that need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BatchAdapter
from .htcondor.adapter import HTCondorAdapter
from .pbs.adapter import PbsAdapter
from .slurm.adapter import SlurmAdapter
from .slurm_pyslurm.adapter import SlurmPyslurmAdapter
from .slurm_rest.adapter import SlurmRestAdapter

if TYPE_CHECKING:
    from ..clusters import ClusterConfig

# one line per adapter; a scheduler's first entry is its default access
ADAPTERS: tuple[type[BatchAdapter], ...] = (
    SlurmAdapter,
    SlurmRestAdapter,
    SlurmPyslurmAdapter,
    PbsAdapter,
    HTCondorAdapter,
)


def access_modes() -> dict[str, tuple[str, ...]]:
    """Scheduler name -> its access modes, the default first."""
    modes: dict[str, tuple[str, ...]] = {}
    for cls in ADAPTERS:
        modes[cls.scheduler] = (*modes.get(cls.scheduler, ()), cls.access)
    return modes


def adapter_class(scheduler: str, access: str) -> type[BatchAdapter]:
    """The registered adapter; KeyError for a pair the cluster checks would have refused."""
    for cls in ADAPTERS:
        if (cls.scheduler, cls.access) == (scheduler, access):
            return cls
    raise KeyError((scheduler, access))


def make_adapter(cluster: ClusterConfig) -> BatchAdapter:
    return adapter_class(cluster.scheduler, cluster.access).from_cluster(cluster)
