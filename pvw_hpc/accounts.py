"""Which accounts a launch may name as its user.

The requested user becomes ``${user}`` in command lines and, on a cluster with
``submit_prefix``, the account the job runs as (``sudo -u <user> sbatch``). A
launch token that could name ``munge`` would get a job that reads munge.key and
forges credentials for every uid on the cluster; ``slurm``, ``daemon`` or
``nobody`` are no better. So by default only ordinary login accounts qualify:
uid from ``UID_MIN`` of ``/etc/login.defs`` (1000 on Debian) up, not nobody's or
systemd's dynamic uids, not in a deny list, and, when ``auth.users.group`` is
set, members of that group. There is no upper bound unless ``max_uid`` sets one:
campus directory (LDAP, SSSD, AD) users often have uids above 200000.

A name that is no local account at all is only a label (limits, usage); it is
refused where a job would run as it.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

LOGIN_DEFS = "/etc/login.defs"
DEFAULT_DENY = frozenset({
    "root", "daemon", "bin", "sys", "sync", "nobody", "nfsnobody", "munge", "slurm", "slurmrestd", "condor",
    "pbs", "postgres", "www-data", "sshd", "messagebus", "systemd-network", "systemd-resolve",
})
USERS_KEYS = ("min_uid", "max_uid", "deny", "group")
# no upper bound by default (directory users often have uids far above login.defs' UID_MAX), but never
# nobody/nogroup's or the overflow uids, nor systemd's DynamicUser range
NOBODY_UIDS = frozenset({65534, 4294967294, 4294967295})
SYSTEMD_DYNAMIC_UIDS = (61184, 65519)


@functools.lru_cache(maxsize=1)
def login_defs_uid_range(path: str = LOGIN_DEFS) -> tuple[int, int]:
    """``UID_MIN`` and ``UID_MAX`` of login.defs (1000 and 60000 when absent or unreadable); only the first is a default."""
    found = {"UID_MIN": 1000, "UID_MAX": 60000}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                words = line.split()
                if len(words) >= 2 and words[0] in found and words[1].isdigit():
                    found[words[0]] = int(words[1])
    except OSError:
        pass
    return found["UID_MIN"], found["UID_MAX"]


@dataclass(frozen=True)
class AccountRule:
    """``auth.users``: the accounts a launch may name (see the module docstring)."""

    min_uid: int | None = None  # None: login.defs' UID_MIN
    max_uid: int | None = None  # None: no upper bound
    deny: frozenset[str] = field(default_factory=lambda: DEFAULT_DENY)
    group: str | None = None

    def refusal(self, name: str, runs_as: bool) -> str | None:
        """Why ``name`` may not be a launch's user, or None; ``runs_as``: a job will run as this account."""
        if name in self.deny or name == _own_account():
            return f"user {name!r} is a system or service account; launches may not name it"
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if runs_as or self.group:
                return f"user {name!r} is not an account on the launcher's machine"
            return None
        low = self.min_uid if self.min_uid is not None else login_defs_uid_range()[0]
        uid = entry.pw_uid
        if uid < low or (self.max_uid is not None and uid > self.max_uid):
            top = f"..{self.max_uid}" if self.max_uid is not None else " and up"
            return f"user {name!r} has uid {uid}, outside {low}{top}: a system account; launches may not name it"
        if uid in NOBODY_UIDS or SYSTEMD_DYNAMIC_UIDS[0] <= uid <= SYSTEMD_DYNAMIC_UIDS[1]:
            return f"user {name!r} has uid {uid}, a placeholder or dynamic service uid; launches may not name it"
        if self.group and not _in_group(entry, self.group):
            return f"user {name!r} is not in group {self.group!r}"
        return None


def _own_account() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def _in_group(entry: pwd.struct_passwd, group: str) -> bool:
    try:
        info = grp.getgrnam(group)
    except KeyError:
        return False
    return entry.pw_gid == info.gr_gid or entry.pw_name in info.gr_mem


def check_users_config(raw: Any, error: Any) -> AccountRule:
    """Check ``auth.users``: ``{min_uid, max_uid, deny: [names added to the built-in list], group}``."""
    path = "$.configuration.auth.users"
    if raw is None:
        return AccountRule()
    if not isinstance(raw, dict):
        error(path, f"must be an object {{{', '.join(USERS_KEYS)}}}")
        return AccountRule()
    for key in raw:
        if key not in USERS_KEYS:
            error(f"{path}.{key}", f"unknown key; known: {', '.join(USERS_KEYS)}")
    bounds: dict[str, int | None] = {}
    for key in ("min_uid", "max_uid"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            error(f"{path}.{key}", "must be a uid >= 1 (uid 0 is root)")
            value = None
        bounds[key] = value
    deny = raw.get("deny", [])
    if not isinstance(deny, list) or not all(isinstance(d, str) and d for d in deny):
        error(f"{path}.deny", "must be a list of user names (added to the built-in deny list)")
        deny = []
    group = raw.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        error(f"{path}.group", "must be a group name")
        group = None
    return AccountRule(min_uid=bounds["min_uid"], max_uid=bounds["max_uid"], deny=DEFAULT_DENY | frozenset(deny),
                       group=group)
