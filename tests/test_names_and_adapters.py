"""One user-name rule, cluster names, and every registered adapter against the interface.

Fast and scheduler-free: the names are checked where each layer reads them (auth, the
OpenAPI document, run-as-user), and the adapters' method signatures against
``BatchAdapter`` (a mismatch there was a live bug: ``SlurmRestAdapter.cancel`` lacked
``user`` and stopping a session raised ``TypeError`` after its row was ended).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from pvw_hpc.api.openapi import USER_PATTERN
from pvw_hpc.auth import USER_RE
from pvw_hpc.backends import Backend, ClusterSessions, LocalSessions
from pvw_hpc.batch import ADAPTERS, adapter_class
from pvw_hpc.batch.base import BatchAdapter, is_valid_user
from pvw_hpc.clusters import CLUSTER_KEYS, check_clusters

INTERFACE = ("submit", "poll", "history", "find_named", "cancel", "close", "from_cluster", "check_settings",
             "check_clusters")
TRAITS = {"name": str, "scheduler": str, "access": str, "template": str, "submits_description": bool,
          "takes_submit_prefix": bool, "takes_job_user": bool, "takes_commands": bool, "settings_keys": frozenset}
# the document's ECMA-262 pattern read the way a JSON-schema validator reads it ('$' is the very end)
OPENAPI_USER = re.compile(USER_PATTERN.replace("$", r"\Z"))
JOBSCRIPTS = Path(__file__).resolve().parents[1] / "jobscripts"


def _shape(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.scheduler}-{c.access}")
def test_every_registered_adapter_has_the_interfaces_methods_and_signatures(cls: type) -> None:
    for method in INTERFACE:
        assert _shape(getattr(cls, method)) == _shape(getattr(BatchAdapter, method)), f"{cls.__name__}.{method}"
    for trait, kind in TRAITS.items():
        assert isinstance(getattr(cls, trait, None), kind), f"{cls.__name__}.{trait} must be a {kind.__name__}"
    assert (JOBSCRIPTS / cls.template).is_file(), f"{cls.__name__}.template names no file in jobscripts/"
    assert not cls.settings_keys & CLUSTER_KEYS, "an adapter's own keys must not shadow the generic ones"


def test_each_scheduler_and_access_pair_is_registered_once() -> None:
    pairs = [(c.scheduler, c.access) for c in ADAPTERS]
    assert len(pairs) == len(set(pairs)) and all(adapter_class(*pair) for pair in pairs)


def test_commands_on_a_cluster_that_runs_none_is_a_warning() -> None:
    warnings: list[str] = []
    raw = {"hpc": {"scheduler": "htcondor", "job_dir": "/srv/jobs", "commands": {"sbatch": "/opt/sbatch"}},
           "cli": {"scheduler": "slurm", "job_dir": "/srv/j2", "commands": {"sbatch": "/opt/sbatch"}}}
    clusters = check_clusters(raw, lambda *_: None, lambda path, message: warnings.append(f"{path}: {message}"))
    assert sorted(clusters) == ["cli", "hpc"]
    assert warnings == ["$.clusters.hpc.commands: ignored: htcondor with access 'bindings' runs no commands"]


def test_a_key_of_another_scheduler_is_an_error_not_ignored() -> None:
    errors: list[str] = []
    clusters = check_clusters({"hpc": {"scheduler": "slurm", "job_dir": "/srv/jobs", "flavor": "torque"}},
                              lambda path, message: errors.append(f"{path}: {message}"), lambda *_: None)
    assert clusters == {} and errors == ["$.clusters.hpc.flavor: only for pbs (cli) clusters, not slurm (cli)"]


@pytest.mark.parametrize("name", ["alice", "alice.smith", "build-bot_2", "_svc", "a" * 32])
def test_one_user_name_rule_everywhere(name: str) -> None:
    assert USER_RE.match(name) and OPENAPI_USER.match(name) and is_valid_user(name)


@pytest.mark.parametrize("name", ["Alice", ".x", "-u", "#0", "a b", "a/b", "a" * 33, "alice\n"])
def test_a_name_refused_by_one_layer_is_refused_by_all(name: str) -> None:
    assert not USER_RE.match(name) and not OPENAPI_USER.match(name) and not is_valid_user(name)


@pytest.mark.parametrize("name", ["local", "a b", "-x", ".hidden", "x" * 65, "ü"])
def test_bad_and_reserved_cluster_names_are_config_errors(name: str) -> None:
    errors: list[str] = []
    clusters = check_clusters({name: {"scheduler": "slurm", "job_dir": "/srv/jobs"}},
                              lambda path, message: errors.append(f"{path}: {message}"), lambda *_: None)
    assert clusters == {} and errors and "cannot name a cluster" in errors[0]


def test_ordinary_cluster_names_are_accepted() -> None:
    errors: list[str] = []
    names = ["hpc", "slurm-2", "site.a", "Cluster_1"]
    clusters = check_clusters({n: {"scheduler": "slurm", "job_dir": "/srv/jobs"} for n in names},
                              lambda path, message: errors.append(path), lambda *_: None)
    assert not errors and sorted(clusters) == sorted(names)


@pytest.mark.parametrize("cls", [LocalSessions, ClusterSessions])
def test_every_backend_has_the_interfaces_methods_and_signatures(cls: type) -> None:
    """The service holds backends, never asks which kind: both must answer the whole protocol alike."""
    assert hasattr(cls, "sees_clients")
    for method in ("launch", "stop", "recover", "start", "close"):
        expected = inspect.signature(getattr(Backend, method))
        actual = inspect.signature(getattr(cls, method))
        assert [(p.name, p.kind) for p in actual.parameters.values()] == \
               [(p.name, p.kind) for p in expected.parameters.values()], f"{cls.__name__}.{method}"
