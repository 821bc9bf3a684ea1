"""Training: config/schedule units (no Ray), then real Ray Train runs of the tiny model on synthetic shards.

The plain DDP run of ``train_tiny.yaml`` (2 workers, the four paper phases: golden losses, trainable
sets per phase, export) is checked by ``check_ddp_four_phases`` on the README's own ``slime train`` run
(tests/test_readme_steps.py), which is that run: training it a second time here would only repeat it.
Golden losses: tests/assets/losses/tiny_ddp.json. Regenerate after an intended change with
    SLIME_UPDATE_GOLDEN=1 pytest tests/test_readme_steps.py -k run_in_order
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train.config import OptimConfig, TrainConfig, expand_phases
from pipelines.train.parallel import cosine_with_warmup, deepspeed_config
from slime.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
GOLDEN = Path(__file__).resolve().parent / "assets" / "losses" / "tiny_ddp.json"


# ----------------------------------------------------------------------------- units


def test_default_schedule_is_the_paper_recipe():
    cfg = TrainConfig(name="x", storage_path="/tmp/x")
    names = [(p.name, p.trainable, p.mode, p.forced_expert) for p in cfg.phases]
    assert names == [("I-a-global-mlp", ("projector",), "global", 0),
                     ("I-b-global-attention", ("global_adapter.resampler",), "global", 1),
                     ("II-local", ("compressor",), "local", None),
                     ("III-joint", ("projector", "global_adapter", "compressor", "llm"), "both", None)]
    assert cfg.phases[2].gamma == 1.0 and cfg.phases[3].router_noise


def test_yaml_configs_load_and_scheduler_keys_exist():
    keys = ["init_from=/m", "data.manifest=s3://b/wds", "export_dir=/e", "name=run-7"]
    for name in ("train_tiny.yaml", "train_7b.yaml"):
        assert (CONFIGS / name).read_text().startswith("#")
        cfg = load_config(TrainConfig, str(CONFIGS / name), keys)
        assert (cfg.init_from, cfg.data["manifest"], cfg.export_dir, cfg.name) == ("/m", "s3://b/wds", "/e", "run-7")
    with pytest.raises(ValueError, match="optim.lr_typo"):
        load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), ["optim.lr_typo=1"])


def test_fixed_length_tuples_are_checked_item_by_item():
    cfg = load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), ["optim.betas=[0.8, 0.95]"])
    assert cfg.optim.betas == (0.8, 0.95)
    for bad, needle in (("[0.9]", "expected 2 items"), ("[0.9, 0.99, 0.999]", "expected 2 items"),
                        ("[0.9, fast]", r"optim\.betas\[1\]: expected a number")):
        with pytest.raises(ValueError, match=needle):
            load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), [f"optim.betas={bad}"])


def test_cyclic_expansion_and_validation():
    cfg = load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"),
                      ["cyclic.rounds=2", "cyclic.steps=3", "cyclic.pattern=[I-b-global-attention, II-local]"])
    names = [(p.name, p.steps) for p in expand_phases(cfg)]
    assert names == [("I-a-global-mlp", 4), ("I-b-global-attention@r0", 3), ("II-local@r0", 3),
                     ("I-b-global-attention@r1", 3), ("II-local@r1", 3), ("III-joint", 4)]
    with pytest.raises(ValueError, match="exactly one of steps / epochs"):
        load_config(TrainConfig, None, ["name=a", "storage_path=/x",
                                        "phases=[{name: a, trainable: [projector], lr: 1.0}]"])
    with pytest.raises(ValueError, match="unknown phase"):
        load_config(TrainConfig, None, ["name=a", "storage_path=/x", "cyclic.rounds=1", "cyclic.pattern=[nope]"])


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(100, 0.03, 0.0)
    values = [f(s) for s in range(100)]
    assert values[0] < values[1] < values[2] < values[3] == 1.0  # 3 warm-up steps, then the peak
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97)))


def test_a_build_lock_left_by_a_killed_process_does_not_hang_deepspeed(tmp_path):
    """torch's JIT-build lock file outlives a builder killed mid-build, and every later DeepSpeed start then
    waited on it forever (a CI run hung to its limit). A fresh process given such a file loads the op (the
    way DeepSpeed's CPU backend asks for it) and removes the file."""
    import subprocess
    import sys

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").write_text("")  # what a killed builder leaves
    code = ("from pipelines.train.parallel import load_deepspeed_ops; load_deepspeed_ops(); "
            "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None; print('loaded')")
    # first use on a fresh machine compiles the op (30 s - 3 min); before the fix this waited forever
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert not (build_dir / "lock").exists()


def test_deepspeed_config_takes_batch_and_precision_from_the_run():
    ds = deepspeed_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "optimizer": {"x": 1}},
                          OptimConfig(micro_batch_size=2, grad_accum=4, grad_clip=0.5), world=2, precision="fp32")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert "optimizer" not in ds and ds["zero_optimization"] == {"stage": 2}


