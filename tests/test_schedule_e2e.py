"""Scheduled retraining end to end with the real steps: ticks with an injected clock drive the real
train (Ray Train), evaluate (Ray Data + Predictor) and Serve rollout through LocalRunner.

tick 1: new shards, no production -> retrain from the tiny init -> evaluate -> promote -> Serve serves it
tick 2: nothing new               -> no job, production unchanged, the reason recorded
tick 3: a new batch was packed    -> fine-tune from production on it -> promote -> Serve rolls over
"""

from __future__ import annotations

import hashlib
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.data.pack import PackConfig, pack
from pipelines.data.synth import SynthConfig, generate
from pipelines.lifecycle.jobs_client import JobsConfig, RolloutConfig
from pipelines.lifecycle.local_runner import LocalRunner
from pipelines.lifecycle.registry import Registry
from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _synth_and_pack(root: Path, seed: int, split: str = "train") -> None:
    raw = root / f"raw{seed}"
    generate(SynthConfig(output_dir=str(raw), seed=seed, num_images=8, val_fraction=0.25, min_side=300, max_side=500,
                         questions_per_image=2, progress=False))
    pack(PackConfig(inputs=(str(raw / f"{split}.json"),), output_dir=str(root / f"wds-{split}"), progress=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ticks_retrain_evaluate_promote_and_roll_serve(ray_session, tmp_path):
    from ray import serve

    _synth_and_pack(tmp_path, seed=1)
    _synth_and_pack(tmp_path, seed=1, split="val")
    run_cfg = yaml.safe_load((REPO / "jobs/configs/train_tiny.yaml").read_text())
    run_cfg.update(storage_path=str(tmp_path / "runs"),
                   # One phase (joint) per retrain: what is checked here is the tick, not the schedule
                   # (test_train covers phases); each phase costs its own data pipeline start-up.
                   phases=[dict(run_cfg["phases"][3], steps=2)],
                   scaling=dict(run_cfg["scaling"], num_workers=1), checkpoint=dict(run_cfg["checkpoint"], every_steps=100))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(run_cfg))
    serve_cfg = yaml.safe_load((REPO / "cluster/serve_config.yaml").read_text())
    app = serve_cfg["applications"][0]
    app["name"], app["route_prefix"] = "sched", "/sched"
    app["args"].update(num_cpus=0.25, autoscaling={"min_replicas": 1, "max_replicas": 1})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))

    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "wds-train"),
                         val=str(tmp_path / "wds-val"), work_dir=str(tmp_path / "work"), tolerance=1.0,
                         jobs=JobsConfig(address="local", train_config=str(tmp_path / "train.yaml"),
                                         eval_config=str(REPO / "jobs/configs/eval_tiny.yaml")),
                         rollout=RolloutConfig(mode="run", serve_config=str(tmp_path / "serve.yaml"), app_name="sched"))
    clock = [datetime(2026, 11, 22, 3, 0, tzinfo=UTC)]
    runner = LocalRunner(cfg.jobs, cfg.rollout, cfg.work_dir, cfg.val)
    scheduler = Scheduler(cfg, runner, now=lambda: clock[0])
    registry = Registry(cfg.registry)
    port = _free_port()
    serve.shutdown()  # start Serve with our port even if an earlier module left one running
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def served_fingerprint() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/sched/healthz", timeout=30).json()["fingerprint"]

    def fingerprint(model_uri: str) -> str:
        return "fp_" + hashlib.sha256(model_uri.encode()).hexdigest()[:12]

    try:
        first = scheduler.tick()
        assert first["decision"] == "promoted", first
        prod = registry.production()
        assert prod.id == first["version"] and len(first["new_shards"]) == 1
        assert json.loads((Path(cfg.registry) / "versions" / prod.id / "metrics.json").read_text())["num_samples"] > 0
        assert served_fingerprint() == fingerprint(prod.model_uri)

        clock[0] += timedelta(days=1)
        runner.job_ids.clear()
        second = scheduler.tick()
        assert second["decision"] == "kept" and "no new shards" in second["reason"]
        assert runner.job_ids == {} and registry.production().id == prod.id

        _synth_and_pack(tmp_path, seed=2)  # a new batch of raw data lands: new shards, new version
        clock[0] += timedelta(days=1)
        third = scheduler.tick()
        assert third["decision"] == "promoted", third
        new_prod = registry.production()
        assert new_prod.id != prod.id and len(third["new_shards"]) == 1
        lineage = json.loads((Path(cfg.registry) / "versions" / new_prod.id / "lineage.json").read_text())
        assert lineage.get("parent") == prod.id or lineage.get("parent_version") == prod.id, lineage
        assert served_fingerprint() == fingerprint(new_prod.model_uri)
        ticks = [d["decision"] for d in registry.decisions() if "decision" in d]  # promotions log too
        assert ticks[-3:] == ["promoted", "kept", "promoted"]
    finally:
        serve.shutdown()
