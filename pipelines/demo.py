"""The end-to-end demo on one machine: synthesise -> pack -> train all phases -> evaluate -> register
and promote -> serve -> one real request through the official ``openai`` client -> shut down.

Everything runs on an embedded local Ray with the ``mini`` preset (a small random model that learns in
minutes) on the fidelity synth tasks (pipelines/data/synth_tasks.py: detail questions only the local crops can
answer, plus global ones); every artefact is written under ``workdir`` (printed at the end). It is the
README's first command (``make demo`` = ``slime demo``).
"""

from __future__ import annotations

import base64
import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

from slime.config import load_config, replace
from slime.presets import preset, save_tiny_checkpoint


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    workdir: str = "demo_out"
    seed: int = 0
    preset: str = "mini"  # the model trained (slime/presets.py); its tile side sizes the images
    num_images: int = 400
    # One local and one global task: a ~3-minute CPU run learns both (benchmarks.learning has all five).
    tasks: tuple[str, ...] = ("texture", "big_color")  # from synth_tasks.TASKS
    steps_per_phase: int | None = None  # None = the steps of train_config's phases
    num_workers: int = 2
    train_config: str  # the run YAML the phases come from (jobs/configs/train_demo.yaml)
    num_cpus: float = 4
    port: int = 0  # 0 = a free port on 127.0.0.1


def say(*parts) -> None:
    """A line of the demo's story: to the terminal even while framework output goes to the log file."""
    from pipelines.console import story

    print(*parts, file=story(), flush=True)


def _step(title: str) -> float:
    say(f"\n== {title}")
    return time.perf_counter()


