"""MLflow tracking against a real ``mlflow server`` (``.venv-mlflow``, ``make mlflow``): SQLite backend, artifacts
on the moto S3 server, on 127.0.0.1 (the session's ``mlflow_server`` in tests/conftest.py, shared with
tests/test_schedule_e2e.py).

One training run covers what happens to real runs (a ``slime train`` driver SIGKILLed and re-run, the server
restarted in the middle): one MLflow run with params, a continuous per-phase metric history, artifacts and the
evaluation attached. The registry, the scheduler's mirror, the embedded store and the UI command ``make demo``
prints are tested without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import requests

from pipelines import storage
from pipelines.tracking.client import MAX_PARAM_VALUE, MlflowClient, flatten_params
from pipelines.tracking.runs import RunTracker, open_run
from tests.test_train import shards, tiny_config  # noqa: F401 - the module-scoped data fixture

TWO_PHASES = ("phases=[{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, steps: 3}, "
              "{name: II-local, trainable: [compressor], mode: local, lr: 1.0e-3, steps: 3}]")


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)  # polling interval of the condition above
    return time.monotonic() - start


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


@pytest.mark.integration
def test_killed_driver_and_server_outage_resume_into_one_mlflow_run(ray_session, shards, tmp_path,  # noqa: F811
                                                                   mlflow_server, artifact_bucket):
    """The one training run of the module (two phases x 3 steps), with everything that happens to real runs:
    ``python -m jobs.train`` (a real driver process, on the test's Ray cluster) logs step 1; the MLflow server
    is then stopped and started again (an outage mid-run: training goes on, the values logged meanwhile stay
    queued and arrive once it is back); rank 0 hangs at global step 4, after phase I-a's end checkpoint (step 3);
    the driver is SIGKILLed. Re-running the same name resumes from that checkpoint into the SAME MLflow run: one
    run, FINISHED, ``slime.resumes`` = 1, every global step 1..6 present (4 twice: before the kill and
    retrained), the phase per step, per-step metrics, per-phase summaries, loss.png and the export's metadata
    on S3; then ``evaluate`` on the export attaches its metrics, per-task table and accuracy.png to that run."""
    import signal
    import subprocess
    import sys

    from pipelines.train.loop import train
    from tests.test_train import CONFIGS

    marker = tmp_path / "fault-marker"
    overrides = ["name=tracked", f"storage_path={tmp_path}/runs", f"export_dir={tmp_path}/export",
                 f"data.manifest={shards}", TWO_PHASES, f"tracking.uri={mlflow_server.uri}",
                 "tracking.experiment=train-test", "scaling.num_workers=1", "checkpoint.every_steps=2",
                 "logging.tensorboard=false", "fault.global_step=4", "fault.rank=0", f"fault.marker={marker}",
                 "fault.kind=hang"]
    client = MlflowClient(mlflow_server.uri)

    def logged_steps(key: str = "loss") -> list[int]:
        runs = runs_named(client, "train-test", "tracked")
        return sorted(m["step"] for m in client.metric_history(runs[0]["info"]["run_id"], key)) if runs else []

    def reachable(fn):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - the server is being restarted
            return None

    driver_log = tmp_path / "driver.log"
    with open(driver_log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(CONFIGS / "train_tiny.yaml"),
                                   "--address", ray_session.get_runtime_context().gcs_address, *overrides],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: reachable(logged_steps), 300, "the driver's step 1 on the server")
        outage = [time.time() * 1000]
        mlflow_server.restart()
        outage.append(time.time() * 1000)
        checkpoint = tmp_path / "runs" / "tracked" / "checkpoint-p00-s0000003"
        wait_for(lambda: marker.exists() and checkpoint.is_dir() and reachable(logged_steps) == [1, 2, 3, 4], 300,
                 "rank 0 hung at step 4 after the phase-end checkpoint, steps 1-4 on the server")
        assert driver.poll() is None, driver_log.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    client = MlflowClient(mlflow_server.uri)
    (killed,) = runs_named(client, "train-test", "tracked")
    assert killed["info"]["status"] == "RUNNING"  # nobody was left to close it
    loss = client.metric_history(killed["info"]["run_id"], "loss")
    during = [m["step"] for m in loss if outage[0] <= m["timestamp"] <= outage[1]]
    assert during, f"no step was logged while the server was down {outage}: {[(m['step'], m['timestamp']) for m in loss]}"

    cfg = tiny_config(tmp_path, shards, "tracked", *overrides[4:])
    summary = train(cfg)  # the same name again (the marker exists: no hang)
    assert summary["mlflow"]["run_id"] == killed["info"]["run_id"] and summary["mlflow"]["resumed"]
    assert summary["mlflow"]["failures"] == 0 and summary["metrics"]["global_step"] == 6
    (run,) = runs_named(client, "train-test", "tracked")
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["name"] == "tracked" and params["phases.1.name"] == "II-local"
    assert params["scaling.num_workers"] == "1" and params["plan.1.II-local"] == "3"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["slime.resumes"] == "1" and tags["phase"] == "II-local" and tags["phase.0"] == "I-a"

    loss = client.metric_history(run_id, "loss")
    assert sorted({m["step"] for m in loss}) == list(range(1, 7))  # continuous across phases, outage and kill
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
    from pipelines.lifecycle.registry import Registry
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

    # An operator moves champion back to version 1 by hand (the UI's REST call): the next tick adopts it as
    # production (the file registry's pointer, then the rollout), instead of moving the alias back to 2.
    r = requests.post(f"{mlflow_server.uri}/api/2.0/mlflow/registered-models/alias",
                      json={"name": "scheduled", "alias": "champion", "version": "1"}, timeout=30)
    assert r.status_code == 200, r.text
    fourth = Scheduler(cfg, runner, now=clock).tick()
    assert fourth["alias_moved_by_hand"] == {"mlflow_version": "1", "mirror_had": "2",
                                             "adopted": records[0]["version"], "previous": records[1]["version"]}
    reg = Registry(cfg.registry)
    assert fourth["recovered_rollout"] == records[0]["version"] == reg.production().id == reg.serving()
    assert "by hand" in reg.production().verdict["reason"]
    # then the tick goes on from the adopted production: v1 has not seen 4 of the shards -> a candidate (0.3),
    # gated against v1's 0.5 -> rejected; champion stays where the operator put it
    assert fourth["decision"] == "rejected" and fourth["production"] == records[0]["version"], fourth
    assert fourth["mlflow"]["champion"] == "1" and champion()[0] == runner.served
    assert Scheduler(cfg, runner, now=clock).tick().get("alias_moved_by_hand") is None  # adopted once


def test_embedded_store_default_and_resume(shards, tmp_path, mlflow_server):  # noqa: F811
    """No tracking.uri: the driver's side starts ``mlflow server`` on SQLite + artifacts in
    <parent of storage_path>/mlflow, records the run with the store's identity (not the server's port), so a
    later session on the same run directory reopens the run through a server at another address; the server
    is stopped with the session; the command ``make demo`` prints at its end (``pipelines.demo.mlflow_ui_note``)
    then opens the MLflow UI and API on that store, with the run in it. (The store starts from an empty store
    with MLflow's schema: the module's server covers a brand-new store's migrations.)"""
    from pipelines.train.config import expand_phases
    from pipelines.train.mlflow_run import TrainTracking

    cfg = tiny_config(tmp_path, shards, "embedded", TWO_PHASES, "tracking.enabled=true")
    phases = expand_phases(cfg)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"phase": p.name, "phase_index": i, "global_step": 3 * i + s, "loss": 1.0 / s,
                                       "samples_per_s": 2.0, "tokens_per_s": 9.0}) + "\n"
                           for i, p in enumerate(phases) for s in (1, 2, 3)))
    (tmp_path / "mlflow").mkdir()
    shutil.copy(mlflow_server.empty_store, tmp_path / "mlflow" / "mlflow.db")  # the schema; the module's server
    session = TrainTracking.open(cfg, phases, [3, 3])  # started on a fresh store (migrations included)
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

    # `make demo`'s last words (pipelines.demo): the command they print opens the UI and API on this store
    import shlex
    import signal
    import subprocess

    import requests

    from pipelines.demo import mlflow_ui_note
    from pipelines.serve.ingress import free_port

    note = mlflow_ui_note(done)
    assert mlflow_ui_note(None) is None and note.splitlines()[-1].strip() == done["ui"]
    command, url = [part.strip() for part in note.splitlines()[-1].split("# then open")]
    argv = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    while "=" in argv[0]:  # VAR=value prefixes, as a shell would take them
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    port = free_port()  # the printed 5000 may be taken on a shared machine: the same command on a free port
    assert argv[argv.index("--port") + 1] == "5000" and url == "http://127.0.0.1:5000"
    argv[argv.index("--port") + 1] = str(port)
    with open(tmp_path / "ui.log", "wb") as log:
        ui = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def shows_the_run() -> bool:
        assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-2000:]
        try:
            r = requests.get(f"{base}/api/2.0/mlflow/runs/get", params={"run_id": done["run_id"]}, timeout=10)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.json()["run"]["info"]["run_id"] == done["run_id"]

    try:
        wait_for(shows_the_run, 180, "the printed UI command to serve the demo's run")
        page = requests.get(base + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()  # the UI itself
        found = MlflowClient(base).search_runs(MlflowClient(base).experiment_id("slime"))
        assert done["run_id"] in {r["info"]["run_id"] for r in found}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)
