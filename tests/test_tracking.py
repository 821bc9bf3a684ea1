"""MLflow tracking against a real ``mlflow server`` (``.venv-mlflow``, ``make mlflow``): SQLite backend, artifacts
on the moto S3 server, on 127.0.0.1, started and stopped by this module.

A training run's params, per-phase metric history and artifacts are on the server; a run that failed and was
re-run under the same name is one MLflow run with a continuous step axis; a server stopped in the middle of a
run does not fail the run.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines import storage
from pipelines.tracking.client import MAX_PARAM_VALUE, MlflowClient, flatten_params
from pipelines.tracking.runs import RunTracker, open_run
from pipelines.tracking.server import start_server
from tests.test_train import shards, tiny_config  # noqa: F401 - the module-scoped data fixture

TWO_PHASES = ("phases=[{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, steps: 3}, "
              "{name: II-local, trainable: [compressor], mode: local, lr: 1.0e-3, steps: 3}]")


@pytest.fixture(scope="module")
def artifact_bucket(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="mlflow-artifacts")
    return "mlflow-artifacts"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, moto_s3, artifact_bucket):
    """One real MLflow server for the module: SQLite store, artifacts proxied to s3://mlflow-artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    server = start_server(f"sqlite:///{root}/mlflow.db", f"s3://{artifact_bucket}/runs",
                          env={"AWS_ENDPOINT_URL": moto_s3, "MLFLOW_S3_ENDPOINT_URL": moto_s3})
    yield server
    server.stop()
    assert server.process.poll() is not None


def runs_named(client: MlflowClient, experiment: str, name: str) -> list[dict]:
    return client.search_runs(client.experiment_id(experiment), f"tags.`slime.run_name` = '{name}'")


