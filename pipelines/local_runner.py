"""LocalRunner: the scheduler's retrain/evaluate/rollout steps run in this process on the Ray it is
connected to (an embedded local Ray or ``ray.init(address=...)``), with no Jobs API in between.

It is the built-in scheduler on one machine; ``pipelines.jobs_client.JobsRunner`` is the cluster form
(Ray Jobs). Both take the same train/evaluate arguments (``train_args`` / ``eval_args``), so a run
behaves the same whichever runner started it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipelines import storage
from pipelines.jobs_client import JobsConfig, RolloutConfig, eval_args, serve_config_for, train_args
from slime.config import load_config


class LocalRunner:
    def __init__(self, jobs: JobsConfig, rollout: RolloutConfig, work_dir: str, val: str) -> None:
        self.jobs, self.rollout_cfg, self.work_dir, self.val = jobs, rollout, work_dir, val
        self.job_ids: dict[str, str] = {}

    def retrain(self, parent_model_dir: str | None, manifest_uri: str, new_shards: list[str], run_name: str) -> str:
        from pipelines.train import train
        from pipelines.train_config import TrainConfig

        export_dir = storage.join(self.work_dir, run_name, "model")
        args = train_args(self.jobs.train_config, parent_model_dir, manifest_uri, export_dir, run_name,
                          self.jobs.train_overrides)
        train(load_config(TrainConfig, args[1], args[2:]))
        self.job_ids["train"] = f"local:{run_name}"
        return export_dir

    def evaluate(self, model_dir: str) -> dict[str, Any]:
        from pipelines.evaluate import EvalConfig, evaluate

        output = storage.join(model_dir.rstrip("/").rsplit("/", 1)[0], "metrics.json")
        args = eval_args(self.jobs.eval_config, model_dir, self.val, output, self.jobs.eval_overrides)
        self.job_ids["evaluate"] = f"local:{model_dir}"
        return evaluate(load_config(EvalConfig, args[1], args[2:]))

    def rollout(self, model_dir: str) -> None:
        cfg = self.rollout_cfg
        if cfg.mode == "none":
            return
        from ray import serve

        config = serve_config_for(cfg.serve_config, cfg.app_name, cfg.model_arg, model_dir)
        app = next(a for a in config["applications"] if a["name"] == cfg.app_name)
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        # Same app name, new args: Serve starts the new replicas before it drains the old ones.
        serve.run(builder(app["args"]), name=cfg.app_name, route_prefix=app.get("route_prefix", "/"))
