"""Scheduled retraining end to end with the real steps: ticks with an injected clock drive the real
train (Ray Train), evaluate (Ray Data + Predictor) and Serve rollout through LocalRunner.

tick 1: 2 shards, no production -> retrain from the tiny init on both -> evaluate -> promote -> Serve serves it
tick 2: nothing new              -> no job (and no job id in its record), production unchanged, reason recorded
tick 3: a new batch (2 shards)   -> fine-tune from production on the new shards + 1 replayed earlier shard
                                    (new+replay, fraction 0.5) -> evaluate -> rejected by the gate:
                                    production and Serve untouched, the record says why
Which shards a run read comes from the run itself (its read tasks, in the model's training_data.json).
The tiny random models all score accuracy 0, so before tick 3 production's recorded accuracy is set to
0.5 by hand: the real candidate (0.0) then fails ``>= 0.5 - 0.05``. Promoting a fine-tuned candidate is
covered in tests/test_scheduler.py; here tick 1 exercises the rollout.

The MLflow mirror is on (a real ``mlflow server``): tick 1 registers version 1 and points ``champion`` at it, tick
3 registers its candidate as version 2, tagged rejected, ``champion`` stays. From tick 1 on, the Serve app is
followed the way ``slime serve --model models:/NAME@champion --follow S`` follows it (``AliasFollower`` on the same
app): the rejected tick rolls nothing; then ``champion`` is moved to version 2 by hand with MLflow's REST API
(what the UI does: an operator overriding the gate) and the endpoint rolls to that checkpoint while the official
``openai`` client keeps asking, with no failed request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import requests
import yaml

from benchmarks.serve_parts import ClientThreads
from pipelines.data.pack import PackConfig, pack
from pipelines.data.synth import SynthConfig, generate
from pipelines.lifecycle.jobs_client import JobsConfig, RolloutConfig
from pipelines.lifecycle.local_runner import LocalRunner
from pipelines.lifecycle.registry import Registry
from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
NAME = "sched-e2e"  # the MLflow registered model the ticks mirror to
ROLL_DEADLINE_S = 300  # a new vLLM replica starts in 20-80 s on 2 busy cores


def _synth_and_pack(root: Path, seed: int, split: str = "train", per_shard: int = 1000) -> None:
    raw = root / f"raw{seed}"
    generate(SynthConfig(output_dir=str(raw), seed=seed, num_images=8, val_fraction=0.25, min_side=300, max_side=500,
                         questions_per_image=2, progress=False))
    pack(PackConfig(inputs=(str(raw / f"{split}.json"),), output_dir=str(root / f"wds-{split}"), progress=False,
                    max_samples_per_shard=per_shard))


def _shards(manifest_dir: Path) -> list[str]:
    return [s["name"] for s in json.loads((manifest_dir / "manifest.json").read_text())["shards"]]


def _read_by_run(model_dir: str) -> dict[str, int]:
    """{shard name: samples} that the training run's read tasks report, from the model it exported."""
    data = json.loads((Path(model_dir) / "training_data.json").read_text())
    return {Path(p).name: n for p, n in data["shards_read"].items()}


class Traffic(ClientThreads):
    """Threads asking through the openai client until stopped, pausing ``pause_s`` between requests (steady
    traffic, not a flood that starves the new replica's start): every fingerprint and every failure."""

    def __init__(self, client, model: str, threads: int = 2, pause_s: float = 0.05) -> None:
        super().__init__()
        self.fingerprints: list[str] = []
        self.errors: list[str] = []

        def run() -> None:
            while not self.stop.is_set():
                try:
                    r = client.chat.completions.create(model=model, max_tokens=4,
                                                       messages=[{"role": "user", "content": "describe"}])
                    assert r.choices[0].message.content is not None
                    with self.lock:
                        self.fingerprints.append(r.system_fingerprint)
                except Exception as e:  # noqa: BLE001 - a failed request is what this records
                    with self.lock:
                        self.errors.append(repr(e)[:300])
                self.stop.wait(pause_s)

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


