"""SliME in miniature: a fast harness that trains the real ``slime`` modules on the fidelity tasks.

Path (said plainly, because it is not the Ray pipeline): images from ``pipelines.data.synth`` (kind
"fidelity") go through the real ``SlimeProcessor`` (tiling, template, ``<image>`` expansion) and, once,
through the frozen random vision tower + Dense Connector; the fused features are cached and fed to
``SlimeModel`` through its ``vision_features`` input (the pipeline's features mode). Training is a
direct torch loop over the phase list (``set_trainable`` + AdamW per phase), so a 5-variant
benchmark fits in minutes on 2 CPU cores. The pipeline path (Ray Data -> Ray Train -> evaluation)
is what ``make demo`` runs.

Accuracy is exact match under greedy decoding, computed in one teacher-forced pass: an answer counts
when the argmax at every supervised position (answer tokens and the end-of-turn token) is the
reference token, which is exactly when greedy generation would print the reference and stop.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slime.config import ModelConfig, replace
from slime.lora import LoraSpec, add_lora
from slime.model import SlimeModel, set_trainable
from slime.presets import build_tiny, mini
from slime.processing import SlimeProcessor


@dataclass(frozen=True)
class Phase:
    name: str
    trainable: tuple[str, ...]
    mode: str  # global | local | both
    steps: int
    lr: float
    gamma: float = 1.0
    forced_expert: int | None = None
    lora: LoraSpec | None = None  # PEFT LoRA on the LLM beside ``trainable`` (a last phase only, as in slime train)


def model_config(tile: int = 112, **local) -> ModelConfig:
    """The ``mini`` preset (slime/presets.py) with the chatml template (no system prompt: shorter
    sequences, same model). ``local`` overrides LocalConfig fields."""
    m = mini()
    return replace(m, vision=replace(m.vision, image_size=tile), local=replace(m.local, **local), template="chatml")


def schedule(variant: str, steps: int, pre: int, lr_pre: float = 1e-3, lr: float = 1e-3) -> list[Phase]:
    """global-only: I-a then a global joint phase. slime-g{gamma}: the paper's alternating I-a, I-b, II, III.
    end-to-end: one joint phase (gamma 0.75) with the same total number of steps as slime-g*. A ``-lora`` suffix
    (slime-g0.75-lora): phase III trains the LLM through LoRA (r 16, alpha 32, all projections) instead of fully,
    the visual modules fully, as SliME's LoRA scripts do."""
    lora = variant.endswith("-lora")
    variant = variant.removesuffix("-lora")
    ia = Phase("I-a", ("projector",), "global", pre, lr_pre, forced_expert=0)
    if variant == "global-only":
        return [ia, Phase("III", ("projector", "global_adapter", "llm"), "global", steps + 2 * pre, lr)]
    joint = ("projector", "global_adapter", "compressor", "llm")
    if variant == "end-to-end":
        return [Phase("joint", joint, "both", steps + 3 * pre, lr, gamma=0.75)]
    gamma = float(variant.removeprefix("slime-g"))
    last = (Phase("III", joint[:-1], "both", steps, lr, gamma=gamma, lora=LoraSpec(r=16, alpha=32.0, dropout=0.05))
            if lora else Phase("III", joint, "both", steps, lr, gamma=gamma))
    return [ia, Phase("I-b", ("global_adapter.resampler",), "global", pre, lr_pre, forced_expert=1),
            Phase("II", ("compressor",), "local", pre, lr_pre, gamma=1.0), last]


