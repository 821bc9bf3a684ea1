"""`slime train`: run (or resume) a phased training schedule with Ray Train, then export the model.

    python -m jobs.train --config jobs/configs/train_tiny.yaml data.manifest=/tmp/slime/wds/train
    python -m jobs.train --config jobs/configs/train_tiny.yaml init_from=<dir> data.manifest=<uri> \
        export_dir=<dir> name=<run>            # what the retraining scheduler runs
Re-running the same name resumes from its last checkpoint. Without --address (and RAY_ADDRESS unset)
an embedded local Ray is started.
"""

from __future__ import annotations

import json

from jobs.common import JobError, init_ray, job_parser, load_job_config, run_job
from pipelines.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    args = job_parser("train", __doc__, "train_tiny.yaml", ray=True).parse_args(argv)
    if (cfg := load_job_config("train", TrainConfig, args)) is None:
        return 2

    def body() -> None:
        from pipelines.train.loop import preflight, train

        try:
            preflight(cfg)  # data and init model exist: checked before Ray starts
        except ValueError as e:
            raise JobError(str(e)) from e
        init_ray(args)
        print(json.dumps(train(cfg), default=str))

    return run_job("train", body)


if __name__ == "__main__":
    raise SystemExit(main())
