"""An HTCondor cluster's own config keys: which pool configuration and which schedd."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...validate import CONTROL_CHARS_RE
from ..base import Report

KEYS = frozenset({"condor_config", "schedd"})


@dataclass(frozen=True)
class HTCondorSettings:
    condor_config: str | None = None  # the client's CONDOR_CONFIG (else the environment's)
    schedd: str | None = None  # the schedd's name (else the local one)


def check(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> HTCondorSettings:
    values: dict[str, str | None] = {}
    for key, what, ok in (("condor_config", "absolute config file path", lambda v: v.startswith("/")),
                          ("schedd", "schedd name", lambda v: True)):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value or CONTROL_CHARS_RE.search(value)
                                  or not ok(value)):
            error(f"{path}.{key}", f"must be the HTCondor pool's {what}")
            value = None
        values[key] = value
    return HTCondorSettings(**values)


def check_clusters(clusters: Sequence[Any], error: Report) -> None:
    """CONDOR_CONFIG is one per process: two pools would read each other's configuration."""
    if len({c.settings.condor_config for c in clusters}) > 1:
        error("$.clusters", "all HTCondor clusters must use the same condor_config (the bindings read one per process)")
