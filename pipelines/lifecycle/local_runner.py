"""LocalRunner: the scheduler's retrain/evaluate steps run in this process on the Ray it is connected
to (an embedded local Ray or ``ray.init(address=...)``), with no Jobs API in between.

It is the built-in scheduler on one machine; ``pipelines.lifecycle.jobs_client.JobsRunner`` is the cluster form
(Ray Jobs). Only how a step runs differs: the arguments (``train_args`` / ``eval_args``), the output
locations and the Serve rollout are JobsRunner's own.
"""

from __future__ import annotations

from pipelines.lifecycle.jobs_client import JobsRunner
from slime.config import load_config


def _train(args: list[str]) -> None:
    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import train

    train(load_config(TrainConfig, args[1], args[2:]))


def _evaluate(args: list[str]) -> None:
    from pipelines.evaluate import EvalConfig, evaluate

    evaluate(load_config(EvalConfig, args[1], args[2:]))


STEPS = {"train": _train, "evaluate": _evaluate}


class LocalRunner(JobsRunner):
    def _run(self, step: str, name: str, args: list[str], run_name: str) -> None:
        # args are exactly what `python -m jobs.<name>` would get: ["--config", YAML, key=value ...]
        STEPS[name](args)
        self.job_ids[step] = f"local:{run_name}"
