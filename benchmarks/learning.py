"""Does the local branch learn? Train the tiny model on the synthetic high-detail set (CPU, Ray Train) and
report validation accuracy per question type for a global-only model, SliME with gamma 1.0 and SliME with
gamma 0.75, beside the chance level (majority answer per question template, from the training split).

    python -m benchmarks.learning [--images 96] [--steps 150]      # ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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


def schedule(variant: str, steps: int) -> str:
    ia = f"{{name: I-a, trainable: [projector], mode: global, forced_expert: 0, lr: 1.0e-3, steps: {steps // 3}}}"
    if variant == "global-only":
        joint = (f"{{name: III, trainable: [projector, global_adapter, llm], mode: global, lr: 5.0e-4, "
                 f"steps: {steps}}}")
        return f"[{ia}, {joint}]"
    gamma = {"slime-g1.0": 1.0, "slime-g0.75": 0.75}[variant]
    ib = (f"{{name: I-b, trainable: [global_adapter.resampler], mode: global, forced_expert: 1, lr: 1.0e-3, "
          f"steps: {steps // 3}}}")
    ii = f"{{name: II, trainable: [compressor], mode: local, gamma: 1.0, lr: 1.0e-3, steps: {steps // 3}}}"
    joint = (f"{{name: III, trainable: [projector, global_adapter, compressor, llm], mode: both, gamma: {gamma}, "
             f"lr: 5.0e-4, steps: {steps}}}")
    return f"[{ia}, {ib}, {ii}, {joint}]"


def main() -> None:
    import ray

    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.pack import PackConfig, pack
    from pipelines.synth import SynthConfig, generate
    from pipelines.train import train
    from pipelines.train_config import TrainConfig
    from slime.config import from_dict, load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--steps", type=int, default=150, help="joint-phase steps (earlier phases: a third each)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="slime-learning-")
    generate(SynthConfig(output_dir=f"{work}/raw", num_images=args.images, min_side=448, max_side=896,
                         val_fraction=0.125, captions=False, progress=False))
    for split in ("train", "val"):
        pack(PackConfig(inputs=(f"{work}/raw/{split}.json",), output_dir=f"{work}/wds/{split}", progress=False))
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    train_recs, val_recs = (json.load(open(f"{work}/raw/{s}.json")) for s in ("train", "val"))
    table = {"chance (majority per task)": chance(train_recs, val_recs)}
    for variant in ("global-only", "slime-g1.0", "slime-g0.75"):
        cfg = load_config(TrainConfig, "jobs/configs/train_tiny.yaml", [
            f"name=learn-{variant}", f"storage_path={work}/runs", f"export_dir={work}/models/{variant}",
            f"data.manifest={work}/wds/train", f"phases={schedule(variant, args.steps)}",
            "optim.micro_batch_size=4", "checkpoint.every_steps=1000", "checkpoint.num_to_keep=1",
            "logging.every_steps=25", "seed=0"])
        train(cfg)
        m = evaluate(from_dict(EvalConfig, {"model": f"{work}/models/{variant}", "data": {"val": f"{work}/wds/val"},
                                            "output": f"{work}/models/{variant}-metrics.json", "max_tokens": 6}))
        table[variant] = {"all": m["accuracy"], **{q: v["accuracy"] for q, v in m["per_qtype"].items()}}
        print(variant, json.dumps(table[variant]), flush=True)
    print(f"\n{'model':<28} {'all':>6} {'detail':>7} {'global':>7}")
    for name, row in table.items():
        print(f"{name:<28} {row.get('all', 0):6.3f} {row.get('detail', 0):7.3f} {row.get('global', 0):7.3f}")
    print(f"(val: {len(val_recs)} questions on {round(args.images * 0.125)} unseen images; work dir {work})")


if __name__ == "__main__":
    main()
