"""Which local tokens the question keeps: the selector's view of one (image, question) pair (SliME A3).

``explain_selection`` runs the model's own visual path once (``SlimeModel.prepare_inputs``) and records,
at the selector, the local tokens and instruction embeddings it was given; from those it reports the
relevance score of every local token, the indices the selector keeps (``TextGuidedSelector.select``,
the same call its forward makes), where each token sits on the tiled canvas and the token budget. A
picture of it is drawn by ``pipelines.plots.plot_explanation``.

Token placement: local tokens are in raster order over the (rows*q) x (cols*q) token map of the crop
canvas (q = sqrt(queries per crop)), so token i covers the canvas cell (i // (cols*q), i % (cols*q)) of
side S/q pixels. The canvas is the image resized onto cols*S x rows*S with black padding, which is
what the crops are cut from (``slime.tiling.tile_image``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from slime.tiling import _resize_and_pad, count_visual_tokens


@dataclass
class Explanation:
    canvas: np.ndarray  # [rows*S, cols*S, 3] uint8: what the crops were cut from
    grid: tuple[int, int]  # (cols, rows)
    tile: int  # S
    q: int  # tokens per crop side
    scores: np.ndarray  # [L] relevance of each local token (raster order)
    kept: np.ndarray  # [K'] indices of the kept tokens (valid ones only), ascending
    budget: dict  # global / separator / local before and after selection / total
    gamma: float
    question: str
    answer: str = ""

    def cell(self, index: int) -> tuple[int, int, int, int]:
        """Canvas box (x0, y0, x1, y1) of local token ``index``."""
        cols, _ = self.grid
        row, col = divmod(int(index), cols * self.q)
        side = self.tile / self.q
        return (round(col * side), round(row * side), round((col + 1) * side), round((row + 1) * side))


@torch.no_grad()
def explain_selection(predictor, image: Image.Image, question: str, gamma: float | None = None) -> Explanation:
    """The selector's decision for ``question`` on ``image`` with ``predictor``'s model (eval mode)."""
    from slime.predictor import ChatRequest

    model, cfg = predictor.model, predictor.cfg
    gamma = cfg.local.gamma if gamma is None else float(gamma)
    if predictor.mode != "both":
        raise ValueError(f"explain needs the local branch; this predictor feeds {predictor.mode!r} tokens only")
    image = image.convert("RGB")
    sample = predictor.encode(ChatRequest(messages=[{"role": "user", "content": question}], images=[image],
                                          gamma=gamma))
    batch = predictor.processor.pad_for_generation([sample])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    seen: dict = {}

    def record(_module, args, output):
        seen["tokens"], seen["text"] = args[0], args[1]
        seen["output"] = output

    handle = model.selector.register_forward_hook(record)
    try:
        model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["tile_mask"],
                             batch["grid"], batch["instruction_mask"], batch["has_image"], mode="both", gamma=gamma)
    finally:
        handle.remove()
    tokens, text = seen["tokens"], seen["text"]
    scores = model.selector.scores(tokens, text)
    idx, valid = model.selector.select(tokens, text, gamma)
    cols, rows = (int(v) for v in batch["grid"][0])
    side = cfg.vision.image_size
    budget = count_visual_tokens(image.width, image.height, cfg, gamma=gamma).as_dict()
    budget["kept_local_tokens"] = int(valid.sum())  # nucleus: what was actually kept, not the slots
    return Explanation(canvas=np.asarray(_resize_and_pad(image, cols * side, rows * side)), grid=(cols, rows),
                       tile=side, q=math.isqrt(cfg.local.num_queries), scores=scores.float().cpu().numpy(),
                       kept=idx[valid].cpu().numpy(), budget=budget, gamma=gamma, question=question)
