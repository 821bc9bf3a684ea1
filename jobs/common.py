"""What every job entry point shares: `--config YAML` + `key=value` overrides into a frozen config
dataclass (an unknown key is an error naming it; exit code 2), and an embedded local Ray when no
cluster address is given."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def job_parser(name: str, doc: str, example_yaml: str, *, ray: bool = False,
               num_cpus: float = 4) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"slime {name}", description=doc.splitlines()[0])
    parser.add_argument("--config", help=f"YAML file (see jobs/configs/{example_yaml})")
    if ray:
        parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
        parser.add_argument("--num-cpus", type=float, default=num_cpus, help="logical CPUs of an embedded Ray")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. a.b=1")
    return parser


def load_job_config(name: str, cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """The config, or None after printing the error (the caller returns 2)."""
    from slime.config import load_config

    try:
        return load_config(cls, args.config, args.overrides, base=base)
    except ValueError as e:
        print(f"slime {name}: config error: {e}", file=sys.stderr)
        return None


def init_ray(args: argparse.Namespace, *, dashboard: bool = True) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start an embedded one. Logical CPUs may exceed
    the cores: fractional workers and data actors then all fit (RAY_NOTES section 5)."""
    import ray

    if ray.is_initialized():
        return
    if args.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1")
