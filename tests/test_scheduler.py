"""Scheduled retraining with an injected clock and a runner doing real file work on real model dirs.

(An end-to-end test with the real train/evaluate jobs through Ray Jobs is the lead's, once those land.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from pipelines.lifecycle.registry import Registry
from pipelines.lifecycle.scheduler import ScheduleConfig, Scheduler, check_cron, next_fire, select_shards

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = T0):
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


class FileRunner:
    """retrain = copy the parent model dir (or a seed) and record the shards; evaluate = write metrics
    from the model's quality file; rollout = write the served model's path. ``quality`` is what the next
    retrain produces; ``fail`` names a step that raises."""

    def __init__(self, work_dir: str, quality: float = 0.5, fail: str | None = None):
        self.work_dir, self.quality, self.fail = work_dir, quality, fail
        self.calls: list[tuple] = []
        self.served: str | None = None

    def _maybe_fail(self, step: str) -> None:
        if self.fail == step:
            raise RuntimeError(f"{step} job FAILED")

    def retrain(self, parent_model_dir, manifest_uri, new_shards, run_name):
        self.calls.append(("retrain", parent_model_dir, tuple(new_shards), run_name))
        self._maybe_fail("retrain")
        out = os.path.join(self.work_dir, run_name, "model")
        shutil.rmtree(out, ignore_errors=True)
        if parent_model_dir:
            shutil.copytree(parent_model_dir, out)
        else:
            os.makedirs(out)
            with open(os.path.join(out, "weights.bin"), "wb") as f:
                f.write(b"\0" * 256)
        with open(os.path.join(out, "quality.json"), "w") as f:
            json.dump({"quality": self.quality, "trained_on": new_shards, "parent": parent_model_dir}, f)
        return out

    def evaluate(self, model_dir):
        self.calls.append(("evaluate", model_dir))
        self._maybe_fail("evaluate")
        with open(os.path.join(model_dir, "quality.json")) as f:
            metrics = {"accuracy": json.load(f)["quality"], "num_samples": 16}
        with open(os.path.join(os.path.dirname(model_dir), "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics

    def rollout(self, model_dir):
        self.calls.append(("rollout", model_dir))
        self._maybe_fail("rollout")
        assert os.path.exists(os.path.join(model_dir, "quality.json")), "rolled out a model that is not there"
        self.served = model_dir

    def steps(self) -> list[str]:
        return [c[0] for c in self.calls]


def write_manifest(data_dir, num_shards: int, version: int) -> None:
    os.makedirs(data_dir, exist_ok=True)
    shards = [{"name": f"shard-{i // 2 + 1:06d}-{i:06d}.tar", "samples": 10, "bytes": 1000, "sha256": f"{i:064x}",
               "version": i // 2 + 1} for i in range(num_shards)]
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump({"dataset_version": version, "shards": shards, "num_samples": 10 * num_shards}, f)


@pytest.fixture()
def env(tmp_path):
    cfg = ScheduleConfig(registry=str(tmp_path / "registry"), manifest=str(tmp_path / "data"),
                         val=str(tmp_path / "val"), work_dir=str(tmp_path / "work"), tolerance=0.05, lock_ttl_s=600)
    write_manifest(cfg.manifest, 2, version=1)
    return cfg, Clock(), FileRunner(cfg.work_dir)


def test_cron_is_croniter_with_macros_and_dst():
    assert next_fire("0 3 * * *", datetime(2026, 11, 22, 3, 0)) == datetime(2026, 11, 23, 3, 0)
    assert next_fire("@daily", datetime(2026, 11, 22, 3, 0)) == datetime(2026, 11, 23, 0, 0)
    assert next_fire("0 0 13 * 5", datetime(2026, 11, 13, 0, 0)) == datetime(2026, 11, 20, 0, 0)  # 13th OR Fri
    for bad in ("0 3 * *", "60 * * * *", "@sometimes"):
        with pytest.raises(ValueError):
            check_cron(bad)
    with pytest.raises(ValueError, match="timezone"):
        ScheduleConfig(registry="r", manifest="m", val="v", work_dir="w", timezone="Mars/Olympus")


def test_run_sleeps_real_time_across_dst(env):
    """Europe/Berlin springs forward on 2027-03-28: 03:00 to 03:00 is 23 hours, not 24."""
    cfg, _, runner = env
    berlin = ZoneInfo("Europe/Berlin")

    class ZonedClock:  # real elapsed time in UTC, shown in Berlin (as datetime.now(zone) is)
        t = datetime(2027, 3, 27, 3, 0, tzinfo=berlin).astimezone(UTC)

        def __call__(self):
            return self.t.astimezone(berlin)

        def advance(self, seconds):
            self.t += timedelta(seconds=seconds)

    clock, ticks = ZonedClock(), []
    scheduler = Scheduler(cfg, runner, now=clock)
    scheduler.tick = lambda: ticks.append(clock()) or {"decision": "kept"}
    scheduler.run(max_ticks=2, sleep=clock.advance)
    assert [t.replace(tzinfo=None) for t in ticks] == [datetime(2027, 3, 28, 3, 0), datetime(2027, 3, 29, 3, 0)]


def test_first_model_then_no_new_data_runs_no_job(env):
    cfg, clock, runner = env
    first = Scheduler(cfg, runner, now=clock).tick()
    assert first["decision"] == "promoted" and "first model" in first["reason"], first
    assert runner.steps() == ["retrain", "evaluate", "rollout"]
    assert runner.calls[0][1] is None  # no parent: trained from scratch
    clock.advance(86400)
    second = Scheduler(cfg, runner, now=clock).tick()
    assert second["decision"] == "kept" and "no new shards" in second["reason"]
    assert runner.steps() == ["retrain", "evaluate", "rollout"]  # nothing ran
    logged = Registry(cfg.registry).decisions()
    assert logged[-1]["decision"] == "kept" and logged[-1]["tick"] == clock().isoformat()


def test_new_shards_retrain_from_production_evaluate_promote_rollout(env):
    cfg, clock, runner = env
    Scheduler(cfg, runner, now=clock).tick()
    reg = Registry(cfg.registry)
    v1 = reg.production()
    write_manifest(cfg.manifest, 4, version=2)
    runner.quality, runner.calls = 0.6, []
    clock.advance(86400)
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["decision"] == "promoted", rec
    assert rec["new_shards"] == ["shard-000002-000002.tar", "shard-000002-000003.tar"]
    assert runner.steps() == ["retrain", "evaluate", "rollout"]
    # default new+replay (fraction 0.5): the 2 new shards + ceil(0.5 * 2) = 1 of the 2 earlier ones
    replayed = [n for n in rec["trained_on"] if n not in rec["new_shards"]]
    assert len(rec["trained_on"]) == 3 and len(replayed) == 1 and replayed[0] in v1.shards
    assert runner.calls[0][1] == v1.model_uri and runner.calls[0][2] == tuple(rec["trained_on"])
    v2 = reg.production()
    assert v2.id == rec["version"] != v1.id and v2.metrics["accuracy"] == 0.6
    assert v2.lineage["parent_version"] == v1.id and len(v2.shards) == 4 and v2.lineage["dataset_version"] == 2
    assert v2.lineage["trained_on"] == rec["trained_on"] and v2.lineage["replayed_shards"] == replayed
    assert v2.lineage["new_shards"] == rec["new_shards"] and v2.lineage["parent_model"] == v1.model_uri
    assert runner.served == v2.model_uri and reg.serving() == v2.id
    with open(os.path.join(v2.model_uri, "quality.json")) as f:  # the registry holds a real copy of the model
        assert json.load(f)["parent"] == v1.model_uri
    assert rec["metrics"]["accuracy"] == 0.6 and rec["production_metrics"]["accuracy"] == 0.5


def test_worse_model_is_not_promoted_and_reason_is_recorded(env):
    cfg, clock, runner = env
    Scheduler(cfg, runner, now=clock).tick()
    reg = Registry(cfg.registry)
    v1 = reg.production()
    write_manifest(cfg.manifest, 3, version=2)
    runner.quality, runner.calls = 0.40, []  # 0.40 < 0.50 - 0.05
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["decision"] == "rejected" and "not promoted" in rec["reason"] and "0.4" in rec["reason"], rec
    assert runner.steps() == ["retrain", "evaluate"]  # no rollout
    assert reg.production().id == v1.id and reg.serving() == v1.id
    assert reg.get(rec["version"]).verdict["verdict"] == "rejected"
    again = Scheduler(cfg, runner, now=clock).tick()  # same data: no second retrain
    assert again["decision"] == "kept" and "already rejected" in again["reason"]
    assert runner.steps() == ["retrain", "evaluate"]
    runner.quality = 0.46  # within tolerance counts as "at least as good"
    write_manifest(cfg.manifest, 4, version=3)
    assert Scheduler(cfg, runner, now=clock).tick()["decision"] == "promoted"


@pytest.mark.parametrize("step", ["retrain", "evaluate"])
def test_tick_failing_midway_leaves_production_and_next_tick_completes(env, step):
    cfg, clock, runner = env
    Scheduler(cfg, runner, now=clock).tick()
    reg = Registry(cfg.registry)
    v1 = reg.production()
    write_manifest(cfg.manifest, 4, version=2)
    runner.quality, runner.fail = 0.7, step
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["decision"] == "failed" and f"{step} job FAILED" in rec["reason"]
    assert reg.production().id == v1.id and [v.id for v in reg.list()] == [v1.id]
    assert not os.path.exists(os.path.join(cfg.registry, "retrain.lock"))
    runner.fail = None
    clock.advance(3600)
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["decision"] == "promoted" and reg.production().metrics["accuracy"] == 0.7


def test_rollout_failure_after_promote_is_recovered_next_tick(env):
    cfg, clock, runner = env
    Scheduler(cfg, runner, now=clock).tick()
    write_manifest(cfg.manifest, 4, version=2)
    runner.quality, runner.fail = 0.7, "rollout"
    assert Scheduler(cfg, runner, now=clock).tick()["decision"] == "failed"
    reg = Registry(cfg.registry)
    assert reg.production().metrics["accuracy"] == 0.7 and reg.serving() != reg.production().id
    runner.fail, runner.calls = None, []
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["recovered_rollout"] == reg.production().id and rec["decision"] == "kept"
    assert runner.steps() == ["rollout"] and reg.serving() == reg.production().id


KILLED_TICK = """
import json, os, sys
from datetime import datetime
from pipelines.lifecycle.registry import Registry
from pipelines.lifecycle.scheduler import Scheduler, ScheduleConfig
from tests.test_scheduler import FileRunner
cfg = ScheduleConfig(**json.loads(sys.argv[1]))
Registry.promote = lambda self, version_id, reason: os._exit(9)  # SIGKILL-like: no finally, no cleanup
Scheduler(cfg, FileRunner(cfg.work_dir, quality=0.9), now=lambda: datetime.fromisoformat(sys.argv[2])).tick()
"""


def test_process_killed_after_register_next_tick_takes_stale_lock_and_finishes(env):
    cfg, clock, runner = env
    Scheduler(cfg, runner, now=clock).tick()
    reg = Registry(cfg.registry)
    v1 = reg.production()
    write_manifest(cfg.manifest, 4, version=2)
    args = {k: getattr(cfg, k) for k in ("registry", "manifest", "val", "work_dir", "tolerance", "lock_ttl_s")}
    proc = subprocess.run([sys.executable, "-c", KILLED_TICK, json.dumps(args), clock().isoformat()],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert reg.production().id == v1.id and len(reg.list()) == 2  # registered, not promoted
    assert Registry(cfg.registry).serving() == v1.id
    # the dead tick's lock is live until its ttl passes: an overlapping tick is refused
    clock.advance(60)
    runner.calls = []
    assert Scheduler(cfg, runner, now=clock).tick()["decision"] == "skipped" and runner.calls == []
    clock.advance(cfg.lock_ttl_s)
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert rec["decision"] == "promoted" and rec["took_over_lock_from"]["owner"] != rec["owner"]
    assert rec["resumed"] == rec["version"] and runner.steps() == ["rollout"]  # finished, no retrain
    assert reg.production().metrics["accuracy"] == 0.9 and reg.serving() == rec["version"]


def test_lock_prevents_a_second_concurrent_retrain(env):
    cfg, clock, runner = env
    inner = FileRunner(cfg.work_dir)
    results = {}

    class Overlapping(FileRunner):
        def retrain(self, *a):
            results["inner"] = Scheduler(cfg, inner, now=clock).tick()  # a second scheduler ticks meanwhile
            return super().retrain(*a)

    outer = Scheduler(cfg, Overlapping(cfg.work_dir), now=clock).tick()
    assert outer["decision"] == "promoted"
    assert results["inner"]["decision"] == "skipped" and "lock held by" in results["inner"]["reason"]
    assert inner.calls == [] and len(Registry(cfg.registry).list()) == 1


def test_shard_selection_policies():
    names = [f"s{i}.tar" for i in range(10)]
    new = names[8:]
    assert select_shards(names, new, "new", 0.5, "run") == (new, [])
    assert select_shards(names, new, "all", 0.5, "run") == (names, names[:8])
    trained, replayed = select_shards(names, new, "new+replay", 0.5, "run")
    assert len(replayed) == 1 and trained == sorted(replayed + new) and replayed[0] in names[:8]
    assert select_shards(names, new, "new+replay", 0.5, "run") == (trained, replayed)  # a retry reads the same
    assert select_shards(names, new, "new+replay", 10.0, "run")[0] == names  # capped at what exists
    assert select_shards(names, names, "new+replay", 0.5, "run") == (names, [])  # first model: all new


def test_train_on_new_passes_only_new_shards_and_records_them(env):
    cfg, clock, runner = env
    cfg = ScheduleConfig(**{**{k: getattr(cfg, k) for k in ("registry", "manifest", "val", "work_dir")},
                            "train_on": "new"})
    Scheduler(cfg, runner, now=clock).tick()
    write_manifest(cfg.manifest, 4, version=2)
    runner.calls = []
    rec = Scheduler(cfg, runner, now=clock).tick()
    assert runner.calls[0][2] == ("shard-000002-000002.tar", "shard-000002-000003.tar") == tuple(rec["trained_on"])
    assert Registry(cfg.registry).get(rec["version"]).lineage["replayed_shards"] == []


def test_decision_records_carry_only_their_own_ticks_job_ids(env):
    cfg, clock, _ = env

    class JobRunner(FileRunner):
        def __init__(self, work_dir):
            super().__init__(work_dir)
            self.job_ids, self.n = {}, 0

        def retrain(self, *a):
            self.n += 1
            self.job_ids["train"] = f"raysubmit_{self.n}"
            return super().retrain(*a)

    runner = JobRunner(cfg.work_dir)
    scheduler = Scheduler(cfg, runner, now=clock)
    assert scheduler.tick()["job_ids"] == {"train": "raysubmit_1"}
    clock.advance(86400)
    assert scheduler.tick()["job_ids"] == {}  # nothing ran this tick
    assert Registry(cfg.registry).decisions()[-1]["job_ids"] == {}


def test_a_run_that_read_other_shards_is_not_registered(env):
    cfg, clock, runner = env

    class Leaky(FileRunner):  # the job read a shard it was not given (e.g. a config's data.manifest won)
        def retrain(self, parent, manifest, shards, run_name):
            out = super().retrain(parent, manifest, shards, run_name)
            with open(os.path.join(out, "training_data.json"), "w") as f:
                json.dump({"shards_read": {f"/data/{n}": 10 for n in [*shards, "shard-000009-000000.tar"]}}, f)
            return out

    rec = Scheduler(cfg, Leaky(cfg.work_dir), now=clock).tick()
    assert rec["decision"] == "failed" and "shard-000009-000000.tar" in rec["reason"]
    assert Registry(cfg.registry).list() == [] and Registry(cfg.registry).production() is None


class AdapterRunner(FileRunner):
    """Each retrain after the first writes an adapter of its start model (as a run whose last phase is a lora
    phase does): ``slime_adapter.json`` naming that model as its base."""

    def retrain(self, parent_model_dir, manifest_uri, new_shards, run_name):
        out = super().retrain(None, manifest_uri, new_shards, run_name)  # a fresh directory, not a copy
        self.calls[-1] = ("retrain", parent_model_dir, *self.calls[-1][2:])
        if parent_model_dir:
            with open(os.path.join(out, "slime_adapter.json"), "w") as f:
                json.dump({"base": {"uri": parent_model_dir, "fingerprint": "sha256:" + "0" * 64}, "r": 8}, f)
        return out


def test_scheduled_adapters_are_versions_over_one_base(env):
    """Retraining can produce an adapter: it is registered as a version of its own whose lineage names its base,
    and the next retrain starts from that base again (a new adapter over the same base, never an adapter of an
    adapter)."""
    cfg, clock, _ = env
    runner = AdapterRunner(cfg.work_dir, quality=0.5)
    Scheduler(cfg, runner, now=clock).tick()  # the first production: a full model
    reg = Registry(cfg.registry)
    base = reg.production()
    assert base.lineage["artifact"] == "model" and base.train_from == base.model_uri
    for version, quality in ((2, 0.6), (3, 0.7)):
        write_manifest(cfg.manifest, 2 * version, version=version)
        clock.advance(86400)
        runner.quality = quality
        rec = Scheduler(cfg, runner, now=clock).tick()
        assert rec["decision"] == "promoted", rec
        prod = reg.production()
        assert prod.lineage["artifact"] == "adapter" and prod.lineage["base"]["uri"] == base.model_uri
        assert prod.train_from == base.model_uri and prod.lineage["parent_model"] == base.model_uri
        assert runner.calls[-3][:2] == ("retrain", base.model_uri), runner.calls  # from the base, each time
        assert runner.served == prod.model_uri  # the adapter version is what Serve rolls to
