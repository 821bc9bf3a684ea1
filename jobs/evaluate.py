"""`slime evaluate`: batched generation over held-out shards -> metrics.json (accuracy per qtype).

    python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml model=<dir> data.val=<uri> output=<metrics.json>
Without --address (and RAY_ADDRESS unset) an embedded local Ray is started.
"""

from __future__ import annotations

import json

from jobs.common import init_ray, job_parser, load_job_config, require_model_dir, run_job
from pipelines.evaluate import EvalConfig


def main(argv: list[str] | None = None) -> int:
    args = job_parser("evaluate", __doc__, "eval_tiny.yaml", ray=True, num_cpus=2).parse_args(argv)
    if (cfg := load_job_config("evaluate", EvalConfig, args)) is None:
        return 2

    def body() -> None:
        from pipelines.evaluate import evaluate, preflight

        require_model_dir(cfg.model, "model", cfg.storage)
        preflight(cfg)  # val shards exist, no result would be silently replaced: before Ray starts
        init_ray(args, dashboard=False)
        metrics = evaluate(cfg)
        print(json.dumps({k: metrics[k] for k in ("output", "plot", "num_samples", "accuracy", "exact_match",
                                                  "errors")}))

    return run_job("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
