"""Training on Ray Train v2: one TorchTrainer run executes every phase of the schedule (MODEL_SPEC A5).

Why one run and not one trainer per phase: one worker group, one process group and one checkpoint
lineage. ``train_state.json`` says which phase and step a checkpoint belongs to, so a worker failure
or a re-run of the same ``name`` resumes mid-schedule with no driver-side bookkeeping, and phase N+1
starts from phase N's weights in memory (no reload from storage between phases). Each phase has its
own dataset (``datasets={phase_name: ds}``, read with ``get_dataset_shard(phase_name)``): phases feed
different visual tokens (global / local / both), so their samples differ.

The loop, top to bottom: restore -> for each phase: set_trainable -> engine -> [batch -> loss ->
backward -> step -> schedule -> log -> checkpoint] -> phase-end checkpoint. Steps are counted here, not
by the data: a phase's dataset is re-iterated until the phase has its configured number of optimizer
steps. After a restore the dataset restarts from the beginning of an epoch; ``resume_data: skip``
discards the micro-batches the checkpoint had already consumed in that epoch (exact continuation when
the order is deterministic), ``continue`` just trains on from the epoch start.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time

import torch
import yaml

from pipelines import storage
from pipelines.train.batches import Batches
from pipelines.train.config import PhaseConfig, TrainConfig, expand_phases
from pipelines.train.state import Position, RunLog, export_model, logs_uri, phase_model_uri, read_position, \
    seed_everything, write_checkpoint_files, write_loss_plot, write_phase_adapter, write_phase_model
from slime.config import from_dict, merge, replace, to_dict

CHECKPOINT_KEYS = ("phase", "phase_index", "step", "global_step", "loss", "phase_done")


# ----------------------------------------------------------------------------- driver side


def phase_data_config(cfg: TrainConfig, phase: PhaseConfig, model_dir: str):
    """The run's ``data`` section + the phase's overrides -> pipelines.data.ingest.DataConfig. The phase decides
    mode and gamma (the processor expands ``<image>`` to what the model will produce in that phase)."""
    from pipelines.data.ingest import DataConfig

    d = merge(dict(cfg.data), dict(phase.data))
    manifest = d.pop("manifest", None)
    d.setdefault("shards", manifest)
    if d["shards"] is None:
        raise ValueError(f"phase {phase.name!r} has no data: set data.manifest (or data.shards)")
    d.update(model=model_dir, mode=phase.mode, gamma=phase.gamma)
    d.setdefault("preserve_order", cfg.deterministic)
    d.setdefault("seed", cfg.seed)
    d.setdefault("metrics_name", f"DataMetrics-{cfg.name}")
    return from_dict(DataConfig, d)


def resolve_phases(cfg: TrainConfig, init_dir: str) -> list[PhaseConfig]:
    """The phases run, each with a number for ``gamma`` (None -> the init model's ``local.gamma``), fixed
    once on the driver: the data pipeline expands ``<image>`` for it, the workers train with it and every
    checkpoint records it as the model's serving default. The model a resumed worker loads carries the
    gamma of the phase its checkpoint was taken in, so "the model's gamma" must not be read again there."""
    from slime.config import ModelConfig

    init_cfg = from_dict(ModelConfig, yaml.safe_load(storage.read_bytes(storage.join(init_dir, "slime_config.yaml"))))
    return [p if p.gamma is not None else replace(p, gamma=init_cfg.local.gamma) for p in expand_phases(cfg)]


def phase_steps(cfg: TrainConfig, phase: PhaseConfig, dcfg) -> int:
    if phase.steps is not None:
        return phase.steps
    from pipelines.data.ingest import list_shards
    from pipelines.data.pack import read_manifest

    uris = list_shards(dcfg)
    root = uris[0].rsplit("/", 1)[0]
    samples = {storage.join(root, s["name"]): s["samples"] for s in read_manifest(root, dcfg.storage)["shards"]}
    if any(u not in samples for u in uris):
        raise ValueError(f"phase {phase.name!r} uses epochs but its shards are not all in {root}/manifest.json; "
                         f"give steps instead")
    return max(1, math.floor(phase.epochs * sum(samples[u] for u in uris) / cfg.samples_per_step))


def ensure_init_model(cfg: TrainConfig) -> str:
    """``init_from``, or (tiny preset) a model built from ``seed`` and saved once under the run dir."""
    if cfg.init_from:
        return cfg.init_from
    from slime.presets import save_tiny_checkpoint

    uri = storage.join(cfg.storage_path, cfg.name, "init_model")
    if not storage.exists(storage.join(uri, "slime_config.yaml")):
        with tempfile.TemporaryDirectory() as d:
            save_tiny_checkpoint(os.path.join(d, "m"), seed=cfg.seed)
            export_model(os.path.join(d, "m"), uri)
    return uri


def preflight(cfg: TrainConfig) -> None:
    """What can be checked before Ray starts: every phase's shards exist and ``init_from`` is a model
    directory. Raises FileNotFoundError / ValueError naming the path and the config key."""
    from pipelines.data.ingest import list_shards

    if cfg.init_from and not storage.exists(storage.join(cfg.init_from, "slime_config.yaml")):
        raise FileNotFoundError(f"init_from={cfg.init_from} is not a model directory (no slime_config.yaml): "
                                "give a directory written by slime train (export_dir) or slime convert")
    for phase in expand_phases(cfg):
        dcfg = phase_data_config(cfg, phase, cfg.init_from or "")
        try:
            list_shards(dcfg)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"phase {phase.name!r}: {e} (set data.manifest to a directory written by "
                                    "slime pack)") from e


AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
           "AWS_DEFAULT_REGION", "AWS_REGION")


def run_config(cfg: TrainConfig):
    import ray.train

    path, fs = cfg.storage_path, None
    if storage.is_s3(path):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        s3, path = storage.filesystem(cfg.storage_path)
        fs = PyFileSystem(FSSpecHandler(s3))
    # Workers touch storage too (logs, init model, export): they get the driver's S3 settings, since a
    # Ray started before these variables were set would not pass them on.
    aws = {k: v for k, v in os.environ.items() if k in AWS_ENV}
    return ray.train.RunConfig(
        name=cfg.name, storage_path=path, storage_filesystem=fs,
        worker_runtime_env={"env_vars": aws} if aws else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep))


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the whole schedule; export the final model to ``cfg.export_dir``."""
    if isinstance(cfg.engine.deepspeed, str):  # resolved here: workers may not see the driver's files
        with open(cfg.engine.deepspeed) as f:
            cfg = replace(cfg, engine=replace(cfg.engine, deepspeed=yaml.safe_load(f)))
    init_dir = ensure_init_model(cfg)
    phases = resolve_phases(cfg, init_dir)
    dcfgs = {p.name: phase_data_config(cfg, p, init_dir) for p in phases}
    plan = [phase_steps(cfg, p, dcfgs[p.name]) for p in phases]
    dcfgs = {p.name: replace(d, limit=min(n * cfg.samples_per_step, d.limit or n * cfg.samples_per_step))
             for p, n, d in zip(phases, plan, dcfgs.values())}
    from pipelines.train.mlflow_run import TrainTracking
    tracking = TrainTracking.open(cfg, phases, plan)  # the MLflow run (reopened on resume); never raises
    try:
        return _fit(cfg, init_dir, phases, dcfgs, plan, tracking)
    finally:
        tracking.close_server()


def _fit(cfg: TrainConfig, init_dir: str, phases: list[PhaseConfig], dcfgs: dict, plan: list[int], tracking) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data.ingest import build_dataset, ingest_options, list_shards, shards_read

    scaling = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "init_dir": init_dir, "plan": plan,
                           "phases": [to_dict(p) for p in phases],
                           "data": {n: to_dict(d) for n, d in dcfgs.items()}, "tracking": tracking.worker_config},
        torch_config=TorchConfig(backend=cfg.engine.backend or ("nccl" if scaling.use_gpu else "gloo")),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=dict(scaling.resources_per_worker),
                                               placement_strategy=scaling.placement_strategy),
        run_config=run_config(cfg),
        datasets={name: build_dataset(d) for name, d in dcfgs.items()},
        dataset_config=ray.train.DataConfig(
            execution_options={n: ingest_options(d) for n, d in dcfgs.items()}))
    from pipelines.console import TrainProgress

    log_uri = storage.join(logs_uri(cfg), "metrics.jsonl")
    with TrainProgress(log_uri, plan, [p.name for p in phases], every=cfg.logging.every_steps,
                       interactive=None if cfg.logging.console == "auto" else cfg.logging.console == "bar"):
        try:
            result = trainer.fit()
        except BaseException:
            tracking.finish(cfg, status="FAILED", log_uri=log_uri)  # a re-run of the name reopens the run
            raise
    plot = write_loss_plot(cfg, log_uri)
    checkpoint_uri = result.checkpoint.path
    if storage.is_s3(cfg.storage_path):
        checkpoint_uri = "s3://" + checkpoint_uri.lstrip("/")
    # What this run read, from the read tasks themselves (not from the config): it travels with the
    # model, so the scheduler's lineage can say which shards a version was trained on.
    read: dict[str, int] = {}
    for name in sorted({d.metrics_name for d in dcfgs.values()}):
        read.update(shards_read(name))
    data = {"run": cfg.name, "shards_read": read, "phase_shards": {n: list_shards(d) for n, d in dcfgs.items()}}
    if cfg.export_dir:
        final = json.loads(storage.read_bytes(storage.join(checkpoint_uri, "train_state.json")))
        export_model(final.get("model") or storage.join(checkpoint_uri, "model"), cfg.export_dir,
                     extra={"training_data.json": json.dumps(data, indent=1).encode(), **tracking.export_files()})
    mlflow = tracking.finish(cfg, status="FINISHED", log_uri=log_uri, plot=plot)
    return {"name": cfg.name, "checkpoint": checkpoint_uri, "export_dir": cfg.export_dir, "phase_steps": plan,
            "phases": [p.name for p in phases], "metrics": result.metrics, "metrics_log": log_uri,
            "loss_plot": plot, "shards_read": read, "mlflow": mlflow}


