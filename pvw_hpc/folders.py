"""The launcher's own folders: only root or the launcher's user may be able to change them.

pvw-hpc (often as root) creates and appends files in ``log_dir`` (its log,
the local sessions' logs, by default the database), in the map file's folder
and under every cluster's ``job_dir``. If another local user owns one of those
folders, or may write to it or to a folder above it, they can plant a symlink
where the launcher is about to create a file (root then writes where they
choose), swap a job folder, or own the database and the map outright.

So ``serve`` refuses to start, and ``pvw-hpc check`` reports an error, when such a
folder or any folder above it

* is owned by anyone but root or the launcher's user, or
* is writable by group or others, except an ancestor with the sticky bit
  (``/tmp``: others cannot rename or remove what is ours in it).

Missing folders are created one level at a time and checked again afterwards,
so a folder someone else made first is refused, not adopted.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from .accounts import login_defs_uid_range
from .config import LauncherConfig


class FolderError(Exception):
    """A folder the launcher writes in is not safe; the message names the path and the fix."""


@dataclass(frozen=True)
class Folder:
    path: Path
    what: str  # the config key it comes from, for the message
    mode: int = 0o755  # when the launcher creates it


def launcher_folders(config: LauncherConfig) -> list[Folder]:
    """Every folder the launcher creates files in, with the config key each comes from."""
    folders = [Folder(config.log_dir, "configuration.log_dir"),
               Folder(config.proxy_file.parent, "the folder of configuration.proxy_file")]
    database = database_file(config.database_url)
    if database is not None:
        folders.append(Folder(database.parent, "the folder of the database"))
    if config.auth.token_file is not None:  # whoever may change it may give themselves an admin token
        folders.append(Folder(config.auth.token_file.parent, "the folder of configuration.auth.token_file"))
    for name, cluster in config.clusters.items():
        folders.append(Folder(cluster.job_dir, f"clusters.{name}.job_dir"))
    unique: dict[Path, Folder] = {}
    for folder in folders:
        unique.setdefault(Path(os.path.abspath(folder.path)), folder)
    return [Folder(path, f.what, f.mode) for path, f in unique.items()]


def database_file(url: str) -> Path | None:
    """The SQLite file of a database URL (None for a server database or memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(os.path.abspath(parsed.database))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _system_group(gid: int, ancestor: bool) -> bool:
    """A group-writable ancestor is fine when its group is a system one (Ubuntu's /var/log is root:syslog 0775)."""
    return ancestor and (gid == 0 or gid < login_defs_uid_range()[0])


def problem(path: Path, what: str) -> str | None:
    """Why ``path`` (a folder, existing or not yet) is not safe for the launcher's files, or None."""
    path = Path(os.path.abspath(path))
    trusted = {0, os.geteuid()}
    chains = [path]
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        real = path
    if real != path:
        chains.append(real)  # a symlink on the way: the folder it leads to must be safe too
    for chain in chains:
        levels = [*reversed(chain.parents), chain]
        for level in levels:
            try:
                info = os.lstat(level)
            except FileNotFoundError:
                break  # the rest is created by the launcher (and checked again then)
            except OSError as exc:
                return f"{what}: cannot inspect {level}: {exc.strerror}"
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid not in trusted:
                    return f"{what}: {level} is a symlink owned by {_user(info.st_uid)}"
                continue  # where it leads is checked through the resolved chain
            if not stat.S_ISDIR(info.st_mode):
                return f"{what}: {level} is not a folder"
            if info.st_uid not in trusted:
                return (f"{what}: {level} is owned by {_user(info.st_uid)}, not by root or the launcher's user "
                        f"({_user(os.geteuid())}); another user could swap the launcher's files there. Use a "
                        f"folder root owns (chown root {level}) or move it, e.g. under /var/lib/pvw-hpc")
            writable = info.st_mode & (stat.S_IWOTH | (0 if _system_group(info.st_gid, level != chain) else stat.S_IWGRP))
            sticky = info.st_mode & stat.S_ISVTX
            if writable and (level == chain or not sticky):
                return (f"{what}: {level} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'} "
                        f"(mode {stat.S_IMODE(info.st_mode):04o}); another user could plant links there. "
                        "Use a folder of the launcher's own, such as /var/lib/pvw-hpc/<name>")
    return None


def ensure(folder: Folder) -> None:
    """Check ``folder``, create what is missing, check again; raises :class:`FolderError`."""
    why = problem(folder.path, folder.what)
    if why:
        raise FolderError(why)
    path = Path(os.path.abspath(folder.path))
    for level in [*reversed(path.parents), path]:
        try:
            os.mkdir(level, folder.mode)
        except FileExistsError:
            continue
    why = problem(folder.path, folder.what)
    if why:
        raise FolderError(why)


def prepare(config: LauncherConfig) -> None:
    """Create and check every folder of the launcher (``serve`` calls this before it writes anything)."""
    for folder in launcher_folders(config):
        ensure(folder)
    unsafe = file_problems(config)
    if unsafe:
        raise FolderError(unsafe[0])


def problems(config: LauncherConfig) -> list[str]:
    """What ``pvw-hpc check`` reports about the folders (nothing is created)."""
    found = [why for folder in launcher_folders(config) if (why := problem(folder.path, folder.what))]
    return found + file_problems(config)


def file_problems(config: LauncherConfig) -> list[str]:
    """The database and the token file themselves: no symlink, and nobody else may write the token file."""
    found = []
    database = database_file(config.database_url)
    if database is not None and database.is_symlink():
        found.append(f"the database {database} is a symlink; the launcher opens only its own file")
    token_file = config.auth.token_file
    if token_file is not None:
        try:
            info = os.lstat(token_file)
        except OSError:
            info = None
        if info is not None and (stat.S_ISLNK(info.st_mode) or info.st_uid not in (0, os.geteuid())
                                 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            found.append(f"configuration.auth.token_file: {token_file} must be a file of root or the launcher's "
                         f"user that nobody else may write (chown root {token_file}; chmod 0600 {token_file})")
    return found
