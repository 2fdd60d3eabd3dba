"""A thin, injectable wrapper around scheduler commands: timeouts and retries in one place.

Every adapter runs its commands through :class:`CommandRunner`, so a hung
``squeue`` cannot stall the poller, transient failures are retried with
backoff (tenacity), and tests or sites can point a command at another binary
(``bin_overrides``, e.g. a wrapper that ssh-es to a login node).

A ``prefix`` (a cluster's ``submit_prefix`` such as ``sudo -n -u alice``) goes in
front of the already overridden command, so the override still names the real
binary that a sudoers rule matches. Every command runs in its own session with
stdin from /dev/null: it has no controlling terminal, so a ``sudo`` that wants
a password fails at once instead of waiting for one, and a timeout kills the
whole process group (``runuser`` -> ``sudo`` -> ``sbatch``), not just its head.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)


class CommandFailed(Exception):
    """A command could not run, timed out, or exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str, why: str):
        super().__init__(f"{' '.join(argv)}: {why}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.why = why


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class CommandRunner:
    """Runs scheduler commands. ``attempts`` > 1 retries failures with exponential backoff."""

    timeout_s: float = 30.0
    attempts: int = 3
    backoff_s: float = 0.2
    bin_overrides: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None

    def run(self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True,
            attempts: int | None = None, prefix: Sequence[str] = (), umask: int | None = None,
            cwd: str | None = None) -> Result:
        """Run ``[*prefix, *argv]`` (``argv[0]`` through ``bin_overrides``); ``umask`` and ``cwd`` for the child only."""
        argv = [*prefix, self.bin_overrides.get(argv[0], argv[0]), *argv[1:]]
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.attempts),
            wait=wait_exponential(multiplier=self.backoff_s, max=5),
            retry=retry_if_exception_type(CommandFailed),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._once(argv, stdin, check, umask, cwd)
        raise AssertionError("unreachable")

    def _once(self, argv: list[str], stdin: str | None, check: bool, umask: int | None = None,
              cwd: str | None = None) -> Result:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=None if self.env is None else dict(self.env),
                start_new_session=True, umask=-1 if umask is None else umask, cwd=cwd,
            )
        except OSError as exc:
            raise CommandFailed(argv, None, "", "", f"cannot run: {exc}") from None
        try:
            stdout, stderr = proc.communicate(stdin, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise CommandFailed(argv, None, stdout or "", stderr or "",
                                f"timed out after {self.timeout_s:g} s") from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, stdout, stderr,
                                f"exit {proc.returncode}: {stderr.strip()[:500]}")
        return Result(proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the command's process group (its pid: it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # a member changed user (sudo -u) and we are not root: at least the head
        proc.kill()

