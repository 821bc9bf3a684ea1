"""More than one node (issue 24): a head plus worker nodes as separate raylets on this machine
(pipelines.cluster.LocalCluster), one cluster for the module, storage on the moto S3 server. Each node-loss
case kills a worker node (SIGKILL, no drain) while it works; the case code is benchmarks/node_loss.py's, which
``python -m benchmarks.node_loss`` runs on a fresh cluster.

Training: the README's tiny schedule (train_tiny.yaml on the synth_tiny data), its first 3 phases x 4 steps, with
its two DDP workers forced onto two worker nodes (``slime_worker: 1`` each); in the middle of phase II the node
of one worker is killed and a replacement node joins, as an autoscaler would provide one. The run resumes from
its last checkpoint and ends with every phase at exactly its configured step count; its losses, before and
after the loss of the node, equal the single-node golden run's first 12 (tests/assets/losses/tiny_ddp.json,
written by test_readme_steps on one embedded Ray; LR schedule and seeds are per phase).
Data: every sample id of an epoch once, with the node holding Preprocessor actors lost mid-epoch.
Scheduler: a tick whose retrain task dies with its node fails cleanly and the next tick reruns it.
Serving: two vLLM replicas on two nodes under openai-client load, one node lost: failed requests, recovery.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import session_ray_aside

GOLDEN = Path(__file__).resolve().parent / "assets" / "losses" / "tiny_ddp.json"
pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + 2 worker nodes (1 CPU, slime_worker=1 each). The session's embedded Ray, if an earlier
    module started it, steps aside for the module and is started again after it."""
    import ray

    from pipelines.cluster import LocalCluster, LocalClusterConfig

    with session_ray_aside():
        started = time.monotonic()
        local = LocalCluster(LocalClusterConfig(workers=2, head_cpus=2, worker_cpus=1)).start()
        try:
            ray.init(address=local.address, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                               "HF_HUB_OFFLINE": "1",
                                               # Train's PlacementGroupCleaner otherwise joins "the latest" Ray
                                               # instance on the machine, which may be someone else's
                                               "RAY_ADDRESS": local.address}})
            print(f"[multinode] head + 2 worker nodes up in {time.monotonic() - started:.1f} s at {local.address}")
            yield local
        finally:
            ray.shutdown()
            local.stop()


@pytest.fixture(scope="module")
def readme_data(tmp_path_factory):
    """The README's synth_tiny set packed as in the README (what the golden losses were trained on)."""
    from benchmarks.node_loss import readme_data

    return readme_data(str(tmp_path_factory.mktemp("readme-data")))


def test_training_across_two_nodes_survives_losing_one(cluster, readme_data, s3_bucket, tmp_path):
    """The README's tiny schedule, its first 3 phases (the LR schedule and seeds are per phase: the golden's first
    12 losses), 2 DDP workers on 2 worker nodes; the node of one is killed in phase II, a replacement joins
    (benchmarks.node_loss.train_case, shared with ``python -m benchmarks.node_loss``)."""
    from benchmarks.node_loss import train_case

    base = f"s3://{s3_bucket}"
    out = train_case(cluster, readme_data, base, str(tmp_path), phases=3)
    golden = json.loads(GOLDEN.read_text())["losses"][:12]
    print(f"[multinode] train: workers on worker nodes {out['worker_nodes']}; killed node {out['victim']} "
          f"({out['kill_s']} s) after global step {out['last_step_before_kill']}, replacement node "
          f"{out['replacement']} joined {out['replacement_joined_s']} s later; resumed from global step "
          f"{out['resumed_from_step']}; phase steps {out['phase_steps']} (configured {out['configured']}); run "
          f"{out['run_s']} s")
    print(f"[multinode] losses {[round(x, 6) for x in out['losses']]}\n[multinode] golden {golden}")

    assert len(out["workers"]) == 2 and len(set(out["workers"].values())) == 2, f"train workers: {out['workers']}"
    assert -1 not in out["worker_nodes"], "a train worker was not on a worker node"
    resumed = out["resumed_from_step"]
    assert resumed is not None, "no resume after the node was killed"
    assert 8 <= resumed <= 10, f"resumed from global step {resumed}, not from the last checkpoint around phase II"
    assert out["last_step_before_kill"] <= 12, "the node died after phase II had ended"
    assert out["global_steps"] == list(range(1, 13)) and out["phase_steps"] == out["configured"]
    order = out["order"]
    # steps the lost attempt logged = where the logged order first goes back; none when the node died right after
    # the checkpoint it resumes from (then nothing is retrained: seen once, killed after global step 10)
    lost = next((i for i in range(1, len(order)) if order[i] <= order[i - 1]), resumed)
    assert order == list(range(1, lost + 1)) + list(range(resumed + 1, 13)), order
    assert lost >= out["last_step_before_kill"]
    assert out["summary_phase_steps"] == [4, 4, 4] and out["summary_global_step"] == 12
    assert out["checkpoint"].startswith(f"{base}/runs/multinode/checkpoint-p02-s0000004")
    assert out["export"]
    assert out["losses"] == pytest.approx(golden, rel=1e-3), "two nodes (with a node lost) != the single-node run"


