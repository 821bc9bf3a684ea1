"""`slime convert` on a synthetic released checkpoint: upstream SliME names and shapes -> a model
directory whose logits equal the model the upstream weights came from."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from jobs import convert
from slime.checkpoint import load_pretrained
from slime.importer import export_state_dict
from slime.presets import build_tiny


def test_convert_released_slime_checkpoint(tmp_path):
    model, tokenizer = build_tiny(seed=5)
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    state = {k: v.clone() for k, v in export_state_dict(model.state_dict(), "slime").items()}
    assert "model.mm_projector.w_gate" in state and state["model.mm_projector.w_gate"].shape == (32, 2)
    assert any(k.startswith("model.sampler.post_qformer.") for k in state)
    save_file(state, str(upstream / "model.safetensors"))
    conf = model.llm.config.to_dict()
    conf.update(mm_hidden_size=32, mm_projector_type="gated")  # upstream configs carry mm_* keys
    (upstream / "config.json").write_text(json.dumps(conf, default=str))
    tokenizer.save_pretrained(str(upstream))

    out = tmp_path / "converted"
    assert convert.main(["--upstream", str(upstream), "--kind", "slime", "--preset", "tiny", "--out", str(out)]) == 0
    loaded, _ = load_pretrained(str(out))
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        want = model.eval().llm(input_ids=ids).logits
        got = loaded.llm(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