# ----------------------------------------------------------------------------- fixtures for Ray runs


@pytest.mark.integration
def test_grouped_fetches_give_the_same_micro_batches(ray_session):
    """Batches slices k micro-batches out of each Ray Data batch: same micro-batches, same order, same
    dropped tail and epoch/skip accounting as fetching them one at a time."""
    import ray

    from pipelines.train.batches import Batches

    ds = ray.data.from_items([{"input_ids": [i, i], "sample_hash": i} for i in range(22)], override_num_blocks=3)
    kwargs = {"prefetch_batches": 1, "dtypes": {"input_ids": torch.int64, "sample_hash": torch.int64}}

    def take(per_fetch: int, n: int, skip: int = 0, warm: bool = False) -> tuple[list[list[int]], Batches]:
        b = Batches(ds.iterator(), kwargs, micro=4, per_fetch=per_fetch, skip=skip)
        if warm:  # the first micro-batch is pulled in a background thread (the next phase's data, warmed)
            b.warm()
        got = [b.next() for _ in range(n)]
        b.close()  # end the Ray Data iteration while Ray is up (else it reports to a gone stats actor at exit)
        assert b.it is None
        assert all("sample_hash" not in x for x in got)
        return [x["input_ids"][:, 0].tolist() for x in got], b

    one, b1 = take(1, 12)
    grouped, b3 = take(3, 12)
    assert grouped == one
    assert one[:6] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19], [0, 1, 2, 3]]
    assert (b3.epoch, b3.batch_in_epoch) == (b1.epoch, b1.batch_in_epoch) == (2, 2)  # 5 per epoch, rows 20-21 dropped
    skipped, bs = take(3, 2, skip=4)
    assert skipped == [[16, 17, 18, 19], [0, 1, 2, 3]] and (bs.epoch, bs.batch_in_epoch) == (1, 1)
    warmed, bw = take(3, 12, warm=True)
    assert warmed == one and (bw.epoch, bw.batch_in_epoch) == (2, 2)
    warm_skipped, _ = take(3, 2, skip=4, warm=True)
    assert warm_skipped == skipped
    failing = Batches(ray.data.from_items([{"input_ids": [1]}]).iterator(), kwargs, micro=4).warm()
    with pytest.raises(RuntimeError, match="yielded no batch"):  # the warming thread's error, in the caller
        failing.next()
    failing.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic high-detail set: 9 train images x 4 records -> 36 samples in 5 shards; 3 val images."""
    from pipelines.data.pack import PackConfig, pack
    from pipelines.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("data")
    generate(SynthConfig(output_dir=str(root / "raw"), num_images=12, min_side=448, max_side=672,
                         val_fraction=0.25, progress=False))
    pack(PackConfig(inputs=(str(root / "raw" / "train.json"),), output_dir=str(root / "wds" / "train"),
                    max_samples_per_shard=8, progress=False))
    return str(root / "wds" / "train")


def tiny_config(tmp, shards, name, *overrides):
    return load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml"), [
        f"name={name}", f"storage_path={tmp}/runs", f"export_dir={tmp}/export", f"data.manifest={shards}",
        "logging.tensorboard=true", *overrides])


def metric_lines(path: str) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def phase_model(run_dir: Path, phase_index: int) -> Path:
    """The phase's model, as its phase-end checkpoint records it (written once, outside the checkpoints)."""
    last = sorted(run_dir.glob(f"checkpoint-p{phase_index:02d}-s*"))[-1]
    state = json.loads((last / "train_state.json").read_text())
    assert state["phase_done"] and not (last / "model").exists()  # a checkpoint holds no second model copy
    assert Path(state["model"]).parent == run_dir / "phases", state["model"]
    return Path(state["model"])


def checkpoint_weights(run_dir: Path, phase_index: int) -> dict[str, torch.Tensor]:
    return load_file(str(phase_model(run_dir, phase_index) / "model.safetensors"))


