"""The pyslurm worker: the one process per launcher that imports pyslurm and makes every libslurm call.

pyslurm holds the GIL in every libslurm call, and a call to a controller that does not answer
blocks for MessageTimeout - 1 s; ``import pyslurm`` may end its process (libslurm's ``fatal()``
on a slurm.conf it cannot use). Both happen here instead of in the launcher, which talks to this
process through :mod:`.client` and stops it when a request takes too long.

Run by path (``python .../worker.py PARENT_PID``; :mod:`.client` does that with
``sys.executable``) or as ``python -m pvw_hpc.batch.slurm_pyslurm.worker``. This module imports
only the standard library, so running it by path costs no package imports.

The protocol, one JSON object per line: requests on stdin, replies on stdout, one reply per
request, in order. Each request has an ``id`` (echoed in the reply) and an ``op``:

* ``version``: ``{"version": pyslurm's version, "api": slurm_api_version()}`` -- the client's
  first request, its check that the import worked and pyslurm fits this Slurm;
* ``load`` (``ids``: job id strings or null, ``prefix``: a name prefix or null): one
  ``Jobs.load()``, the jobs it holds that match, as a list of plain dicts of :data:`FIELDS`;
* ``submit`` (``fields``): ``JobSubmitDescription(**fields).submit()``, the job id;
* ``cancel`` (``job_id``: an int): ``Job(job_id).cancel()``, null.

A reply is ``{"id": n, "ok": value}`` or ``{"id": n, "error": {"kind": ..., "text": ...}}``; the
kinds: ``rpc`` (``pyslurm.RPCError``: libslurm or slurmctld said no; with ``errno``), ``value``
(any other exception pyslurm raised: its own checks of a value, MemoryError...; with ``type``),
``import`` (pyslurm cannot be imported; every request gets it), ``request`` (not a request this
worker knows: a bug on the launcher's side). stdout is the protocol's alone: file descriptor 1 is
moved to stderr before pyslurm is imported, so whatever libslurm prints goes there.

The worker ends on stdin's end (the launcher closed the pipe or exited) and, through
``PR_SET_PDEATHSIG``, with SIGKILL when the launcher's thread that started it ends -- also in
the middle of a libslurm call, where reading stdin cannot happen (:mod:`.client` starts workers
from one thread that lives as long as the launcher).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path: its folder (the package's other modules) is not a place to import from
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _here:
        del sys.path[0]

import json  # noqa: E402  # after the sys.path fix, as every import below
import signal  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

# the attributes of pyslurm.Job the adapter's job_info reads, each read once per job here
FIELDS = ("id", "state", "state_reason", "batch_host", "allocated_nodes", "exit_code", "exit_code_signal",
          "start_time", "name", "working_directory")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def job_record(job: Any) -> dict[str, Any]:
    """One ``pyslurm.Job`` as a plain dict of :data:`FIELDS`, each attribute read once (each read is a call into pyslurm).

    Spelled out rather than a loop over FIELDS: 1.2 instead of 3 us a job. pyslurm 22.5 gives
    str, int or None for all of them; anything else would go as its text (:func:`encode`).
    """
    return {"id": job.id, "state": job.state, "state_reason": job.state_reason, "batch_host": job.batch_host,
            "allocated_nodes": job.allocated_nodes, "exit_code": job.exit_code,
            "exit_code_signal": job.exit_code_signal, "start_time": job.start_time, "name": job.name,
            "working_directory": job.working_directory}


def encode(reply: Mapping[str, Any]) -> bytes:
    """One reply as its line: JSON, a value of a type JSON does not know as its text."""
    return json.dumps(reply, default=str).encode() + b"\n"


class Worker:
    """The request handler: one request dict in, one reply dict out, never an exception.

    ``pyslurm`` is the module (or a fake of it: the unit tests run this class in their own
    process); ``unusable`` the ``import`` error every request gets when there is none.
    """

    def __init__(self, pyslurm: Any, unusable: str | None = None) -> None:
        self.pyslurm = pyslurm
        self.unusable = unusable

    @classmethod
    def importing(cls) -> Worker:
        """The real module; a worker answering ``import`` errors when it cannot be imported.

        libslurm's ``fatal()`` (a slurm.conf it cannot use) ends this process here instead, its
        reason on stderr.
        """
        try:
            import pyslurm  # type: ignore[import-untyped,import-not-found]  # a Cython module without type information
        except ModuleNotFoundError as exc:
            if exc.name != "pyslurm":
                return cls(None, f"import pyslurm failed: {exc}")
            return cls(None, f"pyslurm is not installed for {sys.executable}")
        except Exception as exc:  # ImportError of libslurm.so, or pyslurm's own init
            return cls(None, f"import pyslurm failed: {type(exc).__name__}: {exc}")
        return cls(pyslurm)

    def answer(self, request: Any) -> dict[str, Any]:
        """The reply to ``request``, its ``id`` echoed."""
        reply: dict[str, Any] = {"id": request.get("id") if isinstance(request, Mapping) else None}
        op = request.get("op") if isinstance(request, Mapping) else None
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            reply["error"] = {"kind": "request", "text": f"not a request this worker knows: {request!r:.200}"}
        elif self.unusable is not None:
            reply["error"] = {"kind": "import", "text": self.unusable}
        else:
            try:
                reply["ok"] = handler(request)
            except BadRequest as exc:
                reply["error"] = {"kind": "request", "text": f"bad {op} request: {exc}"}
            except Exception as exc:  # RPCError, and whatever else pyslurm raises
                reply["error"] = self._error(exc)
        return reply

    # -- the ops: the request's shape checked first, then anything raised is pyslurm's ---------------

    def _op_version(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return {"version": str(self.pyslurm.version()), "api": [int(v) for v in self.pyslurm.slurm_api_version()]}

    def _op_load(self, request: Mapping[str, Any]) -> list[dict[str, Any]]:
        ids, prefix = request.get("ids"), request.get("prefix")
        if not (ids is None or isinstance(ids, list)) or not (prefix is None or isinstance(prefix, str)):
            raise BadRequest("ids must be a list or null, prefix a string or null")
        wanted = None if ids is None else {str(i) for i in ids}
        records = []
        for job in self.pyslurm.Jobs.load().values():
            if wanted is not None and str(job.id) not in wanted:
                continue
            if prefix is not None and not str(job.name or "").startswith(prefix):
                continue
            records.append(job_record(job))
        return records

    def _op_submit(self, request: Mapping[str, Any]) -> Any:
        fields = request.get("fields")
        if not isinstance(fields, dict):
            raise BadRequest("fields must be an object")
        return self.pyslurm.JobSubmitDescription(**fields).submit()

    def _op_cancel(self, request: Mapping[str, Any]) -> None:
        job_id = request.get("job_id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise BadRequest(f"job_id must be an integer, not {job_id!r}")
        self.pyslurm.Job(job_id).cancel()

    def _error(self, exc: Exception) -> dict[str, Any]:
        text = str(exc) or type(exc).__name__
        rpc_error = getattr(self.pyslurm, "RPCError", None)
        if isinstance(rpc_error, type) and isinstance(exc, rpc_error):
            errno = getattr(exc, "errno", None)
            return {"kind": "rpc", "errno": errno if isinstance(errno, int) else None, "text": text,
                    "type": type(exc).__name__}
        return {"kind": "value", "type": type(exc).__name__, "text": text}


class BadRequest(Exception):
    """A request of the wrong shape: the launcher's mistake, not pyslurm's."""


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when the thread that started this process ends; gone at once if that already happened."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stdin's end still ends the worker between calls
        pass
    if parent is not None and os.getppid() != parent:  # the launcher ended before prctl took hold
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Serve requests from stdin until it ends; argv: the launcher's pid (optional)."""
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent(int(args[0]) if args and args[0].isdigit() else None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's Ctrl-C is the launcher's to handle
    replies = os.fdopen(os.dup(1), "wb")  # the protocol's own descriptor ...
    os.dup2(2, 1)  # ... and whatever else writes to stdout (libslurm, pyslurm) goes to stderr
    sys.stdout = sys.stderr
    worker = Worker.importing()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
        except ValueError as exc:
            reply: dict[str, Any] = {"id": None, "error": {"kind": "request", "text": f"not JSON: {exc}"}}
        else:
            reply = worker.answer(request)
        try:
            replies.write(encode(reply))
            replies.flush()
        except BrokenPipeError:  # the launcher is gone
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