def test_ticks_retrain_evaluate_promote_and_roll_serve(ray_session, mlflow_server, tmp_path):
    import openai
    from ray import serve

    from pipelines.lifecycle.mlflow_mirror import MlflowSection
    from pipelines.serve.follow import AliasFollower
    from pipelines.serve.ingress import ServeArgs
    from pipelines.tracking.models import resolve_model_uri
    from slime.config import from_dict

    _synth_and_pack(tmp_path, seed=1, per_shard=9)  # 18 samples: 2 shards
    _synth_and_pack(tmp_path, seed=1, split="val")
    run_cfg = yaml.safe_load((REPO / "jobs/configs/train_tiny.yaml").read_text())
    run_cfg.update(storage_path=str(tmp_path / "runs"),
                   # One phase (joint) per retrain: what is checked here is the tick, not the schedule
                   # (test_train covers phases); each phase costs its own data pipeline start-up.
                   # One epoch of the shards given (9 steps of 2 samples on tick 1's 18, 13 on tick 3's 27), so every
                   # one is read and no second pass starts (a new pass waits ~7 s for its pipeline).
                   phases=[dict(run_cfg["phases"][3], steps=None, epochs=1)],
                   scaling=dict(run_cfg["scaling"], num_workers=1), checkpoint=dict(run_cfg["checkpoint"], every_steps=100))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(run_cfg))
    # The gate's evaluation on the HF reference engine (~10 s less a tick than starting vLLM; the README steps and
    # the demo evaluate on vLLM): what is checked here is what the tick does with the result.
    eval_cfg = dict(yaml.safe_load((REPO / "jobs/configs/eval_tiny.yaml").read_text()), engine="hf")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    serve_cfg = yaml.safe_load((REPO / "cluster/serve_config.yaml").read_text())
    app = serve_cfg["applications"][0]
    app["name"], app["route_prefix"] = "sched", "/sched"
    app["args"].update(num_cpus=0.25, autoscaling={"min_replicas": 1, "max_replicas": 1})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))

    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "wds-train"),
                         val=str(tmp_path / "wds-val"), work_dir=str(tmp_path / "work"), tolerance=0.05,
                         jobs=JobsConfig(address="local", train_config=str(tmp_path / "train.yaml"),
                                         eval_config=str(tmp_path / "eval.yaml")),
                         rollout=RolloutConfig(mode="run", serve_config=str(tmp_path / "serve.yaml"), app_name="sched"),
                         mlflow=MlflowSection(uri=mlflow_server.uri, model_name=NAME, experiment="sched-e2e"))
    clock = [datetime(2026, 11, 22, 3, 0, tzinfo=UTC)]
    runner = LocalRunner(cfg.jobs, cfg.rollout, cfg.work_dir, cfg.val)
    scheduler = Scheduler(cfg, runner, now=lambda: clock[0])
    registry = Registry(cfg.registry)
    from tests.conftest import shared_serve

    port = shared_serve()

    def served_fingerprint() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/sched/healthz", timeout=30).json()["fingerprint"]

    def fingerprint(model_uri: str) -> str:
        return "fp_" + hashlib.sha256(model_uri.encode()).hexdigest()[:12]

    stop_following, follower = threading.Event(), None
    try:
        first = scheduler.tick()
        assert first["decision"] == "promoted", first
        prod = registry.production()
        tick1_shards = _shards(tmp_path / "wds-train")
        assert prod.id == first["version"] and first["new_shards"] == tick1_shards and len(tick1_shards) == 2
        assert set(first["job_ids"]) == {"train", "evaluate"}
        assert set(_read_by_run(prod.model_uri)) == set(tick1_shards) == set(prod.lineage["shards_read"])
        assert json.loads((Path(cfg.registry) / "versions" / prod.id / "metrics.json").read_text())["num_samples"] > 0
        assert served_fingerprint() == fingerprint(prod.model_uri)
        assert first["mlflow"]["champion"] == "1", first["mlflow"]
        assert resolve_model_uri(f"models:/{NAME}@champion", mlflow_server.uri)[0] == prod.model_uri
        # `slime serve --model models:/sched-e2e@champion --follow 0.5` on the app tick 1 rolled out
        follower = AliasFollower(from_dict(ServeArgs, {**app["args"], "model": prod.model_uri}),
                                 f"models:/{NAME}@champion", tracking_uri=mlflow_server.uri, version="1",
                                 app_name="sched", route_prefix="/sched")
        threading.Thread(target=follower.run, args=(0.5, stop_following), daemon=True).start()

        clock[0] += timedelta(days=1)
        second = scheduler.tick()
        assert second["decision"] == "kept" and "no new shards" in second["reason"]
        assert second["job_ids"] == {} and registry.production().id == prod.id

        _synth_and_pack(tmp_path, seed=2, per_shard=9)  # a new batch of raw data lands: 2 new shards
        new_shards = [n for n in _shards(tmp_path / "wds-train") if n not in tick1_shards]
        assert len(new_shards) == 2
        metrics_file = Path(cfg.registry) / "versions" / prod.id / "metrics.json"
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "accuracy": 0.5}))
        clock[0] += timedelta(days=1)
        third = scheduler.tick()
        assert third["decision"] == "rejected", third
        assert "not promoted" in third["reason"] and "accuracy 0 vs production" in third["reason"], third["reason"]
        assert set(third["job_ids"]) == {"train", "evaluate"} and third["job_ids"] != first["job_ids"]
        candidate = registry.get(third["version"])
        assert candidate.verdict["verdict"] == "rejected" and candidate.lineage["parent_version"] == prod.id
        # what the run read (reported by its read tasks): the new shards + exactly one earlier shard
        read = _read_by_run(candidate.model_uri)
        replayed = set(read) - set(new_shards)
        assert set(new_shards) <= set(read) and len(replayed) == 1 and replayed <= set(tick1_shards), read
        assert all(n > 0 for n in read.values()), read
        assert sorted(candidate.lineage["trained_on"]) == sorted(read) == sorted(candidate.lineage["shards_read"])
        assert candidate.lineage["replayed_shards"] == sorted(replayed)
        # the rejected candidate changed nothing: production, its pointer and what Serve serves
        assert registry.production().id == prod.id and registry.serving() == prod.id
        assert served_fingerprint() == fingerprint(prod.model_uri)
        ticks = [d for d in registry.decisions() if "decision" in d]  # promotions log too
        assert [d["decision"] for d in ticks[-3:]] == ["promoted", "kept", "rejected"]
        assert ticks[-1]["reason"] == third["reason"]
        # MLflow: the candidate is version 2, tagged rejected; champion stayed, so the follower rolled nothing
        assert third["mlflow"]["versions"] == {prod.id: "1", candidate.id: "2"}, third["mlflow"]
        assert third["mlflow"]["champion"] == "1" and follower.rolls == [] and follower.failures == 0

        # champion moved to version 2 by hand (the UI's REST call): the endpoint rolls to its checkpoint under load
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/sched/v1", api_key="x", max_retries=0, timeout=120)
        with Traffic(client, app["args"]["model_id"]) as traffic:
            while not traffic.fingerprints:  # traffic flows before the move
                assert not traffic.errors, traffic.errors[:3]
                time.sleep(0.1)  # polling interval of the condition above
            r = requests.post(f"{mlflow_server.uri}/api/2.0/mlflow/registered-models/alias",
                              json={"name": NAME, "alias": "champion", "version": "2"}, timeout=30)
            assert r.status_code == 200, r.text
            took = traffic.until_served(fingerprint(candidate.model_uri), ROLL_DEADLINE_S)
        assert not traffic.errors, traffic.errors[:3]
        assert set(traffic.fingerprints) <= {fingerprint(prod.model_uri), fingerprint(candidate.model_uri)}
        deadline = time.monotonic() + 120  # serve.run returns once the old replica is gone too
        while follower.rolls != ["2"]:
            assert time.monotonic() < deadline and follower.failures == 0, (follower.rolls, follower.failures)
            time.sleep(0.25)  # polling interval of the condition above
        print(f"manual alias move: served after {took:.1f} s, {len(traffic.fingerprints)} requests, none failed")
    finally:
        stop_following.set()
        serve.delete("sched")
