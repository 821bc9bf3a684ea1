"""A real Serve endpoint (the vLLM app, tiny checkpoints) following ``models:/NAME@champion`` of a real
``mlflow server``, through the code path of ``slime serve --model models:/NAME@champion --follow S``
(``jobs.serve.resolve_model`` then ``pipelines.serve.follow.AliasFollower``): moving the alias by hand with
MLflow's REST API rolls the endpoint, and so does a scheduler tick that promotes; the official ``openai``
client sees the new version (``system_fingerprint`` names the checkpoint directory) within a deadline and
no request fails during either roll."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time

import pytest
import requests

from benchmarks.serve_parts import ClientThreads

# ~3 min (a vLLM endpoint started, then rolled twice): make test-extended, outside make test's 20-minute budget
pytestmark = [pytest.mark.integration, pytest.mark.extended]

APP, KEY, MODEL_ID, NAME = "slime-follow", "follow-key", "slime-tiny", "served"
ROLL_DEADLINE_S = 300  # a new vLLM replica starts in 20-80 s on 2 busy cores


def fingerprint(model_dir: str) -> str:
    return "fp_" + hashlib.sha256(model_dir.encode()).hexdigest()[:12]  # as the ingress names a checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    root = tmp_path_factory.mktemp("follow_models")
    return [str(save_tiny_checkpoint(root / f"seed{seed}", seed=seed, cfg=tiny_vllm())) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def endpoint(ray_session, mlflow_server, checkpoints):
    """``slime serve --model models:/served@champion --follow 0.5``, in-process: version 1 is champion."""
    from ray import serve

    from jobs.serve import resolve_model
    from pipelines.serve.app import build_app
    from pipelines.serve.follow import AliasFollower
    from pipelines.serve.ingress import ServeArgs, free_port
    from pipelines.tracking.client import MlflowClient
    from pipelines.tracking.models import ModelRegistry

    client = MlflowClient(mlflow_server.uri)  # the run the hand-registered versions link to (MLflow wants one)
    run_id = client.create_run(client.experiment_id("follow"), "hand-registered", {})["info"]["run_id"]
    models = ModelRegistry(mlflow_server.uri, NAME)
    assert models.register(checkpoints[0], {"note": "seed 0"}, run_id=run_id) == "1"
    models.promote("1", "first")
    uri = f"models:/{NAME}@champion"
    cfg, version = resolve_model(ServeArgs(model=uri, model_id=MODEL_ID, api_key=KEY, engine="vllm", num_cpus=0.25,
                                           max_tokens=16), mlflow_server.uri)
    port = free_port()
    serve.shutdown()  # an earlier module's Serve keeps its own HTTP port: start ours fresh
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/", blocking=False)
    follower = AliasFollower(cfg, uri, tracking_uri=mlflow_server.uri, version=version, app_name=APP)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(0.5, stop), daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{port}", "follower": follower, "models": models, "run_id": run_id}
    stop.set()
    thread.join(ROLL_DEADLINE_S)
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    import openai

    return openai.OpenAI(base_url=f"{endpoint['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client) -> str:
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "describe"}],
                                       max_tokens=4)
    assert r.choices[0].message.content is not None
    return r.system_fingerprint


class Traffic(ClientThreads):
    """Threads asking through the openai client until stopped (each pausing ``pause_s`` between requests):
    every fingerprint and every failure."""

    def __init__(self, client, threads: int = 2, pause_s: float = 0.05) -> None:
        super().__init__()
        self.fingerprints: list[str] = []
        self.errors: list[str] = []

        def run() -> None:
            while not self.stop.is_set():
                try:
                    fp = ask(client)
                    with self.lock:
                        self.fingerprints.append(fp)
                except Exception as e:  # noqa: BLE001 - a failed request is what this records
                    with self.lock:
                        self.errors.append(repr(e)[:300])
                self.stop.wait(pause_s)  # steady traffic, not a flood that starves the new replica's start

        self.spawn(run, threads)

    def until_served(self, fp: str, timeout_s: float) -> float:
        """Seconds until 3 answers in a row came from ``fp`` (polls the recorded answers)."""
        start = time.monotonic()
        while self.fingerprints[-3:] != [fp] * 3:
            assert not self.errors, self.errors[:3]
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"not served by {fp} after {timeout_s} s: {self.fingerprints[-5:]}")
            time.sleep(0.25)  # polling interval of the condition above
        return time.monotonic() - start


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)  # polling interval of the condition above


def test_manual_alias_move_rolls_the_endpoint(endpoint, client, mlflow_server, checkpoints):
    """Version 2 registered; ``champion`` moved 1 -> 2 by hand with MLflow's REST API (what the UI does):
    the endpoint serves version 2's checkpoint within the deadline, with no failed request on the way."""
    assert ask(client) == fingerprint(checkpoints[0])
    models = endpoint["models"]
    assert models.register(checkpoints[1], {"note": "seed 1"}, run_id=endpoint["run_id"]) == "2"
    with Traffic(client) as traffic:
        while not traffic.fingerprints:  # traffic flows before the move
            assert not traffic.errors, traffic.errors[:3]
            time.sleep(0.1)
        r = requests.post(f"{mlflow_server.uri}/api/2.0/mlflow/registered-models/alias",
                          json={"name": NAME, "alias": "champion", "version": "2"}, timeout=30)
        assert r.status_code == 200, r.text
        took = traffic.until_served(fingerprint(checkpoints[1]), ROLL_DEADLINE_S)
    assert not traffic.errors, traffic.errors[:3]
    assert set(traffic.fingerprints) <= {fingerprint(checkpoints[0]), fingerprint(checkpoints[1])}
    # serve.run returns once the old replica is gone too, a little after the new one answers
    wait_for(lambda: endpoint["follower"].rolls == ["2"], 120, "the follower's roll to return")
    assert endpoint["follower"].failures == 0
    print(f"manual alias move: served after {took:.1f} s, {len(traffic.fingerprints)} requests, none failed")


