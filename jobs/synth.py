"""`slime synth`: write a deterministic synthetic high-res VQA dataset (images + LLaVA JSON).

    python -m jobs.synth --config jobs/configs/synth_tiny.yaml seed=1 output_dir=s3://bucket/synth
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.synth import SynthConfig, generate
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime synth", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/synth_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_images=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(SynthConfig, args.config, args.overrides)
    except ValueError as e:
        print(f"slime synth: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(generate(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
