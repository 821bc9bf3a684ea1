"""Host memory and time of a phase end on one training worker: the next phase's model built on the meta
device and given the gathered state's own tensors (``pipelines.train.loop.rebuild``) against the way it
was done until December 2026, a full build (random initialisation) followed by ``load_state_dict`` (a copy),
measured in the same run.

A phase end holds the engine's live model and the gathered ``full_state_dict`` (the copy every rank keeps)
and builds the next phase's model. Each strategy runs in its own fresh process (so one cannot reuse the
other's freed pages) on a SliME model whose LLM is ``--width`` wide and ``--layers`` deep (default ~0.3 B
parameters, 1.2 GB in fp32): the process's peak resident memory (``ru_maxrss``) above what it held before
the phase end, in units of one weight copy, and the wall time of the rebuild.

    python -m benchmarks.phase_end_memory [--width 1024] [--layers 16] [--vocab 32000] [--trials 3]

Ends with one JSON line: per strategy the median (and range) of peak extra memory in weight copies and
seconds, and the ratios meta / copy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(strategy: str, width: int, layers: int, vocab: int) -> dict:
    """In this process: build the 'engine' model, gather its state, rebuild; peak RSS above the baseline."""
    import torch

    from pipelines.train.loop import nonpersistent_buffers, rebuild
    from slime.checkpoint import architecture_config
    from slime.config import replace
    from slime.model import build_model
    from slime.presets import tiny
    from slime.tokenizer import build_tiny_tokenizer

    cfg = tiny()
    cfg = replace(cfg, llm=replace(cfg.llm, hidden_dim=width, intermediate_dim=width * 11 // 4, num_layers=layers,
                                   num_heads=width // 64, num_kv_heads=width // 128, vocab_size=vocab))
    tok = build_tiny_tokenizer(vocab)
    torch.manual_seed(0)
    live = build_model(cfg, tok)  # the engine's module
    buffers = nonpersistent_buffers(live)
    state = {k: v.detach().cpu().clone() for k, v in live.state_dict().items()}  # full_state_dict
    weight_bytes = sum(v.numel() * v.element_size() for v in state.values())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if strategy == "meta":
        fresh = rebuild(live, tok, state, buffers)
    else:
        fresh = build_model(cfg, tok, llm_hf_config=architecture_config(live.llm.config.to_dict()),
                            vision_hf_config=live.vision.encoder.config.to_dict())
        fresh.load_state_dict(state)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in live.parameters())
    return {"strategy": strategy, "extra_copies": (peak - base) / weight_bytes, "seconds": seconds,
            "weights_gb": weight_bytes / 1e9, "params_m": sum(p.numel() for p in live.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--child", choices=["meta", "copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.layers, args.vocab)))
        return
    runs: dict[str, list[dict]] = {"copy": [], "meta": []}
    for trial in range(args.trials):
        for strategy in ("copy", "meta"):  # alternated, so drift in the machine hits both alike
            out = subprocess.run([sys.executable, "-m", "benchmarks.phase_end_memory", "--child", strategy,
                                  "--width", str(args.width), "--layers", str(args.layers),
                                  "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[strategy].append(row)
            print(f"trial {trial + 1} {strategy:>4}: +{row['extra_copies']:.2f} weight copies "
                  f"({row['weights_gb']:.2f} GB each), {row['seconds']:.2f} s", flush=True)

    def summary(key: str, strategy: str) -> dict:
        values = [r[key] for r in runs[strategy]]
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    result = {s: {"extra_copies": summary("extra_copies", s), "seconds": summary("seconds", s)} for s in runs}
    result["params_m"] = round(runs["meta"][0]["params_m"], 1)
    result["ratio_meta_over_copy"] = {
        k: round(result["meta"][k]["median"] / max(result["copy"][k]["median"], 1e-9), 3)
        for k in ("extra_copies", "seconds")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
