"""Config reading: the stock dialect, substitution, sanitize, and `pvw-hpc check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvw_hpc import jsonc
from pvw_hpc.config import check_dict, check_file, load_dict
from pvw_hpc.errors import BadRequest
from pvw_hpc.substitute import referenced_names, render

REPO = Path(__file__).resolve().parents[1]
PVW_HPC = str(Path(sys.executable).parent / "pvw-hpc")


def base_config(**configuration: object) -> dict:
    return {
        "configuration": {
            "host": "127.0.0.1", "port": 0, "endpoint": "paraview", "proxy_file": "/tmp/x/proxy.txt",
            "sessionURL": "ws://USE_HOST/proxy?sessionId=${id}&path=ws", "timeout": 5,
            "log_dir": "/tmp/x/logs", "fields": ["file"], **configuration,
        },
        "resources": [{"host": "127.0.0.1", "port_range": [9001, 9003]}],
        "properties": {"python_exec": "/usr/bin/python3", "dataDir": "/data"},
        "apps": {"viz": {"cmd": ["${python_exec}", "app.py", "--port", "${port}", "--data", "${file}",
                                 "--authKey", "${secret}", "--cost", "$$5"], "ready_line": "Starting factory"}},
    }


def test_comments_are_stripped_but_not_inside_strings() -> None:
    text = '{"a": "ws://x/y", // line comment\n /* block\n comment */ "b": "/* kept */", "c": "//kept"}'
    assert jsonc.loads(text) == {"a": "ws://x/y", "b": "/* kept */", "c": "//kept"}


def test_comment_stripping_keeps_line_numbers_for_errors() -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        jsonc.loads('{\n/* one\ntwo */\n"a": ,\n}')
    assert info.value.lineno == 4


def test_stock_example_loads_with_defaults() -> None:
    raw = base_config()
    del raw["configuration"]["endpoint"]
    config = load_dict(raw)
    assert config.endpoint == "paraview"
    assert config.timeout_s == 5.0
    assert config.resources[0].ports == range(9001, 9004)
    assert config.database_url.startswith("sqlite:///") and config.database_url.endswith("pvw-hpc.sqlite")


def test_endpoint_slashes_are_tolerated() -> None:
    assert load_dict(base_config(endpoint="/paraview/")).endpoint == "paraview"


def test_substitution_dollar_forms_unknown_names_literal() -> None:
    config = load_dict(base_config())
    app = config.apps["viz"]
    out = render(config, app, {"application": "viz", "file": "a/b.vtk"},
                 {"id": "i", "host": "h", "port": "9001", "secret": "s3"})
    assert out.argv == ("/usr/bin/python3", "app.py", "--port", "9001", "--data", "a/b.vtk",
                        "--authKey", "s3", "--cost", "$5")
    assert out.session_url == "ws://USE_HOST/proxy?sessionId=i&path=ws"
    assert out.secret_in_argv
    # a name nobody defines stays as written, like stock
    raw = base_config()
    raw["apps"]["viz"]["cmd"].append("${nobody}")
    config = load_dict(raw)
    out = render(config, config.apps["viz"], {"file": "x"}, {"id": "i", "host": "h", "port": "1", "secret": "s"})
    assert out.argv[-1] == "${nobody}"


def test_referenced_names_ignores_escaped_dollar() -> None:
    assert referenced_names(["$a ${b} $$c"]) == {"a", "b"}


def test_property_wins_client_key_naming_a_property_is_refused() -> None:
    config = load_dict(base_config())
    with pytest.raises(BadRequest, match="python_exec"):
        render(config, config.apps["viz"], {"python_exec": "/bin/sh", "file": "x"},
               {"id": "i", "host": "h", "port": "1", "secret": "s"})


@pytest.mark.parametrize("value", ["a b", "a\nb", "x;rm", "$(id)", "`id`", "a#b", "-rf", "'q'", '"q"', "a|b"])
def test_client_values_outside_safe_pattern_are_refused(value: str) -> None:
    config = load_dict(base_config())
    with pytest.raises(BadRequest, match="file"):
        render(config, config.apps["viz"], {"file": value}, {"id": "i", "host": "h", "port": "1", "secret": "s"})


def test_sanitize_rules_replace_the_default_pattern() -> None:
    config = load_dict(base_config(sanitize={
        "file": {"type": "regexp", "regexp": "^[a-z ]+$", "default": "x"},
    }))
    launcher = {"id": "i", "host": "h", "port": "1", "secret": "s"}
    assert render(config, config.apps["viz"], {"file": "with space"}, launcher).argv[5] == "with space"
    with pytest.raises(BadRequest, match="sanitize"):
        render(config, config.apps["viz"], {"file": "UPPER"}, launcher)
    config = load_dict(base_config(sanitize={"file": {"type": "inList", "list": ["a.vtk", 7], "default": "a"}}))
    assert render(config, config.apps["viz"], {"file": 7}, launcher).argv[5] == "7"
    with pytest.raises(BadRequest):
        render(config, config.apps["viz"], {"file": "b.vtk"}, launcher)


@pytest.mark.parametrize("value", [["a"], {"a": 1}, True, None])
def test_non_scalar_client_values_are_refused(value: object) -> None:
    config = load_dict(base_config())
    with pytest.raises(BadRequest, match="string or a number"):
        render(config, config.apps["viz"], {"file": value}, {"id": "i", "host": "h", "port": "1", "secret": "s"})


def test_check_reports_every_problem_with_its_path() -> None:
    raw = base_config(timeout=-1, port="x", sanitize={"f": {"type": "nope"}})
    raw["resources"] = [{"host": "bad host", "port_range": [5, 1]}]
    raw["apps"]["viz"]["cmd"][1] = 7
    del raw["configuration"]["proxy_file"]
    config, problems = check_dict(raw)
    assert config is None
    paths = {p.path for p in problems if not p.warning}
    assert {"$.configuration.timeout", "$.configuration.port", "$.configuration.sanitize.f.type",
            "$.resources[0].host", "$.resources[0].port_range", "$.apps.viz.cmd[1]",
            "$.configuration.proxy_file"} <= paths


def test_placeholder_host_from_the_seed_is_reported() -> None:
    _, problems = check_dict(base_config(host="${launcher_IP}"))
    assert any(p.path == "$.configuration.host" and "placeholder" in p.message for p in problems)


def test_check_cli_exit_codes_and_env_variable(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text("// comment\n" + json.dumps(base_config()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(base_config(timeout="soon")))
    ok = subprocess.run([PVW_HPC, "check", "--config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok" in ok.stdout
    failed = subprocess.run([PVW_HPC, "check"], capture_output=True, text=True, env={"PVW_HPC_CONFIG": str(bad)})
    assert failed.returncode == 1
    assert "$.configuration.timeout" in failed.stdout
    broken = tmp_path / "broken.json"
    broken.write_text('{"configuration": {,}}')
    res = subprocess.run([PVW_HPC, "check", "--config", str(broken)], capture_output=True, text=True)
    assert res.returncode == 1 and "line 1" in res.stdout


@pytest.mark.parametrize("name", ["examples/local/launcher.json", "examples/one-machine/launcher.json",
                                  "examples/two-machines/launcher.json", "examples/many-machines/launcher.json",
                                  "examples/many-machines/launcher-slurm.json", "examples/slurm/launcher.json",
                                  "examples/pbs/launcher.json", "examples/htcondor/launcher.json",
                                  "examples/paraview/local.json", "examples/paraview/slurm.json",
                                  "examples/paraview/pbs.json"])
def test_shipped_examples_pass_check(name: str) -> None:
    config, problems = check_file(REPO / name)
    assert config is not None, [str(p) for p in problems]


@pytest.mark.parametrize("clusters, path", [
    ({"s": {"scheduler": "slurm", "job_dir": "/j", "job_user": "alice"}}, "$.clusters.s.job_user"),
    ({"s": {"scheduler": "slurm", "job_dir": "/j", "unreachable_after_s": 0}}, "$.clusters.s.unreachable_after_s"),
    ({"a": {"scheduler": "htcondor", "job_dir": "/j", "condor_config": "/etc/a"},
      "b": {"scheduler": "htcondor", "job_dir": "/k", "condor_config": "/etc/b"}}, "$.clusters"),
])
def test_cluster_settings_that_cannot_work_are_refused(clusters: dict[str, Any], path: str) -> None:
    from pvw_hpc.clusters import check_clusters

    errors: list[str] = []
    check_clusters(clusters, lambda p, m: errors.append(p), lambda p, m: None)
    assert path in errors, errors


def test_a_zero_walltime_is_no_walltime() -> None:
    from pvw_hpc.limits import walltime_seconds

    assert walltime_seconds("0") is None and walltime_seconds("00:00:00") is None and walltime_seconds(0) is None
    assert walltime_seconds("0-1") == 3600 and walltime_seconds(5) == 300


def test_the_apache_vhost_serves_the_configured_web_client(tmp_path: Path) -> None:
    """``configuration.content`` (the Visualizer's dist/) becomes Apache's DocumentRoot, readable, no listing."""
    from pvw_hpc.apache import vhost

    config, problems = check_file(REPO / "examples/paraview/local.json")
    assert config is not None, [str(p) for p in problems]
    text = vhost(config, listen="127.0.0.1:8080")
    assert "DocumentRoot /opt/pvw-hpc/paraview/visualizer-3.2.0/dist" in text
    assert "<Directory /opt/pvw-hpc/paraview/visualizer-3.2.0/dist>" in text and "Options -Indexes" in text
    plain, _ = check_file(REPO / "examples/slurm/launcher.json")
    assert plain is not None and "DocumentRoot" not in vhost(plain)
