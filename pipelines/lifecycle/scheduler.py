"""Scheduled retraining: on a cron schedule, retrain on new shards, evaluate, promote only if not worse.

One tick, under the registry lock (never two retrains at once; a dead tick's lock expires and is taken
over):

    serving != production?  -> roll Serve to production first (a tick that died after promoting)
    manifest shards - production lineage shards = new shards
    none                    -> keep production, record why
    a candidate for exactly this (parent, shard set) exists
        rejected            -> keep production, record why (same data, same verdict)
        undecided           -> finish it: decide (a tick that died after registering)
    otherwise               -> retrain from production on ``select_shards`` (default: the new shards +
                               a replayed sample of earlier ones) -> evaluate -> register
    metric >= production - tolerance (or <= + tolerance for "min" metrics) -> promote -> roll Serve
                                                          else -> reject, keep production

Production only changes through ``Registry.promote`` (one atomic pointer write), after the candidate is
fully registered, so a tick killed anywhere leaves the old model in production and serving. Every tick
writes a decision record (with the ids of the jobs that tick ran). A version's lineage says which
shards it accounts for (``shards``), which its run was given (``trained_on``: new + replayed) and read
(``shards_read``, from the run's own ``training_data.json``), and its parent (``parent_version``). The steps are injected (``RetrainRunner``); ``pipelines.lifecycle.jobs_client.JobsRunner``
runs them as Ray Jobs. Time comes from an injected ``now`` so tests can drive the clock.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Callable, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from pipelines import storage
from pipelines.lifecycle.jobs_client import JobsConfig, RolloutConfig
from pipelines.lifecycle.mlflow_mirror import MlflowSection, adopt_alias_move, log_tick
from pipelines.lifecycle.registry import LockHeld, Registry, RegistryLock, Version

# ---------------------------------------------------------------- cron
def next_fire(expr: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` at which ``expr`` fires, in ``after``'s timezone.

    croniter does the calendar: 5-field POSIX syntax, names, ``@daily``/``@hourly``/..., cron(8)'s
    day-of-month OR day-of-week rule, and DST (a wall time skipped in spring fires at the first time
    that exists after it; one repeated in autumn fires once).

    Why an in-process cron at all, next to ``cluster/cronjob-retrain.yaml`` and
    ``cluster/raycronjob-retrain.yaml``: on a cluster those manifests are the scheduler (``--once``
    per firing; Kubernetes owns the calendar, retries and history) and this function is unused. The
    built-in loop is the one-machine form (a laptop, a VM with no Kubernetes) that ARCHITECTURE.md
    lists as a component; with croniter it is a dozen lines, so it stays.
    """
    return croniter(expr, after).get_next(datetime)


def check_cron(expr: str) -> None:
    if not croniter.is_valid(expr):
        raise ValueError(f"cron {expr!r} is not a valid cron expression (5 fields or @daily/@hourly/...)")


# ---------------------------------------------------------------- config + steps
@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    registry: str  # registry root (local dir or s3://)
    manifest: str  # manifest.json written by the pack job
    val: str  # the fixed validation set every candidate is evaluated on
    work_dir: str  # where retrain runs export (shared storage the cluster can reach)
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    metric: str = "accuracy"
    metric_mode: Literal["max", "min"] = "max"
    tolerance: float = 0.0  # promote if metric >= production - tolerance ("min": <= production + tolerance)
    # What a retrain reads (see select_shards): the new shards plus a replayed sample of earlier ones
    # (against forgetting, at a cost proportional to the new data), only the new ones, or everything.
    train_on: Literal["new+replay", "new", "all"] = "new+replay"
    replay_fraction: float = 0.5  # new+replay: ceil(fraction * #new) earlier shards, at most all of them
    lock_ttl_s: float = 3600.0  # a lock whose heartbeat is older than this belongs to a dead tick
    jobs: JobsConfig = field(default_factory=JobsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    mlflow: MlflowSection = field(default_factory=MlflowSection)  # tick runs + Model Registry mirror (champion)

    def __post_init__(self) -> None:
        check_cron(self.cron)
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"timezone {self.timezone!r} is not an IANA zone name") from e
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.replay_fraction < 0:
            raise ValueError(f"replay_fraction must be >= 0, got {self.replay_fraction}")


class RetrainRunner(Protocol):
    """The steps. ``retrain`` trains on exactly ``shards`` (names in the manifest at ``manifest_uri``) from
    ``parent_model_dir`` and returns the exported model directory; a run that records what it read
    writes ``training_data.json`` into it (``pipelines.train.loop.train`` does). A runner that submits
    jobs may expose ``job_ids`` (step -> job id): the scheduler empties it when a tick starts."""

    def retrain(self, parent_model_dir: str | None, manifest_uri: str, shards: list[str], run_name: str) -> str: ...
    def evaluate(self, model_dir: str) -> dict[str, Any]: ...
    def rollout(self, model_dir: str) -> None: ...


def read_manifest(uri: str) -> dict[str, Any]:
    if not uri.endswith(".json"):
        uri = storage.join(uri, "manifest.json")
    return json.loads(storage.read_bytes(uri))


