"""`slime tokens --width W --height H [--preset NAME] [--gamma G] [--mode both]`

Prints one JSON object: how many visual tokens an image of that size becomes (grid, crops, global,
separator, local before selection, kept local, total) without loading a model. The same function
expands <image> in the processor and is checked by the model.
"""

from __future__ import annotations

import argparse
import json
import sys

from slime.config import replace
from slime.presets import PRESETS, preset
from slime.tiling import count_visual_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slime tokens", description=__doc__.split("\n\n")[1])
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--preset", default="slime-7b", choices=sorted(PRESETS))
    ap.add_argument("--gamma", type=float, default=None, help="kept fraction of local tokens (default: preset's)")
    ap.add_argument("--mode", default="both", choices=["global", "local", "both"])
    ap.add_argument("--connector", default=None, choices=["mlp", "sti", "sci", "dci"])
    ap.add_argument("--tiling", default=None, choices=["area", "grid"])
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    if args.connector:
        cfg = replace(cfg, connector=replace(cfg.connector, kind=args.connector))
    if args.tiling:
        cfg = replace(cfg, tiling=replace(cfg.tiling, kind=args.tiling))
    try:
        budget = count_visual_tokens(args.width, args.height, cfg, args.gamma, args.mode)
    except ValueError as e:
        print(f"slime tokens: {e}", file=sys.stderr)
        return 2
    print(json.dumps(budget.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
