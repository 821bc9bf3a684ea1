"""The local branch still learns: a regression test in seconds-to-a-minute, not a benchmark.

The ``mini`` preset (benchmarks/miniature.py: real SlimeModel, cached frozen-tower features, direct torch
loop) on the fidelity ``texture`` task only (a 1-px complementary-colour checkerboard on mid-grey: the
global view sees grey, so only the local branch can answer) for a few dozen steps of one joint phase
at gamma 0.75 (compressor, selector and splice all on the path). It fails when a change stops the local
branch from carrying what only the crops show; the golden loss file only notices that something changed.
"""

from __future__ import annotations

import pytest

from benchmarks.miniature import Miniature, Phase, chance, model_config
from pipelines.data.synth import SynthConfig, generate

JOINT = ("projector", "global_adapter", "compressor", "llm")
STEPS = 100


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    raw = tmp_path_factory.mktemp("fidelity")
    generate(SynthConfig(output_dir=str(raw), kind="fidelity", num_images=460, val_fraction=60 / 460,
                         tasks=("texture",), captions=False, progress=False))
    return Miniature(raw, model_config())


def test_local_branch_learns_a_local_only_task(mini):
    model = mini.fresh_model()
    losses = mini.train(model, [Phase("joint", JOINT, "both", STEPS, 1e-3, gamma=0.75)], batch_size=16)
    acc = mini.accuracy(model, "both", 0.75)["texture"]
    base = chance(mini)["texture"]["accuracy"]
    # 400 training images: few enough to cache in seconds, enough that memorising images does not pay
    assert acc["n"] == 60 and losses[-1] < losses[0]
    assert acc["accuracy"] > base + 0.4, (acc, base)  # chance ~0.25; a learning local branch gets ~1.0


def test_batches_draw_tasks_evenly_whatever_their_share_of_rows():
    import torch

    # 900 rows of one task, 100 of another: uniform row sampling would give 10 % of the second
    by_task = [torch.arange(900), torch.arange(900, 1000)]
    rows = torch.cat([Miniature.batch(by_task, 16, torch.Generator().manual_seed(s)) for s in range(100)])
    share = (rows >= 900).float().mean().item()
    assert rows.shape == (1600,) and 0.45 < share < 0.55, share