def check_ddp_four_phases(summary: dict, run_dir: Path, export: Path) -> None:
    """``slime train --config train_tiny.yaml`` (2 DDP workers through the four paper phases): losses match
    the golden file; after each phase only its trainable prefixes changed (bit-identical elsewhere); the
    export is a servable model dir. ``summary`` is what ``train`` returned (the job prints it)."""
    from slime.predictor import Predictor

    phases = expand_phases(load_config(TrainConfig, str(CONFIGS / "train_tiny.yaml")))
    assert summary["phase_steps"] == [4, 4, 4, 4]

    steps, events = metric_lines(f"{run_dir}/logs/metrics.jsonl")
    assert [s["global_step"] for s in steps] == list(range(1, 17))
    assert {"phase_start", "phase_end"} <= {e["event"] for e in events}
    assert all(s["samples_per_s"] > 0 and s["visual_tokens_per_sample"] > 0 for s in steps)
    assert {s["phase"]: s["kept_local_fraction"] for s in steps}["III-joint"] == pytest.approx(0.75, abs=0.1)
    assert list(Path(f"{run_dir}/logs/tensorboard").glob("events.out.tfevents.*"))
    assert summary["loss_plot"] == f"{run_dir}/logs/loss.png"
    assert Path(summary["loss_plot"]).read_bytes()[:4] == b"\x89PNG"

    losses = [round(s["loss"], 6) for s in steps]
    if os.environ.get("SLIME_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "train_tiny.yaml as in the README (synth_tiny, 2 DDP workers, "
                                                "4 phases x 4 steps)", "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=1e-3)

    before = load_file(str(run_dir / "init_model" / "model.safetensors"))
    for index, phase in enumerate(phases):
        after = checkpoint_weights(run_dir, index)
        prefixes = tuple(p.rstrip(".") + "." for p in phase.trainable)
        # saved buffers (the resamplers' fixed sin-cos tables) never train: they count as frozen
        trainable = {k for k in after if k.startswith(prefixes) and not k.startswith("vision.")
                     and not k.endswith(".pos_embed")}
        assert trainable, phase.name
        frozen_changed = [k for k in after if k not in trainable and not torch.equal(before[k], after[k])]
        assert not frozen_changed, f"{phase.name}: frozen tensors changed: {frozen_changed[:5]}"
        unchanged = [k for k in trainable if torch.equal(before[k], after[k])]
        assert not unchanged, f"{phase.name}: trainable tensors did not change: {unchanged[:5]}"
        before = after

    predictor = Predictor.load(str(export))
    assert json.loads((export / "metadata.json").read_text())["phase"] == "III-joint"
    check_served_as_trained(run_dir, export, {0: ("global", 1.0), 2: ("local", 1.0), 3: ("both", 0.75)})
    assert (export / "EXPORT_COMPLETE").exists()
    assert predictor.cfg.max_length == 256


# ----------------------------------------------------------------------------- Ray runs


@pytest.mark.integration
@pytest.mark.extended  # make test runs tests/test_multinode.py's training test instead: failure, resume, S3, steps
def test_worker_failure_resumes_and_s3_storage(ray_session, shards, tmp_path, s3_bucket):
    """Rank 1 dies mid-phase on the first attempt; the run restores from a checkpoint, ends exactly at the
    configured step count, checkpoints + logs + export live on S3 (moto); re-running the same name
    resumes (nothing left to train) instead of starting over."""
    from pipelines import storage
    from pipelines.train.loop import train

    marker = tmp_path / "fault-marker"
    base = f"s3://{s3_bucket}"
    cfg = tiny_config(tmp_path, shards, "fault", f"storage_path={base}/runs", f"export_dir={base}/models/fault",
                      "phases=[{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, "
                      "steps: 4}, {name: II-local, trainable: [compressor], mode: local, lr: 1.0e-3, steps: 4}]",
                      "fault.global_step=7", "fault.rank=1", f"fault.marker={marker}", "checkpoint.num_to_keep=2",
                      "checkpoint.every_steps=2",
                      f"logging.local_dir={tmp_path}/logs")
    summary = train(cfg)
    assert marker.exists(), "the injected failure never fired"
    state = json.loads(storage.read_bytes(storage.join(summary["checkpoint"], "train_state.json")))
    assert (state["phase"], state["step"], state["global_step"], state["phase_done"]) == ("II-local", 4, 8, True)

    logs = storage.read_bytes(f"{base}/runs/fault/logs/metrics.jsonl").decode().splitlines()
    rows = [json.loads(line) for line in logs]
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert resumes and resumes[0]["checkpoint"], "the restarted workers did not restore a checkpoint"
    restored_at = resumes[0]["global_step"]  # whichever checkpoint survived (RAY_NOTES pitfall 11)
    assert 0 < restored_at < 7
    steps = [r["global_step"] for r in rows if "event" not in r]
    assert steps == list(range(1, 8)) + list(range(restored_at + 1, 9))

    assert storage.exists(f"{base}/models/fault/EXPORT_COMPLETE")
    assert storage.exists(f"{base}/models/fault/model.safetensors")
    from slime.checkpoint import load_pretrained

    model, _ = load_pretrained(f"{base}/models/fault")
    assert model.cfg.max_length == 256

    again = train(cfg)  # same name: resumes from the final checkpoint, trains nothing
    rows2 = [json.loads(line) for line in storage.read_bytes(f"{base}/runs/fault/logs/metrics.jsonl").decode()
             .splitlines()]
    new = rows2[len(rows):]
    assert any(r.get("event") == "resume" and r["phase_done"] and r["phase_index"] == 1 for r in new)
    assert not [r for r in new if "event" not in r], "a resumed, finished run must not train again"
    assert again["metrics"]["global_step"] == 8


@pytest.mark.integration
def test_deepspeed_zero3_on_cpu(ray_session, shards, tmp_path):
    """ZeRO-3 (parameters partitioned across the 2 workers) with gradient accumulation (2 micro-batches per step):
    a mid-phase checkpoint holds DeepSpeed's shards and the phase's start model by reference, the phase-end
    weights are gathered to full shapes, frozen weights stay bit-identical and the export loads. (ZeRO-2, with a
    worker failure and its resume, runs across two nodes in tests/test_multinode.py.)"""
    from pipelines.train.loop import train
    from slime.checkpoint import load_pretrained

    cfg = tiny_config(tmp_path, shards, "zero3", "engine.kind=deepspeed",
                      f"engine.deepspeed={CONFIGS / 'deepspeed_zero3.yaml'}", "optim.grad_accum=2",
                      "checkpoint.num_to_keep=null",
                      "checkpoint.every_steps=2", f"export_dir={tmp_path / 'export'}",
                      "phases=[{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, "
                      "steps: 2}, {name: III, trainable: [projector, global_adapter, compressor, llm], mode: both, "
                      "gamma: 0.75, lr: 1.0e-3, steps: 3}]")
    summary = train(cfg)
    run_dir = tmp_path / "runs" / "zero3"
    steps, _ = metric_lines(f"{run_dir}/logs/metrics.jsonl")
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(s["loss"]) for s in steps)
    init = load_file(str(run_dir / "init_model" / "model.safetensors"))
    mid = run_dir / "checkpoint-p01-s0000002"  # training state only: DeepSpeed's shards on top of phase 0's model
    assert (mid / "deepspeed" / "latest").exists() and not (mid / "model").exists()
    assert json.loads((mid / "train_state.json").read_text())["base_model"] == str(phase_model(run_dir, 0))
    final = checkpoint_weights(run_dir, 1)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in init.items()}  # gathered, not shards
    changed = {k for k in final if not torch.equal(init[k], final[k])}
    assert any(k.startswith("llm.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert not any(k.startswith("vision.") for k in changed)
    model, _ = load_pretrained(str(tmp_path / "export"))
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items() if k in final)
    assert summary["metrics"]["global_step"] == 5
    check_served_as_trained(run_dir, tmp_path / "export", {0: ("global", 1.0), 1: ("both", 0.75)})


def check_served_as_trained(run_dir: Path, export: Path, phases: dict[int, tuple[str, float]]) -> None:
    """Each phase-end checkpoint records its phase's visual mode and gamma as the model's serving defaults
    (slime_config.yaml and metadata.json); the export is the last phase's, and the Predictor uses them."""
    import yaml

    from slime.checkpoint import load_config
    from slime.predictor import Predictor

    for index, (mode, gamma) in phases.items():
        last = phase_model(run_dir, index)
        cfg = load_config(last)
        assert (cfg.visual_mode, cfg.local.gamma) == (mode, gamma), (last, cfg.visual_mode, cfg.local.gamma)
    mode, gamma = phases[max(phases)]
    saved = yaml.safe_load((export / "slime_config.yaml").read_text())
    assert (saved["visual_mode"], saved["local"]["gamma"]) == (mode, gamma)
    serving = json.loads((export / "metadata.json").read_text())["serving"]
    assert (serving["visual_mode"], serving["gamma"]) == (mode, gamma) and serving["local"] == saved["local"]
    predictor = Predictor.load(str(export))
    assert predictor.mode == mode and predictor.cfg.local.gamma == gamma


def test_text_fields_keep_the_text_as_typed(tmp_path):
    """YAML would turn ``name=1.10`` into 1.1 and ``007`` into 7; a text field keeps what was typed, in a
    file as on the command line, while numeric and untyped fields still get YAML's value."""
    path = tmp_path / "t.yaml"
    path.write_text((CONFIGS / "train_tiny.yaml").read_text() + "\nname: 1.10\n")
    cfg = load_config(TrainConfig, str(path), ["export_dir=007", "optim.weight_decay=3e-4", "data.manifest=2024"])
    assert (cfg.name, cfg.export_dir, cfg.optim.weight_decay) == ("1.10", "007", 3e-4)
    assert cfg.data["manifest"] == 2024 and type(cfg.data["manifest"]) is int  # untyped: YAML's own value
    assert type(cfg.name) is str and type(cfg.export_dir) is str
    import yaml
    from slime.config import to_dict
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg)))["name"] == "1.10"
    with pytest.raises(ValueError, match="name: expected a string"):
        load_config(TrainConfig, str(path), ["name=[a, b]"])
