"""A thin, injectable wrapper around scheduler commands: timeouts and retries in one place.

Every adapter runs its commands through :class:`CommandRunner`, so a hung
``squeue`` cannot stall the poller, transient failures are retried with
backoff (tenacity), and tests or sites can point a command at another binary
(``bin_overrides``, e.g. a wrapper that ssh-es to a login node).
"""

from __future__ import annotations

import logging
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
            attempts: int | None = None) -> Result:
        argv = [self.bin_overrides.get(argv[0], argv[0]), *argv[1:]]
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.attempts),
            wait=wait_exponential(multiplier=self.backoff_s, max=5),
            retry=retry_if_exception_type(CommandFailed),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._once(argv, stdin, check)
        raise AssertionError("unreachable")

    def _once(self, argv: list[str], stdin: str | None, check: bool) -> Result:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=self.timeout_s,
                                  env=None if self.env is None else dict(self.env))
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(argv, None, _text(exc.stdout), _text(exc.stderr),
                                f"timed out after {self.timeout_s:g} s") from None
        except OSError as exc:
            raise CommandFailed(argv, None, "", "", f"cannot run: {exc}") from None
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr,
                                f"exit {proc.returncode}: {proc.stderr.strip()[:500]}")
        return Result(proc.returncode, proc.stdout, proc.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")