def test_client_limits_reopen_and_failures(mlflow_server, artifact_bucket, tmp_path):
    """Params are flattened and clipped to MLflow's limits, 2,500 metric values go in chunks, artifacts land on
    S3 through the server, a second open of the same run directory reopens the run, and a tracker pointed at
    nothing counts its failures instead of raising."""
    client = MlflowClient(mlflow_server.uri)
    params = flatten_params({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "phases": [{"name": "a"}, {"name": "b"}],
                             "long": "x" * 10_000, "none": None})
    assert params["optim.betas"] == "[0.9, 0.99]" and params["phases.1.name"] == "b" and params["none"] == "null"
    assert len(params["long"]) == MAX_PARAM_VALUE and params["long"].endswith("...")
    run_dir = str(tmp_path / "runs" / "r")
    first = open_run(mlflow_server.uri, "unit", "r", run_dir, params=params, tags={"slime.run_name": "r"})
    tracker = RunTracker(mlflow_server.uri, first["run_id"])
    for step in range(1, 1251):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.5}, step=step)
    tracker.log_artifact("export/metadata.json", b'{"phase": "b"}')
    assert tracker.close(status="FINISHED") == {"failures": 0, "unsent": 0, "dropped": 0}
    history = client.metric_history(first["run_id"], "loss")
    assert sorted(m["step"] for m in history) == list(range(1, 1251))
    run = client.get_run(first["run_id"])
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["optim.lr"] == "0.001"
    assert client.download_artifact(run, "export/metadata.json") == b'{"phase": "b"}'
    s3_keys = [k for k in storage.listdir(f"s3://{artifact_bucket}/runs") if k]
    assert s3_keys, "the server did not write the artifact to S3"

    again = open_run(mlflow_server.uri, "unit", "r", run_dir, params={**params, "optim.lr": "1"}, tags={})
    assert again["run_id"] == first["run_id"] and again["resumed"]
    run = client.get_run(first["run_id"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "RUNNING" and tags["slime.resumes"] == "1"
    assert tags["slime.changed_on_resume"] == "optim.lr"  # a param never changes; the change is recorded
    assert len(runs_named(client, "unit", "r")) == 1

    from pipelines.serve.ingress import free_port

    dead = RunTracker(f"http://127.0.0.1:{free_port()}", "nope", background=True)
    dead.log_metrics({"loss": 1.0}, step=1)
    dead.set_tags({"phase": "x"})
    dead.log_artifact("a.txt", b"a")
    counts = dead.close(status="FINISHED", timeout=0.5)
    assert counts["failures"] >= 3 and counts["unsent"] == 1


@pytest.mark.extended  # a Ray training run each: make test-extended
@pytest.mark.integration
def test_training_run_failed_and_rerun_is_one_mlflow_run(ray_session, shards, tmp_path, mlflow_server,  # noqa: F811
                                                         artifact_bucket):
    """Two phases x 3 steps; the first attempt dies at global step 4 (no Ray Train retries), the re-run of the
    same name resumes from phase I-a's end checkpoint (step 3) into the same MLflow run: params, a loss value
    for every global step 1..6 (step 4 twice: logged, lost with the attempt, retrained), the phase per step, per-phase
    summaries, loss.png and the export's metadata on S3; then ``evaluate`` on the export attaches its metrics,
    per-task table and accuracy.png to that run."""
    from pipelines.train.loop import train

    marker = tmp_path / "fault-marker"
    cfg = tiny_config(tmp_path, shards, "tracked", TWO_PHASES, f"tracking.uri={mlflow_server.uri}",
                      "tracking.experiment=train-test", "scaling.num_workers=1", "checkpoint.every_steps=2",
                      "checkpoint.max_failures=0", "logging.tensorboard=false", "fault.global_step=4", "fault.rank=0",
                      f"fault.marker={marker}", "fault.kind=raise")
    with pytest.raises(Exception, match="injected failure"):
        train(cfg)
    assert marker.exists()
    client = MlflowClient(mlflow_server.uri)
    (failed,) = runs_named(client, "train-test", "tracked")
    assert failed["info"]["status"] == "FAILED"

    summary = train(cfg)
    assert summary["mlflow"]["run_id"] == failed["info"]["run_id"] and summary["mlflow"]["resumed"]
    assert summary["mlflow"]["failures"] == 0
    (run,) = runs_named(client, "train-test", "tracked")
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["name"] == "tracked" and params["phases.1.name"] == "II-local"
    assert params["scaling.num_workers"] == "1" and params["plan.1.II-local"] == "3"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["slime.resumes"] == "1" and tags["phase"] == "II-local" and tags["phase.0"] == "I-a"

    loss = client.metric_history(run_id, "loss")
    assert sorted({m["step"] for m in loss}) == list(range(1, 7))  # continuous across phases and the re-run
    assert sorted(m["step"] for m in loss) == [1, 2, 3, 4, 4, 5, 6]
    phase_of = {m["step"]: m["value"] for m in client.metric_history(run_id, "phase_index")}
    assert phase_of == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    for key in ("lr", "samples_per_s", "tokens_per_s", "visual_tokens_per_sample", "kept_local_fraction",
                "data_wait_s"):
        assert {m["step"] for m in client.metric_history(run_id, key)} == set(range(1, 7)), key
    assert client.metric_history(run_id, "summary.II-local.steps")[-1]["value"] == 3

    artifacts = set(client.list_artifacts(run))
    assert {"loss.png", "phase_summary.json", "metrics.jsonl", "export/metadata.json",
            "export/training_data.json"} <= artifacts
    assert client.download_artifact(run, "loss.png")[:4] == b"\x89PNG"
    summaries = json.loads(client.download_artifact(run, "phase_summary.json"))
    assert [summaries[p]["steps"] for p in ("I-a", "II-local")] == [3, 3]
    assert json.loads(client.download_artifact(run, "export/metadata.json"))["phase"] == "II-local"
    assert storage.exists(f"s3://{artifact_bucket}/runs/{run['info']['experiment_id']}/{run_id}/artifacts/loss.png")

    # `slime evaluate` on the export logs to the run that trained it (the export's mlflow_run.json)
    from pipelines.evaluate import EvalConfig, EvalDataSection, evaluate

    assert json.loads((tmp_path / "export" / "mlflow_run.json").read_text())["run_id"] == run_id
    result = evaluate(EvalConfig(model=str(tmp_path / "export"), data=EvalDataSection(val=shards, limit=4),
                                 max_tokens=2, engine="hf"))
    assert result["mlflow"] == {"run_id": run_id, "experiment_id": run["info"]["experiment_id"], "failures": 0,
                                "unsent": 0, "dropped": 0}
    (accuracy,) = client.metric_history(run_id, "eval.accuracy")
    assert (accuracy["step"], accuracy["value"]) == (6, result["accuracy"])  # at the model's global step
    assert client.metric_history(run_id, "eval.num_samples")[0]["value"] == 4
    tasks = [k for k in result["per_task"]]
    assert client.metric_history(run_id, f"eval.{tasks[0]}.accuracy")
    run = client.get_run(run_id)
    assert {"eval/train/accuracy.png", "eval/train/metrics.json", "eval/train/per_task.csv"} <= set(
        client.list_artifacts(run))
    assert client.download_artifact(run, "eval/train/per_task.csv").decode().splitlines()[0].startswith("task,")


def test_model_registry_aliases_and_models_uris(mlflow_server, artifact_bucket, tmp_path):
    """Versions in MLflow's Model Registry: one from a tracked run (source runs:/<run>/export), one from an
    s3:// directory; promotion moves ``champion`` and records the version it replaced, rollback moves it back;
    ``models:/NAME@champion`` and ``models:/NAME/1`` resolve to the model directories, as ``slime serve
    --model`` does; the alias watch behind ``slime serve --follow`` sees a move by hand; a bad alias is one
    clear error."""
    from jobs.common import JobError
    from jobs.serve import resolve_model
    from pipelines.serve.ingress import ServeArgs
    from pipelines.tracking.models import AliasWatch, ModelRegistry, resolve_model_uri

    client = MlflowClient(mlflow_server.uri)
    first = tmp_path / "models" / "v1"
    first.mkdir(parents=True)
    run = open_run(mlflow_server.uri, "registry", "r1", str(tmp_path / "runs" / "r1"), params={}, tags={})
    (first / "mlflow_run.json").write_text(json.dumps({"run_id": run["run_id"]}))
    second = f"s3://{artifact_bucket}/models/v2"
    registry = ModelRegistry(mlflow_server.uri, "slime-test")
    v1 = registry.register(str(first), {"eval.accuracy": "0.5", "lineage.parent_version": ""})
    v2 = registry.register(second, {"eval.accuracy": "0.75", "lineage.parent_version": v1})
    assert (v1, v2) == ("1", "2")
    assert registry.get(v1)["source"] == f"runs:/{run['run_id']}/export" and registry.get(v1)["run_id"] == run["run_id"]
    assert registry.get(v2)["source"] == second and registry.get(v2)["tags"]["lineage.parent_version"] == "1"
    assert registry.alias("champion") is None

    assert registry.promote(v1, "first model") == {"version": "1", "previous": None}
    assert registry.promote(v2, "gate passed: 0.75 >= 0.5") == {"version": "2", "previous": "1"}
    assert resolve_model_uri("models:/slime-test@champion", mlflow_server.uri)[0] == second
    assert resolve_model_uri("models:/slime-test/1", mlflow_server.uri)[0] == str(first)
    assert resolve_model_uri(str(first)) == (str(first), None)  # a directory stays a directory
    served, version = resolve_model(ServeArgs(model="models:/slime-test@champion"), mlflow_server.uri)
    assert (served.model, version) == (second, "2")
    watch = AliasWatch("models:/slime-test@champion", mlflow_server.uri, current=version)  # slime serve --follow
    assert watch.changed() is None
    registry.set_alias("champion", v1)  # moved by hand (as in the UI)
    assert watch.changed()[0] == str(first) and watch.version == "1"
    assert watch.changed() is None
    registry.set_alias("champion", v2)
    assert watch.changed()[0] == second

    assert registry.rollback("bad answers in production") == {"version": "1", "previous": "2"}
    assert resolve_model_uri("models:/slime-test@champion", mlflow_server.uri)[0] == str(first)
    assert registry.get(v2)["tags"]["slime.verdict"] == "rolled_back"
    assert [v["version"] for v in registry.versions()] == ["1", "2"]
    aliases = client.call("GET", "registered-models/get", params={"name": "slime-test"})["registered_model"]["aliases"]
    assert aliases == [{"alias": "champion", "version": "1"}]
    with pytest.raises(JobError, match="points at no version"):
        resolve_model(ServeArgs(model="models:/slime-test@nobody"), mlflow_server.uri)


def test_scheduled_ticks_register_and_promote_by_alias_only_when_the_gate_passes(mlflow_server, tmp_path):
    """The scheduler's gated promotion with the MLflow mirror on (tests/test_scheduler.py's FileRunner does
    the retrain/evaluate/rollout steps): tick 1 registers and promotes version 1 (``champion`` -> 1), tick 2
    a better model (-> 2), tick 3 a worse one: registered, tagged rejected, ``champion`` stays on 2. The
    rolled-out model is the one ``models:/NAME@champion`` resolves to; each tick is a run with its decision."""
    from pipelines.lifecycle.mlflow_mirror import MlflowSection
    from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler
    from pipelines.tracking.models import ModelRegistry, resolve_model_uri
    from tests.test_scheduler import Clock, FileRunner, write_manifest

    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "data"),
                         val=str(tmp_path / "val"), work_dir=str(tmp_path / "work"), tolerance=0.05,
                         mlflow=MlflowSection(uri=mlflow_server.uri, model_name="scheduled", experiment="ticks"))
    clock, runner = Clock(), FileRunner(cfg.work_dir, quality=0.5)
    champion = lambda: resolve_model_uri("models:/scheduled@champion", mlflow_server.uri)  # noqa: E731
    records = []
    for count, quality in ((2, 0.5), (4, 0.7), (6, 0.3)):
        write_manifest(cfg.manifest, count, version=count // 2)
        runner.quality = quality
        records.append(Scheduler(cfg, runner, now=clock).tick())
        clock.advance(86400)
        assert "error" not in records[-1]["mlflow"], records[-1]["mlflow"]
        directory, mv = champion()
        assert runner.served == directory  # what was rolled out is what the alias names
    assert [r["decision"] for r in records] == ["promoted", "promoted", "rejected"]
    assert records[2]["mlflow"]["versions"] == {records[i]["version"]: str(i + 1) for i in range(3)}
    assert [r["mlflow"]["champion"] for r in records] == ["1", "2", "2"]
    models = ModelRegistry(mlflow_server.uri, "scheduled")
    v2, v3 = models.get("2"), models.get("3")
    assert v2["tags"]["slime.previous_champion"] == "1" and v2["tags"]["eval.accuracy"] == "0.7"
    assert v2["tags"]["lineage.parent_version"] == records[0]["version"]
    assert len(json.loads(v2["tags"]["lineage.shards"])) == 4 and v2["tags"]["lineage.run_name"] == records[1]["run_name"]
    assert v3["tags"]["slime.verdict"] == "rejected" and "not promoted" in v3["tags"]["slime.reason"]
    assert v3["source"] == f"runs:/{records[2]['mlflow']['run_id']}/export"  # linked to its tick's run
    client = MlflowClient(mlflow_server.uri)
    ticks = client.search_runs(client.experiment_id("ticks"))
    decisions = [{x["key"]: x["value"] for x in t["data"]["tags"]}["slime.decision"] for t in ticks]
    assert sorted(decisions) == ["promoted", "promoted", "rejected"]


def test_embedded_store_default_and_resume(shards, tmp_path):  # noqa: F811
    """No tracking.uri: the driver's side starts ``mlflow server`` on SQLite + artifacts in
    <parent of storage_path>/mlflow, records the run with the store's identity (not the server's port), so a
    later session on the same run directory reopens the run through a server at another address; the UI
    command names that store; the server is stopped with the session."""
    from pipelines.train.config import expand_phases
    from pipelines.train.mlflow_run import TrainTracking

    cfg = tiny_config(tmp_path, shards, "embedded", TWO_PHASES, "tracking.enabled=true")
    phases = expand_phases(cfg)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"phase": p.name, "phase_index": i, "global_step": 3 * i + s, "loss": 1.0 / s,
                                       "samples_per_s": 2.0, "tokens_per_s": 9.0}) + "\n"
                           for i, p in enumerate(phases) for s in (1, 2, 3)))
    session = TrainTracking.open(cfg, phases, [3, 3])
    try:
        assert session.store == str(tmp_path / "mlflow") and session.run, "tracking did not start"
        done = session.finish(cfg, status="FINISHED", log_uri=str(log))
        client = MlflowClient(session.run["uri"])
        run = client.get_run(done["run_id"])
        assert run["info"]["status"] == "FINISHED" and "phase_summary.json" in client.list_artifacts(run)
        assert client.metric_history(done["run_id"], "summary.II-local.loss_last")[0]["step"] == 6
        record = json.loads((tmp_path / "runs" / "embedded" / "mlflow_run.json").read_text())
        assert record["store"] == f"embedded:{tmp_path}/mlflow" and "uri" not in record
        other_address = session.run["uri"].replace("127.0.0.1", "localhost")  # as a new server's port would be
        again = open_run(other_address, "slime", "embedded", str(tmp_path / "runs" / "embedded"), params={},
                         tags={}, store=record["store"])
        assert again["run_id"] == done["run_id"] and again["resumed"]
    finally:
        session.close_server()
    assert session.server is None
    assert not done["resumed"] and done["failures"] == 0
    assert (tmp_path / "mlflow" / "mlflow.db").is_file() and (tmp_path / "mlflow" / "artifacts").is_dir()
    assert f"sqlite:///{tmp_path}/mlflow/mlflow.db" in done["ui"]


