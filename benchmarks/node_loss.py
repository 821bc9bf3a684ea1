"""Node loss on a local multi-node Ray cluster (issue 24): serving (this module's ``serve_case``), training and
the data pipeline, each on a worker node that is killed (SIGKILL, no drain) while it works.

``python -m benchmarks.node_loss`` starts a moto S3 server and a fresh ``pipelines.cluster.LocalCluster`` (head +
2 worker nodes), runs the three cases one after the other (minutes; not part of the suite) and ends with one
JSON line::

    {"train": {"phase_steps": {PHASE: N}, "configured": {PHASE: N}, "resumed_from_step": S, "export": true},
     "data": {"expected": N, "seen": N, "duplicated": N, "lost": N},
     "serve": {"requests": N, "failed": N, "recovery_s": T}}

tests/test_multinode.py runs the same case functions on its module's cluster and asserts what they count.

Serving, as built here. The vLLM app (``pipelines.serve.build_app``, engine vllm) with 2 replicas, each asking
for ``slime_worker: 1``: one replica per worker node, none on the head. The HTTP proxy runs on the head only
(``proxy_location=HeadOnly``, 127.0.0.1), as does the Serve controller. Clients are the official ``openai``
client with its own retry (``max_retries=2``: connection errors, 408/409/429 and 5xx, with backoff): a chat
completion changes no server state, so repeating one is safe; the ingress itself does not retry. Every HTTP
attempt is counted (an httpx event hook), so a request that failed on the lost node and then succeeded on its
retry shows as a failed attempt, not as a failed request.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

SERVE_APP, SERVE_DEPLOYMENT, SERVE_MODEL_ID = "node-loss", "SlimeServer", "slime-tiny"


def poll(predicate, timeout_s: float, what: str, every: float = 0.25) -> float:
    """Seconds until ``predicate()`` is true; AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - start


