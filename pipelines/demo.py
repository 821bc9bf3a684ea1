"""The end-to-end demo on one machine: synthesise -> pack -> train all phases -> evaluate -> register
and promote -> serve -> one real request through the official ``openai`` client -> shut down.

Everything runs on an embedded local Ray with the tiny model; every artefact is written under
``workdir`` (printed at the end). It is the README's first command (``make demo`` = ``slime demo``).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from slime.config import load_config, replace


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    workdir: str = "demo_out"
    seed: int = 0
    num_images: int = 40
    min_side: int = 800
    max_side: int = 1400
    steps_per_phase: int = 6
    num_workers: int = 2
    train_config: str  # the run YAML the phases come from (jobs/configs/train_tiny.yaml)
    num_cpus: float = 4
    port: int = 0  # 0 = a free port on 127.0.0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _data_url(path: Path) -> str:
    img = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def run_demo(cfg: DemoConfig) -> dict:
    import openai
    import ray
    from ray import serve

    from pipelines.console import quiet_driver_logs, quiet_ray_init_kwargs, ray_log_dir
    from pipelines.evaluate import EvalConfig, EvalDataSection, evaluate
    from pipelines.pack import PackConfig, pack, read_manifest
    from pipelines.registry import Registry
    from pipelines.serve import ServeArgs, build_app
    from pipelines.synth import SynthConfig, generate
    from pipelines.train import train
    from pipelines.train_config import TrainConfig
    from slime.presets import save_tiny_checkpoint, tiny_vllm

    work = Path(cfg.workdir).resolve()
    raw, wds, models = work / "raw", work / "wds", work / "models"
    timings: dict[str, float] = {}

    t = _step("1/6 synthesise high-detail images + LLaVA-format Q&A")
    synth = generate(SynthConfig(output_dir=str(raw), seed=cfg.seed, num_images=cfg.num_images,
                                 min_side=cfg.min_side, max_side=cfg.max_side, progress=False))
    timings["synth_s"] = time.perf_counter() - t
    print(f"{synth['images']} images, {synth['train_records']} train + {synth['val_records']} val questions "
          f"-> {raw}")

    t = _step("2/6 pack webdataset shards + manifest")
    for split in ("train", "val"):
        summary = pack(PackConfig(inputs=(str(raw / f"{split}.json"),), output_dir=str(wds / split),
                                  max_samples_per_shard=64, progress=False))
        rejected = sum(summary["rejects"].values())
        print(f"{split}: {summary['samples']} samples in {len(summary['written_shards'])} shards, {rejected} rejected "
              f"-> {wds / split}")
    timings["pack_s"] = time.perf_counter() - t

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}},
                 **quiet_ray_init_kwargs())
    quiet_driver_logs()
    print(f"Ray started; full logs of every worker, Ray Data, Train and Serve: {ray_log_dir()}", flush=True)
    try:
        t = _step("3/6 train I-a -> I-b -> II -> III on Ray Train")
        steps = cfg.steps_per_phase
        # vLLM's CPU attention takes heads of 32 or more: the tiny model starts with 2 heads of 32, so
        # evaluation and serving below run on vLLM (the phase schedule is the recipe's own).
        init = save_tiny_checkpoint(work / "init_model", seed=cfg.seed, cfg=tiny_vllm())
        base = load_config(TrainConfig, cfg.train_config, [f"name=demo-{cfg.seed}", f"storage_path={work / 'runs'}",
                                                           f"init_from={init}",
                                                           f"export_dir={models / 'candidate'}",
                                                           f"data.manifest={wds / 'train'}",
                                                           f"scaling.num_workers={cfg.num_workers}",
                                                           f"logging.every_steps={max(1, cfg.steps_per_phase // 4)}"])
        train_cfg = replace(base, phases=tuple(replace(p, steps=steps, epochs=None) for p in base.phases))
        result = train(train_cfg)
        timings["train_s"] = time.perf_counter() - t
        print(f"model -> {result['export_dir']}\nloss plot -> {result['loss_plot']}")

        t = _step("4/6 evaluate on the held-out split")
        metrics = evaluate(EvalConfig(model=str(models / "candidate"), data=EvalDataSection(val=str(wds / "val")),
                                      output=str(work / "eval" / "metrics.json")))
        timings["evaluate_s"] = time.perf_counter() - t
        print(f"accuracy {metrics['accuracy']:.3f} on {metrics['num_samples']} held-out questions "
              f"({metrics['errors']} errors)")
        for task, m in metrics["per_task"].items():
            print(f"  {task:<16} {m['accuracy']:.3f}  (chance {m['chance']:.3f}, n={m['num_samples']})")
        print(f"metrics -> {metrics['output']}\naccuracy plot -> {metrics['plot']}")

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
        print(f"production = {production.id} at {production.model_uri}")

        t = _step("6/6 serve + one request through the official openai client")
        port = cfg.port or _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        quiet_driver_logs()  # Serve configures its driver-side logger when it starts
        serve.run(build_app(ServeArgs(model=production.model_uri, model_id="slime-tiny")), name="slime",
                  route_prefix="/", blocking=False)
        val = json.loads((raw / "val.json").read_text())
        record = next(r for r in val if r.get("image") and r.get("qtype") == "detail")
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
        print(f"Q: {question}\nA: {answer!r}   (reference: {record['conversations'][1]['value']!r})")
        print(f"usage: {json.dumps(usage)}")
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
    print("\n== done\n" + json.dumps(summary, indent=2, default=str))
    return summary
