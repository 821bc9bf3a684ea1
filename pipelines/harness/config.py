"""What a harness run evaluates, against what, and where its results go (see ``pipelines.harness``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pipelines.storage import StorageConfig
from slime.config import VisualMode

_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class HarnessError(RuntimeError):
    """A problem the user can fix (the message names it and the fix)."""


@dataclass(frozen=True, kw_only=True)
class HarnessDataSection:
    val: str | None = None  # our val shards (manifest / dir / tar, local or s3://), exported as task_name
    only_versions: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    # What is evaluated: one of a model directory (served for the run), a registry version (ditto), or the
    # OpenAI base URL of an endpoint that already runs (http://host:port/v1).
    model: str | None = None
    registry: str | None = None  # registry root; with version
    version: str | None = None  # a version id, or "production"
    endpoint: str | None = None
    model_id: str | None = None  # the request's "model"; default: the first id /v1/models lists
    api_key: str | None = None  # the endpoint's key; default: env SLIME_API_KEY, else none
    data: HarnessDataSection = field(default_factory=HarnessDataSection)
    task_name: str = "slime_val"  # the lmms-eval task our val shards become
    tasks: tuple[str, ...] = ()  # lmms-eval's own tasks too (mme, textvqa_val, ...): their datasets must be reachable
    output: str | None = None  # lmms_eval.json URI; default <model>/eval/lmms_eval.json (beside metrics.json)
    overwrite: bool = False
    max_tokens: int = 16  # as slime evaluate's
    prompt_suffix: str = ""  # as slime evaluate's: appended to the last user turn
    limit: int | None = None  # first N questions of each task
    num_concurrent: int = 8  # requests in flight from lmms-eval
    timeout_s: float = 120.0  # per request (lmms-eval's own default, 10 s, is too short for a CPU endpoint)
    max_retries: int = 3
    max_failed_fraction: float = 0.0  # failed requests tolerated before the run is an error
    python: str | None = None  # the harness interpreter; default env SLIME_LMMS_PYTHON, else <repo>/.venv-lmms
    work_dir: str | None = None  # local folder for the task files and lmms-eval's raw output; default: a temp dir
    # Serving for the run (model / registry version): the settings of slime serve that matter here.
    engine: Literal["auto", "vllm", "hf"] = "auto"
    mode: VisualMode | None = None
    serve_num_cpus: float = 0.5
    serve_num_gpus: float = 0.0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        given = [k for k in ("model", "endpoint") if getattr(self, k)] + (["registry"] if self.registry else [])
        if len(given) != 1:
            raise ValueError("give exactly one of model=DIR, registry=ROOT (with version=ID|production) or "
                             f"endpoint=http://HOST:PORT/v1 (got {given or 'none'})")
        if bool(self.registry) != bool(self.version):
            raise ValueError("registry and version go together: registry=ROOT version=ID|production")
        if not self.data.val and not self.tasks:
            raise ValueError("nothing to evaluate: give data.val=SHARDS (our questions) and/or tasks=[...] "
                             "(lmms-eval's own)")
        if not _TASK_NAME.match(self.task_name):
            raise ValueError(f"task_name {self.task_name!r}: letters, digits and _ only, starting with a letter")
        if self.endpoint and not self.output:
            raise ValueError("with endpoint=..., give output=<lmms_eval.json URI> (there is no model directory "
                             "to put it in)")
        if not 0 <= self.max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.max_tokens < 1 or self.num_concurrent < 1 or self.max_retries < 1 or self.timeout_s <= 0:
            raise ValueError("max_tokens, num_concurrent and max_retries must be >= 1 and timeout_s > 0")
