"""The README's first command, end to end: synth -> pack -> train all phases -> evaluate -> register +
promote -> serve -> one request through the openai client. Runs in its own process (its own Ray)."""

from __future__ import annotations

import json
import os
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
    assert summary["usage"]["visual_tokens"] > 0 and summary["usage"]["completion_tokens"] >= 1
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["num_samples"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0
    production = json.loads((tmp_path / "registry" / "production.json").read_text())
    assert Path(summary["model"]).parts[-2] == production["version"]
    assert (Path(summary["model"]) / "model.safetensors").exists()
    logs = proc.stdout + proc.stderr
    for phase in ("I-a-global-mlp", "I-b-global-attention", "II-local", "III-joint"):
        assert f"[phase {phase}] step 3/3" in logs, phase
