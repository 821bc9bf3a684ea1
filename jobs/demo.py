"""`slime demo [--config YAML] [key=value ...]`: the whole pipeline end to end on an embedded local Ray
with the tiny model: synthesise -> pack -> train all phases -> evaluate -> register + promote -> serve
-> one request through the openai client. Prints the answer, the metrics and where everything went.

    python -m jobs.demo workdir=demo_out [seed=1] [steps_per_phase=3]
"""

from __future__ import annotations

from pathlib import Path

from jobs.common import job_parser, load_job_config, run_job
from pipelines.demo import DemoConfig, run_demo, say


def main(argv: list[str] | None = None) -> int:
    args = job_parser("demo", __doc__, "train_demo.yaml (its phases)").parse_args(argv)
    default_run = str(Path(__file__).parent / "configs" / "train_demo.yaml")
    if (cfg := load_job_config("demo", DemoConfig, args, base={"train_config": default_run})) is None:
        return 2
    return run_job("demo", lambda: _run(cfg))


def _run(cfg: DemoConfig) -> None:
    from pipelines.console import framework_output_to

    # The console tells the story; Ray's, vLLM's and the driver's own warnings and logs go to a file.
    log = Path(cfg.workdir).resolve() / "logs" / "console.log"
    say(f"framework output (Ray driver, vLLM, transformers warnings) -> {log}")
    with framework_output_to(str(log)):
        run_demo(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
