"""The OpenAPI document is valid and true: a property-based fuzzer finds no server error against it.

A real ``pvw-hpc serve`` (the conftest fixture) runs the demo app plus apps
that fail fast: one exits at once, one's program does not exist, and three
take a client value through the safe default rule, an ``inList`` rule and a
``regexp`` rule. Schemathesis loads the live ``/openapi.json`` and, for every
operation, generates schema-conforming (positive) and schema-violating
(negative) requests with Hypothesis; every answer must

* not be a server error, except the documented 503 (no port, app failed);
* be JSON, with the documented status, content type and body schema;
* reject negative data with a 4xx.

Generated ids are only ever unknown (404), so GET, DELETE and the job callback
are then fuzzed again on real sessions: a live one of the fuzzer's own browser
(its cookie jar holds the creator cookie), and an ended and a failed one of
another client.

Real launches are slow (~1 s for the demo app), so only the first few positive
demo launches wait for the app; the others are sent with ``"wait": false``, and
the runner stops every session a case started at once (3 ports: when they are
all held, a launch is an immediate, documented 503). The run is bounded by
``max_examples`` per operation and mode and by wall-clock budgets shared out
between the operations, so a loaded machine runs fewer cases, not a longer test.
Set ``PVW_HPC_FUZZ_SEED`` to replay a run; the seed of each run is printed.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.conftest import ADMIN_HEADERS, Launcher, LauncherFactory, wait_for

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = int(os.environ.get("PVW_HPC_FUZZ_EXAMPLES", "50"))  # per operation and generation mode
# wall-clock budgets (the machine may be shared with other test runs): a run whose share is spent stops,
# so a slow machine means fewer cases, never a test over a minute
BUDGET_S = 30.0  # every operation with generated ids, shared fairly between them
REAL_IDS_BUDGET_S = 10.0  # then the per-session operations on real sessions
DEMO_WAITS = 2  # positive demo launches that wait for the real app (~1 s each); the others get "wait": false


def _fast_fail_app(template: str) -> dict[str, Any]:
    """An app whose command takes one client value and exits at once (a fast 503, not a slow 200)."""
    return {"cmd": ["/bin/sh", "-c", "exit 4", "sh", template], "ready_line": "never printed"}


APPS: dict[str, Any] = {
    "crash": {"cmd": ["/bin/sh", "-c", "echo boom; exit 3"], "ready_line": "never printed"},
    "missing": {"cmd": ["/nonexistent/pvw-hpc-test-program", "${port}"], "ready_line": "never"},
    "witharg": _fast_fail_app("${arg}"),
    "withmode": _fast_fail_app("${mode}"),
    "withfile": _fast_fail_app("${file}"),
}
SANITIZE: dict[str, Any] = {
    "mode": {"type": "inList", "list": ["fast", "slow", 3], "default": "fast"},
    "file": {"type": "regexp", "regexp": "^[-A-Za-z0-9_./]+$", "default": "empty"},
}


class BudgetSpent(Exception):
    """Raised inside a hypothesis run when the wall-clock budget is spent, to end it without more cases."""


@dataclass
class Tally:
    """What the fuzzer did: cases per operation and status, the failures, and the time it took."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    started: set[str] = field(default_factory=set)  # session ids the fuzzer's launches created
    demo_waits: int = 0
    unsatisfiable: list[str] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)  # runs the wall-clock budget ended
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.cases.values())


@pytest.fixture(scope="module")
def lau(module_launcher: LauncherFactory) -> Launcher:
    return module_launcher(apps=APPS, sanitize=SANITIZE, ports=3, fields=["host", "port", "file"], timeout=8)