class Miniature:
    """Cached tower features + encoded text for one synthetic split pair; trains and scores models."""

    def __init__(self, raw_dir: str | Path, cfg: ModelConfig, seed: int = 0, tasks: tuple[str, ...] = (),
                 max_train: int | None = None) -> None:
        raw = Path(raw_dir)
        self.cfg, self.seed = cfg, seed
        model, self.tokenizer = build_tiny(seed, cfg)
        self.init_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.processor = SlimeProcessor(cfg, self.tokenizer)
        self.records = {s: [r for r in json.loads((raw / f"{s}.json").read_text())
                            if r["qtype"] != "caption" and (not tasks or r["task"] in tasks)] for s in ("train", "val")}
        if max_train is not None:
            keep = sorted({r["image"] for r in self.records["train"]})[:max_train]
            self.records["train"] = [r for r in self.records["train"] if r["image"] in set(keep)]
        images = sorted({r["image"] for s in self.records.values() for r in s})
        self.image_index = {name: i for i, name in enumerate(images)}
        feats, grids = [], []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                px, gr = [], []
                for name in images[start:start + 32]:
                    inputs = self.processor.image_inputs(Image.open(raw / name).convert("RGB"))
                    px.append(torch.from_numpy(inputs["pixel_values"][inputs["tile_mask"]]))
                    gr.append(inputs["grid"])
                px = torch.stack(px)  # [b, M, 3, S, S]; every fidelity image has the same 3x2 grid
                f = model.connector(model.vision(px.flatten(0, 1)))  # [b*M, P', Din]
                feats.append(f.view(px.shape[0], px.shape[1], *f.shape[1:]))
                grids += gr
        self.features = torch.cat(feats)  # [I, M, P', Din]
        self.grid = torch.as_tensor(np.stack(grids))  # [I, 2]
        self._encoded: dict = {}

    def standardize(self) -> None:
        """Per-dimension z-score of the cached tower features, with the training images' mean and std (a
        fixed affine map, the same for every variant and probe). The miniature's tower is random, so its
        feature dimensions have arbitrary scales; a pretrained tower's are better conditioned."""
        train = sorted({self.image_index[r["image"]] for r in self.records["train"]})
        f = self.features[train].float()
        mu, sd = f.mean(dim=(0, 1, 2)), f.std(dim=(0, 1, 2))
        self.features = ((self.features.float() - mu) / (sd + 1e-6)).to(self.features.dtype)

    def save(self, path: str | Path) -> None:
        """Everything a worker process needs (features, records, init weights), without the encodings."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_encoded", "processor", "tokenizer")}
        torch.save(state, path)

    @classmethod
    def load(cls, path: str | Path) -> "Miniature":
        mini = cls.__new__(cls)
        mini.__dict__.update(torch.load(path, weights_only=False))
        _, mini.tokenizer = build_tiny(mini.seed, mini.cfg)  # built offline, deterministic in (seed, cfg)
        mini.processor = SlimeProcessor(mini.cfg, mini.tokenizer)
        mini._encoded = {}
        return mini

    def fresh_model(self) -> SlimeModel:
        model, _ = build_tiny(self.seed, self.cfg)
        model.load_state_dict(self.init_state)
        return model

    def encoded(self, split: str, mode: str, gamma: float) -> dict[str, torch.Tensor]:
        key = (split, mode, gamma)
        if key not in self._encoded:
            rows = [self.processor.encode(r["conversations"], (self.cfg.vision.image_size * 3,
                                                               self.cfg.vision.image_size * 2), mode, gamma)
                    for r in self.records[split]]
            length = max(int(r["attention_mask"].sum()) for r in rows)
            enc = {k: torch.as_tensor(np.stack([r[k][:length] for r in rows]))
                   for k in ("input_ids", "attention_mask", "labels", "instruction_mask")}
            enc["image"] = torch.tensor([self.image_index[r["image"]] for r in self.records[split]])
            self._encoded[key] = enc
        return self._encoded[key]

    def _forward(self, model: SlimeModel, enc: dict, idx: torch.Tensor, mode: str, gamma: float,
                 forced_expert: int | None, labels: bool = True):
        img = enc["image"][idx]
        feats = self.features[img]
        return model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                     labels=enc["labels"][idx] if labels else None, vision_features=feats,
                     tile_mask=torch.ones(feats.shape[:2], dtype=torch.bool), grid=self.grid[img],
                     instruction_mask=enc["instruction_mask"][idx], has_image=torch.ones(len(idx), dtype=torch.bool),
                     mode=mode, gamma=gamma, forced_expert=forced_expert)

    def train(self, model: SlimeModel, phases: list[Phase], batch_size: int = 16, seed: int = 0) -> list[float]:
        """Direct loop: per phase set_trainable + AdamW; task-balanced batches drawn with replacement. Returns losses."""
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        losses = []
        by_task = self.task_rows("train")
        model.train()
        for phase in phases:
            names = set_trainable(model, phase.trainable) + (add_lora(model, phase.lora) if phase.lora else [])
            params = [model.get_parameter(n) for n in names]
            opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.0)
            enc = self.encoded("train", phase.mode, phase.gamma)
            for step in range(phase.steps):
                warm = min(1.0, (step + 1) / max(1, phase.steps // 20))
                for g in opt.param_groups:
                    g["lr"] = phase.lr * warm * 0.5 * (1 + math.cos(math.pi * step / phase.steps))
                idx = self.batch(by_task, batch_size, gen)
                out = self._forward(model, enc, idx, phase.mode, phase.gamma, phase.forced_expert)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(out.loss.item())
        model.eval()
        return losses

    def task_rows(self, split: str) -> list[torch.Tensor]:
        """Row indices of ``split`` per task: batches draw tasks evenly, whatever each task's share of rows."""
        rows = defaultdict(list)
        for i, r in enumerate(self.records[split]):
            rows[r["task"]].append(i)
        return [torch.tensor(v) for _, v in sorted(rows.items())]

    @staticmethod
    def batch(by_task: list[torch.Tensor], size: int, gen: torch.Generator) -> torch.Tensor:
        """``size`` rows drawn with replacement: a task uniformly, then a row of it uniformly."""
        tasks = torch.randint(0, len(by_task), (size,), generator=gen)
        return torch.stack([by_task[t][torch.randint(0, len(by_task[t]), (1,), generator=gen)[0]] for t in tasks])

    @torch.no_grad()
    def accuracy(self, model: SlimeModel, mode: str, gamma: float, split: str = "val",
                 batch_size: int = 64) -> dict[str, dict]:
        """task -> {accuracy, se, n} (exact match under greedy decoding, see the module docstring)."""
        model.eval()
        enc = self.encoded(split, mode, gamma)
        hits = []
        for start in range(0, len(enc["image"]), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(enc["image"])))
            logits = self._forward(model, enc, idx, mode, gamma, None, labels=False).logits
            target = enc["labels"][idx][:, 1:]
            pred = logits[:, :-1].argmax(-1)
            ok = (pred == target) | (target == -100)
            hits += ok.all(-1).tolist()
        return summarize(self.records[split], hits)

    def answers(self, task: str, split: str = "train") -> list[str]:
        return [r["conversations"][-1]["value"] for r in self.records[split] if r["task"] == task]


