"""Official SliME and Dense Connector releases, converted by `slime convert`, compute what the official code
computes. The releases and the expected values in tests/assets/upstream were made once by the official
code itself (tests/assets/upstream/make_reference.py, run outside the product; README.md there), so
nothing here is checked against our own inverse. No network, no official code at test time.

Tolerances (fp32, relative Frobenius error): modules 1e-5, whole-model logits 1e-4, greedy tokens equal.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs import convert
from slime.checkpoint import load_pretrained

ASSETS = Path(os.environ.get("SLIME_UPSTREAM_ASSETS", Path(__file__).resolve().parent / "assets" / "upstream"))
EXPECTED = ASSETS / "expected"
SLIME = ["slime-llama3", "slime-vicuna"]
DC = ["dc-clip-sti", "dc-clip-sci", "dc-clip-dci", "dc-siglip-dci", "dc-siglip-sti"]
MODULE_TOL, LOGIT_TOL = 1e-5, 1e-4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def expected(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The official outputs of one release; tensors stored once for several releases are looked up where
    the json says they are."""
    tensors, info = load_file(str(EXPECTED / f"{name}.safetensors")), json.loads((EXPECTED / f"{name}.json").read_text())
    for key, where in info.get("not_stored_duplicates", {}).items():
        source = next((w.split("expected/")[1].split(".safetensors")[0] for w in [where] if "expected/" in w), None)
        if source and key not in tensors and key != "projector.out":
            tensors[key] = expected(source)[0][key]
    if "pixel_values.codes" in tensors:  # stored exactly as uint8 codes into a per-channel table of values
        codes, table = tensors.pop("pixel_values.codes").long(), tensors.pop("pixel_values.table")
        channels = [table[c][codes.select(-3, c)] for c in range(codes.shape[-3])]
        tensors["pixel_values"] = torch.stack(channels, dim=-3)
    return tensors, info


_CONVERTED: dict[str, tuple] = {}


def converted(name: str, tmp_root: Path, *extra: str):
    """`slime convert` as a user types it, then the model loaded in fp32 (cached per release)."""
    if name not in _CONVERTED:
        out = tmp_root / name
        assert convert.main(["--upstream", str(ASSETS / "releases" / name), "--out", str(out), *extra]) == 0
        model, tokenizer = load_pretrained(str(out), dtype="float32")
        _CONVERTED[name] = (model, tokenizer, out)
    return _CONVERTED[name]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.vision(pixel_values)[model.cfg.vision.base_index]


def official_sequence(model, tokenizer, exp: dict, info: dict) -> dict:
    """Our processor's prompt for the official question, the official image tensor, and our count of visual
    tokens set to the official one (gamma = kept / local), as the model's forward takes them."""
    from slime.processing import SlimeProcessor
    from slime.tiling import count_visual_tokens

    cfg, proc = model.cfg, SlimeProcessor(model.cfg, tokenizer)
    img = Image.open(EXPECTED / "image.png").convert("RGB")
    block = info["visual_block"]["length"]
    gamma = None
    if cfg.visual_mode != "global":
        budget = count_visual_tokens(*img.size, cfg, 1.0, cfg.visual_mode)
        gamma = (block - budget.global_tokens - budget.separator_tokens) / budget.local_tokens
    sample = proc({"messages": [{"role": "user", "content": "<image>\n" + info["question"]}]}, img,
                  mode=cfg.visual_mode, gamma=gamma, for_generation=True)
    assert sample["num_visual_tokens"] == block, "the token contract disagrees with the official count"
    batch = proc.pad_for_generation([sample])
    pv = exp["pixel_values"]
    pv = pv[None] if pv.dim() == 3 else pv
    batch["pixel_values"][0, : pv.shape[0]] = pv  # the official tiles, so only the model is compared here
    return batch, gamma


# ----------------------------------------------------------------------------- SliME modules


@pytest.mark.parametrize("name", SLIME)
def test_slime_converts_with_no_tensor_left_at_init(name, root):
    model, tokenizer, out = converted(name, root)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["unused_at_init"] == [] and sorted(meta["dropped"]) == ["model.mm_projector.mean",
                                                                        "model.mm_projector.std"]
    _, info = expected(name)
    # the LLM keeps exactly the release's rows; <image> lives outside them
    assert model.llm.get_input_embeddings().weight.shape[0] == info["len_tokenizer"] == model.image_token_id
    assert (meta["visual_mode"], meta["gamma"]) == ("both", info["config"]["mm_resampler_topp"])