def test_openapi_document_is_valid_and_names_the_config(lau: Launcher) -> None:
    """The document validates as OpenAPI 3.1 and is built from this launcher's config."""
    validator = pytest.importorskip("openapi_spec_validator")
    resp = requests.get(f"{lau.base}/openapi.json", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = resp.json()
    validator.validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert {"/paraview", "/paraview/", "/paraview/{id}", "/paraview/{id}/ready", "/health", "/openapi.json"} <= set(
        doc["paths"]
    )
    request = doc["components"]["schemas"]["LaunchRequest"]
    assert request["properties"]["application"]["enum"] == sorted(["demo", *APPS])
    assert request["propertyNames"]["not"]["enum"] == ["demo_app", "python_exec"]
    variants = {v["title"]: v["properties"] for v in request["oneOf"]}
    assert set(variants["witharg"]) == {"application", "arg"}
    assert variants["withmode"]["mode"]["enum"] == ["fast", "slow", 3, "3"]
    assert "file" in variants["withfile"] and set(variants["demo"]) == {"application"}
    launch = doc["paths"]["/paraview"]["post"]
    assert {"200", "202", "400", "401", "403", "413", "429", "503"} <= set(launch["responses"])
    assert {} in launch["security"] and {"bearerAuth": []} in launch["security"]  # anonymous launches allowed here
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {**doc["components"]["securitySchemes"]["bearerAuth"],
                                                                 "type": "http", "scheme": "bearer"}


def test_openapi_document_follows_the_config(lau: Launcher) -> None:
    """Another endpoint and no anonymous launches: the paths and the launch security say so."""
    validator = pytest.importorskip("openapi_spec_validator")
    from pvw_hpc.api.openapi import build_document
    from pvw_hpc.config import load_dict

    raw = json.loads(json.dumps(lau.config))
    raw["configuration"]["endpoint"] = "viz"
    raw["configuration"]["auth"] = {**raw["configuration"].get("auth", {}), "anonymous": False}
    doc = build_document(load_dict(raw))
    validator.validate(doc)
    assert "/viz" in doc["paths"] and "/viz/{id}/ready" in doc["paths"] and "/paraview" not in doc["paths"]
    assert doc["paths"]["/viz"]["post"]["security"] == [{"bearerAuth": []}]


def test_openapi_document_matches_live_answers(lau: Launcher) -> None:
    """One real answer per documented success, validated against the document's own schemas."""
    jsonschema = pytest.importorskip("jsonschema")
    doc = requests.get(f"{lau.base}/openapi.json", timeout=30).json()

    def check(name: str, instance: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    ready = lau.launch("demo", sessionManagerURL=f"{lau.url}")
    try:
        check("ReadySession", ready)
        check("Session", lau.get(ready["id"]).json())
        listed = requests.get(lau.endpoint, headers=ADMIN_HEADERS, timeout=30).json()
        assert ready["id"] in {s["id"] for s in listed["sessions"]}
        check("SessionList", listed)
        check("Health", requests.get(f"{lau.base}/health", timeout=30).json())
        accepted = lau.post({"application": "crash", "wait": False})
        assert accepted.status_code == 202, accepted.text
        check("CreatedSession", accepted.json())
        failed = lau.post({"application": "crash"})
        assert failed.status_code == 503
        check("Error", failed.json())
        assert failed.json()["state"] == "failed"
        check("Session", lau.get(failed.json()["id"]).json())  # a failed session: error and exit_code
    finally:
        stopped = lau.delete(ready["id"])
    check("Session", stopped.json())  # an ended session: reason and exit_code
    assert stopped.json()["state"] == "ended"


def _is_json_error(resp: Any) -> str | None:
    """None when ``resp`` (a schemathesis Response) is JSON with a non-empty string ``error``; else why not."""
    content_type = (resp.headers.get("content-type") or resp.headers.get("Content-Type") or [""])[0]
    if not content_type.startswith("application/json"):
        return f"Content-Type {content_type!r}"
    try:
        body = json.loads(resp.content)
    except ValueError as exc:
        return f"body is not JSON ({exc}): {resp.content[:200]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return f"no 'error' string in {body!r:.200}"
    return None


CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection]


def _fuzz(lau: Launcher, operation: Any, mode: Any, strategy: Any, tally: Tally, deadline: float, run_seed: int,
          session: requests.Session, suffix: str = "") -> None:
    """Run up to MAX_EXAMPLES cases drawn from ``strategy`` against the live server; record, never raise."""
    label = f"{operation.label} [{mode.value}{suffix}]"
    launches = operation.method.upper() == "POST" and not operation.path.endswith("/ready")

    def one(case: Any) -> None:
        if tally.cases[label] and time.monotonic() > deadline:  # every run sends at least one case
            raise BudgetSpent  # ends this hypothesis run at once (caught below)
        tally.cases[label] += 1
        body = case.body if launches and mode.is_positive else None
        if isinstance(body, dict) and body.get("application") == "demo" and body.get("wait", True) is True:
            if tally.demo_waits < DEMO_WAITS:
                tally.demo_waits += 1
            else:
                body["wait"] = False  # still a valid request; the real app's start is not waited for
        try:
            response = case.call(base_url=lau.base, session=session, timeout=30)
        except requests.RequestException as exc:  # the server dropped the connection: as bad as a 500
            tally.failures.append(f"{label}: no answer ({exc})\n{case.as_curl_command()}")
            return
        status = response.status_code
        tally.statuses[(operation.label, status)] += 1
        problems: list[str] = []
        if status >= 500 and status != 503:
            problems.append(f"server error {status}")
        if status >= 400:
            why = _is_json_error(response)
            if why:
                problems.append(f"{status} error body is not the JSON error: {why}")
        if status in (200, 202) and launches:
            started = json.loads(response.content)["id"]
            tally.started.add(started)
            lau.delete(started)  # free the port for the next cases
        try:
            case.validate_response(response, checks=CHECKS, transport_kwargs={"base_url": lau.base})
        except FailureGroup as group:
            problems.extend(f"{f.title}: {f.message}" for f in group.exceptions)
        except Failure as failure:
            problems.append(f"{failure.title}: {failure.message}")
        if problems:
            snippet = response.content[:300]
            tally.failures.append(f"{label}: {status} {snippet!r}\n  " + "\n  ".join(problems)
                                  + f"\n  {case.as_curl_command()}")

    test: Callable[..., None] = given(case=strategy)(one)
    test = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not minimised
                    suppress_health_check=list(HealthCheck))(test)
    try:
        hypothesis_seed(run_seed)(test)()
    except BudgetSpent:
        tally.cut_short.append(label)
    except hypothesis.errors.Unsatisfiable:
        assert mode.is_negative, f"{label}: no positive case could be generated"
        tally.unsatisfiable.append(label)  # nothing to negate: the operation takes no parameters and no body


