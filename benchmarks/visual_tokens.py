"""Visual tokens per image: SliME (gamma 1.0 / 0.75 / 0.5) vs LLaVA-1.5 (576) vs LLaVA-NeXT any-res.

SliME counts come from ``slime.tiling.count_visual_tokens`` with the ``slime-7b`` preset (CLIP-L/336,
144 queries per crop, 576 global tokens + 1 separator). LLaVA-NeXT counts come from transformers' own
helpers (``LlavaNextProcessor._get_number_of_features``: base 576 + unpadded grid features + one
newline per feature row) with the default grid pinpoints. Prefill time is the tiny preset's LLM run
on random embeddings of each length (median of ``--repeats``), so the ratio, not the absolute value,
is what carries over to a real model.

    python benchmarks/visual_tokens.py [--repeats 5] [--threads 1] [--sizes 640x480 1920x1080 ...]

Run on demand; never part of the test pass/fail. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SIZES = ["336x336", "640x480", "1024x768", "1920x1080", "2000x500", "4000x300", "1344x1344"]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA15_TOKENS = 576
GAMMAS = (1.0, 0.75, 0.5)


def llava_next_counter():
    """(w, h) -> (crops, rows x cols grid, tokens) using transformers' LLaVA-NeXT code paths."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)

    from slime.tokenizer import build_tiny_tokenizer

    # The PIL image processor: same pinpoints and counting, no torchvision needed.
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=NEXT_PINPOINTS, size={"shortest_edge": 336},
                                              crop_size={"height": 336, "width": 336})
    # num_additional_image_tokens=0: the "default" feature strategy drops CLS, so the base view is 576.
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=0,
                                   image_token="<image>")

    def count(width: int, height: int) -> tuple[int, str, int]:
        crops = image_size_to_num_patches((height, width), NEXT_PINPOINTS, 336) - 1  # minus the base view
        rows, cols = get_anyres_image_grid_shape((height, width), NEXT_PINPOINTS, 336)
        return crops, f"{cols}x{rows}", processor._get_number_of_features(height, width, 336, 336)

    return count


def prefill_ms(lengths: list[int], repeats: int) -> dict[int, float]:
    """Median ms of one no-cache forward of the tiny LLM on random embeddings, per sequence length.
    Lengths are timed round-robin so a change in machine load hits all of them alike."""
    from slime.config import replace
    from slime.llm import build_llm
    from slime.presets import tiny

    cfg = tiny().llm
    torch.manual_seed(0)
    llm = build_llm(replace(cfg, max_position=8192), cfg.vocab_size).eval()
    width = llm.get_input_embeddings().weight.shape[1]
    inputs = {n: torch.randn(1, n, width) for n in sorted(set(lengths))}
    runs: dict[int, list[float]] = {n: [] for n in inputs}
    with torch.no_grad():
        for x in inputs.values():
            llm(inputs_embeds=x, use_cache=False)  # warm-up
        for _ in range(repeats):
            for n, x in inputs.items():
                start = time.perf_counter()
                llm(inputs_embeds=x, use_cache=False)
                runs[n].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(r) for n, r in runs.items()}


def rows(sizes: list[str], repeats: int) -> list[list[str]]:
    from slime.presets import preset
    from slime.tiling import count_visual_tokens

    cfg = preset("slime-7b")
    next_count = llava_next_counter()
    counted = []
    for size in sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        slime = [count_visual_tokens(w, h, cfg, gamma=g) for g in GAMMAS]
        counted.append((w, h, slime, *next_count(w, h)))
    lengths = [LLAVA15_TOKENS]
    for _, _, slime, _, _, next_tokens in counted:
        lengths += [slime[0].total_tokens, slime[2].total_tokens, next_tokens]
    ms = prefill_ms(lengths, repeats)
    out = []
    for w, h, slime, next_crops, next_grid, next_tokens in counted:
        tokens = [b.total_tokens for b in slime]
        cols, nrows = slime[0].grid
        out.append([f"{w}x{h}", f"{cols}x{nrows} ({slime[0].crops})", *map(str, tokens), str(LLAVA15_TOKENS),
                    f"{next_grid} ({next_crops})", str(next_tokens),
                    f"{tokens[0] / next_tokens:.2f} / {tokens[2] / next_tokens:.2f}",
                    *(f"{ms[n]:.1f}" for n in (tokens[0], tokens[2], LLAVA15_TOKENS, next_tokens))])
    return out


HEADER = ["image", "SliME grid (crops)", "SliME γ=1.0", "SliME γ=0.75", "SliME γ=0.5", "LLaVA-1.5",
          "NeXT grid (crops)", "LLaVA-NeXT", "SliME/NeXT (γ=1 / 0.5)", "prefill ms SliME γ=1", "SliME γ=0.5",
          "LLaVA-1.5", "LLaVA-NeXT"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="WxH image sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefill runs per length (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = rows(args.sizes, args.repeats)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in table:
        print("| " + " | ".join(r) + " |")
    print(f"\nSliME: slime-7b preset (CLIP-L/336, 576 global + 1 separator + ceil(γ·144·crops) local). "
          f"LLaVA-NeXT pinpoints {NEXT_PINPOINTS}. Prefill: tiny preset LLM "
          f"(2 layers, width 64), CPU, threads={torch.get_num_threads()}, median of {args.repeats}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
