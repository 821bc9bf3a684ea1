"""The README's first command, end to end: synth -> pack -> train all phases -> evaluate -> register +
promote -> serve -> one request through the openai client. Runs in its own process (its own Ray)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.integration
def test_demo_end_to_end(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", f"workdir={tmp_path}", "steps_per_phase=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.split("== done\n", 1)[1])
    # The request went through the served model: its image became visual tokens, and an answer came back. How long:
    # greedy output of a 3-step model may be EOS at once (an empty answer); `make demo`'s full schedule learns.
    usage = summary["usage"]
    assert usage["visual_tokens"] > 0 and usage["prompt_tokens"] > usage["visual_tokens"]
    assert isinstance(summary["answer"], str) and 0 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["num_samples"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0
    # The printed table is metrics.json's: one chance (uniform over the task's answers: 4 each) everywhere.
    table = {m[1]: (float(m[2]), float(m[3])) for m in
             re.finditer(r"^(\w+)\s+\w+\s+\d+\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.MULTILINE)}
    assert table == {t: (round(v["accuracy"], 3), round(v["chance"], 3)) for t, v in metrics["per_task"].items()}
    assert {t: v["chance"] for t, v in metrics["per_task"].items()} == {"big_color": 0.25, "texture": 0.25}
    production = json.loads((tmp_path / "registry" / "production.json").read_text())
    assert Path(summary["model"]).parts[-2] == production["version"]
    assert (Path(summary["model"]) / "model.safetensors").exists()
    logs = proc.stdout + proc.stderr
    for phase in ("I-a-global-mlp", "I-b-global-attention", "II-local", "III-joint"):
        assert f"[phase {phase}] step 3/3" in logs, phase
    # The story of the run, not the framework's logs: few lines, each stage named, plots and logs named.
    assert len(logs.splitlines()) <= 150, logs[-5000:]
    assert "[A" not in logs and "Queued blocks" not in logs and "Running Dataset" not in logs
    # Framework warnings (raylet, Serve controller, Ray Data, vLLM, transformers) are in the file it names.
    noisy = [line for line in logs.splitlines() if re.search(r"WARNING|Warning:|\(raylet\)|INFO |Triton", line)]
    assert not noisy, noisy[:10]
    console_log = tmp_path / "logs" / "console.log"
    assert f"-> {console_log}" in logs and console_log.stat().st_size > 0
    for stage in range(1, 7):
        assert f"== {stage}/6 " in logs
    assert Path(summary["loss_plot"]).read_bytes()[:4] == Path(summary["accuracy_plot"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(summary["ray_logs"]).is_dir() and summary["ray_logs"] in logs
