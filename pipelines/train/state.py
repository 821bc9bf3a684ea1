"""What a training run leaves behind: one servable model per phase, checkpoints holding training state,
the metrics log, the exported model.

Phase models (written once, at each phase end, by rank 0; atomic like an export)::

    <storage_path>/<name>/phases/pNN-<phase>/   a self-describing model directory (slime.checkpoint.
                       save_pretrained): full weights, servable and evaluable as it is; its config's
                       visual_mode and local.gamma are the phase's (the serving defaults). Outside Ray
                       Train's checkpoints, so ``checkpoint.num_to_keep`` never deletes a phase's start.
                       A LoRA phase (the run's last) writes an adapter directory there instead (slime.lora:
                       PEFT adapter + non-LoRA trainables over the phase's start model, named by URI and
                       fingerprint): only what the phase trained, never a second full model.

Checkpoint directory (one per ``ray.train.report``; the per-rank files are merged by Ray Train)::

    train_state.json   phase_index, phase, step (optimizer steps done in that phase), phase_steps,
                       global_step, data_epoch, batch_in_epoch, phase_done, and the weights to start
                       from: ``model`` (phase end: that phase's model) or ``base_model`` (mid-phase: the
                       model the phase started from; the state below holds what has trained since)
    optim.pt           DDP: the trainable parameters + optimizer + scheduler state (mid-phase only)
    deepspeed/         DeepSpeed: engine.save_checkpoint shards of every rank (mid-phase only)
    rng-rank{r}.pt     torch / numpy / python RNG states of rank r

So a mid-phase checkpoint costs what training state costs (for LLM-only phases: the trainable parameters
and their optimizer moments), never a second full model; a phase end writes the full model once and no
optimizer state (the next phase starts a new optimizer on other parameters).

The metrics log is written by rank 0 to a local directory (metrics.jsonl + TensorBoard events) and
copied to ``<storage_path>/<name>/logs`` at every checkpoint when the storage is remote.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import storage


@dataclass
class Position:
    phase_index: int = 0
    step: int = 0
    data_epoch: int = 0
    batch_in_epoch: int = 0
    phase_done: bool = False
    global_step: int = 0
    checkpoint_dir: str | None = None  # local directory of the restored checkpoint
    model: str | None = None  # the weights to load before the checkpoint's training state (see module doc)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    # Only tensors and plain lists: loadable with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss], "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_position(directory: str, rank: int) -> Position:
    """Position of a restored checkpoint; restores this rank's RNG states when they were saved."""
    state = json.loads(open(os.path.join(directory, "train_state.json")).read())
    rng = os.path.join(directory, f"rng-rank{rank}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=True))
    # checkpoints written before phase models existed carry the full model in model/
    model = state.get("model") or state.get("base_model") or os.path.join(directory, "model")
    return Position(phase_index=state["phase_index"], step=state["step"], data_epoch=state["data_epoch"],
                    batch_in_epoch=state["batch_in_epoch"], phase_done=state["phase_done"],
                    global_step=state["global_step"], checkpoint_dir=directory, model=model)


def phase_model_uri(storage_path: str, run: str, index: int, phase: str) -> str:
    return storage.join(storage_path, run, "phases", f"p{index:02d}-{phase}")


def write_phase_model(uri: str, *, model, tokenizer, cfg, metadata: dict) -> None:
    """Rank 0 at a phase end: the phase's full, servable model, published atomically at ``uri``."""
    from slime.checkpoint import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tokenizer, tmp, metadata=metadata, cfg=cfg)
        export_model(tmp, uri)


def write_phase_adapter(uri: str, *, engine, rank: int, base_uri: str, trainable: list[str], phase, run: str,
                        global_step: int) -> None:
    """Every rank at the end of a LoRA phase (the state is gathered collectively under ZeRO-3); rank 0 writes
    the adapter (PEFT layout + non-LoRA trainables) over ``base_uri``, the phase's start model, named by URI
    and content fingerprint (slime/lora.py), published atomically. The phase's mode and gamma are its
    serving defaults."""
    from slime.lora import fingerprint, save_adapter

    state = engine.full_state_dict()
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "adapter")
        save_adapter(engine.module, out, base_uri=base_uri, base_fingerprint=fingerprint(base_uri),
                     serving={"visual_mode": phase.mode, "gamma": phase.gamma}, trainable=trainable, state=state,
                     metadata={"run": run, "phase": phase.name, "global_step": global_step})
        export_model(out, uri)


