"""The README's step-by-step block runs top to bottom as written: synth -> pack train -> pack val -> train
-> evaluate -> explain -> tokens -> serve (+ one request through the official openai client).

Two things differ from a person typing it, both outside the commands themselves: ``/tmp/slime`` is this
test's own directory, in the commands and in copies of ``jobs/configs`` they read (so runs never share
state), and ``slime serve`` gets a free ``--port`` instead of 8000 and is stopped with Ctrl-C (SIGINT)
once it has answered.

``slime train`` here is the plain DDP run of ``train_tiny.yaml`` (2 workers, the four paper phases), so
its run directory is also where the golden losses, the per-phase trainable sets and the export are
checked (``tests.test_train.check_ddp_four_phases``) instead of training the same run again there."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_steps() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Running each step", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.split("  #", 1)[0].strip() for line in joined.splitlines() if line.strip().startswith("slime ")]


def test_readme_block_is_the_one_machine_pipeline():
    names = [shlex.split(c)[1] for c in readme_steps()]
    assert names == ["synth", "pack", "pack", "train", "evaluate", "explain", "tokens", "serve"]


def _ctrl_c_stops_it() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt.
    A pytest started in the background (``nohup ... &``, non-interactive shells) ignores SIGINT, every child
    inherits that, and ``slime serve`` would then never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
def test_readme_steps_run_in_order(tmp_path):
    import openai

    root = tmp_path / "slime"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SLIME_LOG_DIR": str(root / "logs"), "RAY_ADDRESS": ""}
    slime = [sys.executable, "-m", "jobs.cli"]  # what the `slime` console script runs
    configs = tmp_path / "configs"
    configs.mkdir()
    for f in (REPO / "jobs" / "configs").glob("*.yaml"):
        (configs / f.name).write_text(f.read_text().replace("/tmp/slime", str(root)))
    steps = [shlex.split(c.replace("/tmp/slime", str(root)).replace("jobs/configs/", f"{configs}/"))
             for c in readme_steps()]
    for argv in steps[:-1]:
        proc = subprocess.run(slime + argv[1:], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (argv, proc.stdout[-3000:], proc.stderr[-3000:])
        if argv[1] == "train":  # the job prints train()'s summary as its last line
            from tests.test_train import check_ddp_four_phases

            summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
            check_ddp_four_phases(summary, root / "runs" / "tiny", root / "models" / "tiny")
        if argv[1] == "evaluate":
            metrics = json.loads((root / "models/tiny/eval/metrics.json").read_text())
            assert metrics["num_samples"] > 0 and (root / "models/tiny/eval/accuracy.png").exists()
            assert metrics["engine"] == "vllm"  # the README's preset runs on the default engine
            # what the person running it reads: the job's lines, not vLLM's Triton notice or Ray Data's read warning
            assert "Triton" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr[-3000:]
    assert (root / "runs/tiny/logs/loss.png").exists() and (root / "explain.png").exists()

    port = _free_port()
    serve = subprocess.Popen(slime + steps[-1][1:] + ["--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_ctrl_c_stops_it)
    try:
        # `slime serve` prints its "serving ... at URL" line once the app is deployed: wait for that line.
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if re.search(r"serving .* at http://127\.0\.0\.1:\d+/v1", line):
                assert " on vllm at " in line, line
                break
        else:
            raise AssertionError("slime serve exited before serving:\n" + "".join(lines)[-3000:])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        image = next((root / "synth_tiny" / "images").iterdir())
        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        if image.suffix == ".jpg":
            url = url.replace("image/png", "image/jpeg")
        reply = client.chat.completions.create(model="slime-tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What colour is the background?"}, {"type": "image_url", "image_url": {"url": url}}]}])
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, serve.stdout.read()[-3000:]