def test_scheduled_promotion_rolls_the_endpoint(endpoint, client, mlflow_server, checkpoints, tmp_path):
    """A scheduler tick (real file registry, the MLflow mirror on the same registered model) retrains into a
    real checkpoint, passes the gate and promotes: the mirror moves ``champion`` to the new MLflow version, the
    follower rolls, and the endpoint serves the directory the tick rolled out."""
    from pipelines.lifecycle.mlflow_mirror import MlflowSection
    from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler
    from tests.test_scheduler import Clock, FileRunner, write_manifest

    class CheckpointRunner(FileRunner):
        """FileRunner whose retrain yields a servable checkpoint (seed 2) with its quality file."""

        def retrain(self, parent_model_dir, manifest_uri, new_shards, run_name):
            out = os.path.join(self.work_dir, run_name, "model")
            shutil.copytree(checkpoints[2], out)
            with open(os.path.join(out, "quality.json"), "w") as f:
                json.dump({"quality": self.quality}, f)
            return out

    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "data"),
                         val=str(tmp_path / "val"), work_dir=str(tmp_path / "work"), tolerance=0.05,
                         mlflow=MlflowSection(uri=mlflow_server.uri, model_name=NAME, experiment="follow-ticks"))
    write_manifest(cfg.manifest, 2, version=1)
    runner = CheckpointRunner(cfg.work_dir, quality=0.6)
    with Traffic(client) as traffic:
        record = Scheduler(cfg, runner, now=Clock()).tick()
        assert record["decision"] == "promoted" and "error" not in record["mlflow"], record
        assert record["mlflow"]["champion"] == "3"
        took = traffic.until_served(fingerprint(runner.served), ROLL_DEADLINE_S)
    assert not traffic.errors, traffic.errors[:3]
    # serve.run returns once the old replica is gone too, a little after the new one answers
    wait_for(lambda: endpoint["follower"].rolls == ["2", "3"], 120, "the follower's roll to return")
    assert endpoint["follower"].failures == 0
    print(f"scheduled promotion: served after {took:.1f} s, {len(traffic.fingerprints)} requests, none failed")