def _data_url(path: Path) -> str:
    # The file's own bytes (PNG for the fidelity tasks): re-encoding to JPEG would smear the 1-px
    # checkerboards the detail question is about (measured: a wrong served answer on seed 1).
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _print_per_task(raw: Path, metrics: dict, predictions: Path) -> None:
    """Held-out accuracy per task next to chance, both as metrics.json has them (pipelines.evaluate.chance
    says what chance is), and 3 examples."""
    questions = {r["id"]: r["conversations"][0]["value"].replace("<image>", "").strip()
                 for r in json.loads((raw / "val.json").read_text())}
    by_task = collections.defaultdict(list)
    for line in predictions.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_task[row["task"]].append(row)
    say(f"{'task':<14} {'kind':<7} {'n':>4} {'accuracy':>9} {'chance':>7}")
    for task, t in sorted(metrics["per_task"].items()):
        kind = by_task[task][0]["qtype"] if by_task.get(task) else ""
        say(f"{task:<14} {kind:<7} {t['num_samples']:>4} {t['accuracy']:>9.3f} {t['chance']:>7.3f}")
    tasks = sorted(by_task)
    examples = [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(3)
                if i // len(tasks) < len(by_task[tasks[i % len(tasks)]])]
    for r in examples:  # round-robin over the tasks
        say(f"  Q: {questions.get(r['id'], r['task'])}  reference: {r['reference']!r}  answer: {r['prediction']!r}")


def run_demo(cfg: DemoConfig) -> dict:
    import openai
    import ray
    from ray import serve

    from pipelines.console import quiet_driver_logs, quiet_ray_init_kwargs, ray_log_dir
    from pipelines.data.pack import PackConfig, pack, read_manifest
    from pipelines.data.synth import SynthConfig, generate
    from pipelines.evaluate import EvalConfig, EvalDataSection, evaluate
    from pipelines.lifecycle.registry import Registry
    from pipelines.serve.app import ServeArgs, build_app
    from pipelines.serve.ingress import free_port
    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import train

    work = Path(cfg.workdir).resolve()
    raw, wds, models = work / "raw", work / "wds", work / "models"
    timings: dict[str, float] = {}

    t = _step("1/6 synthesise high-detail images + LLaVA-format Q&A")
    model_cfg = preset(cfg.preset)
    synth = generate(SynthConfig(output_dir=str(raw), kind="fidelity", seed=cfg.seed, num_images=cfg.num_images,
                                 tile=model_cfg.vision.image_size, tasks=cfg.tasks, val_fraction=0.2,
                                 captions=False, progress=False, workers=2))
    timings["synth_s"] = time.perf_counter() - t
    say(f"{synth['images']} images, {synth['train_records']} train + {synth['val_records']} val questions "
          f"-> {raw}")

    t = _step("2/6 pack webdataset shards + manifest")
    for split in ("train", "val"):
        summary = pack(PackConfig(inputs=(str(raw / f"{split}.json"),), output_dir=str(wds / split),
                                  max_samples_per_shard=64, progress=False))
        rejected = sum(summary["rejects"].values())
        if summary["skipped_sources"] and not summary["written_shards"]:  # a second demo in this work dir
            say(f"{split}: already packed ({summary['num_samples']} samples) -> {wds / split}")
            continue
        say(f"{split}: {summary['samples']} samples in {len(summary['written_shards'])} shards, {rejected} rejected "
              f"-> {wds / split}")
    timings["pack_s"] = time.perf_counter() - t

    if not ray.is_initialized():
        from pipelines.cluster import init_embedded

        init_embedded(num_cpus=cfg.num_cpus, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                                      "HF_HUB_OFFLINE": "1"}},
                      **quiet_ray_init_kwargs())
    quiet_driver_logs()
    say(f"Ray started; full logs of every worker, Ray Data, Train and Serve: {ray_log_dir()}")
    try:
        t = _step("3/6 train I-a -> I-b -> II -> III on Ray Train")
        steps = cfg.steps_per_phase
        init = save_tiny_checkpoint(work / "init_model", seed=cfg.seed, cfg=model_cfg)
        base = load_config(TrainConfig, cfg.train_config, [f"name=demo-{cfg.seed}", f"storage_path={work / 'runs'}",
                                                           f"export_dir={models / 'candidate'}", f"init_from={init}",
                                                           f"data.manifest={wds / 'train'}", f"seed={cfg.seed}",
                                                           f"scaling.num_workers={cfg.num_workers}"])
        train_cfg = base if steps is None else replace(
            base, phases=tuple(replace(p, steps=steps, epochs=None) for p in base.phases))
        result = train(train_cfg)
        timings["train_s"] = time.perf_counter() - t
        say(f"model -> {result['export_dir']}\nloss plot -> {result['loss_plot']}")
        if result.get("mlflow"):  # pipelines/tracking: the embedded store under the work dir (work/mlflow)
            say(f"MLflow run {result['mlflow']['run_id']} -> {result['mlflow']['store'] or result['mlflow']['uri']}")

        t = _step("4/6 evaluate on the held-out split")
        # overwrite: a second demo in the same work dir resumes its run (same name) and re-evaluates what it exports
        metrics = evaluate(EvalConfig(model=str(models / "candidate"), data=EvalDataSection(val=str(wds / "val")),
                                      output=str(work / "eval" / "metrics.json"), overwrite=True))
        timings["evaluate_s"] = time.perf_counter() - t
        say(f"accuracy {metrics['accuracy']:.3f} on {metrics['num_samples']} held-out questions on "
              f"{metrics['engine']} ({metrics['errors']} errors, counted wrong)")
        _print_per_task(raw, metrics, work / "eval" / "predictions.jsonl")
        say(f"metrics -> {metrics['output']}\naccuracy plot -> {metrics['plot']}")

        t = _step("5/6 register + promote")
        registry = Registry(str(work / "registry"))
        manifest = read_manifest(str(wds / "train"))
        version = registry.register(str(models / "candidate"), metrics, {
            "dataset_manifest_version": manifest.get("dataset_version"),
            "shards": [s["name"] for s in manifest.get("shards", [])], "parent": None,
            "run_config": train_cfg.name})
        registry.promote(version, "demo: first model")
        production = registry.production()
        timings["register_s"] = time.perf_counter() - t
        say(f"production = {production.id} at {production.model_uri}")

        t = _step("6/6 serve + one request through the official openai client")
        port = cfg.port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        quiet_driver_logs()  # Serve configures its driver-side logger when it starts
        serve.run(build_app(ServeArgs(model=production.model_uri, model_id="slime-tiny")), name="slime",
                  route_prefix="/", blocking=False)
        val = json.loads((raw / "val.json").read_text())
        detail = [r for r in val if r.get("qtype") == "detail"]
        record = next((r for r in detail if r.get("task") == "texture"), detail[0])
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        reply = client.chat.completions.create(
            model="slime-tiny", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": _data_url(raw / record["image"])}}]}])
        timings["serve_s"] = time.perf_counter() - t
        answer = reply.choices[0].message.content
        usage = reply.usage.model_dump() if reply.usage else {}
        say(f"Q: {question}\nA: {answer!r}   (reference: {record['conversations'][1]['value']!r})")
        say(f"usage: {json.dumps(usage)}")
    finally:
        ray_logs = ray_log_dir()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    summary = {"answer": answer, "usage": usage, "accuracy": metrics.get("accuracy"),
               "metrics": metrics["output"], "loss_plot": result["loss_plot"], "accuracy_plot": metrics["plot"],
               "ray_logs": ray_logs, "model": production.model_uri,
               "registry": str(work / "registry"), "shards": str(wds), "runs": str(work / "runs"),
               "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    ui = (result.get("mlflow") or {}).get("ui")
    if ui:
        summary["mlflow_ui"] = ui
    say("\n== done\n" + json.dumps(summary, indent=2, default=str))
    if note := mlflow_ui_note(result.get("mlflow")):
        say(note)
    return summary


def mlflow_ui_note(mlflow: dict | None) -> str | None:
    """The demo's last words: the one command that opens the MLflow UI on the embedded store its run went to
    (``train()``'s ``mlflow`` result); None when the run was not tracked or went to a server."""
    ui = (mlflow or {}).get("ui")
    return f"\nOpen this demo's run (params, per-step metrics, loss.png, evaluation) in the MLflow UI:\n  {ui}" \
        if ui else None
