"""`slime lmms-eval`: lmms-eval (the field's harness, in its own environment: `make harness`) against a
served model -> lmms_eval.json + per-sample logs beside metrics.json.

    python -m jobs.lmms_eval --config jobs/configs/lmms_eval_tiny.yaml model=<dir> data.val=<shards>
    python -m jobs.lmms_eval registry=<root> version=production data.val=<shards>
    python -m jobs.lmms_eval endpoint=http://HOST:PORT/v1 data.val=<shards> output=<lmms_eval.json>
A model directory or registry version is served for the run (an embedded local Ray, or --address) and
stopped after; an endpoint is used as it is. data.val exports our questions as an lmms-eval task;
tasks=[...] adds lmms-eval's own (their datasets must be reachable).
"""

from __future__ import annotations

import json

from jobs.common import JobError, init_ray, job_parser, load_job_config, run_job
from pipelines.harness.config import HarnessConfig


def main(argv: list[str] | None = None) -> int:
    args = job_parser("lmms-eval", __doc__, "lmms_eval_tiny.yaml", ray=True, num_cpus=2).parse_args(argv)
    if (cfg := load_job_config("lmms-eval", HarnessConfig, args)) is None:
        return 2

    def body() -> None:
        from pipelines.harness.config import HarnessError
        from pipelines.harness.run import preflight, run_harness

        try:
            python, model = preflight(cfg)  # environment, model, shards, tasks, output: before Ray starts
            if model:
                init_ray(args, dashboard=False)
            report = run_harness(cfg, python, model)
        except HarnessError as e:
            raise JobError(str(e)) from e
        ours = report.get("slime_task", {})
        print(json.dumps({"output": report["output"], "tasks": sorted(report["tasks"]),
                          "accuracy": ours.get("accuracy"), "num_samples": ours.get("num_samples"),
                          "failed_requests": report["failed_requests"], "log": report["log"]}))

    return run_job("lmms-eval", body)


if __name__ == "__main__":
    raise SystemExit(main())