def png_url(w: int = 64, h: int = 48) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (20, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- training

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def readme_data(root: str) -> str:
    """The README's synth_tiny set packed as in the README (what the golden losses were trained on) -> shards dir."""
    from pipelines.data.pack import PackConfig, pack
    from pipelines.data.synth import SynthConfig, generate
    from slime.config import load_config

    generate(load_config(SynthConfig, str(CONFIGS / "synth_tiny.yaml"), [f"output_dir={root}/synth_tiny",
                                                                         "progress=false"]))
    pack(load_config(PackConfig, str(CONFIGS / "pack.yaml"), [f"inputs=[{root}/synth_tiny/train.json]",
                                                              f"output_dir={root}/wds/train", "progress=false"]))
    return f"{root}/wds/train"


def train_workers() -> dict[str, str]:
    """Live Ray Train worker actors -> node id (asked of this driver's cluster: another Ray on the machine would
    otherwise be "the latest instance" the state API finds)."""
    import ray
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                                       filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")])}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def train_watched(cfg, watch, seen: dict, join_s: float = 60.0) -> tuple[dict, float]:
    """``train(cfg)`` with ``watch`` running beside it in a thread (it ends when ``seen["stop"]`` is set, which
    happens when training returns or raises) -> (train's summary, seconds it took)."""
    from pipelines.train.loop import train

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        summary = train(cfg)
    finally:
        seen["stop"] = True
        watcher.join(timeout=join_s)
    return summary, time.monotonic() - started


def train_case(cluster, data: str, base: str, work: str, *, phases: int = 4, name: str = "multinode") -> dict:
    """The README's tiny schedule (train_tiny.yaml, its first ``phases`` phases; the LR schedule and the seeds are
    per phase, so the first phases' losses do not depend on the later ones) with its 2 DDP workers on 2 worker
    nodes (``slime_worker: 1`` each), checkpoints every 2 steps and the export on ``base`` (s3://). Once phase
    II's step-2 checkpoint is stored and rank 0 logged global step 10, the node of one train worker is killed
    and a replacement node joins (as an autoscaler would provide one). Returns what the run did: per-phase
    steps, the step it resumed from, the final losses by global step, the logged step order, ..."""
    import dataclasses

    from pipelines import storage
    from pipelines.train.config import TrainConfig
    from slime.config import load_config

    cfg = load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), [
        f"name={name}", f"storage_path={base}/runs", f"export_dir={base}/models/{name}",
        f"data.manifest={data}", "scaling.resources_per_worker={CPU: 1, slime_worker: 1}",
        "checkpoint.every_steps=2", "checkpoint.max_failures=3", "checkpoint.num_to_keep=null",
        f"logging.local_dir={work}/logs", "logging.tensorboard=false"])
    cfg = dataclasses.replace(cfg, phases=cfg.phases[:phases])
    log = Path(work) / "logs" / "metrics.jsonl"
    mid_ckpt = f"{base}/runs/{name}/checkpoint-p02-s0000002/train_state.json"  # phase II, step 2 = global 10
    seen: dict = {}

    def lose_a_node() -> None:
        try:
            watch()
        except BaseException as e:  # reported by the caller, not lost in a thread
            seen["error"] = repr(e)
            raise

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not seen.get("stop"):
            rows = read_rows(log)
            if any(r.get("global_step") == 10 for r in rows) and storage.exists(mid_ckpt):
                seen["workers"] = train_workers()
                nodes = {cluster.node_id(i): i for i in cluster.workers()}
                seen["worker_nodes"] = sorted(nodes.get(n, -1) for n in seen["workers"].values())
                seen["last_step_before_kill"] = max(r["global_step"] for r in rows if "event" not in r)
                seen["victim"] = max(seen["worker_nodes"])
                seen["kill_s"] = cluster.kill_node(seen["victim"])
                seen["killed_at"] = time.monotonic()
                say(f"[node-loss] train: killed worker node {seen['victim']} after global step "
                    f"{seen['last_step_before_kill']}")
                seen["replacement"] = cluster.add_worker()
                seen["replacement_joined_s"] = round(time.monotonic() - seen["killed_at"], 1)
                say(f"[node-loss] train: replacement node {seen['replacement']} joined "
                    f"{seen['replacement_joined_s']} s after the kill")
                return
            time.sleep(0.2)

    summary, took = train_watched(cfg, lose_a_node, seen)
    if "error" in seen:
        raise RuntimeError(f"the node-loss watcher failed: {seen['error']}")
    if "killed_at" not in seen:
        raise RuntimeError("the run ended before phase II's mid checkpoint was seen: no node was lost")
    rows = read_rows(log)
    steps = [r for r in rows if "event" not in r]
    resumes = [r for r in rows if r.get("event") == "resume"]
    final: dict[int, dict] = {}
    for r in steps:
        final[r["global_step"]] = r  # a step recomputed after the restore replaces the lost attempt's
    phase_steps: dict[str, int] = {}
    for r in final.values():
        phase_steps[r["phase"]] = max(phase_steps.get(r["phase"], 0), r["step"])
    out = {"phase_steps": phase_steps, "configured": {p.name: p.steps for p in cfg.phases},
           "resumed_from_step": resumes[-1]["global_step"] if resumes else None,
           "export": storage.exists(f"{base}/models/{name}/EXPORT_COMPLETE"),
           "losses": [final[g]["loss"] for g in sorted(final)], "global_steps": sorted(final),
           "order": [r["global_step"] for r in steps],  # the lost attempt's steps, then the resumed run's
           "summary_phase_steps": summary["phase_steps"], "summary_global_step": summary["metrics"]["global_step"],
           "checkpoint": summary["checkpoint"], "run_s": round(took, 1),
           **{k: seen[k] for k in ("workers", "worker_nodes", "last_step_before_kill", "victim", "replacement",
                                   "replacement_joined_s")}, "kill_s": round(seen["kill_s"], 2)}
    say(f"[node-loss] train: workers on worker nodes {out['worker_nodes']}; killed node {out['victim']} after "
        f"global step {out['last_step_before_kill']}; replacement node {out['replacement']} joined; resumed from "
        f"global step {out['resumed_from_step']}; phase steps {phase_steps} (configured {out['configured']}); "
        f"run {took:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------------- data


def shard_sample_ids(shards: str) -> list[int]:
    """The id (``sample_hash`` of the webdataset key) of every complete sample in the local shard directory's
    tars, read without Ray by the same tar reader Ray Data's ShardReader uses."""
    from collections import Counter

    from pipelines.data.preprocess import iter_tar_samples, sample_hash

    ids = []
    for path in sorted(Path(shards).glob("*.tar")):
        with open(path, "rb") as f:
            ids += [sample_hash(str(s["key"])) for s in iter_tar_samples(f, str(path), Counter())]
    return ids


def data_case(cluster, shards: str, model: str, *, actors: int = 3, kill_after: float = 1 / 3) -> dict:
    """Ray Data reads and preprocesses ``shards`` with ``actors`` Preprocessor actors spread over the nodes; the
    worker node holding most of them is killed after ``kill_after`` of the epoch. Every sample id
    (``sample_hash``) is counted against the samples in the shards (read without Ray)."""
    import ray
    from ray.util.state import list_actors

    from pipelines.data.ingest import DataConfig, build_dataset

    cfg = DataConfig(shards=shards, model=model, mode="global", num_actors=actors, actor_num_cpus=0.5,
                     batch_size=4, metrics_name="DataMetrics-node-loss-data")
    expected = shard_sample_ids(shards)
    seen: list[int] = []
    killed = None
    for batch in build_dataset(cfg).iter_batches(batch_size=4):
        seen += [int(h) for h in batch["sample_hash"]]
        if killed is None and len(seen) >= len(expected) * kill_after:
            alive = [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                            filters=[("state", "=", "ALIVE")]) if "Preprocessor" in a.class_name]
            held = {i: sum(a.node_id == cluster.node_id(i) for a in alive) for i in cluster.workers()}
            victim = max(held, key=lambda i: (held[i], i))  # the worker node holding most Preprocessor actors
            cluster.kill_node(victim)
            killed = {"node": victim, "actors_on_it": held[victim], "actors": len(alive), "after": len(seen)}
            say(f"[node-loss] data: killed worker node {victim} ({held[victim]} of {len(alive)} Preprocessor "
                f"actors on it) after {len(seen)} samples")
    out = {"expected": len(expected), "seen": len(seen), "duplicated": len(seen) - len(set(seen)),
           "lost": len(set(expected) - set(seen)), "unique_expected": len(set(expected)), "killed": killed}
    say(f"[node-loss] data: {json.dumps(out)}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Node loss in training, the data pipeline and serving on a fresh local "
                                            "multi-node cluster; the last line is one JSON object.")
    p.add_argument("--phases", type=int, default=4, help="phases of train_tiny.yaml to train (4 = all)")
    p.add_argument("--clients", type=int, default=3, help="concurrent openai clients in the serve case")
    args = p.parse_args(argv)
    import os
    import shutil
    import tempfile
    import uuid

    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_OFFLINE": "1", "RAY_TRAIN_V2_ENABLED": "1", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "SLIME_TRACKING": "off"}.items():  # no MLflow server for these runs (as in the tests)
        os.environ.setdefault(k, v)
    import logging

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from benchmarks.node_loss_serve import serve_case
    from pipelines.cluster import LocalCluster, LocalClusterConfig
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = tempfile.mkdtemp(prefix="slime-node-loss-")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"  # before the nodes start: they inherit it
    bucket = f"node-loss-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
    cluster, results, started = None, {}, time.monotonic()
    try:
        data = readme_data(f"{work}/data")
        cluster = LocalCluster(LocalClusterConfig(workers=2, head_cpus=2, worker_cpus=1)).start()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                           "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}})
        say(f"[node-loss] head + 2 worker nodes up in {time.monotonic() - started:.1f} s")
        t = time.monotonic()
        train = train_case(cluster, data, f"s3://{bucket}", f"{work}/train", phases=args.phases)
        results["train"] = {k: train[k] for k in ("phase_steps", "configured", "resumed_from_step", "export")}
        times = {"train_s": round(time.monotonic() - t, 1)}
        while len(cluster.workers()) < 2:
            cluster.add_worker()
        t = time.monotonic()
        model = str(save_tiny_checkpoint(f"{work}/model", seed=3407))
        results["data"] = {k: v for k, v in data_case(cluster, data, model).items()
                           if k in ("expected", "seen", "duplicated", "lost")}
        times["data_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        served = str(save_tiny_checkpoint(f"{work}/served", seed=0, cfg=tiny_vllm()))
        serve = serve_case(cluster, served, clients=args.clients)
        results["serve"] = {k: serve[k] for k in ("requests", "failed", "recovery_s")}
        times["serve_s"] = round(time.monotonic() - t, 1)
        say(f"[node-loss] details: train {json.dumps({k: train[k] for k in ('losses', 'order', 'last_step_before_kill', 'replacement_joined_s', 'run_s')})}; "
            f"serve {json.dumps({k: v for k, v in serve.items() if k not in results['serve']})}; times {json.dumps(times)}; "
            f"total {time.monotonic() - started:.0f} s")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
