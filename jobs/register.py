"""`slime register`: copy a model directory into the registry with its metrics and lineage.

    python -m jobs.register --registry s3://bucket/registry --model runs/export --metrics metrics.json \
        [--manifest s3://bucket/wds/train] [--parent v000001-...] [--promote "reason"]
"""

from __future__ import annotations

import argparse
import json

from pipelines import storage
from pipelines.lifecycle.registry import Registry
from pipelines.lifecycle.scheduler import read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slime register", description=__doc__.splitlines()[0])
    p.add_argument("--registry", required=True)
    p.add_argument("--model", required=True, help="exported model directory (local or s3://)")
    p.add_argument("--metrics", required=True, help="metrics.json written by slime evaluate")
    p.add_argument("--manifest", help="dataset the model was trained on (records its version and shards)")
    p.add_argument("--parent", help="registry version it was fine-tuned from")
    p.add_argument("--promote", metavar="REASON", help="also make it production")
    args = p.parse_args(argv)
    manifest = read_manifest(args.manifest) if args.manifest else {"dataset_version": None, "shards": []}
    lineage = {"dataset_version": manifest["dataset_version"], "shards": [s["name"] for s in manifest["shards"]],
               "parent_version": args.parent, "manifest": args.manifest}
    registry = Registry(args.registry)
    version = registry.register(args.model, json.loads(storage.read_bytes(args.metrics)), lineage)
    if args.promote:
        registry.promote(version, args.promote)
    print(version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
