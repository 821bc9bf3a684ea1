"""The driver's side of a training run's MLflow run (pipelines/tracking/ has the client and the why).

``TrainTracking.open`` (before ``trainer.fit``): the embedded server when no URI is configured, the run
(reopened on resume) with the flattened resolved config as params; the workers get ``{uri, run_id}`` in their
loop config and rank 0 logs each step at ``step = global_step`` (continuous across phases and restarts).
``finish`` (after the fit): phase summaries as metrics (``summary.<phase>.<what>``) and ``phase_summary.json``,
``loss.png``, ``metrics.jsonl`` and the export's metadata as artifacts, then the run's status. Nothing here
raises because MLflow failed: the training result is what matters.
"""

from __future__ import annotations

import json
import os
import re
import sys

from pipelines import storage
from pipelines.tracking.client import flatten_params
from pipelines.tracking.runs import RunTracker, open_run
from pipelines.tracking.server import Server, embedded_store, embedded_ui_command, start_server
from slime.config import to_dict

EXPORT_METADATA = ("metadata.json", "training_data.json", "slime_config.yaml")


def tracking_enabled(cfg) -> bool:
    """Explicitly on/off; else on with a server URI; else (embedded store) on unless env SLIME_TRACKING=off."""
    if cfg.tracking.enabled is not None:
        return cfg.tracking.enabled
    if cfg.tracking.uri:
        return True
    return os.environ.get("SLIME_TRACKING", "on").lower() not in ("off", "0", "false", "no")


def embedded_dir(cfg) -> str:
    if cfg.tracking.dir:
        return cfg.tracking.dir
    if storage.is_s3(cfg.storage_path):
        return os.path.abspath("mlflow")
    return os.path.join(os.path.dirname(os.path.abspath(cfg.storage_path.rstrip("/"))), "mlflow")


def metric_key(text: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``; phase names may hold others (``@r0``)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def phase_summaries(rows: list[dict]) -> dict[str, dict]:
    """Per phase from metrics.jsonl's step rows (the last attempt of a step wins): steps, first/last/min loss,
    mean samples/s and tokens/s, summed step time and data wait."""
    by_step: dict[int, dict] = {}
    for r in rows:
        if "event" not in r and "global_step" in r:
            by_step[r["global_step"]] = r
    phases: dict[str, list[dict]] = {}
    for _, r in sorted(by_step.items()):
        phases.setdefault(r["phase"], []).append(r)
    out = {}
    for name, rs in phases.items():
        out[name] = {"phase_index": rs[0]["phase_index"], "steps": len(rs), "first_global_step": rs[0]["global_step"],
                     "last_global_step": rs[-1]["global_step"], "loss_first": rs[0]["loss"],
                     "loss_last": rs[-1]["loss"], "loss_min": min(r["loss"] for r in rs),
                     "samples_per_s": sum(r["samples_per_s"] for r in rs) / len(rs),
                     "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
                     "step_time_s": sum(r.get("step_time_s", 0.0) for r in rs),
                     "data_wait_s": sum(r.get("data_wait_s", 0.0) for r in rs)}
    return out


class TrainTracking:
    """One ``slime train`` invocation's MLflow session (``worker_config`` goes to rank 0)."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.run: dict | None = None
        self.tracker = RunTracker(None, None)
        self.store: str | None = None

    @classmethod
    def open(cls, cfg, phases: list, plan: list[int]) -> TrainTracking:
        self = cls()
        if not tracking_enabled(cfg):
            return self
        uri = cfg.tracking.uri
        try:
            if uri is None:
                self.store = embedded_dir(cfg)
                self.server = start_server(*embedded_store(self.store))
                uri = self.server.uri
            params = flatten_params(to_dict(cfg))
            params.update({f"plan.{i}.{p.name}": str(n) for i, (p, n) in enumerate(zip(phases, plan))})
            tags = {"slime.run_name": cfg.name, "slime.storage_path": cfg.storage_path,
                    "slime.export_dir": cfg.export_dir or "", "mlflow.source.name": "slime train",
                    "slime.phases": ",".join(p.name for p in phases)}
            self.run = open_run(uri, cfg.tracking.experiment, cfg.name, storage.join(cfg.storage_path, cfg.name),
                                params=params, tags=tags,
                                store=f"embedded:{os.path.abspath(self.store)}" if self.store else None)
        except Exception as e:  # noqa: BLE001 - no tracking is better than no training
            print(f"[tracking] MLflow tracking is off for this run: {e}", file=sys.stderr, flush=True)
            self.close_server()
            self.run = None
            return self
        self.tracker = RunTracker(self.run["uri"], self.run["run_id"], label="tracking")
        where = f"embedded store {self.store}" if self.store else uri
        print(f"[tracking] MLflow run {self.run['run_id']} ({'resumed' if self.run['resumed'] else 'new'}) "
              f"in experiment {cfg.tracking.experiment!r} at {where}", file=sys.stderr, flush=True)
        return self

    @property
    def worker_config(self) -> dict | None:
        return {"uri": self.run["uri"], "run_id": self.run["run_id"]} if self.run else None

    def export_files(self) -> dict[str, bytes]:
        """``mlflow_run.json`` for the exported model: ``slime evaluate`` logs to the run that trained it."""
        if not self.run:
            return {}
        record = {k: self.run[k] for k in ("store", "experiment_id", "run_id")}
        if not self.store:
            record["uri"] = self.run["uri"]
        return {"mlflow_run.json": json.dumps(record, indent=1).encode()}

    def finish(self, cfg, *, status: str, log_uri: str | None = None, plot: str | None = None) -> dict | None:
        """Phase summaries, artifacts, status; returns what the summary reports (None when off)."""
        if not self.run:
            return None
        t = self.tracker
        if log_uri and storage.exists(log_uri):
            from pipelines.plots import read_jsonl

            data = storage.read_bytes(log_uri)
            summaries = phase_summaries(read_jsonl(data))
            metrics = {f"summary.{metric_key(name)}.{k}": v for name, s in summaries.items()
                       for k, v in s.items() if k != "phase_index"}
            t.log_metrics(metrics, step=max([s["last_global_step"] for s in summaries.values()] or [0]))
            t.log_artifact("phase_summary.json", json.dumps(summaries, indent=1).encode())
            t.log_artifact("metrics.jsonl", data)
        if plot and storage.exists(plot):
            t.log_artifact("loss.png", storage.read_bytes(plot))
        if cfg.export_dir and status == "FINISHED":
            for name in EXPORT_METADATA:
                uri = storage.join(cfg.export_dir, name)
                if storage.exists(uri):
                    t.log_artifact(f"export/{name}", storage.read_bytes(uri))
        counts = t.close(status=status)
        return {"uri": self.run["uri"], "experiment_id": self.run["experiment_id"], "run_id": self.run["run_id"],
                "resumed": self.run["resumed"], "store": self.store, **counts,
                **({"ui": embedded_ui_command(self.store)} if self.store else {})}

    def close_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
