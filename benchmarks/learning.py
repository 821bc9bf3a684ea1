"""Less is more, in miniature: does the local branch learn what the global view cannot see?

Trains a small random model (frozen random CLIP 112/14 x 64 wide x 4 layers, Llama 128 wide x 4 layers,
16 queries per local crop) on the synthetic high-detail set, CPU only, through the real pipelines
(pack -> Ray Data -> Ray Train -> Ray Data evaluation with the serving Predictor), and reports validation
accuracy per question type for a global-only model, SliME with gamma 1.0 and SliME with gamma 0.75, beside
the chance level (majority training answer of each task).

The question types are restricted to what a small model can learn in minutes: ``corner_color`` (detail:
with ``detail_scale`` 0.03 the mark is 4.5 % of the short side, 27-45 px on 600-1000 px images, i.e. ~5 px
in the 112 px global view and roughly a 14 px patch in a local crop), ``background`` and ``large_color``
(global). Captions are not generated.

    python -m benchmarks.learning [--images 240] [--steps 600] [--pre-steps 30]   # ~17 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TASKS = ("corner_color", "background", "large_color")  # detail, global, global


def chance(train: list[dict], val: list[dict]) -> dict[str, float]:
    """Accuracy of always answering the most common training answer of the record's task."""
    by_task = collections.defaultdict(collections.Counter)
    for r in train:
        by_task[r["task"]][r["conversations"][-1]["value"]] += 1
    hits = collections.defaultdict(list)
    for r in val:
        guess = by_task[r["task"]].most_common(1)[0][0] if by_task[r["task"]] else ""
        hit = guess == r["conversations"][-1]["value"]
        hits[r["qtype"]].append(hit)
        hits["all"].append(hit)
    return {q: sum(h) / len(h) for q, h in hits.items()}


def model_config():
    """tiny() made just large enough to learn: 112 px tiles (64 patches), 16 queries per crop."""
    from slime.config import replace
    from slime.presets import tiny

    t = tiny()
    return replace(t, vision=replace(t.vision, image_size=112, patch_size=14, hidden_dim=64, intermediate_dim=128,
                                     num_layers=4, num_heads=4),
                   local=replace(t.local, num_queries=16, num_heads=4),
                   llm=replace(t.llm, hidden_dim=128, intermediate_dim=256, num_layers=4, num_heads=4, num_kv_heads=2),
                   max_length=320)


def schedule(variant: str, steps: int, pre: int, lr_connector: float, lr_joint: float) -> str:
    ia = (f"{{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: {lr_connector}, "
          f"steps: {pre}}}")
    if variant == "global-only":
        joint = (f"{{name: III, trainable: [projector, global_adapter, llm], mode: global, lr: {lr_joint}, "
                 f"steps: {steps}}}")
        return f"[{ia}, {joint}]"
    gamma = {"slime-g1.0": 1.0, "slime-g0.75": 0.75}[variant]
    ib = (f"{{name: I-b, trainable: [global_adapter.resampler], mode: global, forced_expert: 1, "
          f"lr: {lr_connector}, steps: {pre}}}")
    ii = f"{{name: II, trainable: [compressor], mode: local, gamma: 1.0, lr: {lr_connector}, steps: {pre}}}"
    joint = (f"{{name: III, trainable: [projector, global_adapter, compressor, llm], mode: both, gamma: {gamma}, "
             f"lr: {lr_joint}, steps: {steps}}}")
    return f"[{ia}, {ib}, {ii}, {joint}]"


