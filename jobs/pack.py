"""`slime pack`: append LLaVA JSON/JSONL + images to a versioned webdataset (manifest, rejects log).

    python -m jobs.pack --config jobs/configs/pack.yaml inputs=[data/new.jsonl] output_dir=s3://bucket/wds
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.pack import PackConfig, pack
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime pack", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/pack.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_samples_per_shard=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PackConfig, args.config, args.overrides)
    except ValueError as e:
        print(f"slime pack: config error: {e}", file=sys.stderr)
        return 2
    # Bad records are counted in the summary and rejects.jsonl, never fatal: exit 0 if the run committed.
    print(json.dumps(pack(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
