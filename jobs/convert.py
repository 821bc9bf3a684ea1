"""`slime convert --upstream DIR --kind slime|dense_connector --preset slime-8b --vision-path CLIP_DIR --out DIR`

Turns a released SliME or Dense Connector checkpoint (HF directory with *.safetensors or *.bin weights
and its tokenizer) into a slime-ray model directory that `slime serve` / `slime evaluate` load by path.
Loads from local paths or s3:// (copied to a local cache). Nothing is downloaded from a hub.
"""

from __future__ import annotations

import argparse
import json

from slime.config import replace
from slime.presets import PRESETS, preset


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from slime.checkpoint import architecture_config, save_pretrained
    from slime.importer import load_upstream, read_upstream_weights
    from slime.model import build_model
    from slime.storage import local_copy
    from slime.tokenizer import ensure_image_token

    ap = argparse.ArgumentParser(prog="slime convert", description=__doc__.split("\n\n")[1])
    ap.add_argument("--upstream", required=True, help="released checkpoint dir (local or s3://)")
    ap.add_argument("--kind", required=True, choices=["slime", "dense_connector"])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--vision-path", default=None,
                    help="the CLIP/SigLIP HF dir the checkpoint was trained with (real presets need it)")
    ap.add_argument("--connector", default="mlp", choices=["mlp", "sti", "sci", "dci"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    upstream = local_copy(args.upstream)
    cfg = preset(args.preset, vision_path=args.vision_path)
    if args.preset != "tiny" and not args.vision_path:
        ap.error(f"--vision-path is required for preset {args.preset}")
    cfg = replace(cfg, connector=replace(cfg.connector, kind=args.connector))
    if args.kind == "dense_connector":  # LLaVA-1.5 style: no attention expert, no local branch trained
        cfg = replace(cfg, global_branch=replace(cfg.global_branch, kind="mlp"))
    tokenizer = AutoTokenizer.from_pretrained(upstream)
    ensure_image_token(tokenizer)
    llm_conf = architecture_config(json.loads(open(f"{upstream}/config.json").read()))
    llm_conf = {k: v for k, v in llm_conf.items() if not k.startswith("mm_")}  # LLaVA's multimodal keys
    llm_conf["model_type"] = cfg.llm.kind
    model = build_model(cfg, tokenizer, llm_hf_config=llm_conf)
    report = load_upstream(model, read_upstream_weights(upstream), args.kind)
    out = save_pretrained(model, tokenizer, args.out, metadata={"imported_from": args.upstream, "kind": args.kind,
                                                                 "dropped": report["dropped"]})
    print(json.dumps({"out": str(out), "dropped": len(report["dropped"]),
                      "kept_init": report["kept_init"][:20]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
