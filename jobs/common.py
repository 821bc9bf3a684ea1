"""What every job entry point shares: `--config YAML` + `key=value` overrides into a frozen config
dataclass (an unknown key is an error naming it; exit code 2), an embedded local Ray when no cluster
address is given, and `run_job`: an expected failure (a missing path, empty data, a bad model directory)
is one line naming the problem and exit code 2, with the traceback kept in a log file."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


class JobError(Exception):
    """A mistake the user can fix (the message names the problem and the fix): one line, exit code 2."""


# Failures that come from the user's paths and data, not from a bug: one line instead of a traceback.
EXPECTED = (JobError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def log_dir() -> str:
    return os.environ.get("SLIME_LOG_DIR") or os.path.join(tempfile.gettempdir(), "slime", "logs")


def run_job(name: str, body: Callable[[], int | None]) -> int:
    """Run a job's body. Expected failures print ``slime NAME: error: ...`` plus where the traceback was
    written and return 2; anything else is a bug and keeps its traceback on screen (exit 1)."""
    try:
        return int(body() or 0)
    except EXPECTED as e:
        path = _write_traceback(name)
        print(f"slime {name}: error: {_one_line(e)} (traceback: {path})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slime {name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        path = _write_traceback(name)
        traceback.print_exc()
        print(f"slime {name}: failed (traceback also in {path})", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _write_traceback(name: str) -> str:
    os.makedirs(log_dir(), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(log_dir(), f"{name}-{stamp}-{os.getpid()}.log")
    with open(path, "a") as f:
        f.write(f"slime {name} {' '.join(sys.argv[1:])}\n")
        traceback.print_exc(file=f)
    return path


def require_model_dir(uri: str, what: str = "model", storage_cfg: Any = None) -> None:
    """A model directory must hold slime_config.yaml, an adapter directory slime_adapter.json (local or s3://)."""
    from pipelines import storage
    from slime.lora import ADAPTER_META

    if not uri:
        raise JobError(f"no {what} given: pass {what}=DIR (a directory written by slime train / export)")
    if storage.exists(storage.join(uri, ADAPTER_META), storage_cfg):
        return
    if not storage.exists(storage.join(uri, "slime_config.yaml"), storage_cfg):
        why = "does not exist" if not storage.exists(uri, storage_cfg) else "has no slime_config.yaml"
        raise JobError(f"{what} {uri} {why}: give a model directory written by slime train (export_dir) "
                       "or slime convert")


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

    from pipelines.console import quiet_driver_logs, quiet_ray_init_kwargs, ray_log_dir

    if ray.is_initialized():
        return
    if args.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.address, **quiet_ray_init_kwargs())
    else:
        # "local": a new embedded Ray even when a `ray start` cluster runs on this machine (ray.init() alone
        # would join that one and then refuse num_cpus).
        from pipelines.cluster import init_embedded

        init_embedded(num_cpus=args.num_cpus, include_dashboard=dashboard, **quiet_ray_init_kwargs())
    quiet_driver_logs()
    print(f"Ray logs (workers, Ray Data, Train, Serve): {ray_log_dir()}", flush=True)
