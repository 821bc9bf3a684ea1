"""The scheduler's registry, published in MLflow: every tick is an MLflow run and the Model Registry mirrors
the file registry (``registry.py``) after the tick's decision.

Why a mirror and not a second backend: the file registry is what the tick's crash-safety rests on (an atomic
``production.json`` write is the promotion, a lock by S3 conditional writes, a decision record per tick; tested
in tests/test_scheduler.py). MLflow's REST API has no conditional write for an alias, so it cannot be that
lock. What MLflow adds is the published view: versions with metrics and lineage as tags, the ``champion``
alias that ``slime serve --model models:/NAME@champion`` resolves, the UI, search. ``sync`` is idempotent and
runs at the end of every tick, so a tick whose MLflow calls failed (recorded in its decision, never raised) is
caught up by the next one.

An alias moved by hand (the MLflow UI, a client) is an operator's decision, not drift: at the start of the next
tick ``adopt_alias_move`` makes that version production in the file registry (the tick then rolls Serve to it,
as after any promotion) instead of ``sync`` moving the alias back. It tells a hand move from a mirror that fell
behind (MLflow down during a promotion) by the registered model's tag ``slime.mirror_champion``: the version the
mirror itself last pointed the alias at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipelines import storage
from pipelines.lifecycle.registry import Registry
from pipelines.tracking.client import MlflowClient, flatten_params
from pipelines.tracking.models import ModelRegistry


@dataclass(frozen=True, kw_only=True)
class MlflowSection:
    uri: str | None = None  # http(s)://host:port of an MLflow server; None = no mirror
    model_name: str = "slime"  # the registered model
    alias: str = "champion"  # the alias that follows production
    experiment: str = "slime-schedule"  # one run per tick: its decision

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.startswith(("http://", "https://")):
            raise ValueError(f"mlflow.uri must be http(s)://host:port, got {self.uri!r}")


def _numbers(prefix: str, d: dict[str, Any] | None) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_tick(section: MlflowSection, registry: Registry, record: dict[str, Any]) -> dict[str, Any]:
    """The tick as a run (decision, reason, versions as tags; candidate and production metrics; the record as
    ``decision.json``), then ``sync``. Raises on MLflow errors (the caller records them)."""
    client = MlflowClient(section.uri)
    exp = client.experiment_id(section.experiment)
    tags = {f"slime.{k}": str(record.get(k)) for k in ("decision", "reason", "version", "production", "run_name",
                                                      "dataset_version") if record.get(k) is not None}
    run = client.create_run(exp, f"tick {record['tick']}", {"mlflow.source.name": "slime schedule", **tags})
    run_id = run["info"]["run_id"]
    metrics = _numbers("candidate.", record.get("metrics")) | _numbers("production.", record.get("production_metrics"))
    client.log_batch(run_id, metrics=[{"key": k, "value": v, "step": 0} for k, v in metrics.items()],
                     params=flatten_params({"new_shards": record.get("new_shards") or [],
                                            "trained_on": record.get("trained_on") or []}))
    client.upload_artifact(run, "decision.json", json.dumps(record, indent=1, default=str).encode())
    synced = sync(section, registry, tick_run=run_id)
    client.update_run(run_id, "FAILED" if record.get("decision") == "failed" else "FINISHED")
    return {"run_id": run_id, **synced}


MIRROR_TAG = "slime.mirror_champion"  # registered-model tag: the version this mirror last pointed the alias at


def adopt_alias_move(section: MlflowSection, registry: Registry) -> dict[str, Any] | None:
    """If the alias was moved since the mirror last set it, promote the file-registry version it now names
    (reason: moved by hand) and return what was adopted; None when nothing moved. A move to a version that is
    not one of this registry's (no ``slime.registry_version`` tag) is reported and left to ``sync``."""
    models = ModelRegistry(section.uri, section.model_name)
    current = models.alias(section.alias)
    last = models.tags().get(MIRROR_TAG) if current else None
    if current is None or last is None or current["version"] == last:
        return None
    moved = {"mlflow_version": current["version"], "mirror_had": last}
    version_id = current["tags"].get("slime.registry_version", "")  # "" (not mirrored from a registry): unknown
    try:
        registry.get(version_id)
    except KeyError:
        return {**moved, "ignored": f"MLflow version {current['version']} is not a version of {registry.root}"}
    prod = registry.production()
    if prod is None or prod.id != version_id:
        registry.promote(version_id, f"{section.alias} moved to MLflow version {current['version']} by hand "
                                     f"(was {last})")
    models.set_model_tag(MIRROR_TAG, current["version"])
    return {**moved, "adopted": version_id, "previous": prod.id if prod else None}


def sync(section: MlflowSection, registry: Registry, tick_run: str) -> dict[str, Any]:
    """Every complete file-registry version has an MLflow version (tag ``slime.registry_version``), verdicts
    are tags, and ``alias`` points at production's version. Returns ``{versions: {id: mlflow version},
    champion}``."""
    models = ModelRegistry(section.uri, section.model_name)
    models.ensure()
    mirrored = {mv["tags"].get("slime.registry_version"): mv for mv in models.versions()}
    for v in registry.list():
        if v.id not in mirrored:
            record = storage.join(v.model_uri, "mlflow_run.json")  # a tracked training run made it
            train_run = json.loads(storage.read_bytes(record))["run_id"] if storage.exists(record) else None
            lineage = {k: v.lineage.get(k) for k in ("parent_version", "dataset_version", "run_name", "shards",
                                                     "trained_on", "shards_read")}
            tags = {"slime.registry_version": v.id, "slime.registry": registry.root, "slime.tick_run": tick_run,
                    **{f"eval.{k}": str(x) for k, x in _numbers("", v.metrics).items()},
                    **{f"lineage.{k}": x if isinstance(x, str) else json.dumps(x) for k, x in lineage.items()}}
            number = models.register(v.model_uri, tags, run_id=train_run or tick_run)
            mirrored[v.id] = models.get(number)
        if v.verdict and mirrored[v.id]["tags"].get("slime.verdict") != v.verdict["verdict"]:
            models.set_tags(mirrored[v.id]["version"], {"slime.verdict": v.verdict["verdict"],
                                                        "slime.reason": v.verdict["reason"]})
    prod = registry.production()
    champion = None
    if prod is not None:
        champion = mirrored[prod.id]["version"]
        current = models.alias(section.alias)
        if current is None or current["version"] != champion:
            models.promote(champion, (prod.verdict or {}).get("reason", "production"), alias=section.alias)
        models.set_model_tag(MIRROR_TAG, champion)
    return {"versions": {k: mv["version"] for k, mv in mirrored.items() if k}, "champion": champion}