@pytest.mark.parametrize("name", SLIME)
def test_slime_global_branch_matches(name, root):
    model, _, _ = converted(name, root)
    exp, _ = expected(name)
    assert rel_err(tower_features(model, exp["pixel_values"]), exp["vision.features"]) < MODULE_TOL
    x = exp["vision.features"][:1]  # the official tower output for the global view
    adapter = model.global_adapter
    with torch.no_grad():
        checks = {"global.gates": adapter.gates(x)[0], "global.mlp_expert": model.projector(x)[0],
                  "global.attn_expert": model.projector(adapter.resampler(x))[0],
                  "global.mixture": model.global_tokens(x, None)[0]}
    errors = {k: rel_err(v, exp[k]) for k, v in checks.items()}
    assert max(errors.values()) < MODULE_TOL, errors


@pytest.mark.parametrize("name", SLIME)
def test_slime_local_branch_matches(name, root):
    from slime.local import raster_layout

    model, _, _ = converted(name, root)
    exp, info = expected(name)
    crops = exp["vision.features"][1:]
    with torch.no_grad():
        compressed = model.compressor.resampler(crops)
        projected = model.projector(compressed)
        raster = raster_layout(projected, info["grid_cols"], info["grid_rows"])
    errors = {"local.compressed": rel_err(compressed, exp["local.compressed"]),
              "local.projected": rel_err(projected, exp["local.projected"]),
              "local.raster": rel_err(raster, exp["local.raster"])}
    assert max(errors.values()) < MODULE_TOL, errors


@pytest.mark.parametrize("name", SLIME)
def test_slime_selector_ranks_as_upstream(name, root):
    """Same scores; our fixed-count top-k keeps exactly the official nucleus set when given its count
    (the June-2024 double softmax and today's single softmax rank alike, they keep different counts)."""
    model, tokenizer, _ = converted(name, root)
    exp, info = expected(name)
    ids = exp["input_ids"][exp["input_ids"] != -200]
    with torch.no_grad():
        text = model.llm.get_input_embeddings()(ids)
    assert rel_err(text, exp["selector.text_embeds"][exp["selector.text_mask"].bool()]) < MODULE_TOL
    batch, _ = official_sequence(model, tokenizer, exp, info)
    ours = batch["input_ids"][0][batch["instruction_mask"][0]]  # what our processor scores against
    assert ours.tolist() == ids.tolist()
    scores = model.selector.scores(exp["local.raster"], text)
    assert rel_err(scores, exp["selector.scores"]) < MODULE_TOL
    num_local = exp["local.raster"].shape[0]
    for rule in ("kept_head", "kept_june2024"):
        kept = exp[f"selector.{rule}"]
        idx, valid = model.selector.eval().select(exp["local.raster"], text, kept.numel() / num_local)
        assert valid.all() and idx.tolist() == kept.tolist(), rule


# ----------------------------------------------------------------------------- whole models


def check_whole_model(name: str, model, tokenizer, exp: dict, info: dict) -> None:
    from slime.generate import GenerationParams, generate

    batch, gamma = official_sequence(model, tokenizer, exp, info)
    official_ids = exp["input_ids"].tolist()
    start, length = info["visual_block"]["start"], info["visual_block"]["length"]
    ours = batch["input_ids"][0].tolist()
    assert ours[:start] + ours[start + length:] == official_ids[:start] + official_ids[start + 1:]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], tile_mask=batch["tile_mask"], grid=batch["grid"],
                    instruction_mask=batch["instruction_mask"], has_image=batch["has_image"],
                    mode=model.cfg.visual_mode, gamma=gamma)
    logits = out.logits[0]
    positions = info.get("logits_positions", list(range(logits.shape[0])))
    assert rel_err(logits[positions], exp["logits"]) < LOGIT_TOL
    greedy = generate(model, tokenizer, batch, [GenerationParams(max_new_tokens=exp["greedy"].numel(), temperature=0)],
                      mode=model.cfg.visual_mode, gamma=gamma)[0]
    want = exp["greedy"].tolist()  # the official generate stops at (and keeps) the end of sequence
    if want[-1] == tokenizer.eos_token_id:
        assert (greedy.token_ids, greedy.finish_reason) == (want[:-1], "stop")
    else:
        assert greedy.token_ids == want


@pytest.mark.parametrize("name", SLIME + DC)
def test_whole_model_logits_and_greedy_tokens(name, root):
    model, tokenizer, _ = converted(name, root)
    exp, info = expected(name)
    check_whole_model(name, model, tokenizer, exp, info)


