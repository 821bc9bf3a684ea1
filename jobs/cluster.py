"""`slime cluster`: a local multi-node Ray cluster (head + N worker nodes, separate raylets on this machine).

    python -m jobs.cluster --workers 2 [--head-cpus 2] [--worker-cpus 1] [--dashboard-port 8266]
Prints the address and the Jobs API URL, then runs until Ctrl-C / SIGTERM and stops what it started (by
pid). Worker node i carries the resources slime_worker=1 and slime_node_<i>=1; in another shell:
    RAY_ADDRESS=<address> python -m jobs.train --config jobs/configs/train_tiny.yaml \\
        storage_path=s3://BUCKET/runs 'scaling.resources_per_worker={CPU: 0.5, slime_worker: 1}'
    slime submit train --address <jobs url> -- --config jobs/configs/train_tiny.yaml ...
(A run whose workers sit on more than one node needs shared storage: S3, not a local path.)
"""

from __future__ import annotations

import argparse
import json
import signal
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slime cluster", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    p.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head")
    p.add_argument("--worker-cpus", type=int, default=1, help="logical CPUs of each worker node")
    p.add_argument("--dashboard-port", type=int, default=8266, help="Jobs API / dashboard port on 127.0.0.1")
    p.add_argument("--root", default=None, help="directory for the nodes' temp dirs and logs, kept (default: a new /tmp dir, removed at the end)")
    args = p.parse_args(argv)

    from pipelines.cluster import LocalCluster, LocalClusterConfig

    stop = threading.Event()
    with LocalCluster(LocalClusterConfig(workers=args.workers, head_cpus=args.head_cpus,
                                         worker_cpus=args.worker_cpus, dashboard_port=args.dashboard_port,
                                         root=args.root)) as cluster:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after the start: Ray's nodes install their own handler
            signal.signal(sig, lambda *_: stop.set())
        print(json.dumps({"address": cluster.address, "jobs_url": cluster.dashboard_url, "root": cluster.root,
                          "workers": {i: cluster.node_id(i) for i in cluster.nodes}, "pids": cluster.pids()}),
              flush=True)
        print(f"export RAY_ADDRESS={cluster.address}   # then python -m jobs.<name> joins this cluster\n"
              f"slime submit <name> --address {cluster.dashboard_url} -- ARGS   # through the Jobs API\n"
              "Ctrl-C stops the cluster.", flush=True)
        stop.wait()
        print("stopping the local cluster", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
