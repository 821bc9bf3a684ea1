"""`slime serve`: run the OpenAI-compatible Serve app on 127.0.0.1 and block until Ctrl-C.

    python -m jobs.serve --config jobs/configs/serve_tiny.yaml --model /tmp/slime/tiny_model [mode=global ...]
    python -m jobs.serve --model s3://bucket/models/v3 --address auto      # on a running cluster
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m jobs.serve --model models:/slime@champion   # MLflow registry

For `serve run` / `serve deploy` use cluster/serve_config.yaml (same builder, same arguments).
"""

from __future__ import annotations

import argparse
import sys
import threading

from jobs.common import JobError, require_model_dir, run_job
from pipelines.serve.app import ServeArgs, build_app
from slime.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/serve_tiny.yaml)")
    parser.add_argument("--model", help="checkpoint directory, s3:// URI, or models:/NAME@ALIAS | models:/NAME/VERSION "
                        "of the MLflow Model Registry (overrides the config's model)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server for models:/ URIs (default: "
                        "$MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--follow", type=float, default=None, metavar="SECONDS",
                        help="with --model models:/NAME@ALIAS: poll the alias every SECONDS and roll the app to the "
                        "version it names when it moves (promotion, rollback, or by hand in the MLflow UI)")
    parser.add_argument("--name", default="slime", help="Serve application name (same name = rolling update)")
    parser.add_argument("--address", default=None, help="Ray cluster address; default: start an embedded Ray")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. autoscaling.max_replicas=2")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    try:
        cfg = load_config(ServeArgs, args.config, overrides)
    except ValueError as e:
        print(f"slime serve: config error: {e}", file=sys.stderr)
        return 2
    return run_job("serve", lambda: _serve(cfg, args))


def resolve_model(cfg: ServeArgs, tracking_uri: str | None) -> tuple[ServeArgs, str | None]:
    """A ``models:/`` model becomes the directory its MLflow model version points at (said once); returns the
    config and that version (None for a plain directory)."""
    import dataclasses

    from pipelines.tracking.client import MlflowError
    from pipelines.tracking.models import resolve_model_uri

    try:
        directory, mv = resolve_model_uri(cfg.model, tracking_uri)
    except (ValueError, MlflowError) as e:
        raise JobError(f"model {cfg.model}: {e}") from e
    if mv is None:
        return cfg, None
    print(f"{cfg.model} -> version {mv['version']} -> {directory}", flush=True)
    return dataclasses.replace(cfg, model=directory), mv["version"]


def _serve(cfg: ServeArgs, args: argparse.Namespace) -> None:
    if args.follow and not (args.model or "").startswith("models:/"):
        raise JobError("--follow needs --model models:/NAME@ALIAS")
    cfg, version = resolve_model(cfg, args.tracking_uri)
    # A missing model would otherwise surface only as "Deploying application slime failed", with the
    # cause in a replica's log: check it before Serve deploys anything.
    require_model_dir(cfg.model, "model", getattr(cfg, "storage", None))
    import dataclasses

    import ray

    from pipelines.serve.engine import resolve_engine

    cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg.engine, cfg.model))  # auto: said once, printed below
    from ray import serve

    from pipelines.console import quiet_driver_logs, quiet_ray_init_kwargs, ray_log_dir

    quiet = quiet_ray_init_kwargs()
    ray.init(address=args.address, include_dashboard=False, **quiet) if args.address else \
        ray.init(address="local", include_dashboard=False, **quiet)
    serve.start(http_options={"host": args.host, "port": args.port})
    quiet_driver_logs()
    print(f"Ray logs (Serve controller, proxy, replicas): {ray_log_dir()}", flush=True)
    serve.run(build_app(cfg), name=args.name, route_prefix="/", blocking=False)
    print(f"serving {cfg.model} on {cfg.engine} at http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        if args.follow:
            from pipelines.serve.follow import AliasFollower

            AliasFollower(cfg, args.model, tracking_uri=args.tracking_uri, version=version,
                          app_name=args.name).run(args.follow)
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        serve.delete(args.name)


if __name__ == "__main__":
    raise SystemExit(main())