@pytest.mark.extended  # ~55 s alone: `make test-extended` (make test keeps the node-loss cases of issue 24)
def test_deepspeed_zero2_across_two_nodes_resumes_and_equals_the_single_node_run(cluster, readme_data, s3_bucket,
                                                                                tmp_path):
    """DeepSpeed ZeRO-2 (fp32 on CPU, torch AdamW instance) with its 2 workers on 2 worker nodes, checkpoints and
    export on S3, the tiny schedule's first phase with a checkpoint every 2 steps; the worker of rank 1 dies after
    global step 3. The mid-phase checkpoint holds DeepSpeed's shards and the phase's start model by reference; the
    run resumes from it to the configured step count; every step's loss (the retrained step 3 included) equals the
    single-node DDP golden's (same global batch, same data order; ZeRO-2 reduce-scatters the gradients DDP
    all-reduces, and the resume restores optimizer state, RNG and data position); frozen weights stay bit-identical."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from benchmarks.node_loss import CONFIGS, read_rows, train_watched, train_workers
    from pipelines import storage
    from pipelines.train.config import TrainConfig
    from slime.config import load_config
    from slime.storage import local_copy

    base = f"s3://{s3_bucket}"
    while len(cluster.workers()) < 2:
        cluster.add_worker()
    marker = tmp_path / "fault-marker"  # one machine: every node sees this path
    cfg = load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), [
        "name=zero2-multinode", f"storage_path={base}/runs", f"export_dir={base}/models/zero2",
        f"data.manifest={readme_data}", "scaling.resources_per_worker={CPU: 1, slime_worker: 1}",
        "engine.kind=deepspeed", f"engine.deepspeed={CONFIGS / 'deepspeed_zero2.yaml'}",
        "checkpoint.every_steps=2", "checkpoint.num_to_keep=null",
        "fault.global_step=3", "fault.rank=1", f"fault.marker={marker}",
        f"logging.local_dir={tmp_path}/logs", "logging.tensorboard=false"])
    cfg = dataclasses.replace(cfg, phases=cfg.phases[:1])
    seen: dict = {}

    def record_workers() -> None:  # the workers' nodes, read while the run is on
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(seen.get("workers", {})) < 2 and not seen.get("stop"):
            seen["workers"] = train_workers()
            time.sleep(0.5)

    summary, took = train_watched(cfg, record_workers, seen, join_s=30)
    rows = read_rows(tmp_path / "logs" / "metrics.jsonl")
    steps, events = [r for r in rows if "event" not in r], [r for r in rows if "event" in r]
    losses = {r["global_step"]: r["loss"] for r in steps}  # the retrained step's value is the later one
    golden = json.loads(GOLDEN.read_text())["losses"][:4]
    nodes = {cluster.node_id(i): i for i in cluster.workers()}
    workers = sorted(nodes.get(n, -1) for n in seen.get("workers", {}).values())
    print(f"[multinode] zero2: workers on worker nodes {workers}; steps {[r['global_step'] for r in steps]}; losses "
          f"{[round(x, 6) for x in losses.values()]} vs golden {golden}; run {took:.0f} s")
    assert len(workers) == 2 and len(set(workers)) == 2 and -1 not in workers, seen.get("workers")
    assert marker.exists(), "the injected failure never fired"
    assert [e["global_step"] for e in events if e["event"] == "resume"] == [2]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 3, 4]
    assert summary["metrics"]["global_step"] == 4 and storage.exists(f"{base}/models/zero2/EXPORT_COMPLETE")
    assert list(losses.values()) == pytest.approx(golden, rel=1e-3), "ZeRO-2 on two nodes != the single-node DDP run"
    run = f"{base}/runs/zero2-multinode"
    mid = f"{run}/checkpoint-p00-s0000002"  # training state only: DeepSpeed's shards over the phase's start model
    assert storage.exists(f"{mid}/deepspeed/latest") and not storage.exists(f"{mid}/model/model.safetensors")
    assert json.loads(storage.read_bytes(f"{mid}/train_state.json"))["base_model"] == f"{run}/init_model"
    end = json.loads(storage.read_bytes(f"{run}/checkpoint-p00-s0000004/train_state.json"))
    init = load_file(f"{local_copy(f'{run}/init_model')}/model.safetensors")
    final = load_file(f"{local_copy(end['model'])}/model.safetensors")
    changed = {k for k in final if not torch.equal(init[k], final[k])}
    assert changed and all(k.startswith("projector.") for k in changed), sorted(changed)[:5]


def test_data_pipeline_loses_a_node_mid_epoch(cluster, readme_data, tmp_path):
    """Ray Data reads and preprocesses the README's shards with Preprocessor actors spread over the nodes; the
    worker node holding most of them is killed a third into the epoch. Every sample id (``sample_hash``) of the
    epoch is counted: none lost, none seen twice (Ray Data retries the lost tasks and restarts the lost actors)."""
    import ray

    from benchmarks.node_loss import data_case
    from slime.presets import save_tiny_checkpoint

    model = str(tmp_path / "model")
    save_tiny_checkpoint(model, seed=3407)
    while len(cluster.workers()) < 2:
        cluster.add_worker()
    out = data_case(cluster, readme_data, model)
    print(f"[multinode] data: expected {out['expected']} seen {out['seen']} duplicated {out['duplicated']} "
          f"lost {out['lost']} (killed {out['killed']})")
    assert ray.is_initialized() and out["killed"] is not None and out["killed"]["actors_on_it"] >= 1
    assert out["unique_expected"] == out["expected"]
    assert (out["duplicated"], out["lost"], out["seen"]) == (0, 0, out["expected"])


def test_data_counters_live_on_the_driver_node(cluster):
    """The run's DataMetrics actor is pinned to the driver's node: on a worker node, losing that node failed
    every restart of a training run (every read task reports to it). A soft affinity put 2 of 4 on workers."""
    import ray
    from ray.util.state import list_actors

    from pipelines.data.preprocess import metrics_actor

    names = [f"DataMetrics-placement-{i}" for i in range(4)]
    ray.get([metrics_actor(n).get.remote() for n in names])
    nodes = {a.name: a.node_id for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                                       filters=[("class_name", "=", "DataMetrics"), ("state", "=", "ALIVE")])
             if a.name in names}
    print(f"[multinode] DataMetrics actors on nodes {sorted(set(nodes.values()))}")
    assert nodes == dict.fromkeys(names, ray.get_runtime_context().get_node_id())


def test_scheduler_tick_whose_train_job_dies_with_its_node_is_retried_next_tick(cluster, tmp_path):
    """A scheduler tick (pipelines.lifecycle.scheduler, file registry) whose retrain runs as a Ray task on a worker
    node; the node is killed while the task trains. The tick records "failed" with the node's death as the
    reason, production and serving stay on v1, the lock is released; the next tick computes the same run from
    the recorded state (same new shards, same run name), trains on a live node and promotes."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from benchmarks.node_loss import poll
    from pipelines.cluster import WORKER_RESOURCE, node_resource
    from pipelines.lifecycle.registry import Registry
    from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler
    from tests.test_scheduler import Clock, FileRunner, write_manifest

    def train_job(parent, out, quality, shards, started, gate):  # a Ray task on a worker node (pickled by value)
        import json
        import shutil
        import time

        import ray

        with open(started, "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        deadline = time.monotonic() + 300  # "training" until the test opens the gate (or the node dies)
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {gate}")
            time.sleep(0.05)
        shutil.rmtree(out, ignore_errors=True)
        if parent:
            shutil.copytree(parent, out)
        else:
            os.makedirs(out)
        with open(os.path.join(out, "quality.json"), "w") as f:
            json.dump({"quality": quality, "trained_on": shards, "parent": parent}, f)
        return out

    class NodeRunner(FileRunner):
        """FileRunner whose retrain is a Ray task (no task retries) on the nodes ``resources`` select."""

        def __init__(self, work_dir, quality, resources):
            super().__init__(work_dir, quality)
            self.resources = resources

        def retrain(self, parent_model_dir, manifest_uri, new_shards, run_name):
            self.calls.append(("retrain", parent_model_dir, tuple(new_shards), run_name))
            task = ray.remote(train_job).options(num_cpus=0.05, resources=self.resources, max_retries=0)
            return ray.get(task.remote(parent_model_dir, os.path.join(self.work_dir, run_name, "model"), self.quality,
                                       new_shards, started, gate))

    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "data"), val=str(tmp_path / "val"),
                         work_dir=str(tmp_path / "work"), tolerance=0.05, lock_ttl_s=600)
    started, gate = str(tmp_path / "started"), str(tmp_path / "go")
    clock = Clock()
    write_manifest(cfg.manifest, 2, version=1)
    assert Scheduler(cfg, FileRunner(cfg.work_dir), now=clock).tick()["decision"] == "promoted"
    reg = Registry(cfg.registry)
    v1 = reg.production()
    write_manifest(cfg.manifest, 4, version=2)
    clock.advance(3600)
    while len(cluster.workers()) < 2:
        cluster.add_worker()
    victim = cluster.workers()[0]
    victim_node = cluster.node_id(victim)
    runner = NodeRunner(cfg.work_dir, 0.7, {node_resource(victim): 0.01})
    with ThreadPoolExecutor(1) as pool:
        tick = pool.submit(Scheduler(cfg, runner, now=clock).tick)
        poll(lambda: os.path.exists(started) or tick.done(), 120, "the retrain task to start on its node")
        assert not tick.done(), tick.result()
        ran_on = Path(started).read_text()
        killed_at = time.monotonic()
        cluster.kill_node(victim)
        failed = tick.result(timeout=180)
    failed_s = time.monotonic() - killed_at
    print(f"[multinode] scheduler: retrain task on worker node {victim} killed; tick ended {failed['decision']} "
          f"{failed_s:.1f} s later: {failed['reason'][:160]}")
    assert ran_on == victim_node
    assert failed["decision"] == "failed" and failed["run_name"] and failed["new_shards"]
    assert reg.production().id == v1.id and reg.serving() == v1.id and [v.id for v in reg.list()] == [v1.id]
    assert runner.steps() == ["retrain"] and not os.path.exists(os.path.join(cfg.registry, "retrain.lock"))
    assert reg.decisions()[-1]["decision"] == "failed"

    Path(gate).touch()
    clock.advance(3600)
    runner = NodeRunner(cfg.work_dir, 0.7, {WORKER_RESOURCE: 0.01})  # any live worker node
    retried = Scheduler(cfg, runner, now=clock).tick()
    print(f"[multinode] scheduler: next tick {retried['decision']} {retried['version']} ({retried['reason']}); "
          f"run {retried['run_name']} on node {Path(started).read_text()[:12]}")
    assert retried["decision"] == "promoted" and runner.steps() == ["retrain", "evaluate", "rollout"]
    assert (retried["run_name"], retried["new_shards"], retried["trained_on"]) == (
        failed["run_name"], failed["new_shards"], failed["trained_on"])
    assert Path(started).read_text() != victim_node
    assert reg.production().id == retried["version"] != v1.id and reg.serving() == retried["version"]
    assert reg.production().metrics["accuracy"] == 0.7


