"""`slime convert --upstream RELEASE --out DIR [--base LLM_DIR] [--vision-path TOWER_DIR]`

Turns a released SliME or Dense Connector checkpoint into a slime-ray model directory that `slime serve` /
`slime evaluate` load by path. The release's config.json decides every visual setting; flags only fill
what it lacks (a flag that contradicts it is an error naming both). Full releases, adapter-only stage
directories and LoRA releases (merged into --base) load from local paths or s3://. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slime convert", description=__doc__.split("\n\n")[1])
    ap.add_argument("--upstream", required=True, help="the release directory (local or s3://)")
    ap.add_argument("--out", required=True, help="where the slime-ray model directory is written")
    ap.add_argument("--base", default=None, help="the LLM an adapter-only stage or a LoRA release was trained from")
    ap.add_argument("--vision-path", default=None,
                    help="the CLIP/SigLIP HF dir, for a release that holds no tower weights")
    ap.add_argument("--kind", default=None, choices=["slime", "dense_connector"], help="checked against config.json")
    ap.add_argument("--connector", default=None, choices=["mlp", "sti", "sci", "dci"],
                    help="Dense Connector type, for a config.json without mm_dense_connector_type")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="precision of the written model (default: the release's torch_dtype; a merged LoRA is exact "
                         "only in float32)")
    ap.add_argument("--template", default=None, choices=["vicuna_v1", "llama3", "llama3_dc", "chatml", "plain"],
                    help="chat template (default: the release's: llama3 / llama3_dc for a Llama-3 tokenizer, "
                         "else vicuna_v1)")
    args = ap.parse_args(argv)
    try:
        report = convert(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"slime convert: {message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def convert(args) -> dict:
    from dataclasses import replace

    import torch
    import transformers

    from slime.checkpoint import save_pretrained
    from slime.importer import load_upstream
    from slime.model import build_model
    from slime.releases import read_release
    from slime.storage import local_copy
    from slime.tokenizer import ensure_image_token

    transformers.logging.set_verbosity_error()  # "llava_llama" is not a transformers type: said once per file
    print(f"[convert] reading {args.upstream}", file=sys.stderr)
    rel = read_release(local_copy(args.upstream), base=args.base and local_copy(args.base),
                       vision_path=args.vision_path and local_copy(args.vision_path), kind=args.kind,
                       connector=args.connector, template=args.template)
    tokenizer = rel.tokenizer  # loaded once, by read_release
    rows = len(tokenizer)
    ensure_image_token(tokenizer)  # id len(tokenizer): outside the LLM's rows, never embedded, never sampled
    print(f"[convert] {rel.kind} ({rel.layout}): {rel.cfg.connector.kind} connector, {rel.cfg.vision.kind} tower, "
          f"mode {rel.cfg.visual_mode}, gamma {rel.cfg.local.gamma}", file=sys.stderr)
    model = build_model(replace(rel.cfg, dtype="float32"), tokenizer, llm_hf_config=rel.llm_config,
                        vision_hf_config=rel.vision_hf_config)
    loaded = load_upstream(model, rel.weights, rel.kind)
    own_rows = model.llm.get_input_embeddings().weight.shape[0]
    if own_rows != rows:
        raise ValueError(f"the converted LLM has {own_rows} rows but the release's tokenizer has {rows} tokens")
    # Modules the release has no weights for (a DC release's compressor) are never run in its visual mode.
    unused = [k for k in loaded["kept_init"] if not k.startswith("vision.") and not _used(k, rel.cfg)]
    # A release without position tables (upstream's LoRA saves none) runs upstream's formula, which ours is.
    at_init = [k for k in loaded["kept_init"] if not k.startswith("vision.") and not k.endswith(".pos_embed")
               and _used(k, rel.cfg)]
    if rel.cfg.vision.path is None and any(k.startswith("vision.") for k in loaded["kept_init"]):
        at_init += [k for k in loaded["kept_init"] if k.startswith("vision.")]
    if at_init:
        raise ValueError(f"the release provides no weights for {len(at_init)} tensors the model runs "
                         f"(first: {at_init[0]})")
    dtype = args.dtype or rel.cfg.dtype  # the release's own precision unless asked otherwise
    model = model.to(getattr(torch, dtype))
    model.cfg = replace(model.cfg, dtype=dtype)
    meta = {"imported_from": args.upstream, "kind": rel.kind, "layout": rel.layout, "base": args.base,
            "visual_mode": rel.cfg.visual_mode, "gamma": rel.cfg.local.gamma,
            "selector": {"selection": rel.cfg.local.selection, "score": rel.cfg.local.score,
                         "text": rel.cfg.local.text},
            "dropped": loaded["dropped"], "unused_at_init": unused, "notes": rel.notes}
    out = save_pretrained(model, tokenizer, args.out, metadata=meta)
    print(f"[convert] wrote {out}", file=sys.stderr)
    return {"out": str(out), "kind": rel.kind, "layout": rel.layout, "connector": rel.cfg.connector.kind,
            "visual_mode": rel.cfg.visual_mode, "gamma": rel.cfg.local.gamma, "template": rel.cfg.template,
            "dropped": len(loaded["dropped"]), "unused_at_init": len(unused), "notes": rel.notes}


def _used(key: str, cfg) -> bool:
    """Does the model run this tensor in its visual mode? (global: no compressor; local: no global adapter)."""
    if key.startswith("compressor."):
        return cfg.visual_mode != "global"
    if key.startswith("global_adapter."):
        # the noise weight only acts in training; the gate and attention expert only outside "local"
        return cfg.visual_mode != "local" and not key.startswith("global_adapter.noise.")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
