"""One user-name rule, cluster names, and every registered adapter against the interface.

Fast and scheduler-free: the names are checked where each layer reads them (auth, the
OpenAPI document, run-as-user), and the adapters' method signatures against
``BatchAdapter`` (a mismatch there was a live bug: ``SlurmRestAdapter.cancel`` lacked
``user`` and stopping a session raised ``TypeError`` after its row was ended).
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from pvw_hpc.api.openapi import USER_PATTERN
from pvw_hpc.auth import USER_RE
from pvw_hpc.backends import Backend, ClusterSessions, LocalSessions
from pvw_hpc.batch import ADAPTERS
from pvw_hpc.batch.base import BatchAdapter, is_valid_user
from pvw_hpc.clusters import check_clusters

INTERFACE = ("submit", "poll", "history", "find_named", "cancel")
# the document's ECMA-262 pattern read the way a JSON-schema validator reads it ('$' is the very end)
OPENAPI_USER = re.compile(USER_PATTERN.replace("$", r"\Z"))


def _adapter_class(target: str) -> type:
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split(".")[:-1]:  # "SlurmAdapter.from_cluster" -> the class
        obj = getattr(obj, part)
    assert isinstance(obj, type)
    return obj


@pytest.mark.parametrize("key", sorted(ADAPTERS))
def test_every_registered_adapter_has_the_interfaces_methods_and_signatures(key: tuple[str, str]) -> None:
    cls = _adapter_class(ADAPTERS[key])
    assert isinstance(getattr(cls, "name", None), str)
    for method in INTERFACE:
        expected = inspect.signature(getattr(BatchAdapter, method))
        actual = inspect.signature(getattr(cls, method))
        assert [(p.name, p.kind, p.default) for p in actual.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in expected.parameters.values()], f"{cls.__name__}.{method}"


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
