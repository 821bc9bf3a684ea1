"""Scheduled retraining: on a cron schedule, retrain on new shards, evaluate, promote only if not worse.

One tick, under the registry lock (never two retrains at once; a dead tick's lock expires and is taken
over):

    serving != production?  -> roll Serve to production first (a tick that died after promoting)
    manifest shards - production lineage shards = new shards
    none                    -> keep production, record why
    a candidate for exactly this (parent, shard set) exists
        rejected            -> keep production, record why (same data, same verdict)
        undecided           -> finish it: decide (a tick that died after registering)
    otherwise               -> retrain (from production) -> evaluate -> register
    metric >= production - tolerance (or <= + tolerance for "min" metrics) -> promote -> roll Serve
                                                          else -> reject, keep production

Production only changes through ``Registry.promote`` (one atomic pointer write), after the candidate is
fully registered, so a tick killed anywhere leaves the old model in production and serving. Every tick
writes a decision record. The steps are injected (``RetrainRunner``); ``pipelines.lifecycle.jobs_client.JobsRunner``
runs them as Ray Jobs. Time comes from an injected ``now`` so tests can drive the clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Literal, Protocol

from pipelines import storage
from pipelines.lifecycle.jobs_client import JobsConfig, RolloutConfig
from pipelines.lifecycle.registry import LockHeld, Registry, RegistryLock, Version

# ---------------------------------------------------------------- cron (5 fields, POSIX semantics)
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def _parse_field(text: str, index: int) -> frozenset[int]:
    name, lo, hi = _FIELDS[index]
    names = {n: i + (1 if index == 3 else 0) for i, n in enumerate(_NAMES.get(index, []))}

    def value(tok: str) -> int:
        v = names.get(tok.lower())
        if v is None:
            if not tok.isdigit():
                raise ValueError(f"cron {name}: {tok!r} is not a number")
            v = int(tok)
        if not lo <= v <= hi:
            raise ValueError(f"cron {name}: {v} is outside {lo}-{hi}")
        return v

    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(f"cron {name}: bad step in {part!r}")
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            start, end = (value(t) for t in base.split("-", 1))
            if start > end:
                raise ValueError(f"cron {name}: range {base!r} runs backwards")
        else:
            start = value(base)
            end = hi if step else start  # "5/15" = from 5 to the end, every 15
        out.update(range(start, end + 1, step or 1))
    if index == 4 and 7 in out:  # 0 and 7 are both Sunday
        out = (out - {7}) | {0}
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    """``Cron.parse("0 3 * * *")``: numbers, ``*``, lists, ranges, steps, month/day names. When both
    day-of-month and day-of-week are restricted a day matches either (as in cron(8))."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expr: str) -> Cron:
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
        sets = [_parse_field(p, i) for i, p in enumerate(parts)]
        return cls(*sets, any_day=parts[2].startswith("*"), any_weekday=parts[4].startswith("*"))

    def _day_matches(self, t: datetime) -> bool:
        dom, dow = t.day in self.days, (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def matches(self, t: datetime) -> bool:
        return t.minute in self.minutes and t.hour in self.hours and t.month in self.months and self._day_matches(t)

    def next_after(self, t: datetime) -> datetime:
        """The first matching minute strictly after ``t`` (same tzinfo as ``t``)."""
        t = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 8)  # "29 2 *" can be 8 years away
        while t < limit:
            if t.month not in self.months or not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        raise ValueError("cron expression never matches")


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
    lock_ttl_s: float = 3600.0  # a lock whose heartbeat is older than this belongs to a dead tick
    jobs: JobsConfig = field(default_factory=JobsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def __post_init__(self) -> None:
        Cron.parse(self.cron)
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


class RetrainRunner(Protocol):
    def retrain(self, parent_model_dir: str | None, manifest_uri: str, new_shards: list[str], run_name: str) -> str: ...
    def evaluate(self, model_dir: str) -> dict[str, Any]: ...
    def rollout(self, model_dir: str) -> None: ...


def read_manifest(uri: str) -> dict[str, Any]:
    if not uri.endswith(".json"):
        uri = storage.join(uri, "manifest.json")
    return json.loads(storage.read_bytes(uri))


def run_name_for(dataset_version: str, parent: Version | None, shards: list[str]) -> str:
    """Deterministic per (parent, data): a retried tick continues the same Ray Train run from its last
    checkpoint (RunConfig name + storage_path) instead of starting over."""
    digest = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()[:8]
    return f"retrain-{dataset_version}-{parent.id.split('-')[0] if parent else 'scratch'}-{digest}"


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
            record["job_ids"].update(getattr(self.runner, "job_ids", {}))
            self.registry.log_decision(record)
            lock.release()
        return record

    def _beat(self, lock: RegistryLock, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            lock.heartbeat()

    def _tick(self, record: dict[str, Any], lock: RegistryLock) -> None:
        reg, cfg = self.registry, self.cfg
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
            run_name = run_name_for(str(manifest.get("dataset_version")), prod, names)
            record["run_name"] = run_name
            model_dir = self.runner.retrain(prod.model_uri if prod else None, cfg.manifest, new, run_name)
            lock.heartbeat()
            metrics = self.runner.evaluate(model_dir)
            lock.heartbeat()
            lineage = {"dataset_version": manifest.get("dataset_version"), "shards": names,
                       "parent_version": parent_id, "run_name": run_name, "manifest": cfg.manifest,
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
        cron = Cron.parse(self.cfg.cron)
        done = 0
        while max_ticks is None or done < max_ticks:
            t = self.now()
            sleep(max(0.0, (cron.next_after(t) - t).total_seconds()))
            record = self.tick()
            print(json.dumps({k: record.get(k) for k in ("tick", "decision", "reason", "version")}), flush=True)
            done += 1
