"""`slime demo [--config YAML] [key=value ...]`: the whole pipeline end to end on an embedded local Ray
with the tiny model: synthesise -> pack -> train all phases -> evaluate -> register + promote -> serve
-> one request through the openai client. Prints the answer, the metrics and where everything went.

    python -m jobs.demo workdir=demo_out steps_per_phase=6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.demo import DemoConfig, run_demo
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="optional YAML with DemoConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. workdir=/tmp/demo num_images=24")
    args = parser.parse_args(argv)
    try:
        default_run = str(Path(__file__).parent / "configs" / "train_tiny.yaml")
        cfg = load_config(DemoConfig, args.config, args.overrides, base={"train_config": default_run})
    except ValueError as e:
        print(f"slime demo: config error: {e}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
