"""A PBS cluster's own config key: ``flavor``, the dialect its ``qstat`` and resources speak."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import Report

FLAVORS = ("pbspro", "torque")  # status dialect and resource syntax: qstat -F json + select, or text + ppn
KEYS = frozenset({"flavor"})


@dataclass(frozen=True)
class PbsSettings:
    flavor: str = "pbspro"


def check(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> PbsSettings:
    flavor = raw.get("flavor", "pbspro")
    if flavor not in FLAVORS:
        error(f"{path}.flavor", f"must be one of {', '.join(FLAVORS)}, got {flavor!r}")
        return PbsSettings()
    return PbsSettings(flavor=flavor)
