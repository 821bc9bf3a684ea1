"""The training run config: phases are data (MODEL_SPEC A5), everything else is a nested frozen dataclass.

YAML is its serialisation (jobs/configs/train_*.yaml); ``key=value`` overrides go through
``slime.config.load_config``. The scheduler calls training with exactly
``init_from=<dir> data.shards=[<tar URI>, ...] export_dir=<dir> name=<run>`` (the exact shards it chose), so
those keys live at these paths; the exported model's ``training_data.json`` says which shards were read.

A phase says what trains (module-name prefixes, and ``lora: {r, alpha, dropout, targets}`` for PEFT LoRA on the
LLM: the run's last phase then ends in an adapter, slime/lora.py), which visual tokens are fed (``mode``), the global
expert to pin (``forced_expert``), the local keep ratio ``gamma``, the learning rate and how long it
runs (``steps``, or ``epochs`` of its dataset). ``data`` overrides the run's ``data`` section for that
phase only (e.g. another manifest or SFT shards). ``DEFAULT_PHASES`` reproduces the paper's 4 runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from slime.config import VisualMode
from slime.lora import LoraSpec


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    name: str
    trainable: tuple[str, ...]  # parameter-name prefixes; `vision.` never trains
    mode: VisualMode = "both"
    forced_expert: int | None = None  # 0 = MLP path P(x), 1 = attention path P(R(x)), None = gated mixture
    gamma: float | None = None  # kept local fraction; None = the model's local.gamma
    router_noise: bool = True  # noisy gating while training (only matters when forced_expert is None)
    lr: float
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: float | None = None  # passes over the phase's dataset (rows from the manifest count)
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the run's `data` section
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into engine.deepspeed (e.g. ZeRO-3 for III)
    # LoRA on the LLM (PEFT) beside the fully trained ``trainable`` prefixes; the phase then ends in an adapter
    lora: LoraSpec | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"phase {self.name!r}: set exactly one of steps / epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"phase {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.forced_expert not in (None, 0, 1):
            raise ValueError(f"phase {self.name!r}: forced_expert must be 0, 1 or null, got {self.forced_expert}")
        if self.gamma is not None and not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"phase {self.name!r}: gamma must be in (0, 1], got {self.gamma}")
        if not self.trainable and self.lora is None:
            raise ValueError(f"phase {self.name!r}: trainable must name at least one prefix")
        llm = [t for t in self.trainable if t == "llm" or t.startswith("llm.")]
        if self.lora is not None and llm:
            raise ValueError(f"phase {self.name!r}: with lora the LLM trains through its adapter only; remove "
                             f"{llm[0]!r} from trainable")
        if self.lr <= 0:
            raise ValueError(f"phase {self.name!r}: lr must be > 0, got {self.lr}")


def _paper_phases() -> tuple[PhaseConfig, ...]:
    """MODEL_SPEC A5: I-a MLP on the global view, I-b attention expert, II local compressor, III joint."""
    return (
        PhaseConfig(name="I-a-global-mlp", trainable=("projector",), mode="global", forced_expert=0, lr=1e-3,
                    epochs=1.0),
        PhaseConfig(name="I-b-global-attention", trainable=("global_adapter.resampler",), mode="global",
                    forced_expert=1, lr=1e-3, epochs=1.0),
        PhaseConfig(name="II-local", trainable=("compressor",), mode="local", gamma=1.0, lr=1e-3, epochs=1.0),
        PhaseConfig(name="III-joint", trainable=("projector", "global_adapter", "compressor", "llm"), mode="both",
                    gamma=0.95, router_noise=True, lr=2e-5, epochs=1.0),
    )


@dataclass(frozen=True, kw_only=True)
class CyclicConfig:
    """Alternate the phases named in ``pattern`` (e.g. a global-only and a local-only phase), ``steps``
    each, for ``rounds`` rounds; they are expanded in place of the first pattern phase. 0 rounds = off."""

    rounds: int = 0
    steps: int = 100
    pattern: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    micro_batch_size: int = 1  # per worker
    grad_accum: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # linear warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("optim.micro_batch_size and optim.grad_accum must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True, kw_only=True)
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 0.5})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the model is parallelised (pipelines/train/parallel.py). ``deepspeed`` is a DeepSpeed config dict
    (zero_optimization etc.); batch sizes, accumulation, clipping and precision are filled in from
    this run config, so they cannot disagree."""

    kind: Literal["ddp", "deepspeed"] = "ddp"
    backend: Literal["gloo", "nccl"] | None = None  # default: nccl with GPUs, else gloo
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    find_unused_parameters: bool = True  # phases freeze modules and global-only phases skip the compressor
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. sdpa / flash_attention_2 / eager; None = as saved
    deepspeed: dict[str, Any] | str = field(default_factory=dict)  # a dict, or a YAML/JSON file holding one