def write_checkpoint_files(directory: str, *, rank: int, state: dict, engine) -> None:
    """Fill ``directory`` with this rank's part of a checkpoint. ``engine`` None = phase end (the phase's
    model is already written; ``state["model"]`` points at it). Every rank calls it: DeepSpeed saves
    shards on every rank."""
    if engine is not None:
        engine.save(directory, rank)
    if rank == 0:
        with open(os.path.join(directory, "train_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    torch.save(rng_state(), os.path.join(directory, f"rng-rank{rank}.pt"))


class RunLog:
    """Rank 0's metrics: metrics.jsonl, TensorBoard events and a readable progress line."""

    # rank 0's per-step values sent to MLflow (step = global step; the phase is the ``phase`` tag, ``phase_index``)
    TRACKED = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "visual_tokens_per_sample",
               "kept_local_fraction", "data_wait_s", "step_time_s", "phase_index", "data_epoch")

    def __init__(self, local_dir: str, remote_dir: str | None, *, enabled: bool, tensorboard: bool,
                 every_steps: int, tracking: dict | None = None) -> None:
        self.enabled, self.local_dir, self.remote_dir, self.every = enabled, local_dir, remote_dir, every_steps
        self.writer = None
        self.tracker = None
        if not enabled:
            return
        if tracking:  # pipelines/tracking/runs.py: a background sender; failures are counted, never raised
            from pipelines.tracking.runs import RunTracker

            self.tracker = RunTracker(tracking["uri"], tracking["run_id"], background=True, label="train rank 0")
        os.makedirs(local_dir, exist_ok=True)
        path = os.path.join(local_dir, "metrics.jsonl")
        if remote_dir and not os.path.exists(path) and storage.exists(storage.join(remote_dir, "metrics.jsonl")):
            # A restart on another node: continue the log the earlier attempts wrote.
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(remote_dir, "metrics.jsonl")))
        self.file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(local_dir, "tensorboard"))

    def event(self, name: str, **fields) -> None:
        if self.enabled:
            self.file.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")
            print(f"[train] {name}: {json.dumps(fields)}", flush=True)
            if self.tracker is not None and name == "phase_start":
                self.tracker.set_tags({"phase": fields["phase"], f"phase.{fields['phase_index']}": fields["phase"]})

    def step(self, m: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": time.time(), **m}) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics({k: m[k] for k in self.TRACKED if k in m}, step=m["global_step"])
        if self.writer is not None:
            for key, value in m.items():
                if isinstance(value, (int, float)) and key not in ("step", "global_step", "phase_index"):
                    self.writer.add_scalar(f"train/{key}", value, m["global_step"])
        if m["step"] % self.every == 0 or m["step"] == m["phase_steps"]:
            print(f"[phase {m['phase']}] step {m['step']}/{m['phase_steps']} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                  f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s "
                  f"visual {m['visual_tokens_per_sample']:.0f}/sample kept {m['kept_local_fraction']:.2f} "
                  f"grad {m['grad_norm']:.3f}", flush=True)

    def sync(self) -> None:
        if not self.enabled:
            return
        self.file.flush()
        if self.writer is not None:
            self.writer.flush()
        if self.remote_dir:
            storage.copy_dir(self.local_dir, self.remote_dir)

    def close(self) -> None:
        self.sync()
        if self.tracker is not None:
            self.tracker.close()
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def logs_uri(cfg) -> str:
    """Where the driver finds rank 0's metrics.jsonl: the local log dir, or its remote copy."""
    if storage.is_s3(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name, "logs")
    return cfg.logging.local_dir or os.path.join(cfg.storage_path, cfg.name, "logs")


def write_loss_plot(cfg, log_uri: str) -> str | None:
    """loss.png next to metrics.jsonl; prints the per-phase summary table."""
    from pipelines.console import story, summary_table
    from pipelines.plots import plot_training, read_jsonl

    if not storage.exists(log_uri):
        return None
    rows = read_jsonl(storage.read_bytes(log_uri))
    print(summary_table(rows), file=story(), flush=True)
    plot = storage.join(log_uri.rsplit("/", 1)[0], "loss.png")
    storage.write_bytes_atomic(plot, plot_training(rows, title=cfg.name))
    return plot


def export_model(src_uri: str, export_dir: str, extra: dict[str, bytes] | None = None) -> None:
    """Publish a model directory atomically, with ``extra`` files (name -> bytes) added to it. Local: copy
    to a sibling temp dir, then rename over the old one. S3 (no rename): delete the old prefix, upload
    every file with slime_config.yaml (the file load_pretrained looks for first) last, then an
    ``EXPORT_COMPLETE`` marker: a half-uploaded export is never recognised as a model directory."""
    import shutil

    def add_extra(directory: str) -> None:
        for name, data in (extra or {}).items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)

    if not storage.is_s3(export_dir):
        dst = os.path.abspath(export_dir)
        tmp = f"{dst}.tmp{os.getpid()}"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        storage.copy_dir(src_uri, tmp)
        add_extra(tmp)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
        with open(os.path.join(dst, "EXPORT_COMPLETE"), "w") as f:
            f.write(json.dumps({"source": src_uri, "time": time.time()}))
        return
    fs, path = storage.filesystem(export_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    with tempfile.TemporaryDirectory() as local:
        storage.copy_dir(src_uri, local)
        add_extra(local)
        # the file a reader recognises the directory by goes last: a model's config, or an adapter's record
        last = os.path.join(local, "slime_config.yaml")
        if not os.path.exists(last):
            last = os.path.join(local, "slime_adapter.json")
        held = open(last, "rb").read()
        os.unlink(last)
        storage.copy_dir(local, export_dir)
    storage.write_bytes_atomic(storage.join(export_dir, os.path.basename(last)), held)
    storage.write_bytes_atomic(storage.join(export_dir, "EXPORT_COMPLETE"),
                               json.dumps({"source": src_uri, "time": time.time()}).encode())