def summarize(records: list[dict], hits: list[bool]) -> dict[str, dict]:
    by_task = defaultdict(list)
    for r, h in zip(records, hits):
        by_task[r["task"]].append(float(h))
    return {t: stat(v) for t, v in sorted(by_task.items())}


def stat(values: list[float]) -> dict:
    n = len(values)
    p = sum(values) / n if n else 0.0
    return {"accuracy": round(p, 4), "se": round(math.sqrt(p * (1 - p) / n), 4) if n else 0.0, "n": n}


def chance(mini: Miniature) -> dict[str, dict]:
    """Always answering the most common training answer of the task."""
    out = {}
    for task in sorted({r["task"] for r in mini.records["val"]}):
        train = mini.answers(task, "train")
        guess = max(set(train), key=train.count)
        out[task] = stat([float(a == guess) for a in mini.answers(task, "val")])
    return out


def probe(x_train: torch.Tensor, y_train: list[str], x_val: torch.Tensor, y_val: list[str],
          steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic probe (weight decay picked on a 20 %
    slice of the training set from a small grid, then refit on all of it)."""
    classes = sorted(set(y_train) | set(y_val))
    yt = torch.tensor([classes.index(y) for y in y_train])
    yv = torch.tensor([classes.index(y) for y in y_val])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = (x_train - mean) / std, (x_val - mean) / std

    def fit(x, y, wd):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(x.shape[1], len(classes))
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(x), y) + wd * lin.weight.square().sum()
            loss.backward()
            opt.step()
        return lin

    cut = int(0.8 * len(yt))
    best = max((1e-4, 1e-3, 1e-2), key=lambda wd: (fit(xt[:cut], yt[:cut], wd)(xt[cut:]).argmax(-1)
                                                   == yt[cut:]).float().mean().item())
    lin = fit(xt, yt, best)
    with torch.no_grad():
        return round((lin(xv).argmax(-1) == yv).float().mean().item(), 4)


def view_probe(mini: Miniature, task: str, view: str) -> float:
    """Probe reading ``task``'s answer from the features of the global view (tile 0) or of the crops."""
    def x(split):
        imgs = torch.tensor([mini.image_index[r["image"]] for r in mini.records[split] if r["task"] == task])
        f = mini.features[imgs]  # [R, M, P', Din]
        return (f[:, 0] if view == "global" else f[:, 1:]).flatten(1)

    return probe(x("train"), mini.answers(task, "train"), x("val"), mini.answers(task, "val"))
