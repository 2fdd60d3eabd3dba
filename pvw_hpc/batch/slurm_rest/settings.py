"""A slurmrestd cluster's own config key: ``rest``, where slurmrestd listens and whose token it takes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base import Report

KEYS = frozenset({"rest"})
API_VERSIONS = ("v0.0.38",)  # Slurm 22.05's slurmrestd
_TOKEN_USER = re.compile(r"^[A-Za-z0-9_.+-]{1,64}\Z")


@dataclass(frozen=True)
class RestAccess:
    """slurmrestd over HTTP with a JWT (a launcher outside the cluster)."""

    url: str
    user: str
    token_file: str | None = None
    api_version: str = "v0.0.38"


def check(raw: Mapping[str, Any], path: str, error: Report, warn: Report) -> RestAccess | None:
    rest, path = raw.get("rest"), f"{path}.rest"
    if not isinstance(rest, dict):
        error(path, "access 'rest' needs {url, user, token_file}")
        return None
    url, user, token_file = rest.get("url"), rest.get("user"), rest.get("token_file")
    if not isinstance(url, str) or not re.match(r"^https?://[^\s]+\Z", url):
        error(f"{path}.url", "must be the slurmrestd base URL, e.g. http://host:6820")
        return None
    if not isinstance(user, str) or not _TOKEN_USER.match(user):
        error(f"{path}.user", "must be the user name the token belongs to")
        return None
    if token_file is not None and not isinstance(token_file, str):
        error(f"{path}.token_file", "must be a path")
        return None
    version = rest.get("api_version", "v0.0.38")
    if version not in API_VERSIONS:
        error(f"{path}.api_version", f"only {', '.join(API_VERSIONS)} (Slurm 22.05's slurmrestd) is supported")
        return None
    return RestAccess(url=url.rstrip("/"), user=user, token_file=token_file, api_version=version)