@dataclass(frozen=True, kw_only=True)
class IngestSection:
    """How a worker pulls micro-batches from its Ray Data shard. Ray Data hands over
    ``micro_batches_per_fetch`` micro-batches as one batch and the loop slices it: the iterator costs
    ~3 ms of CPU per batch on its own threads (collate, block fetch, deserialisation), which competes
    with the step for the GIL, so paying it once per group matters when steps are short. The
    micro-batches and their order are the same for any value (only whole micro-batches are used)."""

    micro_batches_per_fetch: int = 4
    prefetch_batches: int = 1  # fetched batches (of micro_batches_per_fetch each) kept ready ahead
    # Start the data pipelines of the next ``warm_ahead`` phases in background threads (batches.Batches.warm),
    # and the first phase's while the model loads: a phase change then does not wait for Ray Data's start-up
    # (12-50 s on 2 cores). 1 overlaps each start with the phase before it; more can help when phases are
    # shorter than a pipeline start and cores are free (on 2 cores 2 was slower: README), at the price of that
    # many pipelines holding actors at once. 0 = off.
    warm_ahead: int = 1

    def __post_init__(self) -> None:
        if self.micro_batches_per_fetch < 1 or self.prefetch_batches < 0 or self.warm_ahead < 0:
            raise ValueError("ingest.micro_batches_per_fetch must be >= 1, ingest.prefetch_batches and "
                             "ingest.warm_ahead >= 0")


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every_steps: int = 100  # plus one at the end of every phase
    num_to_keep: int | None = 2
    wait_committed: bool = True  # block until the controller registered it (RAY_NOTES pitfall 11)
    max_failures: int = 2


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    every_steps: int = 10  # progress line (when the console is not a terminal)
    console: Literal["auto", "bar", "lines"] = "auto"  # driver-side progress: a bar on a terminal, else lines
    tensorboard: bool = True
    local_dir: str | None = None  # where rank 0 writes metrics.jsonl + TB events; default a temp dir,
    # synced to <storage_path>/<name>/logs at every checkpoint and at the end


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    """MLflow tracking (pipelines/tracking/): the run's params, rank 0's per-step metrics, phase summaries
    and artifacts. ``uri: null`` = the embedded store (SQLite + artifact folder in ``dir``, served by an
    ``mlflow server`` the driver starts on 127.0.0.1 for the run); ``http://host:port`` = a team's server."""

    enabled: bool | None = None  # None = on; the embedded store only unless env SLIME_TRACKING=off (tests)
    uri: str | None = None  # http(s)://host:port; None = embedded store
    dir: str | None = None  # embedded store; None = <parent of a local storage_path>/mlflow, else ./mlflow
    experiment: str = "slime"

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.startswith(("http://", "https://")):
            raise ValueError(f"tracking.uri must be http(s)://host:port of an MLflow server (or null for the "
                             f"embedded store), got {self.uri!r}")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Fault injection for drills and tests: rank ``rank`` exits (``exit``), raises (``raise``) or hangs for
    good (``hang``: a stuck rank, until something kills it, e.g. the driver killed from outside) at
    ``global_step`` unless ``marker`` exists (it is created first, so only the first attempt fails)."""

    global_step: int | None = None
    rank: int = 0
    marker: str | None = None
    kind: Literal["exit", "raise", "hang"] = "exit"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    name: str  # run name: re-running the same name resumes it
    storage_path: str  # local dir or s3://bucket/prefix (checkpoints, logs)
    export_dir: str | None = None  # final model directory (local or s3://); None = no export
    init_from: str | None = None  # model directory to start from; None = build the tiny preset from `seed`
    seed: int = 3407
    deterministic: bool = True  # preserve_order in Ray Data (+ fixed seeds): reproducible losses
    resume_data: Literal["skip", "continue"] = "skip"  # after a restore: skip the consumed batches or not
    data: dict[str, Any] = field(default_factory=dict)  # pipelines.data.ingest.DataConfig (validated there)
    phases: tuple[PhaseConfig, ...] = field(default_factory=_paper_phases)
    cyclic: CyclicConfig = field(default_factory=CyclicConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ingest: IngestSection = field(default_factory=IngestSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def samples_per_step(self) -> int:
        """Samples one optimizer step consumes over all workers."""
        return self.scaling.num_workers * self.optim.micro_batch_size * self.optim.grad_accum

    def __post_init__(self) -> None:
        missing = [n for n in self.cyclic.pattern if n not in {p.name for p in self.phases}]
        if missing:
            raise ValueError(f"cyclic.pattern names unknown phase {missing[0]!r}")
        names = [p.name for p in expand_phases(self)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"phases: names must be unique, {dupes[0]!r} repeats")
        # A LoRA phase ends in an adapter over its start model (the run's product), not in a full model a
        # further phase could start from.
        lora = [p.name for p in expand_phases(self)[:-1] if p.lora is not None]
        if lora:
            raise ValueError(f"phase {lora[0]!r}: a lora phase must be the last phase of the run")


def expand_phases(cfg: TrainConfig) -> list[PhaseConfig]:
    """The phase list actually run: cyclic pattern phases repeated ``rounds`` times, ``steps`` each."""
    cyc = cfg.cyclic
    if cyc.rounds <= 0 or not cyc.pattern:
        return list(cfg.phases)
    by_name = {p.name: p for p in cfg.phases}
    cycle = [dataclasses.replace(by_name[n], name=f"{n}@r{r}", steps=cyc.steps, epochs=None)
             for r in range(cyc.rounds) for n in cyc.pattern]
    out: list[PhaseConfig] = []
    for p in cfg.phases:
        if p.name == cyc.pattern[0]:
            out += cycle
        elif p.name not in cyc.pattern:
            out.append(p)
    return out
