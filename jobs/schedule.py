"""`slime schedule`: scheduled retraining (retrain on new shards -> evaluate -> promote if not worse -> roll Serve).

    python -m jobs.schedule --config jobs/configs/schedule_tiny.yaml --once            # one tick now (CronJob pod)
    python -m jobs.schedule --config jobs/configs/schedule_tiny.yaml --cron "0 3 * * *" # long-running process
Exit code of --once: 0 unless the tick failed (its decision record says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

from pipelines.lifecycle.jobs_client import JobsRunner
from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler, check_cron
from slime.config import load_config, replace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see jobs/configs/schedule_tiny.yaml)")
    parser.add_argument("--cron", help='cron expression (5 fields or @daily/@hourly/...), overrides the config (e.g. "0 3 * * *")')
    parser.add_argument("--once", action="store_true", help="tick once now and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. jobs.address=http://head:8265")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ScheduleConfig, args.config, args.overrides)
        if args.cron:
            check_cron(args.cron)
            cfg = replace(cfg, cron=args.cron)
    except ValueError as e:
        print(f"slime schedule: config error: {e}", file=sys.stderr)
        return 2
    zone = ZoneInfo(cfg.timezone)
    if cfg.jobs.address == "local":  # built-in scheduler on one machine: steps run on an embedded Ray
        from pipelines.cluster import init_embedded
        from pipelines.lifecycle.local_runner import LocalRunner

        init_embedded()
        runner = LocalRunner(cfg.jobs, cfg.rollout, cfg.work_dir, cfg.val)
    else:
        runner = JobsRunner(cfg.jobs, cfg.rollout, cfg.work_dir, cfg.val)
    # the heartbeat thread keeps the registry lock alive while train/evaluate jobs run for hours
    scheduler = Scheduler(cfg, runner, now=lambda: datetime.now(zone), heartbeat_s=cfg.lock_ttl_s / 4)
    if args.once:
        record = scheduler.tick()
        print(json.dumps(record, indent=2, default=str))
        return 1 if record["decision"] == "failed" else 0
    print(f"slime schedule: ticking at {cfg.cron!r} ({cfg.timezone}); registry {cfg.registry}", flush=True)
    scheduler.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
