"""`slime train`: run (or resume) a phased training schedule with Ray Train, then export the model.

    python -m jobs.train --config jobs/configs/train_tiny.yaml data.manifest=/tmp/slime/wds/train
    python -m jobs.train --config jobs/configs/train_tiny.yaml init_from=<dir> data.manifest=<uri> \
        export_dir=<dir> name=<run>            # what the retraining scheduler runs
Re-running the same name resumes from its last checkpoint. Without --address (and RAY_ADDRESS unset)
an embedded local Ray is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines.train_config import TrainConfig
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/train_tiny.yaml)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    parser.add_argument("--num-cpus", type=float, default=4, help="logical CPUs of an embedded Ray")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.grad_accum=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ValueError as e:
        print(f"slime train: config error: {e}", file=sys.stderr)
        return 2

    import ray

    from pipelines.train import train

    if not ray.is_initialized():
        if args.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=args.address)
        else:  # logical CPUs above the core count: fractional workers + data actors all fit (RAY_NOTES 5)
            ray.init(num_cpus=args.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    print(json.dumps(train(cfg), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
