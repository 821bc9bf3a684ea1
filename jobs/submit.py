"""Run a job on a Ray cluster through the Jobs API, and inspect it.

    slime submit train --address http://HEAD:8265 [--working-dir .] [--pip PKG]... [--env K=V]... \\
        [--submission-id ID] [--num-cpus N] [--num-gpus N] [--no-wait] -- --config jobs/configs/train_tiny.yaml
    slime status|stop JOB_ID --address URL        slime logs JOB_ID --address URL [--follow]

The address defaults to $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS / http://127.0.0.1:8265. With token auth
on the cluster, set RAY_AUTH_TOKEN (or RAY_AUTH_MODE=token with ~/.ray/auth_token).
Exit code: 0 when the job SUCCEEDED (or was submitted, with --no-wait), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.lifecycle import jobs_client


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, job_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="slime submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="job module: runs python -m jobs.<name> <args after -->")
    p.add_argument("--address", default=None)
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir ('' = none)")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="job env var (repeatable)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--num-cpus", type=float, default=None, help="entrypoint_num_cpus")
    p.add_argument("--num-gpus", type=float, default=None, help="entrypoint_num_gpus")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    args = p.parse_args(own)
    env_vars = dict(kv.split("=", 1) for kv in args.env)
    client = jobs_client.connect(args.address)
    job_id = jobs_client.submit(client, args.name, job_args,
                                runtime_env=jobs_client.runtime_env(args.working_dir or None, args.pip, env_vars),
                                submission_id=args.submission_id, entrypoint_num_cpus=args.num_cpus,
                                entrypoint_num_gpus=args.num_gpus)
    print(f"submitted {job_id}", flush=True)
    if args.no_wait:
        return 0
    status = jobs_client.follow(client, job_id)
    print(f"job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _job_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("job_id")
    p.add_argument("--address", default=None)
    return p


def status_main(argv: list[str] | None = None) -> int:
    args = _job_parser("slime status").parse_args(argv)
    info = jobs_client.connect(args.address).get_job_info(args.job_id)
    print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
    return 1 if info.status.value in ("FAILED", "STOPPED") else 0


def logs_main(argv: list[str] | None = None) -> int:
    p = _job_parser("slime logs")
    p.add_argument("--follow", action="store_true")
    args = p.parse_args(argv)
    client = jobs_client.connect(args.address)
    if args.follow:
        return 0 if jobs_client.follow(client, args.job_id) == "SUCCEEDED" else 1
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def stop_main(argv: list[str] | None = None) -> int:
    args = _job_parser("slime stop").parse_args(argv)
    stopped = jobs_client.connect(args.address).stop_job(args.job_id)
    print(f"{args.job_id} {'stop requested' if stopped else 'was not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