@pytest.mark.extended  # a Ray training run each: make test-extended
@pytest.mark.integration
def test_server_stopped_mid_run_does_not_fail_the_run(ray_session, shards, tmp_path, mlflow_server):  # noqa: F811
    """The module's server, stopped once rank 0's step 2 reached it (so this test is the module's last: a
    second server would cost ~10 s of start-up): the run trains all its steps, exports, and reports the
    failed MLflow calls instead of raising."""
    from pipelines.train.loop import train

    server = mlflow_server
    client = MlflowClient(server.uri)
    stopped = threading.Event()

    def stop_at_step_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                (run,) = runs_named(client, "stop-test", "stopped") or [None]
                if run and any(m["step"] >= 2 for m in client.metric_history(run["info"]["run_id"], "loss")):
                    server.stop()
                    stopped.set()
                    return
            except Exception:  # noqa: BLE001 - the run may not exist yet
                pass
            time.sleep(0.2)  # polling interval of the condition above

    watcher = threading.Thread(target=stop_at_step_2, daemon=True)
    watcher.start()
    try:
        cfg = tiny_config(tmp_path, shards, "stopped", f"tracking.uri={server.uri}", "tracking.experiment=stop-test",
                          "phases=[{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, "
                          "steps: 8}]", "scaling.num_workers=1", "checkpoint.every_steps=8",
                          "logging.tensorboard=false")
        summary = train(cfg)
    finally:
        watcher.join(30)
    assert stopped.is_set(), "the server was never stopped mid-run"
    assert summary["metrics"]["global_step"] == 8 and storage.exists(f"{tmp_path}/export/EXPORT_COMPLETE")
    assert summary["mlflow"]["failures"] >= 1  # counted and reported, not raised
    rows = [json.loads(line) for line in open(summary["metrics_log"]) if "event" not in line]
    assert [r["global_step"] for r in rows] == list(range(1, 9))