# ----------------------------------------------------------------------------- worker side


def _reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _maybe_fail(cfg: TrainConfig, global_step: int, rank: int) -> None:
    f = cfg.fault
    if f.global_step != global_step or f.rank != rank or not f.marker or os.path.exists(f.marker):
        return
    open(f.marker, "w").write(f"failed at global step {global_step}\n")
    print(f"[fault] rank {rank} dies at global step {global_step}", flush=True)
    if f.kind == "exit":
        os._exit(1)
    if f.kind == "hang":
        threading.Event().wait()  # never set: this rank is stuck until its process is killed
    raise RuntimeError(f"injected failure at global step {global_step}")


def nonpersistent_buffers(model) -> dict[str, torch.Tensor]:
    """Buffers a state dict leaves out (rotary inv_freq, position ids), as built: ``rebuild`` needs them, and
    the engine may have cast the live ones (DeepSpeed bf16 casts every buffer)."""
    saved = set(model.state_dict())
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}


def rebuild(model, tokenizer, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
    """A new model holding ``state`` (the next phase gets new DDP/DeepSpeed wrappers on new modules).

    Built on the meta device and given ``state``'s own tensors (``assign``): no random initialisation of a
    model that is overwritten anyway, and no third copy of the weights beside the engine's and ``state``."""
    from slime.checkpoint import architecture_config
    from slime.model import build_model

    with torch.device("meta"):
        fresh = build_model(model.cfg, tokenizer, llm_hf_config=architecture_config(model.llm.config.to_dict()),
                            vision_hf_config=model.vision.encoder.config.to_dict())
    dtypes = {k: v.dtype for k, v in fresh.state_dict().items()}  # the config's dtype, as a fresh build has
    fresh.load_state_dict({k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()}, assign=True)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner)._buffers[leaf] = buf.clone()
    if getattr(fresh.llm.config, "tie_word_embeddings", False):
        fresh.llm.tie_weights()  # assign gave the two names two tensors
    left = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"phase-end rebuild left tensors without data: {left[:5]}")
    return fresh


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from pipelines.data.ingest import DataConfig, torch_batch_kwargs
    from pipelines.train.parallel import build_engine
    from slime.checkpoint import serving_config
    from slime.lora import add_lora, load_model
    from slime.model import set_trainable

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    plan: list[int] = config["plan"]
    phases = [from_dict(PhaseConfig, p) for p in config["phases"]]  # resolve_phases: every gamma a number
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    local_logs = (logs_uri(cfg) if not storage.is_s3(cfg.storage_path) else
                  cfg.logging.local_dir or os.path.join(tempfile.gettempdir(), "slime-runs", cfg.name, "logs"))
    remote_logs = storage.join(cfg.storage_path, cfg.name, "logs") if storage.is_s3(cfg.storage_path) else None
    log = RunLog(local_logs, remote_logs, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                 every_steps=cfg.logging.every_steps, tracking=config.get("tracking"))

    seed_everything(cfg.seed + rank)
    pos, restored = Position(), ray.train.get_checkpoint()
    with restored.as_directory() if restored else tempfile.TemporaryDirectory() as ckpt_dir:
        start_model = config["init_dir"]
        if restored:
            pos = read_position(ckpt_dir, rank)
            start_model = pos.model
            log.event("resume", phase_index=pos.phase_index, step=pos.step, phase_done=pos.phase_done,
                      global_step=pos.global_step, checkpoint=restored.path)
            if pos.phase_done:
                pos = Position(phase_index=pos.phase_index + 1, checkpoint_dir=ckpt_dir)
        def phase_batches(i: int) -> Batches:
            """Phase ``i``'s micro-batches; the restored phase continues where its checkpoint was taken."""
            dcfg, mid = from_dict(DataConfig, config["data"][phases[i].name]), i == pos.phase_index and pos.step > 0
            return Batches(ray.train.get_dataset_shard(phases[i].name),
                           torch_batch_kwargs(dcfg, cfg.optim.micro_batch_size,
                                              prefetch_batches=cfg.ingest.prefetch_batches),
                           cfg.optim.micro_batch_size, cfg.ingest.micro_batches_per_fetch,
                           epoch=pos.data_epoch if mid else 0,
                           skip=pos.batch_in_epoch if mid and cfg.resume_data == "skip" else 0)

        engine, warmed, started = None, {}, set()

        def warm(upto: int) -> None:  # phases up to ``upto`` (inclusive) have their pipelines started
            for i in range(pos.phase_index, min(upto, len(phases) - 1) + 1):
                if i not in started and cfg.ingest.warm_ahead:
                    warmed[i] = phase_batches(i).warm()
                    started.add(i)

        warm(pos.phase_index + cfg.ingest.warm_ahead - 1)  # the first phases' start while the model loads
        model, tokenizer = load_model(start_model)  # an adapter dir after a finished lora phase
        buffers = nonpersistent_buffers(model)
        for index in range(pos.phase_index, len(phases)):
            phase, total = phases[index], plan[index]
            resuming = index == pos.phase_index and pos.step > 0
            if not resuming:  # mid-phase resumes restored their RNG states instead
                seed_everything(cfg.seed + 1000 * index + rank)  # each phase reproducible on its own
            trainable = set_trainable(model, phase.trainable)  # + PEFT LoRA on the LLM in a lora phase:
            trainable += add_lora(model, phase.lora) if phase.lora is not None else []
            if model.global_adapter is not None:
                model.global_adapter.gate_noise = phase.router_noise
            model.train()
            engine = build_engine(model, optim=cfg.optim, engine=cfg.engine, phase=phase, total_steps=total,
                                  device=device)
            if resuming:
                engine.load(ckpt_dir)
            step = pos.step if resuming else 0
            warm(index + cfg.ingest.warm_ahead)
            batches = warmed.pop(index, None) or phase_batches(index)
            log.event("phase_start", phase=phase.name, phase_index=index, steps=total, start_step=step,
                      trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      trainable_tensors=len(trainable))
            while step < total:
                start = time.perf_counter()
                sums = [0.0] * 6  # loss, micro-batches, samples, tokens, visual tokens, kept fraction
                wait = 0.0  # time this step waited for its micro-batches
                for micro in range(cfg.optim.grad_accum):
                    before = time.perf_counter()
                    batch = batches.next()
                    wait += time.perf_counter() - before
                    out = engine.micro_step(batch, phase, last=micro == cfg.optim.grad_accum - 1)
                    sums = [a + b for a, b in zip(sums, (float(out.loss), 1, len(batch["input_ids"]),
                                                         float(batch["attention_mask"].sum()),
                                                         float(batch["num_visual_tokens"].sum()),
                                                         out.kept_local_fraction))]
                lr = engine.lr  # the rate this step used (the scheduler moves on in optimizer_step)
                grad_norm = engine.optimizer_step()
                step += 1
                global_step = sum(plan[:index]) + step
                loss, micros, samples, tokens, visual, kept = _reduce(sums)
                elapsed = time.perf_counter() - start
                metrics = {"phase": phase.name, "phase_index": index, "step": step, "phase_steps": total,
                           "global_step": global_step, "loss": loss / micros, "lr": lr,
                           "grad_norm": grad_norm, "samples_per_s": samples / elapsed,
                           "tokens_per_s": tokens / elapsed, "visual_tokens_per_sample": visual / samples,
                           "kept_local_fraction": kept / micros, "data_epoch": batches.epoch, "step_time_s": elapsed,
                           "data_wait_s": wait}
                log.step(metrics)
                _maybe_fail(cfg, global_step, rank)
                done = step == total
                if done or step % cfg.checkpoint.every_steps == 0:
                    state = {"phase_index": index, "phase": phase.name, "step": step, "phase_steps": total,
                             "global_step": global_step, "data_epoch": batches.epoch,
                             "batch_in_epoch": batches.batch_in_epoch, "phase_done": done}
                    if done and phase.lora is not None:  # the run's last phase: its adapter over the start model
                        state["model"] = phase_model_uri(cfg.storage_path, cfg.name, index, phase.name)
                        write_phase_adapter(state["model"], engine=engine, rank=rank, base_uri=start_model,
                                            trainable=trainable, phase=phase, run=cfg.name, global_step=global_step)
                    elif done:  # the next phase trains a fresh model holding these weights, written once here
                        model = rebuild(engine.module, tokenizer, engine.full_state_dict(), buffers)
                        state["model"] = start_model = phase_model_uri(cfg.storage_path, cfg.name, index, phase.name)
                        if rank == 0:
                            # Served as trained: this phase's visual tokens and gamma become the model's
                            # defaults (the export is the last phase's model).
                            served = serving_config(model.cfg, visual_mode=phase.mode, gamma=phase.gamma)
                            write_phase_model(start_model, model=model, tokenizer=tokenizer, cfg=served,
                                              metadata={"run": cfg.name, "phase": phase.name,
                                                        "global_step": global_step, "trainable": list(trainable)})
                    else:
                        state["base_model"] = start_model
                    with tempfile.TemporaryDirectory() as out_dir:
                        write_checkpoint_files(out_dir, rank=rank, state=state, engine=None if done else engine)
                        name = f"checkpoint-p{index:02d}-s{step:07d}"
                        ray.train.report({k: metrics[k] for k in CHECKPOINT_KEYS if k in metrics} |
                                         {"phase_done": done}, checkpoint=Checkpoint.from_directory(out_dir),
                                         checkpoint_dir_name=name)
                    if cfg.checkpoint.wait_committed:  # pitfall 11: a crash right after report() loses it
                        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
                    log.sync()
            engine = None
            batches.close()
            log.event("phase_end", phase=phase.name, phase_index=index, steps=total)
        log.close()