# ----------------------------------------------------------------------------- Dense Connector


@pytest.mark.parametrize("name", DC)
def test_dense_connector_fusion_matches(name, root):
    model, tokenizer, out = converted(name, root)
    exp, info = expected(name)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["visual_mode"] == "global"  # a DC release has no trained local branch: it is never fed
    from slime.predictor import Predictor
    assert Predictor(model, tokenizer).mode == "global" and Predictor(model, tokenizer, mode="both").mode == "both"
    assert model.cfg.connector.kind == info["dense_connector_type"]
    pv = exp["pixel_values"]
    pv = pv[None] if pv.dim() == 3 else pv
    with torch.no_grad():
        states = model.vision(pv)
        fused = model.connector(states)
        tokens = model.projector(fused)
    assert rel_err(states[model.cfg.vision.base_index], exp["vision.features"]) < MODULE_TOL
    assert rel_err(fused, exp["connector.fused"]) < MODULE_TOL
    assert rel_err(tokens[0], exp["visual_tokens"]) < MODULE_TOL


def test_anyres_release_is_refused_in_one_line(root, capsys):
    code = convert.main(["--upstream", str(ASSETS / "releases" / "dc-anyres"), "--out", str(root / "anyres")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "spatial_unpad" in err[-1] and len(err[-1]) < 250


# ----------------------------------------------------------------------------- LoRA and adapter-only stages


def test_lora_release_merges_into_its_base(root):
    # a LoRA run saves no frozen tower: the tower it names is passed as a user would
    tower = tower_dir_from("slime-llama3", root / "tower-lora")
    model, tokenizer, out = converted("slime-lora", root, "--base", str(ASSETS / "bases" / "llama3-tiny"),
                                      "--vision-path", str(tower), "--dtype", "float32")  # merged deltas: exact
    exp, info = expected("slime-lora")
    assert json.loads((out / "metadata.json").read_text())["layout"] == "lora"
    check_whole_model("slime-lora", model, tokenizer, exp, info)


def tower_dir_from(release: str, out: Path) -> Path:
    """A plain CLIP tower directory cut out of a release that holds its tower (what a user would pass as
    --vision-path for an adapter-only stage)."""
    from safetensors.torch import save_file

    from slime.releases import TOWER_PREFIX, read_weights

    src = ASSETS / "releases" / release
    conf = json.loads((src / "config.json").read_text())
    tower_conf = json.loads((ASSETS / conf["mm_vision_tower"] / "config.json").read_text())
    weights = {f"vision_model.{k[len(TOWER_PREFIX + 'vision_model.'):]}": v for k, v in read_weights(src).items()
               if k.startswith(TOWER_PREFIX)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(tower_conf))
    return out


def test_adapter_only_stage_loads_onto_a_base(root):
    tower = tower_dir_from("slime-llama3", root / "tower")
    model, _, out = converted("slime-stage2-adapters", root, "--base", str(ASSETS / "bases" / "llama3-tiny"),
                              "--vision-path", str(tower))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["layout"] == "adapters" and meta["visual_mode"] == "local"  # the stage's use_local_only
    exp, info = expected("slime-llama3")  # the stage's tensors are slime-llama3's (the json says so)
    x, crops = exp["vision.features"][:1], exp["vision.features"][1:]
    with torch.no_grad():
        assert rel_err(model.global_tokens(x, None)[0], exp["global.mixture"]) < MODULE_TOL
        assert rel_err(model.compressor.resampler(crops), exp["local.compressed"]) < MODULE_TOL


# ----------------------------------------------------------------------------- real CLIP-L geometry


def test_modules_at_clip_l_geometry_match_upstream():
    """GatedBlock and the compressor at 576 x 1024 with 8 heads: weights regenerated from the recipe the
    official run recorded (not stored), our own position tables."""
    from slime.config import ConnectorConfig
    from slime.connectors import DenseConnector, MixtureOfAdapters, MLPProjector, Resampler
    from slime.importer import import_state_dict
    from slime.presets import CLIP_L_336

    exp = load_file(str(EXPECTED / "clip-l-geometry.safetensors"))
    info = json.loads((EXPECTED / "clip-l-geometry.json").read_text())
    g = torch.Generator().manual_seed(info["seed"])
    upstream = {}
    for key in sorted(k["key"] for k in info["keys"]):
        spec = next(k for k in info["keys"] if k["key"] == key)
        if not spec["generated"]:
            continue
        value = torch.randn(spec["shape"], generator=g) * spec["scale"]
        upstream[key] = value + 1.0 if spec["kind"] == "ln_weight" else value
    x = torch.randn((576, 1024), generator=g)
    crops = torch.randn((2, 576, 1024), generator=g)
    assert math.isclose(float(x.double().sum()), info["input_checksums"]["x.sum"], rel_tol=1e-9)

    dc = DenseConnector(ConnectorConfig(kind="mlp"), CLIP_L_336)
    parts = torch.nn.ModuleDict({
        "projector": MLPProjector(1024, info["config"]["hidden_size"]),
        "global_adapter": MixtureOfAdapters(Resampler(576, 1024, 8, dc.positions, queries_on_keys=True), 1024),
        "compressor": torch.nn.ModuleDict({"resampler": Resampler(144, 1024, 8, dc.positions)})}).eval()
    mapped, _ = import_state_dict(upstream, "slime")
    missing, unexpected = parts.load_state_dict(mapped, strict=False)
    assert not unexpected and sorted(missing) == ["compressor.resampler.pos_embed", "global_adapter.resampler.pos_embed"]
    adapter, proj = parts["global_adapter"], parts["projector"]
    with torch.no_grad():
        got = {"global.gates": adapter.gates(x[None])[0], "global.mlp_expert": proj(x),
               "global.attn_expert": proj(adapter.resampler(x[None]))[0], "global.mixture": adapter(x[None], proj)[0],
               "local.compressed": parts["compressor"]["resampler"](crops)[:1]}  # the first crop is stored
    errors = {k: rel_err(v, exp[k]) for k, v in got.items()}
    assert max(errors.values()) < MODULE_TOL, errors


# ----------------------------------------------------------------------------- the vLLM engine


@pytest.mark.integration
@pytest.mark.parametrize("name", ["slime-llama3", "dc-siglip-dci"])
def test_vllm_engine_answers_as_upstream(name, root):
    """The converted release on vLLM (our processor, our adapter, vLLM's Llama) gives the official greedy
    tokens for the official image and question: the image goes through our tiling, which is bit-identical
    to upstream's on these releases (test_our_tiles_are_upstreams)."""
    from pipelines.serve.engine import VllmChat, offline_engine
    from slime.predictor import ChatRequest

    model, tokenizer, out = converted(name, root)
    exp, info = expected(name)
    _, gamma = official_sequence(model, tokenizer, exp, info)
    chat = VllmChat(str(out))
    req = ChatRequest(messages=[{"role": "user", "content": info["question"]}],
                      images=[Image.open(EXPECTED / "image.png").convert("RGB")], max_tokens=exp["greedy"].numel(),
                      temperature=0.0, gamma=gamma)
    prompt, meta = chat.prompt(req)
    assert meta["visual_tokens"] == info["visual_block"]["length"]
    llm = offline_engine(str(out), dtype="float32")
    try:
        # (no prompt_logprobs: vLLM gathers them at the prompt's ids, and <image> lies outside the vocabulary)
        result = llm.generate([prompt], chat.sampling_params(req, meta, logprobs=20), use_tqdm=False)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    completion = result.outputs[0]
    assert list(completion.token_ids) == exp["greedy"].tolist()
    assert len(result.prompt_token_ids) == info["num_positions"]  # vLLM expanded <image> to the official count
    # vLLM's logits at the last prompt position, seen through its top-20 log-probabilities, against
    # log_softmax of the official logits there
    official = exp["logits"][-1].double().log_softmax(-1)
    first = completion.logprobs[0]
    got = torch.tensor([first[t].logprob for t in sorted(first)], dtype=torch.float64)
    assert len(first) >= 20 and rel_err(got, official[sorted(first)]) < LOGIT_TOL


@pytest.mark.parametrize("name", ["slime-llama3", "dc-clip-sti", "dc-siglip-dci"])
def test_our_tiles_are_upstreams(name, root):
    from slime.processing import SlimeProcessor

    model, tokenizer, _ = converted(name, root)
    exp, _ = expected(name)
    tiles = SlimeProcessor(model.cfg, tokenizer).image_inputs(Image.open(EXPECTED / "image.png").convert("RGB"))
    pv = exp["pixel_values"]
    pv = pv[None] if pv.dim() == 3 else pv
    assert torch.equal(torch.from_numpy(tiles["pixel_values"][: pv.shape[0]]), pv)  # DC: the global view
