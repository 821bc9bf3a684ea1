"""benchmarks/serve_load.py's own parts that need no cluster: the LLaVA-NeXT peer it builds (weights in the layout
vLLM's llava_next loads, our pinpoints, its visual token counts) and the JSON last line's ratios, nulls and reasons."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import serve_load as sl
from benchmarks.serve_peer import peer_model


def test_peer_is_a_llava_next_of_our_llm_and_tiny_tower(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    from slime.presets import save_tiny_checkpoint, tiny_vllm

    model = str(save_tiny_checkpoint(tmp_path / "m", cfg=tiny_vllm()))
    out, visual = peer_model(model, str(tmp_path / "peer"))
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llava_next" and cfg.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112],
                                                                           [168, 56], [56, 168]]
    assert (cfg.vision_config.image_size, cfg.vision_config.hidden_size) == (56, 32)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (64, 2)
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]  # noqa: SIM118 - safe_open is no dict
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    # base tile (4x4 patches) + the grid's patches unpadded to the aspect ratio, a newline per row: more for the
    # square 1344 px image (2x2 grid, 8x8 patches, 8 newlines: 16 + 64 + 8) than for 640x480
    assert visual["1344x1344"] == 88 and 16 < visual["640x480"] < visual["1344x1344"]


def args(runs: int) -> argparse.Namespace:
    return argparse.Namespace(max_tokens=32, duration=1.0, replica_cpus=0.5, threads=2, runs=runs)


def cell(tok_s: float, p50: float) -> dict:
    return {"tok_s": tok_s, "rps": tok_s / 32, "p50": p50, "p99": p50, "n": 3, "failed": 0, "tok_req": 32.0,
            "visual": 41}


def test_json_line_medians_ranges_and_nulls_with_reasons(capsys):
    runs = []
    for i, (hf, vllm, ceil) in enumerate([(100, 300, 330), (110, 280, 350), (90, 330, 340)]):
        runs.append({("hf", "640x480", None, 16): cell(hf, 2.0), ("vllm", "640x480", None, 16): cell(vllm, 1.0),
                     ("ceiling", "640x480", None, 16): cell(ceil, 0.9), ("hf", "640x480", None, 1): cell(20, 1.0 + i),
                     ("vllm", "640x480", None, 1): cell(25, 1.0), ("ceiling", "640x480", None, 1): cell(26, 0.8)})
    runs[0][("peer", "1344x1344", None, 16)] = cell(50, 3.0)  # one peer cell of another image: printed, no ratio
    runs[0][("vllm", "1344x1344", None, 16)] = cell(150, 1.5)
    out = sl.report(runs, args(3), {"hf": [1.0]}, {"peer": "RuntimeError: no server"}, None)
    line = json.loads(json.dumps(out))
    assert set(line) >= {"c16", "c1", "runs", "machine"} and line["runs"] == 3
    assert set(line["c16"]) == {"vllm_vs_hf", "vllm_vs_ceiling", "vllm_vs_peer"}
    assert set(line["c1"]) == {"p50_vs_hf", "p50_vs_ceiling"}
    assert line["c16"]["vllm_vs_hf"] == pytest.approx(3.0)  # median of 3.0, 2.545, 3.667
    assert line["range"]["c16"]["vllm_vs_hf"] == [pytest.approx(2.545, abs=1e-3), pytest.approx(3.667, abs=1e-3)]
    assert line["c1"]["p50_vs_hf"] == pytest.approx(0.5)  # 1/1, 1/2, 1/3
    assert line["c16"]["vllm_vs_peer"] is None and "no server" in line["reasons"]["c16.vllm_vs_peer"]
    assert isinstance(line["machine"]["cpu"], str) and isinstance(line["machine"]["isa"], list)
    printed = capsys.readouterr().out
    assert "vllm_vs_ceiling" in printed
    assert "1344x1344   16" in printed and "3.00" in printed.split("against the peer")[1]  # 150 / 50 tok/s
