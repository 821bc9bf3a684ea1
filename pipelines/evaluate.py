"""Evaluation: batched greedy generation over held-out shards on the serving engine, in Ray Data.

    shards (manifest / dir / tars, local or s3://) -> ShardReader (raw bytes) ->
    map_batches(EvalPredictor, actor pool) -> rows {id, qtype, reference, prediction, ...} -> metrics.json

A record's question is its conversation without the final gpt turn; the reference is that final turn.
The actor decodes the image and generates on the engine Ray Serve runs: ``engine="vllm"`` a ``vllm.LLM``
per actor (``pipelines.serve.engine.OfflineVllm``), ``engine="hf"`` the reference ``Predictor``, ``auto``
(default) vllm wherever vLLM runs the model (``metrics.json`` records which one ran).
Both encode through ``ChatEncoder``, so evaluation and serving cannot disagree on templates, tiling or
decoding, and the vLLM numbers are the ones the endpoint would produce.

Metrics: exact match (string equality after stripping whitespace) and normalised accuracy (lowercase,
punctuation and the articles a/an/the removed, whitespace collapsed), overall, per ``qtype`` and per
task (with its ``chance``, see ``chance``); visual tokens per sample; per-request latency and throughput.
``accuracy`` is the normalised one (what the retraining scheduler compares).

Every sample counts: one that fails (a bad record, an image the engine refuses, a prompt too long) is
wrong, so ``accuracy`` is over all ``num_samples`` and a model cannot raise its score by failing on the
hard half. The failures are also reported on their own: ``errors`` (how many) and ``error_codes``
(``InputError.code``, or ``invalid_record`` for a record without a final gpt turn).

Latency is per request as the engine ran it: from the submission of the request's batch to the engine
step that finished that request (``ChatResult.latency_s``); a batch's wall time divided by its size would
be the inverse of throughput, not anybody's latency. Failed samples have none.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipelines import storage
from pipelines.answers import normalize_answer, score
from pipelines.storage import StorageConfig
from slime.config import VisualMode

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True, kw_only=True)
class EvalDataSection:
    val: str  # manifest.json URI, packed dataset dir, or a tar (local or s3://)
    only_versions: tuple[int, ...] | None = None
    limit: int | None = None  # first N records only (smoke runs)


@dataclass(frozen=True, kw_only=True)
class EvalTrackingSection:
    """Where the result is logged in MLflow: the training run the model's ``mlflow_run.json`` names (written
    by ``slime train`` into its export), or ``run_id`` on the server at ``uri``."""

    enabled: bool = True
    uri: str | None = None  # http(s)://host:port; None = the server (or embedded store) the record names
    run_id: str | None = None  # None = from <model>/mlflow_run.json


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    model: str  # model directory, local or s3://
    data: EvalDataSection
    output: str | None = None  # metrics.json URI; default: <model>/eval/metrics.json (results live with the model)
    overwrite: bool = False  # replace an existing metrics.json (said on stderr); otherwise that is an error
    predictions: bool = True  # also write predictions.jsonl beside metrics.json
    max_tokens: int = 16
    gamma: float | None = None  # local keep ratio at inference; None = the model's
    mode: VisualMode | None = None  # visual tokens fed at inference; None = the model's own (metadata)
    engine: Literal["auto", "vllm", "hf"] = "auto"  # as ServeArgs.engine: auto = vllm where vLLM runs the model
    # vLLM's engine core inside the actor's own process (engine.offline_engine): None = on CPU, where it starts
    # ~12 s sooner; on GPU its own process overlaps scheduling with the model's work.
    vllm_in_process: bool | None = None
    prompt_suffix: str = ""  # e.g. "\nAnswer the question using a single word or phrase."
    batch_size: int = 8
    num_actors: int = 1
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    read_num_cpus: float = 0.25
    read_concurrency: int | None = 2  # as DataConfig.read_concurrency: a burst of reads delays the engine actor
    device: str = "cpu"
    dtype: str | None = None
    preserve_order: bool = True
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: EvalTrackingSection = field(default_factory=EvalTrackingSection)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1:
            raise ValueError("batch_size and num_actors must be >= 1")


def split_record(record: dict) -> tuple[list[dict], str]:
    """LLaVA record -> (chat messages up to the last user turn, reference answer = final gpt turn)."""
    conv = record["conversations"]
    if not conv or _ROLES.get(conv[-1]["from"]) != "assistant":
        raise ValueError(f"record {record.get('id')!r} does not end with a gpt turn")
    return [{"role": _ROLES[t["from"]], "content": t["value"]} for t in conv[:-1]], conv[-1]["value"]


class EvalPredictor:
    """Ray Data callable class: one engine per actor (vLLM or the HF Predictor), loaded once."""

    def __init__(self, *, model: str, max_tokens: int, gamma: float | None, prompt_suffix: str, device: str,
                 dtype: str | None, mode: str | None = None, engine: str = "vllm", in_process: bool | None = None) -> None:
        if engine == "vllm":
            from pipelines.serve.engine import OfflineVllm

            if in_process is None:
                from vllm.platforms import current_platform

                in_process = current_platform.is_cpu()
            self.predictor = OfflineVllm(model, mode=mode, in_process=in_process, **({"dtype": dtype} if dtype else {}))
        else:
            from slime.predictor import Predictor

            self.predictor = Predictor.load(model, device=device, dtype=dtype, mode=mode)
        self.max_tokens, self.gamma, self.suffix = max_tokens, gamma, prompt_suffix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from slime.errors import InputError
        from slime.predictor import ChatRequest

        rows, reqs = [], []
        for image, meta in zip(batch["image"], batch["json"]):
            record = json.loads(meta)
            row = {"id": str(record.get("id", "")), "qtype": str(record.get("qtype", "all")),
                   "task": str(record.get("task", "")), "reference": "", "prediction": "", "error": "",
                   "error_code": "", "visual_tokens": 0, "prompt_tokens": 0, "completion_tokens": 0,
                   "latency_s": 0.0}
            try:
                messages, row["reference"] = split_record(record)
                if self.suffix:
                    messages[-1] = {**messages[-1], "content": messages[-1]["content"] + self.suffix}
                images = [self.predictor.processor.decode_image(image)] if image is not None else []
                req = ChatRequest(messages=messages, images=images, max_tokens=self.max_tokens, temperature=0.0,
                                  gamma=self.gamma)
                self.predictor.encode(req)  # validate alone: one bad record must not sink the batch
                reqs.append(req)
            except (InputError, ValueError, KeyError) as e:
                row.update(error=f"{type(e).__name__}: {e}", error_code=getattr(e, "code", "invalid_record"))
                reqs.append(None)
            rows.append(row)
        good = [i for i, r in enumerate(reqs) if r is not None]
        if good:
            for i, res in zip(good, self.predictor.generate([reqs[i] for i in good])):
                rows[i].update(prediction=res.text.strip(), visual_tokens=res.visual_tokens,
                               prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                               latency_s=res.latency_s)
        for row in rows:
            ok, scored = not row["error"], score(row["prediction"], row["reference"])
            row["exact"], row["correct"] = ok and scored["exact"], ok and scored["correct"]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]} if rows else {}


LATENCY_MEASURES = ("seconds from the submission of a request's batch to the engine until that request's last "
                    "token (per request, not batch time / batch size); samples that failed have none")
CHANCE_IS = "1 / the number of distinct (normalised) reference answers of the task: uniform guessing over its answers"


def chance(references: list[str]) -> float:
    """What answering without looking at the image scores on one task: 1 / |the task's answer set|, the
    set being the distinct normalised references in the evaluated data.

    Why uniform and not the majority answer: (1) it is exact. Our tasks draw their answers uniformly
    (pipelines/data/synth_tasks.py), so every answer that ignores the image scores 1/|A| in expectation;
    the majority answer's rate is only an estimate of that, and a biased one when the guess is picked on
    the references it is scored on (the largest of |A| sampled frequencies: 0.325 and 0.3125 for 1/4 on
    the demo's 80 questions), or a noisy one when picked on the training answers (0.188 and 0.225 there).
    (2) It needs nothing but the evaluated data: evaluation does not see the training set, and a
    baseline that peeks at the scored references is not one. (3) On open answers (captions) it goes to
    ~0, which is what guessing scores. Its limit: on a skewed answer distribution a model that learned
    the answer prior alone beats it (e.g. "yes" on a 70 %-yes set), so there it is a floor for guessing,
    not for a blind model. A task whose evaluated sample misses some answers gets a chance too high."""
    answers = {normalize_answer(r) for r in references if r}
    return 1.0 / len(answers) if answers else 0.0


def score_rows(rows: list[dict]) -> dict:
    """num_samples, exact_match, accuracy and errors of scored rows; a failed row is wrong."""
    def right(r: dict, key: str) -> bool:
        return not r["error"] and bool(r[key])

    n = len(rows)
    return {"num_samples": n, "exact_match": sum(right(r, "exact") for r in rows) / n if n else 0.0,
            "accuracy": sum(right(r, "correct") for r in rows) / n if n else 0.0,
            "errors": sum(bool(r["error"]) for r in rows)}


def summarize(rows: list[dict]) -> dict:
    """Rows of ``EvalPredictor`` -> metrics. Failed rows count as wrong (module docstring)."""
    block = score_rows

    per_qtype = {q: block([r for r in rows if r["qtype"] == q]) for q in sorted({r["qtype"] for r in rows})}
    per_task = {}
    for task in sorted({r.get("task") or r["qtype"] for r in rows}):
        rs = [r for r in rows if (r.get("task") or r["qtype"]) == task]
        per_task[task] = block(rs) | {"chance": chance([str(r.get("reference", "")) for r in rs])}
    generated = [r for r in rows if not r["error"]]
    latencies = [float(r["latency_s"]) for r in generated]
    codes = collections.Counter(r.get("error_code") or "error" for r in rows if r["error"])
    return {**block(rows), "error_codes": dict(sorted(codes.items())), "per_qtype": per_qtype,
            "per_task": per_task, "chance_is": CHANCE_IS,
            "visual_tokens_per_sample": float(np.mean([int(r["visual_tokens"]) for r in generated])) if generated
            else 0.0,
            "latency_s_per_request": {"mean": float(np.mean(latencies)) if latencies else 0.0,
                                      "p50": float(np.percentile(latencies, 50)) if latencies else 0.0,
                                      "p95": float(np.percentile(latencies, 95)) if latencies else 0.0,
                                      "measures": LATENCY_MEASURES}}


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; write metrics.json (+ predictions.jsonl) and return the metrics."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.data.ingest import DataConfig, list_shards, read_concurrency, read_target
    from pipelines.data.preprocess import ShardReader, metrics_actor

    start = time.perf_counter()
    output = default_output(cfg)
    preflight(cfg)
    shards = list_shards(DataConfig(shards=cfg.data.val, model=cfg.model, only_versions=cfg.data.only_versions,
                                    storage=cfg.storage))
    paths, fs = read_target(shards, cfg.storage)
    metrics_actor("DataMetrics-eval")
    reader = ShardReader(paths, filesystem=fs, metrics_name="DataMetrics-eval")
    ds = ray.data.read_datasource(reader, num_cpus=cfg.read_num_cpus,
                                  concurrency=read_concurrency(cfg.read_concurrency, len(paths)))
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    from pipelines.serve.engine import resolve_engine

    engine = resolve_engine(cfg.engine, cfg.model)
    ds = ds.map_batches(EvalPredictor, fn_constructor_kwargs=dict(
        model=cfg.model, max_tokens=cfg.max_tokens, gamma=cfg.gamma, mode=cfg.mode, prompt_suffix=cfg.prompt_suffix,
        device=cfg.device, dtype=cfg.dtype, engine=engine, in_process=cfg.vllm_in_process),
        compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size, num_cpus=cfg.actor_num_cpus,
        num_gpus=cfg.actor_num_gpus, batch_format="numpy")
    ds.context.execution_options.preserve_order = cfg.preserve_order
    rows = [{k: v.item() if hasattr(v, "item") else v for k, v in r.items()} for r in ds.take_all()]
    wall = time.perf_counter() - start
    metrics = {"model": cfg.model, "data": cfg.data.val, "engine": engine, **summarize(rows), "wall_s": wall,
               "samples_per_s": len(rows) / wall if wall else 0.0}
    if storage.exists(output, cfg.storage):
        print(f"evaluate: replacing the earlier result at {output} (overwrite=true)", file=sys.stderr)
    storage.write_bytes_atomic(output, json.dumps(metrics, indent=1).encode(), cfg.storage)
    out_dir = output.rsplit("/", 1)[0] if "/" in output else "."
    if cfg.predictions:
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        storage.write_bytes_atomic(storage.join(out_dir, "predictions.jsonl"), lines.encode(), cfg.storage)
    from pipelines.plots import plot_accuracy

    plot = storage.join(out_dir, "accuracy.png")
    storage.write_bytes_atomic(plot, plot_accuracy(metrics, title=cfg.model.rstrip("/").rsplit("/", 1)[-1]),
                               cfg.storage)
    metrics["output"], metrics["plot"] = output, plot
    metrics["mlflow"] = log_to_mlflow(cfg, metrics, rows)
    return metrics


def log_to_mlflow(cfg: EvalConfig, metrics: dict, rows: list[dict]) -> dict | None:
    """The result on the training run that made the model (pipelines.tracking.runs.log_evaluation): metrics
    ``eval.<what>`` and ``eval.<task>.accuracy`` at the model's global step, the per-task table, metrics.json,
    accuracy.png and predictions under ``eval/<label>/``. None when there is no run to log to."""
    from pipelines.tracking.runs import RUN_FILE, log_evaluation

    t = cfg.tracking
    record_uri = storage.join(cfg.model.rstrip("/"), RUN_FILE)
    if not t.enabled or not (t.run_id or storage.exists(record_uri, cfg.storage)):
        return None
    record = {"run_id": t.run_id} if t.run_id else json.loads(storage.read_bytes(record_uri, cfg.storage))
    meta_uri = storage.join(cfg.model.rstrip("/"), "metadata.json")
    meta = json.loads(storage.read_bytes(meta_uri, cfg.storage)) if storage.exists(meta_uri, cfg.storage) else {}
    label = re.sub(r"[^A-Za-z0-9_\-.]", "_", cfg.data.val.rstrip("/").rsplit("/", 1)[-1]) or "val"
    values = {f"eval.{k}": metrics[k] for k in ("accuracy", "exact_match", "errors", "num_samples",
                                                 "samples_per_s", "visual_tokens_per_sample") if k in metrics}
    values |= {f"eval.latency_p{p}_s": metrics["latency_s_per_request"][f"p{p}"] for p in (50, 95)}
    for task, m in metrics.get("per_task", {}).items():
        key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", task)
        values |= {f"eval.{key}.accuracy": m["accuracy"], f"eval.{key}.chance": m["chance"]}
    table = "task,num_samples,accuracy,exact_match,chance\n" + "".join(
        f"{task},{m.get('num_samples', '')},{m['accuracy']},{m.get('exact_match', '')},{m['chance']}\n"
        for task, m in metrics.get("per_task", {}).items())
    files = {f"eval/{label}/metrics.json": json.dumps({k: v for k, v in metrics.items() if k != "mlflow"},
                                                      indent=1, default=str).encode(),
             f"eval/{label}/per_task.csv": table.encode(),
             f"eval/{label}/accuracy.png": storage.read_bytes(metrics["plot"], cfg.storage)}
    if cfg.predictions:
        files[f"eval/{label}/predictions.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return log_evaluation(record, metrics=values, step=int(meta.get("global_step", 0)), uri=t.uri, files=files,
                          tags={"eval.model": cfg.model, "eval.data": cfg.data.val, "eval.engine": metrics["engine"]})


def preflight(cfg: EvalConfig) -> None:
    """Before Ray starts: the val shards exist and no earlier result would be replaced unasked."""
    from pipelines.data.ingest import DataConfig, list_shards

    output = default_output(cfg)
    if storage.exists(output, cfg.storage) and not cfg.overwrite:
        raise FileExistsError(f"{output} already holds a result: pass output=<another metrics.json> to keep both, "
                              "or overwrite=true to replace it")
    list_shards(DataConfig(shards=cfg.data.val, model=cfg.model, only_versions=cfg.data.only_versions,
                           storage=cfg.storage))


def default_output(cfg: EvalConfig) -> str:
    """Where metrics.json goes: ``output``, else inside the model directory it measures, so evaluating
    two models never writes to one file."""
    return cfg.output or storage.join(cfg.model.rstrip("/"), "eval", "metrics.json")
