"""A user's common mistakes get one line that names the path, exit code 2, and the traceback in a log
file: missing paths, empty data, an unknown model directory, a result that would be replaced. Each job
runs as the user runs it (``python -m jobs.<name>`` in a subprocess) and must fail before it starts Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "jobs", "configs")


def run(tmp_path, job: str, *args: str) -> tuple[int, str, float]:
    env = dict(os.environ, SLIME_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=REPO, RAY_ADDRESS="")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def assert_one_line_error(tmp_path, rc: int, out: str, *must: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, out
    for text in must:
        assert text in errors[0], (text, out)
    log = errors[0].rsplit("(traceback: ", 1)[1].rstrip(")")
    assert log.startswith(str(tmp_path / "logs")) and "Traceback" in open(log).read()
    assert "Started a local Ray instance" not in out  # checked before Ray started


@pytest.fixture()
def model_dir(tmp_path):
    from slime.presets import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "model")


def test_pack_missing_input_file(tmp_path):
    rc, out, _ = run(tmp_path, "pack", "--config", f"{CONFIGS}/pack.yaml", f"inputs=[{tmp_path}/nope.json]",
                     f"output_dir={tmp_path}/wds")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/nope.json", "not found")
    assert not (tmp_path / "wds").exists()  # nothing written


def test_pack_missing_image_root(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    rc, out, _ = run(tmp_path, "pack", "--config", f"{CONFIGS}/pack.yaml", f"inputs=[{tmp_path}/d.json]",
                     f"output_dir={tmp_path}/wds", f"image_root={tmp_path}/imgs")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/imgs", "does not exist")


def test_train_wrong_manifest(tmp_path):
    rc, out, _ = run(tmp_path, "train", "--config", f"{CONFIGS}/train_tiny.yaml", f"data.manifest={tmp_path}/wds",
                     f"storage_path={tmp_path}/runs")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/wds", "data.manifest")


def test_train_empty_data_dir_and_bad_init(tmp_path):
    (tmp_path / "wds").mkdir()
    rc, out, _ = run(tmp_path, "train", "--config", f"{CONFIGS}/train_tiny.yaml", f"data.manifest={tmp_path}/wds",
                     f"storage_path={tmp_path}/runs")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/wds", "no manifest.json")
    rc, out, _ = run(tmp_path, "train", "--config", f"{CONFIGS}/train_tiny.yaml", f"data.manifest={tmp_path}/wds",
                     f"init_from={tmp_path}/nomodel", f"storage_path={tmp_path}/runs")
    assert_one_line_error(tmp_path, rc, out, f"init_from={tmp_path}/nomodel", "not a model directory")


def test_evaluate_unknown_model_and_no_val_shards(tmp_path, model_dir):
    rc, out, _ = run(tmp_path, "evaluate", "--config", f"{CONFIGS}/eval_tiny.yaml", f"model={tmp_path}/ghost",
                     f"data.val={tmp_path}/val")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/ghost", "does not exist")
    (tmp_path / "notamodel").mkdir()
    rc, out, _ = run(tmp_path, "evaluate", "--config", f"{CONFIGS}/eval_tiny.yaml", f"model={tmp_path}/notamodel",
                     f"data.val={tmp_path}/val")
    assert_one_line_error(tmp_path, rc, out, "has no slime_config.yaml")
    rc, out, _ = run(tmp_path, "evaluate", "--config", f"{CONFIGS}/eval_tiny.yaml", f"model={model_dir}",
                     f"data.val={tmp_path}/val")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/val", "does not exist")


def test_evaluate_refuses_to_replace_a_result(tmp_path, model_dir):
    (model_dir / "eval").mkdir()
    (model_dir / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    rc, out, _ = run(tmp_path, "evaluate", "--config", f"{CONFIGS}/eval_tiny.yaml", f"model={model_dir}",
                     f"data.val={tmp_path}/val")
    assert_one_line_error(tmp_path, rc, out, f"{model_dir}/eval/metrics.json", "overwrite=true")
    assert json.loads((model_dir / "eval" / "metrics.json").read_text()) == {"accuracy": 0.9}


def test_serve_missing_model_fails_before_serve_starts(tmp_path):
    rc, out, elapsed = run(tmp_path, "serve", "--model", f"{tmp_path}/nonexistent")
    assert_one_line_error(tmp_path, rc, out, f"{tmp_path}/nonexistent", "does not exist")
    assert "Deploying application" not in out and "Started Serve" not in out