def run_name_for(dataset_version: str, parent: Version | None, shards: list[str], policy: str = "") -> str:
    """Deterministic per (parent, data, shard policy): a retried tick continues the same Ray Train run
    from its last checkpoint (RunConfig name + storage_path) instead of starting over."""
    digest = hashlib.sha256("\n".join([*sorted(shards), policy]).encode()).hexdigest()[:8]
    return f"retrain-{dataset_version}-{parent.id.split('-')[0] if parent else 'scratch'}-{digest}"


def select_shards(names: list[str], new: list[str], train_on: str, replay_fraction: float,
                  seed: str) -> tuple[list[str], list[str]]:
    """(shards to train on, the replayed earlier ones among them), in manifest order.

    ``new+replay`` (default): fine-tuning from production on the new shards alone drifts away from what
    production learnt; retraining on everything costs more every tick. Mixing in ceil(fraction * #new)
    earlier shards, drawn at random, keeps earlier data in view at a cost that grows with the new data
    only. The draw is seeded by the run name, so a retried tick reads the same shards and resumes its
    run. ``new``: the new shards only. ``all``: every shard of the manifest."""
    if train_on == "all":
        return list(names), [n for n in names if n not in set(new)]
    earlier = [n for n in names if n not in set(new)]
    k = min(len(earlier), math.ceil(replay_fraction * len(new))) if train_on == "new+replay" else 0
    replayed = set(random.Random(seed).sample(earlier, k))
    return [n for n in names if n in set(new) or n in replayed], [n for n in earlier if n in replayed]


def shards_read(model_dir: str) -> dict[str, int] | None:
    """{shard name: samples read} from the run's own ``training_data.json``; None if it wrote none."""
    uri = storage.join(model_dir, "training_data.json")
    if not storage.exists(uri):
        return None
    record = json.loads(storage.read_bytes(uri))
    return {posixpath.basename(path): int(n) for path, n in record["shards_read"].items()}


