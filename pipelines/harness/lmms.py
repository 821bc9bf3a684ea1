"""The lmms-eval environment (``make harness`` -> ``.venv-lmms``) and one lmms-eval run in it, as a
subprocess that reaches nothing but the endpoint; its results and per-sample logs read back."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipelines.harness.config import HarnessConfig, HarnessError

REPO = Path(__file__).resolve().parents[2]
HARNESS_PYTHON = REPO / ".venv-lmms" / "bin" / "python"


def harness_python(cfg: HarnessConfig) -> str:
    python = cfg.python or os.environ.get("SLIME_LMMS_PYTHON") or str(HARNESS_PYTHON)
    if not Path(python).is_file():
        raise HarnessError(f"no lmms-eval environment at {python}: build it with `make harness` (a separate "
                           "venv, ~1.6 GB), or point python= / SLIME_LMMS_PYTHON at one")
    return python


def known_tasks(python: str) -> set[str]:
    """Task and group names of the installed lmms-eval (read from its task YAMLs, no import: fast)."""
    root = subprocess.run([python, "-c", "import importlib.util as u; "
                           "print(u.find_spec('lmms_eval').submodule_search_locations[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = set()
    pattern = re.compile(r"^(?:task|group)\s*:\s*['\"]?([\w.\-]+)", re.M)
    for path in glob.glob(os.path.join(root, "tasks", "**", "*.yaml"), recursive=True) + \
            glob.glob(os.path.join(root, "tasks", "**", "_default_template*"), recursive=True):
        with open(path, errors="replace") as f:
            names.update(pattern.findall(f.read()))
    return names


def harness_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('lmms_eval'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def harness_env(work: Path, api_key: str | None) -> dict[str, str]:
    """The subprocess's environment: offline (it may reach nothing but the endpoint), its caches under the
    run's folder, nothing of our venv on its paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf"),
               TOKENIZERS_PARALLELISM="false", OPENAI_API_KEY=api_key or "EMPTY", PYTHONUNBUFFERED="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    return env


def run_lmms_eval(python: str, cfg: HarnessConfig, *, endpoint: str, model_id: str, tasks: list[str],
                  task_dir: Path | None, work: Path, log: Path) -> Path:
    """One lmms-eval run; its output folder. A failed run is a HarnessError with the end of its log."""
    out = work / "lmms_eval_output"
    model_args = (f"model={model_id},base_url={endpoint},timeout={cfg.timeout_s:g},max_retries={cfg.max_retries},"
                  f"num_concurrent={cfg.num_concurrent},retry_backoff_s=1")
    cmd = [python, "-m", "lmms_eval", "--model", "openai", "--model_args", model_args, "--tasks", ",".join(tasks),
           "--output_path", str(out), "--log_samples", "--batch_size", "1", "--seed", "0", "--verbosity", "INFO"]
    if task_dir is not None:
        cmd += ["--include_path", str(task_dir)]
    if cfg.limit:
        cmd += ["--limit", str(cfg.limit)]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=harness_env(work, cfg.api_key),
                            cwd=work).returncode
    if rc != 0 or not glob.glob(str(out / "**" / "*_results.json"), recursive=True):
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-12:]
        raise HarnessError(f"lmms-eval exited with code {rc} and no results (full log: {log}); its last lines:\n  "
                           + "\n  ".join(tail))
    return out


def read_results(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """lmms-eval's newest results.json and its per-task sample logs."""
    results_path = max(glob.glob(str(out / "**" / "*_results.json"), recursive=True), key=os.path.getmtime)
    results = json.loads(Path(results_path).read_text())
    stamp = Path(results_path).name.removesuffix("_results.json")
    samples = {}
    for path in glob.glob(str(Path(results_path).parent / f"{stamp}_samples_*.jsonl")):
        task = Path(path).name.removeprefix(f"{stamp}_samples_").removesuffix(".jsonl")
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return results, samples


def response(sample: dict) -> str:
    resp = sample.get("filtered_resps") or sample.get("resps") or [""]
    while isinstance(resp, list):
        resp = resp[0] if resp else ""
    return str(resp)
