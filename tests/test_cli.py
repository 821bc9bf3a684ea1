"""`slime <command>` dispatch: lazy imports, help, unknown and not-yet-present commands."""

from __future__ import annotations

import subprocess
import sys
import types

from jobs import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("tokens", "synth", "pack", "train", "evaluate", "serve", "demo", "schedule", "submit", "status",
                 "logs", "stop", "register", "promote"):
        assert f"  {name} " in out


def test_no_args_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2 and "usage: slime" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_dispatches_rest_of_argv_to_module_main(monkeypatch):
    seen = {}
    fake = types.ModuleType("jobs.demo")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "jobs.demo", fake)
    assert cli.main(["demo", "--config", "x.yaml", "a.b=1"]) == 3
    assert seen["argv"] == ["--config", "x.yaml", "a.b=1"]


def test_missing_job_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("jobs.ghost_job_never_written:main", "nothing"))
    assert cli.main(["ghost"]) == 2
    assert "jobs/ghost_job_never_written.py is not part of this installation" in capsys.readouterr().err


def test_console_script_and_module_agree():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "slime submit NAME" in out.stdout


def test_submit_splits_job_args_at_double_dash(monkeypatch):
    from jobs import submit
    from pipelines.lifecycle import jobs_client

    calls = {}
    monkeypatch.setattr(jobs_client, "connect", lambda address: calls.setdefault("address", address))
    monkeypatch.setattr(jobs_client, "submit", lambda client, name, args, **kw: calls.update(name=name, args=args, **kw)
                        or "raysubmit_x")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert submit.main(["train", "--address", "http://h:8265", "--pip", "foo==1", "--env", "A=b", "--no-wait",
                        "--", "--config", "jobs/configs/train_tiny.yaml", "name=r1"]) == 0
    assert calls["name"] == "train" and calls["args"] == ["--config", "jobs/configs/train_tiny.yaml", "name=r1"]
    env = calls["runtime_env"]
    assert env["pip"] == ["foo==1"] and env["env_vars"] == {"RAY_AUTH_MODE": "token", "A": "b"}
    assert ".venv" in env["excludes"] and calls["address"] == "http://h:8265"


def test_auth_headers_from_token_env_and_token_file(monkeypatch, tmp_path):
    from pipelines.lifecycle import jobs_client

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs_client.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert jobs_client.auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("filetoken\n")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs_client.auth_headers() == {"Authorization": "Bearer filetoken"}


def test_job_command_lines_live_in_one_place():
    from pipelines.data.ingest import list_shards
    from pipelines.lifecycle.jobs_client import entrypoint, eval_args, shard_uris, train_args
    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import phase_data_config
    from slime.config import load_config

    shards = shard_uris("s3://b/wds", ["shard-000002-000001.tar", "shard-000001-000000.tar"])
    assert shard_uris("s3://b/wds/manifest.json", ["x.tar"]) == ["s3://b/wds/x.tar"]
    args = train_args("jobs/configs/train_tiny.yaml", "/r/v1/model", shards, "/w/m", "run-1")
    assert entrypoint("train", args) == (
        "python -m jobs.train --config jobs/configs/train_tiny.yaml init_from=/r/v1/model "
        "'data.shards=[\"s3://b/wds/shard-000002-000001.tar\", \"s3://b/wds/shard-000001-000000.tar\"]' "
        "export_dir=/w/m name=run-1")
    # the job reads exactly those shards: data.shards wins over the config's data.manifest
    cfg = load_config(TrainConfig, args[1], args[2:])
    dcfg = phase_data_config(cfg, cfg.phases[0], "/r/v1/model")
    assert dcfg.shards == tuple(shards) and list_shards(dcfg) == shards
    assert "init_from" not in " ".join(train_args("c.yaml", None, ["m"], "e", "n"))
    assert eval_args("jobs/configs/eval_tiny.yaml", "/m", "/val", "/o.json") == [
        "--config", "jobs/configs/eval_tiny.yaml", "model=/m", "data.val=/val", "output=/o.json", "overwrite=true"]


def test_rollout_config_keeps_every_running_app_and_swaps_only_the_model(tmp_path):
    from pipelines.lifecycle.jobs_client import serve_config_for

    live = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": {"slime": {"deployed_app_config": {
                "name": "slime", "import_path": "pipelines.serve:build_app",
                "args": {"model": "s3://b/v1/model", "num_gpus": 1}}},
                             "other": {"deployed_app_config": {"name": "other", "import_path": "x:y"}}}}
    cfg = serve_config_for("unused.yaml", "slime", "model", "s3://b/v2/model", live=live)
    assert [a["name"] for a in cfg["applications"]] == ["slime", "other"]
    assert cfg["applications"][0]["args"] == {"model": "s3://b/v2/model", "num_gpus": 1}
    assert cfg["http_options"]["host"] == "0.0.0.0"
    (tmp_path / "serve.yaml").write_text("applications:\n- name: slime\n  import_path: a:b\n  args: {model: old}\n")
    cfg = serve_config_for(str(tmp_path / "serve.yaml"), "slime", "model", "/new", live={"applications": {}})
    assert cfg["applications"][0]["args"]["model"] == "/new"
