"""`slime merge --adapter DIR --out DIR [--base MODEL_DIR]`

Folds a LoRA adapter (a lora phase's export: PEFT adapter + non-LoRA trainables, slime/lora.py) into its base
and writes a full model directory that `slime serve` / `slime evaluate` load by path. The base is the one the
adapter records, or --base (e.g. the base moved elsewhere), which must have the recorded content fingerprint:
another base is refused in one line. Local paths or s3:// for every directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slime merge", description=__doc__.split("\n\n")[1])
    ap.add_argument("--adapter", required=True, help="the adapter directory (local or s3://)")
    ap.add_argument("--out", required=True, help="where the merged model directory is written (local or s3://)")
    ap.add_argument("--base", default=None, help="the base model directory (default: the one the adapter records)")
    args = ap.parse_args(argv)
    from pipelines.train.state import export_model
    from slime.lora import AdapterBaseMismatch, merge_to_model

    try:
        with tempfile.TemporaryDirectory() as tmp:
            merge_to_model(args.adapter, f"{tmp}/merged", base=args.base)
            export_model(f"{tmp}/merged", args.out)
    except AdapterBaseMismatch as e:
        print(f"slime merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
