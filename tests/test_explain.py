"""`slime explain`: the kept cells are exactly the selector's indices, every local token is drawn where
it sits on the crop canvas, the picture is written, and the selection depends on the question."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from slime.config import replace
from slime.explain import explain_selection
from slime.local import raster_layout
from slime.predictor import ChatRequest, Predictor
from slime.presets import build_tiny, tiny


@pytest.fixture(scope="module")
def predictor():
    t = tiny()  # 16 queries per crop (4x4) so placement is not trivially one cell per crop
    model, tokenizer = build_tiny(0, replace(t, local=replace(t.local, num_queries=16)))
    return Predictor(model, tokenizer)


def image(w=150, h=100, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("gamma", [0.5, 0.75, 1.0])
def test_kept_cells_are_the_indices_the_model_used(predictor, gamma):
    img = image()
    used = {}
    handle = predictor.model.selector.register_forward_hook(
        lambda _m, args, out: used.update(tokens=args[0], kept=out[0], valid=out[1]))
    try:  # the model's own generation path, hooked at the selector
        predictor.generate([ChatRequest(messages=[{"role": "user", "content": "Where is the mark?"}], images=[img],
                                        gamma=gamma, max_tokens=1)])
    finally:
        handle.remove()
    ex = explain_selection(predictor, img, "Where is the mark?", gamma)
    assert torch.equal(used["kept"][used["valid"]], used["tokens"][torch.as_tensor(ex.kept)])
    num_local = used["tokens"].shape[0]
    assert len(ex.kept) == ex.budget["kept_local_tokens"] == int(np.ceil(gamma * num_local))
    assert ex.budget["local_tokens"] == num_local == ex.scores.shape[0]
    assert list(ex.kept) == sorted(set(ex.kept))


def test_every_token_sits_in_its_own_crop_and_cell(predictor):
    ex = explain_selection(predictor, image(), "Where is the mark?")
    cols, rows = ex.grid
    q, side = ex.q, ex.tile
    # Label each (crop, query) and lay the labels out exactly as the model lays out local tokens.
    n = cols * rows
    labels = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(q * q), indexing="ij"), -1).float()  # [n, Q, 2]
    raster = raster_layout(labels, cols, rows)  # [L, 2]
    covered = np.zeros(ex.canvas.shape[:2], int)
    for i, (crop, query) in enumerate(raster.long().tolist()):
        x0, y0, x1, y1 = ex.cell(i)
        crow, ccol = divmod(crop, cols)
        qy, qx = divmod(query, q)
        assert (x0, y0) == (round(ccol * side + qx * side / q), round(crow * side + qy * side / q))
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()  # the cells tile the whole canvas once


def test_job_writes_the_picture_and_follows_the_question(tmp_path, predictor, capsys):
    from jobs.explain import main
    from slime.checkpoint import save_pretrained

    model_dir = save_pretrained(predictor.model, predictor.tokenizer, tmp_path / "model")
    img_path = tmp_path / "img.png"
    image(300, 200, seed=1).save(img_path)
    outs = []
    for question in ("What colour is the small mark in the top-left corner?", "How many large circles are there?"):
        out = tmp_path / f"{len(outs)}.png"
        assert main(["--model", str(model_dir), "--image", str(img_path), "--question", question, "--gamma", "0.5",
                     "--out", str(out), "--max-tokens", "2"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert Image.open(io.BytesIO(out.read_bytes())).size[0] > 400
    assert outs[0]["kept"] == outs[0]["budget"]["kept_local_tokens"] == outs[0]["budget"]["local_tokens"] // 2
    a = explain_selection(predictor, Image.open(img_path), "What colour is the small mark in the top-left corner?")
    b = explain_selection(predictor, Image.open(img_path), "How many large circles are there?")
    assert not np.allclose(a.scores, b.scores)  # relevance is to the question, not to the image alone
    assert main(["--model", str(tmp_path / "nope"), "--image", str(img_path), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