def test_serving_loses_a_replica_node_under_load(cluster, tmp_path):
    """Two vLLM replicas on two worker nodes (``slime_worker: 1`` each), proxy and controller on the head, three
    ``openai`` clients (their own retries on) (a request, then 0.2 s) and a /healthz probe every 0.25 s; one replica's
    node is killed and a replacement node joins. Counted: requests, failed requests (after the client's
    retry), failed HTTP attempts, requests in flight at the kill, health probes, seconds until 2 replicas run
    again (benchmarks.node_loss.serve_case, shared with ``python -m benchmarks.node_loss``)."""
    from benchmarks.node_loss_serve import serve_case
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    model = str(save_tiny_checkpoint(tmp_path / "model", seed=0, cfg=tiny_vllm()))
    # paced (0.2 s between a client's requests), not the benchmark's closed loop: the 2 cores leave room for the
    # replacement replica's start
    out = serve_case(cluster, model, clients=3, pause_s=0.2)
    print(f"[multinode] serve: {out['requests']} requests, {out['failed']} failed after the client's retries, "
          f"{out['failed_attempts']} failed attempts of {out['attempts']} (statuses "
          f"{out['failed_attempt_statuses']}, {out['failed_attempt_s_after_kill']} s after the kill), "
          f"{out['in_flight_at_kill']} in flight at the kill, replicas back "
          f"{out['recovery_s']} s after the kill, health probes not 200: {out['health_not_200']} of "
          f"{out['health_probes']} (statuses {out['health_statuses_not_200']}, never more than "
          f"{out['health_longest_failed_run']} in a row)")
    assert out["replica_nodes_before"] == sorted(out["replica_nodes_before"]) and len(set(out["replica_nodes_before"])) == 2
    assert -1 not in out["replica_nodes_before"] and out["killed_node"] in out["replica_nodes_before"]
    assert out["replacement_node"] in out["replica_nodes_after"]  # the lost replica restarted on the new node
    assert out["failed"] == 0, out["errors"]
    # only requests routed to the lost replica before the proxy learned it was gone needed a retry: those in flight
    # at the kill and, paced, a client's next request sent right after it (CI: 1 failed attempt, 0 in flight at
    # the kill); each client has one request out at a time, and after the first failure the proxy's router drops the
    # replica (actor died) or probes it before routing to it again (unavailable)
    assert out["failed_attempts"] <= out["clients"] and out["in_flight_at_kill"] <= out["clients"]
    assert all(0 <= s <= out["recovery_s"] for s in out["failed_attempt_s_after_kill"]), out
    assert set(out["failed_attempt_statuses"]) <= {-1, 500, 502, 503, 504}, out  # all retryable by the client
    # /healthz goes through the proxy to a replica like any request: a probe that reached the lost replica just
    # before its node died fails (measured: 0 or 1 of ~180); never two in a row, so a checker with a failure
    # threshold of 2 (Kubernetes' default is 3) never sees the endpoint down
    assert out["health_longest_failed_run"] <= 1 and out["health_not_200"] <= 2, out
    assert out["requests"] >= 4 * out["clients"] and out["recovery_s"] < 300