def _with_real_ids(operation: Any, mode: Any, ids: list[str]) -> Any:
    """Cases of ``operation`` whose path id is one of ``ids`` (random ids are only ever 404s)."""
    st = hypothesis.strategies
    return st.sampled_from(ids).flatmap(
        lambda sid: operation.as_strategy(generation_mode=mode, path_parameters={"id": sid}))


def _fuzz_all(lau: Launcher, runs: list[tuple[Any, Any, Any, str]], budget_s: float, tally: Tally, run_seed: int,
              session: requests.Session) -> None:
    """Run each (operation, mode, strategy, suffix) with a fair share of what is left of ``budget_s``.

    Shares are weighted (launches are slow); a run that finishes early (an
    operation without parameters has one case) leaves its share to the next
    ones, and a slow one cannot starve the rest.
    """
    def weight(run: tuple[Any, Any, Any, str]) -> int:  # a positive launch may start a real app: ~1 s
        operation, mode = run[0], run[1]
        return 8 if mode.is_positive and operation.method.upper() == "POST" and "{id}" not in operation.path else 1

    deadline = time.monotonic() + budget_s
    for i, run in enumerate(runs):
        share = (deadline - time.monotonic()) * weight(run) / sum(weight(r) for r in runs[i:])
        _fuzz(lau, run[0], run[1], run[2], tally, time.monotonic() + share, run_seed, session, run[3])


def test_fuzz_the_live_api_finds_no_server_error(lau: Launcher, capsys: pytest.CaptureFixture[str]) -> None:
    """Every operation, positive and negative data: 0 server errors, every answer as documented."""
    schema = schemathesis.openapi.from_url(f"{lau.base}/openapi.json")
    run_seed = int(os.environ.get("PVW_HPC_FUZZ_SEED") or random.randrange(1 << 32))
    tally = Tally()
    before_rows = {sid for sid, _, _ in lau.db_rows()}
    start = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the operation that served the document unless a filter selects it
    operations += [result.ok() for result in schema.include(path="/openapi.json").get_all_operations()]
    assert len(operations) == 9, " ".join(op.label for op in operations)
    by_label = {op.label: op for op in operations}
    per_session = ("GET /paraview/{id}", "POST /paraview/{id}/ready", "DELETE /paraview/{id}")
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    session = requests.Session()  # one anonymous browser: its jar keeps the creator cookie of its launches
    try:
        _fuzz_all(lau, [(op, mode, op.as_strategy(generation_mode=mode), "") for op in operations for mode in modes],
                  BUDGET_S, tally, run_seed, session)
        # then the per-session operations on real sessions of each kind: one of this browser's, live, and
        # an ended and a failed one of another client's (those answer 401 to this browser)
        live = session.post(lau.url, json={"application": "demo", "wait": False}, timeout=30).json()["id"]
        wait_for(lambda: lau.state(live) == "ready", 20, "the demo session to be ready")
        states = {s["state"]: s["id"] for s in lau.sessions() if s["id"] != live}
        assert {"ended", "failed"} <= set(states), f"no ended and failed sessions to aim at: {states}"
        ids = [live, states["ended"], states["failed"]]
        _fuzz_all(lau, [(by_label[label], mode, _with_real_ids(by_label[label], mode, ids), ", real ids")
                        for label in per_session for mode in modes], REAL_IDS_BUDGET_S, tally, run_seed, session)
    finally:
        tally.seconds = time.monotonic() - start
        # stop whatever the fuzzer started and is still active (a DELETE may have raced a slow start)
        for sid in lau.active_ids() - before_rows:
            lau.delete(sid)
        session.close()
    with capsys.disabled():
        print(f"\nfuzz: seed {run_seed}, {tally.total} cases in {tally.seconds:.1f} s over {len(operations)} "
              f"operations, {len(tally.started)} sessions started, budget ended {tally.cut_short or 'none'}; "
              "statuses " + ", ".join(f"{op} {st}: {n}" for (op, st), n in sorted(tally.statuses.items())))
    assert not tally.failures, f"{len(tally.failures)} failures (seed {run_seed}):\n\n" + "\n\n".join(tally.failures[:20])
    ran = {label.split(" [")[0] for label in tally.cases}
    assert ran == set(by_label), f"operations never tried: {set(by_label) - ran}"
    assert tally.total >= 50, f"too few cases ran ({tally.total}): the budget is too small for this machine"
    assert any(op.startswith("POST /paraview") and st in (200, 202) for op, st in tally.statuses), \
        "no launch succeeded: the positive path was never exercised"
    for label in ("GET /paraview/{id}", "DELETE /paraview/{id}"):
        assert tally.statuses[(label, 200)], f"{label} never reached a real session: {tally.statuses}"
    assert lau.active_ids() - before_rows == set(), "the fuzzer left sessions running"
