"""The HTCondor adapter on event logs recorded from the real pool, with the real bindings' objects.

``tests/fixtures/htcondor/*.log`` are user event logs written by the pool that
``schedulers/htcondor/up`` runs (SOURCES.md there says how); the adapter reads
them with the real ``htcondor2.JobEventLog``. The submit description our
template renders is parsed by the real ``htcondor2.Submit``. The schedd itself
is exercised by ``tests/test_batch_e2e.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pvw_hpc.batch.base import JobId, JobState, Presence
from pvw_hpc.batch.htcondor.adapter import HTCondorAdapter, _ad_info, _constraint, _Follow, node_of
from pvw_hpc.clusters import check_clusters
from pvw_hpc.jobs import merged_resources, render_body, render_script

if os.environ.get("CI"):  # CI installs the htcondor extra: a missing module there is a failure
    import classad2
    import htcondor2
else:
    classad2 = pytest.importorskip("classad2")
    htcondor2 = pytest.importorskip("htcondor2")

FIXTURES = Path(__file__).parent / "fixtures" / "htcondor"


def follow(name: str, tmp_path: Path) -> tuple[HTCondorAdapter, _Follow]:
    path = tmp_path / "events.log"
    shutil.copy(FIXTURES / name, path)
    adapter = HTCondorAdapter()
    state = _Follow(path)
    adapter._read(state)
    return adapter, state


def test_a_job_that_exits_3_fails_with_its_code_and_node(tmp_path: Path) -> None:
    _, state = follow("normal-exit3.log", tmp_path)
    assert (state.state, state.native, state.exit_code, state.node) == (JobState.FAILED, "COMPLETED", 3, "vm")


def test_the_demo_app_ending_by_itself_completes(tmp_path: Path) -> None:
    _, state = follow("demo-app.log", tmp_path)
    assert (state.state, state.exit_code) == (JobState.COMPLETED, 0)


def test_a_held_job_fails_with_its_hold_reason_even_after_it_was_removed(tmp_path: Path) -> None:
    _, state = follow("held-missing-input.log", tmp_path)
    assert state.state == JobState.FAILED and state.native == "HELD"
    assert state.reason and state.reason.startswith("held: Transfer input files failure")
    assert not state.stuck  # removed since: nothing left to clean up


def test_a_removed_running_job_is_over(tmp_path: Path) -> None:
    _, state = follow("removed-running.log", tmp_path)
    assert (state.state, state.native, state.node) == (JobState.COMPLETED, "REMOVED", "vm")


def test_events_are_read_incrementally_and_a_missing_log_is_not_an_answer(tmp_path: Path) -> None:
    text = (FIXTURES / "normal-exit3.log").read_text()
    cut = text.index("006 (")  # after SUBMIT and EXECUTE
    adapter, path = HTCondorAdapter(), tmp_path / "events.log"
    state = _Follow(path)
    adapter._read(state)  # the schedd has not written the log yet
    assert state.state is None
    path.write_text(text[:cut])
    adapter._read(state)
    assert (state.state, state.node) == (JobState.RUNNING, "vm")
    with path.open("a") as log:
        log.write(text[cut:])
    adapter._read(state)
    assert (state.state, state.exit_code) == (JobState.FAILED, 3)


def test_a_held_ad_from_the_schedd_is_failed_and_stuck() -> None:
    ad = classad2.ClassAd({"ClusterId": 9, "ProcId": 0, "JobStatus": 5, "Iwd": "/tmp/x",
                           "HoldReason": "Transfer input files failure at access point vm"})
    info = _ad_info(ad)
    assert (info.job_id, info.presence, info.state, info.stuck) == ("9.0", Presence.FOUND, JobState.FAILED, True)
    assert info.reason == "held: Transfer input files failure at access point vm"
    done = _ad_info(classad2.ClassAd({"ClusterId": 8, "ProcId": 0, "JobStatus": 4, "ExitCode": 3,
                                      "LastRemoteHost": "slot1_1@vm"}))
    assert (done.state, done.exit_code, done.node) == (JobState.FAILED, 3, "vm")


def test_constraints_name_only_numeric_clusters() -> None:
    assert _constraint([JobId("12.0"), JobId("13.0"), JobId("12.0")]) == "ClusterId == 12 || ClusterId == 13"
    assert _constraint([JobId("x) || true || (y")]) == "false"
    assert node_of("slot1_1@node7.example") == "node7.example" and node_of(None) is None


def test_our_submit_description_is_what_htcondor_reads(tmp_path: Path) -> None:
    errors: list[str] = []
    clusters = check_clusters({"c": {"scheduler": "htcondor", "job_dir": str(tmp_path), "job_user": "pvwcondor",
                                     "defaults": {"cpus": 2, "memory": "2G", "gpus": 1, "time": "01:30:00",
                                                  "extra_directives": ["+Experiment = \"viz\""]}}},
                              lambda p, m: errors.append(f"{p}: {m}"), lambda p, m: None)
    assert not errors
    cluster = clusters["c"]
    session = "0b7f2d4e-1c3a-4e5f-8a9b-0c1d2e3f4a5b"
    resources = merged_resources(cluster, {})
    text, template = render_script(cluster, session, resources)
    assert template.endswith("htcondor.sub.j2")
    sub = htcondor2.Submit(text)
    assert sub["executable"] == str(tmp_path / session / "body.sh")
    assert sub["initialdir"] == str(tmp_path / session)
    assert sub["batch_name"] == f"pvw-{session}"
    assert (sub["request_cpus"], sub["request_memory"], sub["request_gpus"]) == ("2", "2048", "1")
    assert sub["allowed_job_duration"] == "5400"
    assert sub["MY.PvwSession"] == f'"{session}"' and sub["MY.Experiment"] == '"viz"'
    body = render_body(cluster, session, resources)
    assert body is not None and body.startswith("#!/bin/bash") and "PVW_HPC_JOB_SIDE" in body


def test_a_control_character_never_reaches_a_submit_description(tmp_path: Path) -> None:
    errors: list[str] = []
    clusters = check_clusters({"c": {"scheduler": "htcondor", "job_dir": str(tmp_path),
                                     "defaults": {"extra_directives": ["queue\nexecutable = /bin/evil"]}}},
                              lambda p, m: errors.append(p), lambda p, m: None)
    assert errors == ["$.clusters.c.defaults.extra_directives"]  # refused where the config is read
    assert "c" not in clusters


def test_logs_of_jobs_no_longer_polled_are_closed_and_forgotten(tmp_path: Path) -> None:
    adapter, state = follow("normal-exit3.log", tmp_path)
    adapter._follows[JobId("8.0")] = state
    adapter._forget({JobId("8.0")})
    assert adapter._follows == {}


def test_an_ad_of_a_job_killed_by_a_signal_or_with_undefined_values() -> None:
    killed = _ad_info(classad2.ClassAd({"ClusterId": 5, "ProcId": 0, "JobStatus": 4, "ExitBySignal": True,
                                        "ExitSignal": 9}))
    assert (killed.state, killed.exit_code, killed.reason) == (JobState.FAILED, 137, "killed by signal 9")
    ad = classad2.ClassAd({"ClusterId": 6, "ProcId": 0, "JobStatus": 2})
    ad["ExitCode"] = classad2.ExprTree("undefined")
    ad["RemoteHost"] = classad2.ExprTree("undefined")
    running = _ad_info(ad)
    assert (running.state, running.exit_code, running.node) == (JobState.RUNNING, None, None)