def main() -> None:
    import ray

    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.pack import PackConfig, pack
    from pipelines.synth import SynthConfig, generate
    from pipelines.train import train
    from pipelines.train_config import TrainConfig
    from slime.config import from_dict, load_config
    from slime.presets import save_tiny_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--steps", type=int, default=600, help="joint-phase (III) steps")
    ap.add_argument("--pre-steps", type=int, default=30, help="steps of each earlier phase (I-a, I-b, II)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr-connector", type=float, default=3e-3, help="phases I-a, I-b, II")
    ap.add_argument("--lr-joint", type=float, default=1e-3, help="phase III (LLM + connectors)")
    ap.add_argument("--detail-scale", type=float, default=0.03, help="small-type height / short side")
    ap.add_argument("--variants", default="global-only,slime-g1.0,slime-g0.75")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="slime-learning-")
    t0 = time.perf_counter()
    # 3 detail + 3 global questions per image would be drawn; all 7 templates are asked (4 detail, 3
    # global), then only TASKS are kept.
    generate(SynthConfig(output_dir=f"{work}/raw", num_images=args.images, min_side=600, max_side=1000,
                         val_fraction=0.125, captions=False, progress=False, questions_per_image=7,
                         detail_fraction=4 / 7, detail_scale=args.detail_scale))
    recs = {}
    for split in ("train", "val"):
        recs[split] = [r for r in json.load(open(f"{work}/raw/{split}.json")) if r["task"] in TASKS]
        with open(f"{work}/raw/{split}-subset.json", "w") as f:
            json.dump(recs[split], f)
        pack(PackConfig(inputs=(f"{work}/raw/{split}-subset.json",), output_dir=f"{work}/wds/{split}",
                        progress=False))
    init = str(save_tiny_checkpoint(f"{work}/init_model", seed=0, cfg=model_config()))
    print(f"data + init model: {time.perf_counter() - t0:.0f} s; train {len(recs['train'])} / val "
          f"{len(recs['val'])} questions; work dir {work}", flush=True)
    ray.init(num_cpus=2, include_dashboard=False)
    table = {"chance (majority per task)": chance(recs["train"], recs["val"])}
    walls = {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        cfg = load_config(TrainConfig, "jobs/configs/train_tiny.yaml", [
            f"name=learn-{variant}", f"storage_path={work}/runs", f"export_dir={work}/models/{variant}",
            f"init_from={init}", f"data.manifest={work}/wds/train", "data.shuffle=files",
            f"phases={schedule(variant, args.steps, args.pre_steps, args.lr_connector, args.lr_joint)}",
            "scaling.num_workers=1", "scaling.resources_per_worker={CPU: 1}",
            f"optim.micro_batch_size={args.micro_batch}", "optim.warmup_ratio=0.05",
            "checkpoint.every_steps=100000", "checkpoint.num_to_keep=1", "logging.every_steps=50",
            "logging.tensorboard=false", "seed=0"])
        train(cfg)
        trained = time.perf_counter()
        m = evaluate(from_dict(EvalConfig, {
            "model": f"{work}/models/{variant}", "data": {"val": f"{work}/wds/val"},
            "output": f"{work}/eval/{variant}/metrics.json", "max_tokens": 4, "batch_size": 16,
            "mode": "global" if variant == "global-only" else "both"}))
        walls[variant] = (trained - start, time.perf_counter() - trained)
        table[variant] = {"all": m["accuracy"], **{q: v["accuracy"] for q, v in m["per_qtype"].items()}}
        preds = [json.loads(x) for x in open(f"{work}/eval/{variant}/predictions.jsonl")]
        print(variant, json.dumps(table[variant]), "sample predictions:",
              [(p["task"], p["reference"], p["prediction"]) for p in preds[:6]], flush=True)
    n_val = len(recs["val"])
    counts = collections.Counter(r["qtype"] for r in recs["val"])
    print(f"\n| model | all | detail (n={counts['detail']}) | global (n={counts['global']}) | train s | eval s |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        tw, ew = walls.get(name, (0.0, 0.0))
        print(f"| {name} | {row.get('all', 0):.3f} | {row.get('detail', 0):.3f} | {row.get('global', 0):.3f} | "
              f"{tw:.0f} | {ew:.0f} |")
    print(f"\nval: {n_val} questions on {round(args.images * 0.125)} unseen images; tasks {list(TASKS)}; "
          f"total wall {time.perf_counter() - t0:.0f} s; work dir {work}")


if __name__ == "__main__":
    main()
