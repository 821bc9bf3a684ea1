"""`slime explain`: which local tokens a question keeps, drawn on the image.

    slime explain --model /tmp/slime/models/tiny --image photo.jpg --question "What does the sign say?" \
        [--gamma 0.5] [--out explain.png]
Writes a PNG of the crop grid with the selector's relevance of every local token placed where it sits,
the kept tokens outlined and the token budget in the title; prints the answer and the budget as JSON.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import JobError, require_model_dir, run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slime explain", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (local or s3://)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True)
    p.add_argument("--gamma", type=float, default=None, help="kept local fraction (default: the model's)")
    p.add_argument("--out", default="explain.png", help="PNG to write (local or s3://)")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    return run_job("explain", lambda: explain(args))


def explain(args: argparse.Namespace) -> None:
    import os

    from PIL import Image, UnidentifiedImageError

    from pipelines import storage
    from pipelines.plots import plot_explanation
    from slime.explain import explain_selection
    from slime.predictor import ChatRequest, Predictor

    require_model_dir(args.model)
    if not os.path.isfile(args.image):
        raise JobError(f"image {args.image} does not exist")
    if args.gamma is not None and not 0 < args.gamma <= 1:
        raise JobError(f"--gamma must be in (0, 1], got {args.gamma}")
    try:
        image = Image.open(args.image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise JobError(f"image {args.image} cannot be decoded: {e}") from e
    predictor = Predictor.load(args.model)
    ex = explain_selection(predictor, image, args.question, args.gamma)
    result = predictor.generate([ChatRequest(messages=[{"role": "user", "content": args.question}], images=[image],
                                             gamma=ex.gamma, max_tokens=args.max_tokens)])[0]
    ex.answer = result.text.strip()
    storage.write_bytes_atomic(args.out, plot_explanation(ex))
    print(json.dumps({"answer": ex.answer, "out": args.out, "gamma": ex.gamma, "grid": list(ex.grid),
                      "budget": ex.budget, "kept": len(ex.kept)}))


if __name__ == "__main__":
    raise SystemExit(main())