# ---------------------------------------------------------------- the tick
class Scheduler:
    def __init__(self, cfg: ScheduleConfig, runner: RetrainRunner, now: Callable[[], datetime],
                 owner: str | None = None, heartbeat_s: float | None = None):
        self.cfg, self.runner, self.now = cfg, runner, now
        self.registry = Registry(cfg.registry, now=now)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.heartbeat_s = heartbeat_s  # wall-clock heartbeat thread period; None = heartbeat between steps only

    def _better_or_equal(self, new: float, old: float) -> bool:
        if self.cfg.metric_mode == "max":
            return new >= old - self.cfg.tolerance
        return new <= old + self.cfg.tolerance

    def _metric(self, metrics: dict[str, Any], what: str) -> float:
        if self.cfg.metric not in metrics:
            raise KeyError(f"{what} metrics have no {self.cfg.metric!r} (have {sorted(metrics)})")
        return float(metrics[self.cfg.metric])

    def tick(self) -> dict[str, Any]:
        """Run one tick; returns (and logs) its decision record. Failures are recorded, not raised."""
        record: dict[str, Any] = {"tick": self.now().isoformat(), "owner": self.owner, "new_shards": [],
                                  "job_ids": {}, "metrics": None, "production_metrics": None, "version": None}
        job_ids = getattr(self.runner, "job_ids", None)
        if job_ids is not None:
            job_ids.clear()  # the record names this tick's jobs, never an earlier tick's
        lock = RegistryLock(self.registry, self.owner, self.cfg.lock_ttl_s)
        try:
            stale = lock.acquire()
        except LockHeld as e:
            record.update(decision="skipped", reason=str(e))
            self.registry.log_decision(record)
            return record
        if stale:
            record["took_over_lock_from"] = stale
        stop = threading.Event()
        if self.heartbeat_s:
            threading.Thread(target=self._beat, args=(lock, stop), daemon=True).start()
        try:
            self._tick(record, lock)
        except Exception as e:  # noqa: BLE001 - recorded; production is untouched by construction
            record.update(decision="failed", reason=f"{type(e).__name__}: {e}")
        finally:
            stop.set()
            record["job_ids"].update(job_ids or {})
            if self.cfg.mlflow.uri:  # published after the decision; a failure is recorded, never raised
                try:
                    record["mlflow"] = log_tick(self.cfg.mlflow, self.registry, record)
                except Exception as e:  # noqa: BLE001
                    record["mlflow"] = {"error": f"{type(e).__name__}: {e}"}
            self.registry.log_decision(record)
            lock.release()
        return record

    def _beat(self, lock: RegistryLock, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            lock.heartbeat()

    def _tick(self, record: dict[str, Any], lock: RegistryLock) -> None:
        reg, cfg = self.registry, self.cfg
        if cfg.mlflow.uri:  # an alias moved by hand in MLflow is production from now on (rolled out below)
            try:
                if adopted := adopt_alias_move(cfg.mlflow, reg):
                    record["alias_moved_by_hand"] = adopted
            except Exception as e:  # noqa: BLE001 - MLflow down: the tick goes on with the file registry's production
                record["alias_moved_by_hand"] = {"error": f"{type(e).__name__}: {e}"}
        prod = reg.production()
        if prod and reg.serving() != prod.id:  # a previous tick promoted but died before the rollout
            self.runner.rollout(prod.model_uri)
            reg.mark_serving(prod.id)
            record["recovered_rollout"] = prod.id
        manifest = read_manifest(cfg.manifest)
        names = [s["name"] for s in manifest["shards"]]
        seen = set(prod.shards) if prod else set()
        new = [n for n in names if n not in seen]
        record.update(new_shards=new, dataset_version=manifest.get("dataset_version"),
                      production=prod.id if prod else None,
                      production_metrics=prod.metrics if prod else None)
        if not new:
            record.update(decision="kept", reason=f"no new shards: production {prod and prod.id} has seen all "
                                                  f"{len(names)} shards of dataset {manifest.get('dataset_version')}")
            return
        parent_id = prod.id if prod else None
        same = [v for v in reg.list() if v.lineage.get("parent_version") == parent_id
                and set(v.shards) == set(names)]
        candidate = same[-1] if same else None
        if candidate and candidate.verdict:  # rejected, or promoted and later rolled back by hand
            record.update(decision="kept", version=candidate.id,
                          reason=f"candidate {candidate.id} trained on these shards was already "
                                 f"{candidate.verdict['verdict']} ({candidate.verdict['reason']}); "
                                 "waiting for new data")
            return
        if candidate:
            record["resumed"] = candidate.id  # registered by a tick that died before deciding
        else:
            policy = f"{cfg.train_on}:{cfg.replay_fraction}" if cfg.train_on == "new+replay" else cfg.train_on
            run_name = run_name_for(str(manifest.get("dataset_version")), prod, names, policy)
            trained_on, replayed = select_shards(names, new, cfg.train_on, cfg.replay_fraction, run_name)
            record.update(run_name=run_name, trained_on=trained_on)
            model_dir = self.runner.retrain(prod.train_from if prod else None, cfg.manifest, trained_on, run_name)
            lock.heartbeat()
            read = shards_read(model_dir)
            if read is not None and set(read) - set(trained_on):
                raise RuntimeError(f"run {run_name} read shards it was not given: {sorted(set(read) - set(trained_on))}")
            metrics = self.runner.evaluate(model_dir)
            lock.heartbeat()
            # shards: every shard this version accounts for (the parent's + the new ones), which the next
            # tick diffs against; trained_on: what this run was given; shards_read: what it reports reading.
            lineage = {"dataset_version": manifest.get("dataset_version"), "shards": names,
                       "new_shards": new, "trained_on": trained_on, "replayed_shards": replayed,
                       "shards_read": read, "train_on": cfg.train_on, "replay_fraction": cfg.replay_fraction,
                       "parent_version": parent_id, "parent_model": prod.train_from if prod else None,
                       "run_name": run_name, "manifest": cfg.manifest,
                       "run_config": {"train_config": cfg.jobs.train_config,
                                      "train_overrides": list(cfg.jobs.train_overrides),
                                      "eval_config": cfg.jobs.eval_config, "val": cfg.val}}
            candidate = reg.get(reg.register(model_dir, metrics, lineage))
        self._decide(record, prod, candidate)

    def _decide(self, record: dict[str, Any], prod: Version | None, candidate: Version) -> None:
        reg = self.registry
        new = self._metric(candidate.metrics, f"candidate {candidate.id}")
        record.update(version=candidate.id, metrics=candidate.metrics)
        if prod is None:
            reason = f"first model: {self.cfg.metric}={new:.6g}"
        else:
            old = self._metric(prod.metrics, f"production {prod.id}")
            op = ">=" if self.cfg.metric_mode == "max" else "<="
            sign = "-" if self.cfg.metric_mode == "max" else "+"
            verdict = f"{self.cfg.metric} {new:.6g} vs production {prod.id} {old:.6g} (tolerance {self.cfg.tolerance})"
            if not self._better_or_equal(new, old):
                reason = f"not promoted: {verdict}: needs {op} {old:.6g} {sign} {self.cfg.tolerance}"
                reg.reject(candidate.id, reason)
                record.update(decision="rejected", reason=reason)
                return
            reason = f"promoted: {verdict}"
        reg.promote(candidate.id, reason)
        self.runner.rollout(candidate.model_uri)
        reg.mark_serving(candidate.id)
        record.update(decision="promoted", reason=reason)

    def run(self, max_ticks: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Tick at every cron match (in the timezone of ``now()``), forever or ``max_ticks`` times."""
        done = 0
        while max_ticks is None or done < max_ticks:
            t = self.now()
            # in UTC: aware datetimes sharing a tzinfo subtract as wall times, an hour off across DST
            sleep(max(0.0, (next_fire(self.cfg.cron, t).astimezone(UTC) - t.astimezone(UTC)).total_seconds()))
            record = self.tick()
            print(json.dumps({k: record.get(k) for k in ("tick", "decision", "reason", "version")}), flush=True)
            done += 1
