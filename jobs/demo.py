"""`slime demo [--config YAML] [key=value ...]`: the whole pipeline end to end on an embedded local Ray
with the tiny model: synthesise -> pack -> train all phases -> evaluate -> register + promote -> serve
-> one request through the openai client. Prints the answer, the metrics and where everything went.

    python -m jobs.demo workdir=demo_out [seed=1] [steps_per_phase=3]
"""

from __future__ import annotations

from pathlib import Path

from jobs.common import job_parser, load_job_config, run_job
from pipelines.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    args = job_parser("demo", __doc__, "train_demo.yaml (its phases)").parse_args(argv)
    default_run = str(Path(__file__).parent / "configs" / "train_demo.yaml")
    if (cfg := load_job_config("demo", DemoConfig, args, base={"train_config": default_run})) is None:
        return 2
    return run_job("demo", lambda: run_demo(cfg) and None)


if __name__ == "__main__":
    raise SystemExit(main())
