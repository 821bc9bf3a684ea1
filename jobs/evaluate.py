"""`slime evaluate`: batched generation over held-out shards -> metrics.json (accuracy per qtype).

    python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml model=<dir> data.val=<uri> output=<metrics.json>
Without --address (and RAY_ADDRESS unset) an embedded local Ray is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines.evaluate import EvalConfig
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/eval_tiny.yaml)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    parser.add_argument("--num-cpus", type=float, default=2, help="logical CPUs of an embedded Ray")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
    except ValueError as e:
        print(f"slime evaluate: config error: {e}", file=sys.stderr)
        return 2

    import ray

    from pipelines.evaluate import evaluate

    if not ray.is_initialized():
        if args.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=args.address)
        else:
            ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    metrics = evaluate(cfg)
    print(json.dumps({k: metrics[k] for k in ("output", "num_samples", "accuracy", "exact_match", "errors")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
