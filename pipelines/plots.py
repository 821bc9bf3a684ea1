"""Pictures people would rather look at than read: training loss per phase, evaluation accuracy per task.

    plot_training(metrics.jsonl rows) -> loss.png   loss per optimizer step, one colour per phase, phase
                                                    boundaries marked, learning rate on a second axis
    plot_accuracy(metrics.json dict)  -> accuracy.png  accuracy per task (or qtype) with the task's
                                                    chance (pipelines.evaluate.chance) marked on each bar

matplotlib with the headless Agg backend; nothing here needs a display. Both return PNG bytes so the
caller writes them next to the numbers they show (local or s3:// through pipelines.storage).
"""

from __future__ import annotations

import io
import json


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=110)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def read_jsonl(data: bytes) -> list[dict]:
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write: the rest is still worth plotting
            continue
    return rows


def step_rows(rows: list[dict]) -> list[dict]:
    """The per-step rows of a run log, last attempt wins: a resumed run re-logs the steps after its
    checkpoint, and the curve should show each global step once."""
    by_step: dict[int, dict] = {}
    for r in rows:
        if "event" not in r and "global_step" in r and "loss" in r:
            by_step[int(r["global_step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_training(rows: list[dict], title: str = "training") -> bytes:
    steps = step_rows(rows)
    plt, fig = _figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("global optimizer step")
    ax.set_ylabel("loss")
    if not steps:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return _png(plt, fig)
    phases: list[str] = []
    for r in steps:
        if not phases or phases[-1] != r["phase"]:
            phases.append(r["phase"])
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(dict.fromkeys(phases)):
        pts = [(r["global_step"], r["loss"]) for r in steps if r["phase"] == name]
        ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None, color=cmap(i % 10), label=name)
    first = {}
    for r in steps:
        first.setdefault(r["phase"], r["global_step"])
    for name, s in list(first.items())[1:]:  # a dashed line where each later phase starts
        ax.axvline(s - 0.5, color="grey", linestyle="--", linewidth=0.8)
    lr_ax = ax.twinx()
    lr_ax.plot([r["global_step"] for r in steps], [r.get("lr", 0.0) for r in steps], color="black",
               linewidth=0.8, alpha=0.5, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = lr_ax.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper right", fontsize=8)
    ax.set_title(f"{title}: loss per phase ({len(steps)} steps)")
    return _png(plt, fig)


def plot_accuracy(metrics: dict, title: str = "evaluation") -> bytes:
    """Bars of accuracy per task (``per_task`` if present, else ``per_qtype``), chance as a black tick."""
    groups = metrics.get("per_task") or metrics.get("per_qtype") or {}
    names = sorted(groups)
    plt, fig = _figure(max(5.5, 1.1 * len(names) + 2), 4.6)
    ax = fig.add_subplot(1, 1, 1)
    acc = [groups[n]["accuracy"] for n in names]
    bars = ax.bar(names, acc, color="tab:blue", label="accuracy")
    for i, n in enumerate(names):
        chance = groups[n].get("chance")
        if chance is not None:
            ax.hlines(chance, i - 0.4, i + 0.4, colors="black", linewidth=2,
                      label="chance (uniform over the task's answers)" if i == 0 else None)
        top = max(acc[i], chance or 0.0)  # the label sits above the bar and its chance tick
        ax.text(i, top + 0.02, f"{acc[i]:.2f}\nn={groups[n]['num_samples']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("accuracy")
    errors = metrics.get("errors", 0)
    ax.set_title(f"{title}\noverall {metrics.get('accuracy', 0.0):.3f} on {metrics.get('num_samples', 0)} questions"
                 + (f" ({errors} failed, counted wrong)" if errors else ""), pad=22, fontsize=10)
    if bars:  # above the axes, under the title: inside them it covered a bar's label
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return _png(plt, fig)


def plot_explanation(ex) -> bytes:
    """A ``slime.explain.Explanation``: the crop canvas with its grid, every local token's relevance as a
    heatmap cell where the token sits, kept tokens outlined, the token budget in the title."""
    import numpy as np

    cols, rows = ex.grid
    h, w = ex.canvas.shape[:2]
    plt, fig = _figure(max(6.0, 6.0 * w / h), 6.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(ex.canvas)
    heat = ex.scores.reshape(rows * ex.q, cols * ex.q)
    shown = ax.imshow(heat, cmap="inferno", alpha=0.45, extent=(0, w, h, 0), interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.01, label="relevance to the question")
    from matplotlib.patches import Rectangle

    for i in np.asarray(ex.kept):
        x0, y0, x1, y1 = ex.cell(int(i))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.2))
    for c in range(1, cols):  # the crop grid
        ax.axvline(c * ex.tile, color="white", linewidth=2)
    for r in range(1, rows):
        ax.axhline(r * ex.tile, color="white", linewidth=2)
    b = ex.budget
    ax.set_title(f"Q: {ex.question}\nA: {ex.answer!r}   grid {cols}x{rows}, gamma {ex.gamma:g}: "
                 f"{b['global_tokens']} global + {b['separator_tokens']} sep + {b['kept_local_tokens']}/"
                 f"{b['local_tokens']} local kept (outlined) = {b['global_tokens'] + b['separator_tokens'] + b['kept_local_tokens']} tokens",
                 fontsize=9)
    ax.set_axis_off()
    return _png(plt, fig)
