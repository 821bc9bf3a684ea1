"""`slime promote`: point production at a registered version (also how to roll back), or show it.

    python -m jobs.promote --registry s3://bucket/registry v000003-20261122T030012Z --reason "rollback: ..."
    python -m jobs.promote --registry s3://bucket/registry            # print production and the versions
"""

from __future__ import annotations

import argparse
import json

from pipelines.lifecycle.registry import Registry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slime promote", description=__doc__.splitlines()[0])
    p.add_argument("--registry", required=True)
    p.add_argument("version", nargs="?")
    p.add_argument("--reason", default="manual promotion")
    args = p.parse_args(argv)
    registry = Registry(args.registry)
    if args.version:
        print(json.dumps(registry.promote(args.version, args.reason)))
        return 0
    prod = registry.production()
    for v in registry.list():
        mark = "*" if prod and v.id == prod.id else " "
        print(f"{mark} {v.id}  {json.dumps(v.metrics)}  {(v.verdict or {}).get('verdict', 'undecided')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
