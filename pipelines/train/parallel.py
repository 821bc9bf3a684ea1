"""Parallelism, applied from outside the model in one place: a DDP wrap or a DeepSpeed engine.

Both engines expose the same five verbs the training loop uses, so the loop has no branches:
``micro_step(batch, phase, last)`` (forward + backward, gradient sync only on the last micro-batch),
``optimizer_step() -> grad norm`` (clip, step, schedule, zero grads), ``lr``, ``save(dir)`` /
``load(dir)`` (optimizer + scheduler state; DeepSpeed's own sharded format), ``full_state_dict()``
(every rank gets the full weights: ZeRO-3 gathers them).

An engine lives for one phase. The next phase builds a fresh model from ``full_state_dict()`` and a
fresh engine: what trains changes, and neither DDP's reducer nor DeepSpeed's flattened ZeRO buffers
can be re-targeted to another parameter set in place.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from pipelines.train.config import EngineConfig, OptimConfig, PhaseConfig
from slime.config import merge

log = logging.getLogger(__name__)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_ratio: float):
    """lr multiplier: linear 0 -> 1 over ceil(warmup_ratio * total) steps, then cosine to ``min_ratio``."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def resolve_precision(engine: EngineConfig, device: torch.device) -> str:
    if engine.precision != "auto":
        return engine.precision
    return "bf16" if device.type == "cuda" else "fp32"


def _optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    # A torch optimizer instance: DeepSpeed then wraps it instead of JIT-compiling its fused C++ Adam.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


def _forward(model, batch: dict[str, torch.Tensor], phase: PhaseConfig):
    return model(**batch, mode=phase.mode, gamma=phase.gamma, forced_expert=phase.forced_expert)


class DDPEngine:
    def __init__(self, model, *, optim: OptimConfig, engine: EngineConfig, phase: PhaseConfig, total_steps: int,
                 device: torch.device) -> None:
        self.module = model.to(device)
        self.optim_cfg = optim
        self.precision = resolve_precision(engine, device)
        self.device = device
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids,
                                                 find_unused_parameters=engine.find_unused_parameters)
        else:
            self.model = self.module
        self.optimizer = _optimizer(self.module, optim, phase.lr)
        self.scheduler = LambdaLR(self.optimizer, cosine_with_warmup(total_steps, optim.warmup_ratio,
                                                                     optim.min_lr_ratio))

    def micro_step(self, batch, phase: PhaseConfig, last: bool):
        sync = contextlib.nullcontext() if last or self.model is self.module else self.model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with sync:  # no_sync must cover forward too: DDP decides in forward whether backward reduces
            with autocast:
                out = _forward(self.model, batch, phase)
            (out.loss / self.optim_cfg.grad_accum).backward()
        return out

    def optimizer_step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def gathered(self):
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save(self, directory: str, rank: int) -> None:
        """The training state: what trains (the rest is the phase's start model) and the optimizer."""
        if rank == 0:  # replicated state: one copy
            weights = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save({"weights": weights, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, f"{directory}/optim.pt")

    def load(self, directory: str) -> None:
        state = torch.load(f"{directory}/optim.pt", map_location=self.device, weights_only=True)
        params = dict(self.module.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        saved = state.get("weights")
        if saved is not None:  # (older checkpoints held the whole model in model/ instead)
            if set(saved) != trainable:
                raise RuntimeError(f"checkpoint {directory} trained other parameters than this phase: "
                                   f"{sorted(set(saved) ^ trainable)[:5]}")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def load_deepspeed_ops() -> None:
    """Load the C++ op DeepSpeed's CPU backend JIT-builds on first use (``shm_comm``), safely.

    torch builds it behind a lock file (``<build dir>/lock``) that only the builder removes: a process killed
    mid-build (a worker group restarted after a fault, an OOM kill) leaves it behind, and every later build,
    DeepSpeed's included, then waits on it forever without a word (seen: a DeepSpeed test hung until CI's
    90-minute limit). Here each process loads the op first while holding an ``flock`` on a file beside it,
    which the kernel releases when its holder dies: whoever holds it knows a leftover lock file is stale and
    removes it. DeepSpeed then finds the op already loaded (its builders cache loaded ops per process).
    A no-op where the accelerator has no such op (CUDA)."""
    import fcntl

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where torch.utils.cpp_extension.load builds

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = _get_build_directory(builder.name, verbose=False)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "slime-ray.flock"), "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # waits while a live process builds
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            log.warning("removing %s, left by a build of %s that did not finish", stale, builder.name)
            os.remove(stale)
        builder.load(verbose=False)


class DeepSpeedEngine:
    def __init__(self, model, *, optim: OptimConfig, engine: EngineConfig, phase: PhaseConfig, total_steps: int,
                 device: torch.device) -> None:
        import deepspeed

        load_deepspeed_ops()
        self.precision = resolve_precision(engine, device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        config = deepspeed_config(merge(engine.deepspeed, phase.deepspeed), optim, world, self.precision)
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        optimizer = _optimizer(model, optim, phase.lr)
        scheduler = LambdaLR(optimizer, cosine_with_warmup(total_steps, optim.warmup_ratio, optim.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False)  # Ray Train already created the process group
        self.module = self.engine.module

    def micro_step(self, batch, phase: PhaseConfig, last: bool):
        if self.precision == "bf16":
            batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        out = _forward(self.engine, batch, phase)
        self.engine.backward(out.loss)  # scales by 1/gradient_accumulation_steps itself
        self.engine.step()  # steps optimizer + scheduler only at the accumulation boundary
        return out

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def gathered(self):
        """Full parameters inside the block on every rank (ZeRO-3 partitions them; collective call)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # Every rank keeps a CPU copy: each builds the next phase's model from it. fp32 so frozen
        # weights stay bit-identical across phases whatever the training precision.
        with self.gathered():
            return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                    for k, v in self.module.state_dict().items()}

    def save(self, directory: str, rank: int) -> None:
        self.engine.save_checkpoint(f"{directory}/deepspeed", tag="state")  # every rank writes its shard

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(f"{directory}/deepspeed", tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)


def deepspeed_config(user: dict[str, Any], optim: OptimConfig, world: int, precision: str) -> dict[str, Any]:
    """The run config decides batch sizes, accumulation, clipping and precision; the YAML dict the rest."""
    cfg = {k: v for k, v in user.items() if k not in ("optimizer", "scheduler")}
    cfg.update(train_micro_batch_size_per_gpu=optim.micro_batch_size, gradient_accumulation_steps=optim.grad_accum,
               train_batch_size=optim.micro_batch_size * optim.grad_accum * world,
               gradient_clipping=optim.grad_clip, bf16={"enabled": precision == "bf16"}, fp16={"enabled": False},
               zero_allow_untested_optimizer=True, steps_per_print=cfg.get("steps_per_print", 1 << 30))
    zero = dict(cfg.get("zero_optimization", {}))
    for key, value in list(zero.items()):
        if value == "auto":  # stock LLaVA JSONs use "auto" (an HF Trainer convention)
            zero.pop(key)
    cfg["zero_optimization"] = zero
    return cfg


def build_engine(model, *, optim: OptimConfig, engine: EngineConfig, phase: PhaseConfig, total_steps: int,
                 device: torch.device):
    if engine.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if engine.attn_implementation:
        model.llm.set_attn_implementation(engine.attn_implementation)
    cls = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}[engine.kind]
    return cls(model, optim=optim, engine=engine, phase=phase, total_steps=total_steps, device=device)
