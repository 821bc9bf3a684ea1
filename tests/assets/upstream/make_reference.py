#!/usr/bin/env python3
"""Build tiny, structurally faithful replicas of the official SliME and Dense Connector
releases, plus the official code's outputs on fixed inputs (test data for slime-ray).

Everything here is produced WITH THE OFFICIAL CLASSES (their state_dict(), key names,
config fields, loaders, preprocessing, templates).  The official code is imported from
the paths given on the command line; none of it is copied into this repository.

Official commits
    SliME            github.com/yfzhang114/SliME        5c89ec9  (2024-12-26)
    Dense Connector  github.com/HJYao00/DenseConnector  0f8936c  (2024-10-14)

Environment (throwaway venv, CPU only, nothing downloaded from any model hub)
    python3 -m venv /work/ref/venv
    /work/ref/venv/bin/pip install torch==2.13.0           # CPU build
    /work/ref/venv/bin/pip install transformers==4.37.2 tokenizers==0.15.1 \
        peft==0.10.0 accelerate==0.26.1 "numpy<2" safetensors sentencepiece \
        protobuf einops pillow
    # transformers 4.37.2 is the version SliME pins (pyproject.toml).  With >=4.38
    # the official SliME LlavaLlamaForCausalLM.forward() rejects `cache_position`
    # during generate().  Do NOT install torchvision/deepspeed/flash-attn etc.:
    # they are stubbed below (see STUBS).

Export the official work trees (bare mirrors, no work tree):
    git --git-dir=/work/.mirror/yfzhang114+SliME/repo archive HEAD | tar -x -C /work/ref/SliME
    git --git-dir=/work/.mirror/HJYao00+DenseConnector/repo archive HEAD | tar -x -C /work/ref/DC

Run (about 35-90 s on 2 shared CPU cores):
    nice -n 10 /work/ref/venv/bin/python tests/assets/upstream/make_reference.py \
        --slime-repo /work/ref/SliME --dc-repo /work/ref/DC --out tests/assets/upstream

The script re-executes itself once per phase (common / slime / dc / clipl) because the
two official code bases both register the transformers model type "llava_llama" and
cannot live in one process.  All randomness comes from fixed seeds; running it twice
gives byte-identical expected/*.safetensors.

Size-saving storage (see README.md): the full vision towers are written to a scratch run
root only (`towers/` there; `releases/`, `bases/`, `expected/` are symlinks into --out), and
--out/towers keeps just their config.json (+ preprocessor_config.json); every tower's weights
are inside at least one release (checked in the last phase).  `logits` keeps only the rows of
the text positions (json `logits_positions`); `pixel_values` is stored exactly as uint8
`pixel_values.codes` + fp32 `pixel_values.table`.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import importlib.machinery

SEED = 20240615
CLIPL_SEED = 1234

QUESTION = "What is written in the top left corner?"

LLM_GEOMETRY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=128)   # head dim 32 (vLLM CPU kernels need >= 32)
LLAMA3_VOCAB_TRAIN = 368    # BPE vocab before the added special tokens
VICUNA_VOCAB = 384          # sentencepiece vocab (incl. <unk>, <s>, </s> and 256 byte pieces)
MAX_SHARD = "300KB"         # small enough that every release has >= 2 shards
N_GREEDY = 16

CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
What is written in the top left corner? What is shown in the image?
The picture shows a red sign with white letters in the top left corner of the page.
There is a blue square, a green circle and a yellow triangle on a grey background.
Describe the image in detail. Answer the question using a single word or phrase.
The chart compares the number of students in three schools over five years.
In the first year the numbers were small, but they grew quickly in the second year.
Please read the text on the board and tell me what it says.
The man is holding an umbrella while walking across the street in the rain.
A small dog is sitting next to a bicycle in front of a wooden house.
How many people are in the photo? There are two people standing near the window.
The answer is forty two. The total is 56 + 98 + 98 = 252.
Which option is correct? A. the cat B. the dog C. the bird D. the horse.
The scientist looked at the data and wrote a short report about the results.
Mountains, rivers and forests cover most of the northern part of the country.
She opened the book, read the first page, and smiled at the funny drawing.
The weather today is sunny with a light wind from the west and warm air.
Tables, charts and diagrams help readers understand numbers and trends.
The train leaves the station at nine o'clock and arrives at noon.
We can see a kitchen with a white table, four chairs and a large window.
The top left corner contains the title; the bottom right corner contains the date.
Reading, writing and counting are the first things children learn at school.
Hello, world! This is a test of the tokenizer: numbers 0 1 2 3 4 5 6 7 8 9.
"""

STUB_MODULES = [
    # imported by the official code but not needed for CPU inference / saving
    "torchvision", "torchvision.transforms", "torchvision.transforms.functional",   # llava/process_image.py, DC mm_utils users
    "deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero",
    "deepspeed.runtime.zero.partition_parameters", "deepspeed.utils",              # train.py maybe_zero_3 (guarded by hasattr(ds_id))
    "datasets",                                                                     # llava/train/llava_trainer.py top-level import
    "flash_attn", "bitsandbytes", "wandb", "shortuuid",
]


# ----------------------------------------------------------------------------- utilities
class _AnyModule(types.ModuleType):
    """A module whose every attribute is another stub (enough for `from x import Y`)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _AnyModule(f"{self.__name__}.{name}")
        sub.__spec__ = importlib.machinery.ModuleSpec(sub.__name__, None)
        setattr(self, name, sub)
        return sub

    def __call__(self, *a, **k):
        return self


def install_stubs():
    for name in STUB_MODULES:
        if name in sys.modules:
            continue
        m = _AnyModule(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__path__ = []
        sys.modules[name] = m
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, m)


def fp32_torch_proxy(torch):
    """A stand-in for the `torch` global of the official builder modules: identical except
    that torch.float16 is torch.float32.  The official loaders hard-code fp16 (GPU
    inference); on CPU we load in fp32 and otherwise run their code unchanged."""
    proxy = types.ModuleType("torch_fp32_proxy")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.float16 = torch.float32
    proxy.half = torch.float32
    return proxy


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def save_tensors(path, tensors):
    import torch
    from safetensors.torch import save_file
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.dtype == torch.uint8:
            pass                      # pixel_values.codes
        elif v.dtype in (torch.int32, torch.int64, torch.bool):
            v = v.to(torch.int64)
        else:
            v = v.to(torch.float32)
        out[k] = v
    save_file(out, path, metadata={"format": "pt"})


def randomize_(module, gen, skip=()):
    """Deterministically randomise every floating parameter of `module` (named_parameters
    in sorted order).  Scales keep activations O(1): matrices ~ N(0, 1/fan_in) (fan_in =
    product of trailing dims, or dim 0 for the gate matrices used as x @ W), norm weights
    1 + 0.1 N, biases 0.1 N, embedding tables / queries / vectors N(0, 0.5^2) (SigLIP/CLIP
    class/position embeddings 0.2)."""
    import torch
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        if any(s in name for s in skip) or not p.is_floating_point():
            continue
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        lname = name.lower()
        if leaf in ("w_gate", "w_noise"):
            val = torch.randn(shape, generator=gen) * (2.0 / math.sqrt(shape[0]))
        elif ("norm" in lname or ".ln_" in lname or "layernorm" in lname or "layer_norm" in lname) and p.dim() == 1:
            val = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if leaf == "weight" else 0.1 * torch.randn(shape, generator=gen)
        elif "position_embedding" in lname or "class_embedding" in lname:
            val = 0.2 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in lname or leaf in ("query", "image_newline", "probe"):
            val = 0.5 * torch.randn(shape, generator=gen)
        elif p.dim() >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            val = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            if "lora_b" in lname:
                val = val * 0.5
        else:
            val = 0.1 * torch.randn(shape, generator=gen)
        with torch.no_grad():
            p.copy_(val.to(p.dtype))


def make_image(path):
    """672x336 synthetic RGB image: smooth background, a dark 'text-like' block of bars in
    the top left corner, coloured shapes.  SliME tiles it as a 2x1 grid (2 crops)."""
    import numpy as np
    from PIL import Image
    w, h = 672, 336
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), dtype=np.float64)
    img[..., 0] = 170 + 60 * np.sin(xx / 53.0)
    img[..., 1] = 140 + 70 * np.cos(yy / 41.0)
    img[..., 2] = 110 + 50 * np.sin((xx + yy) / 77.0)
    img[20:80, 20:200] = (250, 250, 245)                       # white label, top left
    for i, x0 in enumerate(range(30, 190, 14)):                # glyph-like bars
        hgt = 20 + (i * 7) % 25
        img[35:35 + hgt, x0:x0 + 8] = (20, 20, 30)
    img[150:300, 380:520] = (200, 30, 40)                      # red square
    r = np.sqrt((xx - 200) ** 2 + (yy - 230) ** 2)
    img[r < 60] = (30, 160, 60)                                # green disc
    img[(yy > 100) & (yy < 130) & (xx > 560) & (xx < 660)] = (30, 60, 200)
    img = np.clip(img, 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path, format="PNG", optimize=False, compress_level=6)


# ----------------------------------------------------------------------------- tokenizers
def build_llama3_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers, Regex
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=LLAMA3_VOCAB_TRAIN, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_4|>", "<|eot_id|>"]           # Llama-3 order (128000..128009)
    tok.add_special_tokens(specials)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", clean_up_tokenization_spaces=True,
                                   model_input_names=["input_ids", "attention_mask"],
                                   model_max_length=1000000000000000019884624838656)
    fast.save_pretrained(out_dir)
    return fast


def build_vicuna_tokenizer(out_dir, scratch):
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    prefix = os.path.join(scratch, "tokenizer")
    cwd = os.getcwd()
    os.chdir(scratch)    # relative model_prefix: the prefix is recorded inside tokenizer.model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_prefix="tokenizer", vocab_size=VICUNA_VOCAB,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2, hard_vocab_limit=True, shuffle_input_sentence=False)
    os.chdir(cwd)
    os.makedirs(out_dir, exist_ok=True)
    tk = LlamaTokenizer(vocab_file=prefix + ".model", legacy=False, add_bos_token=True,
                        add_eos_token=False, clean_up_tokenization_spaces=False,
                        model_max_length=4096, padding_side="right", pad_token=None)
    tk.save_pretrained(out_dir)
    for extra in ("tokenizer.json", "added_tokens.json"):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))
    return tk


def base_llm(tok_dir, out_dir, kind):
    """A plain LlamaForCausalLM base (what the official training scripts start from)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, GenerationConfig
    tok = AutoTokenizer.from_pretrained(tok_dir, use_fast=False)
    if kind == "llama3":
        extra = dict(bos_token_id=tok.convert_tokens_to_ids("<|begin_of_text|>"),
                     eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"), rope_theta=500000.0,
                     max_position_embeddings=8192, rms_norm_eps=1e-5)
        gen_eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    else:
        extra = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
                     max_position_embeddings=4096, rms_norm_eps=1e-5)
        gen_eos = 2
    cfg = LlamaConfig(vocab_size=len(tok), hidden_act="silu", tie_word_embeddings=False,
                      attention_bias=False, torch_dtype="bfloat16", initializer_range=0.02,
                      **LLM_GEOMETRY, **extra)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(SEED + (1 if kind == "llama3" else 2))
    randomize_(model, g)
    model.generation_config = GenerationConfig(bos_token_id=extra["bos_token_id"], eos_token_id=gen_eos,
                                               pad_token_id=extra.get("pad_token_id"))
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD)
    tok.save_pretrained(out_dir)
    for extra_f in ("tokenizer.json", "added_tokens.json") if kind == "vicuna" else ():
        p = os.path.join(out_dir, extra_f)
        if os.path.exists(p):
            os.remove(p)
    return len(tok)


def clip_tower(out_dir, width, heads, inter, layers, image_size, patch, seed):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch,
                           projection_dim=width, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           torch_dtype="bfloat16")
    torch.manual_seed(seed)
    m = CLIPVisionModel(cfg)
    randomize_(m, torch.Generator().manual_seed(seed))
    m.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                       do_convert_rgb=True, resample=3,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out_dir)


# ----------------------------------------------------------------------------- phase: common
def phase_common(args):
    import torch
    torch.set_num_threads(1)
    out, scratch = args.out, args.scratch
    os.makedirs(os.path.join(out, "expected"), exist_ok=True)
    make_image(os.path.join(out, "expected", "image.png"))
    # tokenizers (offline) + plain base LLMs
    l3_tok_dir = os.path.join(scratch, "tok-llama3")
    vi_tok_dir = os.path.join(scratch, "tok-vicuna")
    build_llama3_tokenizer(l3_tok_dir)
    build_vicuna_tokenizer(vi_tok_dir, scratch)
    base_llm(l3_tok_dir, os.path.join(out, "bases", "llama3-tiny"), "llama3")
    base_llm(vi_tok_dir, os.path.join(scratch, "bases", "vicuna-tiny"), "vicuna")   # not shipped (size)
    # vision towers (CLIP; SigLIP is built in the dc phase with DC's own class).  The full
    # towers live in the scratch run root only; the assets keep their configs (see main()).
    towers = os.path.join(run_root(args), "towers")
    clip_tower(os.path.join(towers, "clip-tiny-336"), 128, 4, 256, 2, 336, 14, SEED + 10)
    clip_tower(os.path.join(towers, "clip-tiny-336-w128"), 128, 4, 128, 2, 336, 14, SEED + 11)
    clip_tower(os.path.join(towers, "clip-tiny-56-l24"), 16, 2, 32, 24, 56, 14, SEED + 12)


# ----------------------------------------------------------------------------- shared helpers
def train_like_tokenizer(base_dir, version, pad_rule):
    """Tokenizer exactly as the official train.py loads/modifies it (it is saved into the
    release by the HF Trainer)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_dir, model_max_length=2048, padding_side="right", use_fast=False)
    if pad_rule == "slime":       # SliME train.py ~1080
        tok.pad_token = tok.unk_token
        if tok.pad_token is None:
            tok.pad_token = "<|end_of_text|>"
    elif pad_rule == "dc_llama3":  # DC train.py ~1012
        if tok.unk_token is None:
            tok.unk_token = "<|reserved_special_token_0|>"
        tok.pad_token = tok.unk_token
    else:                          # DC vicuna (v1)
        tok.pad_token = tok.unk_token
    return tok


def save_release_tokenizer(tok, out_dir, kind):
    tok.save_pretrained(out_dir)
    if kind == "vicuna":
        for extra in ("tokenizer.json", "added_tokens.json"):
            p = os.path.join(out_dir, extra)
            if os.path.exists(p):
                os.remove(p)


def bf16_save(model, out_dir):
    import torch
    model.config.use_cache = True
    model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD)


def versions():
    import torch, transformers, tokenizers, PIL, numpy, peft, sentencepiece, safetensors
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "peft": peft.__version__, "sentencepiece": sentencepiece.__version__,
            "safetensors": safetensors.__version__, "python": sys.version.split()[0]}


def config_subset(cfg):
    keys = ["mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
            "mm_vision_select_feature", "mm_patch_merge_type", "mm_resampler_type", "mm_resampler_dim",
            "mm_resampler_topp", "mm_resampler_temp", "seperator", "mm_learnable_gated", "image_aspect_ratio",
            "tokenizer_model_max_length", "image_grid_pinpoints", "mm_dense_connector_type", "use_mm_proj",
            "use_local_only", "use_global_only", "vocab_size", "hidden_size", "pad_token_id",
            "bos_token_id", "eos_token_id", "tokenizer_padding_side"]
    d = cfg.to_dict()
    return {k: d[k] for k in keys if k in d}


def strip_bos_placeholder(out_ids, tokenizer):
    """transformers 4.37 generate() called with inputs_embeds (as the official LLaVA-style
    generate() does) starts its output with a (batch, 1) BOS placeholder (see
    GenerationMixin._maybe_initialize_input_ids_for_generation); the new tokens follow."""
    if out_ids.numel() == N_GREEDY + 1 or (out_ids.numel() >= 1 and int(out_ids[0]) == tokenizer.bos_token_id):
        return out_ids[1:], True
    return out_ids, False


def run_root(args):
    """Working directory of the slime/dc phases: `towers/` holds the FULL towers (scratch only),
    `releases/`, `bases/`, `expected/` are symlinks into --out.  So `mm_vision_tower` stays the
    relative string "towers/<name>" and the official loaders resolve it from here."""
    return os.path.join(args.scratch, "root")


def text_logits(logits, pos, nvis, tensors, info):
    """Keep only the logits rows of the text positions (before and after the visual block)."""
    T = int(logits.shape[0])
    positions = list(range(pos)) + list(range(pos + nvis, T))
    tensors["logits"] = logits[positions]
    info["logits_positions"] = positions
    info["logits_storage"] = ("logits [len(logits_positions), V] fp32 = the official logits at the expanded-"
                              "sequence positions logits_positions (all positions outside visual_block)")


def pack_pixels(tensors, info):
    """pixel_values -> pixel_values.codes (uint8, same shape) + pixel_values.table (fp32 [3, K]) with
    pixel_values.select(-3, c) == table[c][codes.select(-3, c).long()] bit-exactly for every channel c
    (the preprocessing maps each uint8 input value of a channel to one float).  Rows of `table` are
    the sorted distinct values of the channel, padded by repeating the channel's largest value."""
    import torch
    if "pixel_values" not in tensors:
        return
    pv = tensors["pixel_values"].detach().to(torch.float32).contiguous()
    cdim = pv.dim() - 3              # channel axis: [3,H,W] (pad) or [1+n,3,H,W] (anyres)
    assert pv.shape[cdim] == 3, tuple(pv.shape)
    chans = [pv.select(cdim, c).contiguous() for c in range(3)]
    uniq = [torch.unique(ch) for ch in chans]
    counts = [int(u.numel()) for u in uniq]
    if max(counts) > 256:
        print(f"[make_reference] WARNING {info.get('release')}: pixel_values has {counts} distinct values per "
              "channel (> 256); storing plain fp32 pixel_values", flush=True)
        tensors["pixel_values"] = pv
        info["pixel_values_storage"] = {"how": "plain fp32 pixel_values (a channel has > 256 distinct values)",
                                        "distinct_per_channel": counts}
        return
    K = max(counts)
    table = torch.stack([torch.cat([u, u[-1:].expand(K - u.numel())]) for u in uniq])
    codes = torch.stack([torch.searchsorted(uniq[c], chans[c]) for c in range(3)], dim=cdim).to(torch.uint8)
    for c in range(3):
        back = table[c][codes.select(cdim, c).long()]
        assert torch.equal(back.view(torch.int32), chans[c].view(torch.int32)), (info.get("release"), c)
    del tensors["pixel_values"]
    tensors["pixel_values.codes"] = codes
    tensors["pixel_values.table"] = table
    info["pixel_values_storage"] = {
        "how": "pixel_values.codes (uint8, shape of pixel_values) + pixel_values.table (fp32 [3, K]); "
               "pixel_values.select(-3, c) == table[c][codes.select(-3, c).long()] exactly (asserted, bitwise); "
               "the channel axis is dim -3 (dim 1 of [1+n,3,H,W], dim 0 of [3,H,W]); table rows are sorted, "
               "padded by repeating the channel's largest value",
        "shape": list(pv.shape), "distinct_per_channel": counts}


def splice_positions(input_ids, n_embeds):
    """(start, length) of the visual block that replaced the single -200 in input_ids."""
    ids = input_ids.tolist()
    pos = ids.index(-200)
    return pos, n_embeds - (len(ids) - 1)


# ----------------------------------------------------------------------------- phase: slime
def phase_slime(args):
    import torch
    torch.set_num_threads(1)
    install_stubs()
    sys.path.insert(0, os.path.abspath(args.slime_repo))
    from PIL import Image
    from llava.model import LlavaLlamaForCausalLM
    import llava.model.builder as builder
    import llava.train.train as official_train
    import llava.model.multimodal_resampler.builder as rs_builder
    from llava.mm_utils import process_images, tokenizer_image_token, get_anyres_image_grid_shape
    from llava.conversation import conv_templates
    from llava.constants import IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN
    from llava.model.multimodal_resampler.sampler import get_2d_sincos_pos_embed as sincos

    out, scratch = args.out, args.scratch
    os.chdir(run_root(args))   # mm_vision_tower is the relative path "towers/..." (resolves from here)
    builder.torch = fp32_torch_proxy(torch)

    def model_args(tower, seperator, **over):
        a = types.SimpleNamespace(
            vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
            pretrain_mm_mlp_adapter=None, pretrain_mm_re_sampler=None, mm_patch_merge_type="spatial",
            mm_resampler_type="cosine", mm_resampler_topp=0.95, mm_resampler_dim=144,
            mm_resampler_temp=1.0, mm_projector_type="gated", mm_learnable_gated=-1,
            use_local_only=False, use_global_only=False, seperator=seperator,
            mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False)
        for k, v in over.items():
            setattr(a, k, v)
        return a

    def finish_config(model, tok, margs, tune_adapter=False):
        # the lines of llava/train/train.py (~1091-1150) that write config fields
        cfg = model.config
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tok.pad_token_id
        cfg.image_aspect_ratio = "anyres"
        cfg.image_grid_pinpoints = [(672, 672), (336, 672), (672, 336), (336, 1008), (1008, 336), (336, 1344), (1344, 336)]
        cfg.tokenizer_padding_side = tok.padding_side
        cfg.tokenizer_model_max_length = tok.model_max_length
        cfg.tune_mm_mlp_adapter = tune_adapter
        cfg.freeze_mm_mlp_adapter = False
        cfg.mm_use_im_start_end = False
        cfg.mm_projector_lr = None
        cfg.mm_use_im_patch_token = False

    def build_slime(name, base_dir, tower, kind, seed):
        tok = train_like_tokenizer(base_dir, None, "slime")
        sep = tok(",")["input_ids"][-1]
        model = LlavaLlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        model.config._name_or_path = "bases/" + os.path.basename(base_dir)
        margs = model_args(tower, sep)
        model.get_model().initialize_vision_modules(model_args=margs, fsdp=[])
        finish_config(model, tok, margs)
        g = torch.Generator().manual_seed(seed)
        randomize_(model, g, skip=("pos_embed", "vision_tower"))   # LLM is fine-tuned in SFT: re-randomise it too
        out_dir = os.path.join("releases", name)
        bf16_save(model, out_dir)
        save_release_tokenizer(tok, out_dir, kind)
        return out_dir

    rel_l3 = build_slime("slime-llama3", "bases/llama3-tiny", "towers/clip-tiny-336", "llama3", SEED + 100)
    rel_vi = build_slime("slime-vicuna", os.path.join(scratch, "bases", "vicuna-tiny"),
                         "towers/clip-tiny-336-w128", "vicuna", SEED + 101)

    # ---- stage-2 adapter directory (tune_mm_mlp_adapter, use_local_only, topp 1.0) ----
    tok = train_like_tokenizer("bases/llama3-tiny", None, "slime")
    model = LlavaLlamaForCausalLM.from_pretrained("bases/llama3-tiny", torch_dtype=torch.float32)
    margs = model_args("towers/clip-tiny-336", tok(",")["input_ids"][-1], mm_resampler_topp=1.0,
                       use_local_only=True, tune_mm_mlp_adapter=True)
    model.get_model().initialize_vision_modules(model_args=margs, fsdp=[])
    finish_config(model, tok, margs, tune_adapter=True)
    from safetensors.torch import load_file
    full = {}
    for f in sorted(os.listdir(rel_l3)):
        if f.endswith(".safetensors"):
            full.update(load_file(os.path.join(rel_l3, f)))
    adapter_sd = {k: v for k, v in full.items() if k.startswith("model.mm_projector.") or k.startswith("model.sampler.")}
    missing, unexpected = model.load_state_dict(adapter_sd, strict=False)
    assert not unexpected
    model.to(torch.bfloat16)
    ad_dir = os.path.join("releases", "slime-stage2-adapters")
    os.makedirs(ad_dir, exist_ok=True)
    trainer = types.SimpleNamespace(model=model, args=types.SimpleNamespace(
        tune_mm_mlp_adapter=True, use_im_start_end=False, local_rank=-1))
    official_train.safe_save_model_for_hf_trainer(trainer=trainer, output_dir=ad_dir)
    del model

    # ---- LoRA release (train.py order: LoRA on the bare LLM, then vision modules) ----
    from peft import LoraConfig, get_peft_model
    tok = train_like_tokenizer("bases/llama3-tiny", None, "slime")
    model = LlavaLlamaForCausalLM.from_pretrained("bases/llama3-tiny", torch_dtype=torch.float32)
    model.config.use_cache = False
    targets = official_train.find_all_linear_names(model)
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.05,
                             bias="none", task_type="CAUSAL_LM")
    model.to(torch.bfloat16)
    model = get_peft_model(model, lora_config)
    margs = model_args("towers/clip-tiny-336", tok(",")["input_ids"][-1])
    model.get_model().initialize_vision_modules(model_args=margs, fsdp=[])
    vt = model.get_vision_tower()
    vt.to(dtype=torch.bfloat16)
    finish_config(model, tok, margs)
    g = torch.Generator().manual_seed(SEED + 102)
    # randomise what LoRA training changes: lora_A/lora_B and the mm modules
    randomize_(model, g, skip=("pos_embed", "vision_tower", "embed_tokens", "lm_head", "norm.weight",
                               "base_layer", "layers."))
    gl = torch.Generator().manual_seed(SEED + 103)
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for n in sorted(lora_params):
        p = lora_params[n]
        fan_in = p.shape[1]
        scale = 1.0 / math.sqrt(fan_in) * (0.5 if "lora_B" in n else 1.0)
        with torch.no_grad():
            p.copy_((torch.randn(tuple(p.shape), generator=gl) * scale).to(p.dtype))
    model.to(torch.bfloat16)
    model.config.use_cache = True
    lora_dir = os.path.join("releases", "slime-lora")
    state_dict = official_train.get_peft_state_maybe_zero_3(model.named_parameters(), "none")
    non_lora_state_dict = official_train.get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    model.config.save_pretrained(lora_dir)
    model.save_pretrained(lora_dir, state_dict=state_dict)
    torch.save(non_lora_state_dict, os.path.join(lora_dir, "non_lora_trainables.bin"))
    readme = os.path.join(lora_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)   # peft's auto-generated model card (not needed, has no data)
    del model

    # ================================================================= expected outputs
    image = Image.open("expected/image.png").convert("RGB")

    def run_release(name, model_path, model_base, conv_mode, record_modules=True):
        tokenizer, model, image_processor, context_len = builder.load_pretrained_model(
            model_path, model_base, name, device_map="cpu", device="cpu")
        model.eval()
        notes = {}
        if model_base is not None and "lora" in name:
            # The official LoRA path builds the model from the *base* checkpoint under
            # low_cpu_mem_usage (meta tensors); the Resampler pos_embed tables are not in
            # non_lora_trainables.bin (requires_grad=False) and stay uninitialised memory.
            # We restore the table the official constructor computes (fp16 sin-cos).
            fixed = []
            for mname, mod in model.named_modules():
                if type(mod).__name__ == "Resampler":
                    tbl = torch.from_numpy(sincos(mod.embed_dim, mod.grid_size)).to(torch.float16)
                    before = mod.pos_embed.detach()
                    before_ok = torch.equal(before.to(torch.float16), tbl)
                    mod.pos_embed = torch.nn.Parameter(tbl.to(before.dtype), requires_grad=False)
                    fixed.append({"module": mname, "dtype": str(before.dtype),
                                  "pos_embed_matched_official_table_before_fix": bool(before_ok),
                                  "before_fix": "uninitialised memory (torch.empty; run-dependent)"})
            notes["lora_pos_embed_fix"] = fixed
        conv = conv_templates[conv_mode].copy()
        qs = DEFAULT_IMAGE_TOKEN + "\n" + QUESTION
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        pixel_values = process_images([image], image_processor, model.config)[0]      # [1+n,3,336,336]
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        images = pixel_values.unsqueeze(0)                 # DataLoader batch of 1 -> 5-D
        image_sizes = [image.size]

        rec = {}
        calls = {"proj": []}
        m = model.get_model()
        hooks = []
        hooks.append(m.vision_tower.register_forward_hook(lambda mod, i, o: rec.__setitem__("vision.features", o)))
        hooks.append(m.mm_projector.register_forward_hook(lambda mod, i, o: calls["proj"].append((i[0], o))))
        hooks.append(m.sampler.post_qformer.register_forward_hook(lambda mod, i, o: rec.__setitem__("local.compressed", o)))
        hooks.append(m.sampler.selector.register_forward_hook(lambda mod, i, o: rec.__setitem__("selector.scores", o)))

        def sampler_pre(mod, a, kw):
            rec["local.raster"] = a[0]
            rec["selector.text_embeds"] = kw["text_embedding"]
            rec["selector.text_mask"] = kw["attn_mask"]
        hooks.append(m.sampler.register_forward_pre_hook(sampler_pre, with_kwargs=True))
        orig_prep = model.prepare_inputs_labels_for_multimodal

        def prep_wrapper(*a, **k):
            res = orig_prep(*a, **k)
            if res[4] is not None and "inputs_embeds" not in rec:
                rec["inputs_embeds"] = res[4]
            return res
        model.prepare_inputs_labels_for_multimodal = prep_wrapper
        with torch.inference_mode():
            out_fwd = model(input_ids=input_ids.unsqueeze(0), images=images, image_sizes=image_sizes)
        for h in hooks:
            h.remove()
        logits = out_fwd.logits[0]
        T_full = logits.shape[0]
        pos, nvis = splice_positions(input_ids, T_full)
        visual = rec["inputs_embeds"][0, pos:pos + nvis]

        tensors = {"pixel_values": pixel_values, "input_ids": input_ids,
                   "vision.features": rec["vision.features"], "visual_tokens": visual}
        info = {"release": name, "prompt": prompt, "question": QUESTION, "conv_mode": conv_mode,
                "image_size": list(image.size), "image_file": "expected/image.png",
                "config": config_subset(model.config), "versions": versions(),
                "visual_block": {"start": pos, "length": nvis}, "num_positions": T_full,
                "dtype": "float32 (release weights are bf16; loaded with the official builder in fp32)",
                "notes": notes}
        text_logits(logits, pos, nvis, tensors, info)
        gw, gh = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints,
                                             model.get_vision_tower().config.image_size)
        info.update({"grid_cols": gw, "grid_rows": gh, "num_crops": int(pixel_values.shape[0] - 1)})

        if record_modules:
            (gx, gout), (lx, lout) = calls["proj"][0], calls["proj"][1]
            proj = m.mm_projector
            with torch.inference_mode():
                gates, _ = proj.noisy_top_k_gating(gx.reshape(-1, gx.shape[-1]))
                mlp_e = proj.projection(gx)
                attn_e = proj.projection(proj.attn(gx.unsqueeze(0)))[0]
            tensors.update({"global.gates": gates, "global.mlp_expert": mlp_e, "global.attn_expert": attn_e,
                            "global.mixture": gout, "local.compressed": rec["local.compressed"],
                            "local.projected": lout, "local.raster": rec["local.raster"],
                            "selector.text_embeds": rec["selector.text_embeds"],
                            "selector.text_mask": rec["selector.text_mask"],
                            "selector.scores": rec["selector.scores"]})
            # kept indices, through the official TextGuidedSampler.forward (scores injected)
            smp = m.sampler
            L = rec["local.raster"].shape[0]
            idx_f = torch.arange(L, dtype=torch.float32).unsqueeze(1)
            scores = rec["selector.scores"]

            def kept(transform, topp):
                saved_fwd, saved_topp = smp.selector.forward, smp.topp
                smp.selector.forward = lambda *a, **k: transform(scores)
                smp.topp = topp
                try:
                    with torch.inference_mode():
                        r = smp(idx_f, text_embedding=rec["selector.text_embeds"][0], attn_mask=rec["selector.text_mask"][0])
                finally:
                    smp.selector.forward, smp.topp = saved_fwd, saved_topp
                return r[:, 0].round().to(torch.int64)
            head = kept(lambda s: s, smp.topp)
            june = kept(lambda s: rs_builder.softmax_with_temperature(s, temperature=0.5), smp.topp)
            head1 = kept(lambda s: s, 1.0)
            june1 = kept(lambda s: rs_builder.softmax_with_temperature(s, temperature=0.5), 1.0)
            tensors.update({"selector.kept_head": head, "selector.kept_june2024": june})
            n_global = gout.shape[0]
            assert nvis == n_global + 1 + head.numel(), (nvis, n_global, head.numel())
            assert torch.equal(visual[n_global + 1:], rec["local.raster"][head])
            info["selector"] = {
                "topp": smp.topp, "temp": smp.temp, "num_local_tokens": L,
                "kept_head": int(head.numel()), "kept_june2024": int(june.numel()),
                "kept_head_topp_1.0": int(head1.numel()), "kept_june2024_topp_1.0": int(june1.numel()),
                "june2024_rule": "softmax(softmax(s/0.5)/temp) then the same nucleus rule (extra first softmax "
                                 "commented out in commit 6b4e0fe); emulated by substituting the selector output "
                                 "on the instance, eval mode (no noise)",
                "visual_block_layout": "[576 global] + [1 separator = embed_tokens(seperator)] + [kept local, ascending raster order]",
            }
            info["global"] = {"num_tokens": int(n_global),
                              "gates_mean": [float(x) for x in gates.mean(0)],
                              "gate_dtype_after_load": str(proj.w_gate.dtype),
                              "pos_embed_dtype_after_load": str(proj.attn.pos_embed.dtype)}

        # greedy: the official generate() (do_sample=False)
        with torch.inference_mode():
            gen = model.generate(input_ids.unsqueeze(0), images=images, image_sizes=image_sizes,
                                 do_sample=False, temperature=0, top_p=None, num_beams=1,
                                 max_new_tokens=N_GREEDY, use_cache=True)
        greedy, stripped = strip_bos_placeholder(gen[0], tokenizer)
        tensors["greedy"] = greedy
        info["greedy"] = {"how": "official LlavaLlamaForCausalLM.generate(do_sample=False, num_beams=1, "
                                 f"max_new_tokens={N_GREEDY}, use_cache=True) with generation_config from the "
                                 "release (would stop early at eos); selection is done once at prefill",
                          "num_tokens": int(greedy.numel()), "stripped_leading_bos_placeholder": stripped,
                          "text": tokenizer.decode(greedy, skip_special_tokens=False),
                          "first_token_equals_argmax_last_logits": bool(int(greedy[0]) == int(logits[-1].argmax()))}
        info["tokenizer_loaded_by_builder"] = type(tokenizer).__name__
        info["len_tokenizer"] = len(tokenizer)
        return model, tensors, info

    def write(name, tensors, info):
        pack_pixels(tensors, info)
        save_tensors(os.path.join("expected", f"{name}.safetensors"), tensors)
        save_json(os.path.join("expected", f"{name}.json"), info)

    model, t, info = run_release("slime-llama3", "releases/slime-llama3", None, "llama3")
    ref_l3 = {k: v for k, v in t.items()}     # before write(): pack_pixels replaces pixel_values
    write("slime-llama3", t, info)
    del model
    model, t, info = run_release("slime-vicuna", "releases/slime-vicuna", None, "vicuna_v1")
    assert torch.equal(t["pixel_values"], ref_l3["pixel_values"])
    del t["pixel_values"]
    info["not_stored_duplicates"] = {"pixel_values": "identical to expected/slime-llama3.safetensors pixel_values "
                                                     "(stored there as pixel_values.codes/.table; same "
                                                     "CLIPImageProcessor settings; asserted)"}
    write("slime-vicuna", t, info)
    del model
    model, t, info = run_release("slime-lora", "releases/slime-lora", "bases/llama3-tiny", "llama3")
    info["lora"] = {"r": 8, "alpha": 16, "target_modules": sorted(targets),
                    "how": "official builder: LlavaLlamaForCausalLM.from_pretrained(model_base, config=release config) "
                           "+ non_lora_trainables.bin + PeftModel.from_pretrained + merge_and_unload"}
    assert torch.equal(t["pixel_values"], ref_l3["pixel_values"])
    assert torch.equal(t["vision.features"], ref_l3["vision.features"])
    keep = ("input_ids", "logits", "greedy", "visual_tokens", "global.gates", "selector.scores",
            "selector.kept_head", "selector.kept_june2024", "selector.text_mask")
    info["not_stored_duplicates"] = {
        "pixel_values": "identical to expected/slime-llama3.safetensors (pixel_values.codes/.table; asserted)",
        "vision.features": "identical to expected/slime-llama3.safetensors (same tower; asserted)",
        "other module outputs": "not stored for the LoRA release (size); only " + ", ".join(keep)}
    t = {k: v for k, v in t.items() if k in keep}
    write("slime-lora", t, info)
    del model

    # adapters: no model run (see json); verify the saved tensors are slime-llama3's
    proj_bin = torch.load(os.path.join(ad_dir, "mm_projector.bin"), map_location="cpu")
    smp_bin = torch.load(os.path.join(ad_dir, "sampler.bin"), map_location="cpu")
    same = all(torch.equal(v, full[k]) for k, v in {**proj_bin, **smp_bin}.items())
    save_json(os.path.join("expected", "slime-stage2-adapters.json"), {
        "release": "slime-stage2-adapters",
        "files": {"mm_projector.bin": sorted(proj_bin.keys()), "sampler.bin": sorted(smp_bin.keys())},
        "dtypes": sorted({str(v.dtype) for v in {**proj_bin, **smp_bin}.values()}),
        "tensors_equal_slime_llama3": bool(same),
        "module_outputs": "identical to expected/slime-llama3.safetensors for global.gates, global.mlp_expert, "
                          "global.attn_expert, global.mixture, local.compressed, local.projected when fed "
                          "slime-llama3's vision.features (same tower towers/clip-tiny-336)",
        "not_in_bins": "GatedBlock buffers model.mm_projector.mean/std (named_parameters only)",
        "config": config_subset(__import__("transformers").AutoConfig.from_pretrained(ad_dir)),
        "official_loader_note": "llava/model/builder.py with model_base loads ONLY mm_projector.bin (sampler.bin is "
                                "ignored), so a builder run of this directory would leave the sampler uninitialised; "
                                "no logits are recorded for it.",
        "versions": versions()})


# ----------------------------------------------------------------------------- phase: dc
def phase_dc(args):
    import torch
    torch.set_num_threads(1)
    install_stubs()
    sys.path.insert(0, os.path.abspath(args.dc_repo))
    from PIL import Image
    from dc.model import LlavaLlamaForCausalLM
    import dc.model.builder as builder
    import dc.model.llava_arch as arch
    from dc.model.multimodal_encoder.siglip_encoder import SigLipVisionConfig, SigLipVisionModel
    from dc.mm_utils import process_images, tokenizer_image_token, get_anyres_image_grid_shape
    from dc.conversation import conv_templates
    from dc.constants import IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN

    out, scratch = args.out, args.scratch
    os.chdir(run_root(args))   # towers/ = full scratch towers; releases/, bases/, expected/ -> args.out
    builder.torch = fp32_torch_proxy(torch)

    # DC's own SigLIP tower class (27 layers configured, the last one deleted, head Identity)
    sig_dir = os.path.join("towers", "siglip-tiny-384")
    if not os.path.exists(os.path.join(sig_dir, "config.json")):
        scfg = SigLipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=27,
                                  num_attention_heads=2, image_size=384, patch_size=14,
                                  torch_dtype="bfloat16")
        torch.manual_seed(SEED + 13)
        sm = SigLipVisionModel(scfg)
        randomize_(sm, torch.Generator().manual_seed(SEED + 13))
        sm.to(torch.bfloat16).save_pretrained(sig_dir, safe_serialization=True)

    def build_dc(name, base_dir, kind, tower, dc_type, seed, pad_rule, anyres=False):
        tok = train_like_tokenizer(base_dir, None, pad_rule)
        model = LlavaLlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        model.config._name_or_path = "bases/" + os.path.basename(base_dir)
        margs = types.SimpleNamespace(
            vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
            pretrain_mm_mlp_adapter=None, mm_patch_merge_type="spatial_unpad" if anyres else "flat",
            mm_projector_type="mlp2x_gelu", mm_dense_connector_type=dc_type,
            mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False)
        if "siglip" in tower:
            # DC's SigLipVisionTower.hidden_size is the DEFAULT SigLipVisionConfig (1152), so the
            # official initialize_vision_modules would write mm_hidden_size=3456 whatever the
            # tower; for a tiny SigLIP we write what the tower really outputs (see README).
            real = SigLipVisionConfig.from_pretrained(tower).hidden_size
            orig_init = arch.build_vision_projector

            def patched_projector(cfg, *a, **k):
                cfg.mm_hidden_size = real * (3 if dc_type in ("sci", "dci") else 1)
                return orig_init(cfg, *a, **k)
            arch.build_vision_projector = patched_projector
            try:
                model.get_model().initialize_vision_modules(model_args=margs, fsdp=[])
            finally:
                arch.build_vision_projector = orig_init
        else:
            model.get_model().initialize_vision_modules(model_args=margs, fsdp=[])
        cfg = model.config
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tok.pad_token_id
        # DC train.py ~1037-1050
        cfg.image_aspect_ratio = "anyres" if anyres else "pad"
        cfg.tokenizer_padding_side = tok.padding_side
        cfg.tokenizer_model_max_length = tok.model_max_length
        cfg.tune_mm_mlp_adapter = False
        cfg.freeze_mm_mlp_adapter = False
        cfg.mm_use_im_start_end = False
        cfg.mm_projector_lr = None
        cfg.mm_use_im_patch_token = False
        if anyres:
            # not written by DC's train.py (no such argument); LLaVA-NeXT pinpoints scaled to the 56 px tile
            cfg.image_grid_pinpoints = [[112, 112], [56, 112], [112, 56], [56, 168], [168, 56]]
        g = torch.Generator().manual_seed(seed)
        randomize_(model, g, skip=("vision_tower",))
        out_dir = os.path.join("releases", name)
        bf16_save(model, out_dir)
        save_release_tokenizer(tok, out_dir, kind)
        return out_dir

    vic_base = os.path.join(scratch, "bases", "vicuna-tiny")
    releases = [
        # name, base, kind, tower, dc type, conv mode, pad rule, anyres
        ("dc-clip-sti", vic_base, "vicuna", "towers/clip-tiny-56-l24", "sti", "vicuna_v1", "dc_v1", False),
        ("dc-clip-sci", vic_base, "vicuna", "towers/clip-tiny-56-l24", "sci", "vicuna_v1", "dc_v1", False),
        ("dc-clip-dci", vic_base, "vicuna", "towers/clip-tiny-56-l24", "dci", "vicuna_v1", "dc_v1", False),
        ("dc-siglip-dci", "bases/llama3-tiny", "llama3", sig_dir, "dci", "llama_3", "dc_llama3", False),
        ("dc-siglip-sti", vic_base, "vicuna", sig_dir, "sti", "vicuna_v1", "dc_v1", False),
        ("dc-anyres", vic_base, "vicuna", "towers/clip-tiny-56-l24", "dci", "vicuna_v1", "dc_v1", True),
    ]
    image = Image.open("expected/image.png").convert("RGB")
    first_pixels = {}
    for i, (name, base, kind, tower, dc_type, conv_mode, pad_rule, anyres) in enumerate(releases):
        path = build_dc(name, base, kind, tower, dc_type, SEED + 200 + i, pad_rule, anyres)
        # -------- expected (official builder needs 'llava' in model_name) --------
        tokenizer, model, image_processor, _ = builder.load_pretrained_model(
            path, None, "llava-" + name, device_map="cpu", device="cpu")
        model.eval()
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + QUESTION)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        terminators = [tokenizer.eos_token_id]
        if conv_mode == "llama_3":     # dc/eval/model_vqa_loader.py
            if tokenizer.unk_token is None:
                tokenizer.unk_token = "<|reserved_special_token_0|>"
            tokenizer.pad_token = tokenizer.unk_token
            terminators = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        pixel_values = process_images([image], image_processor, model.config)[0]
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        images = pixel_values.unsqueeze(0)
        image_sizes = [image.size]
        rec = {}
        m = model.get_model()
        hooks = [m.vision_tower.register_forward_hook(lambda mod, i, o: rec.__setitem__("vision.features", o[0])),
                 m.mm_projector.register_forward_hook(lambda mod, i, o: rec.__setitem__("projector.out", o))]
        orig_dc = arch.dense_connector

        def dc_wrapper(*a, **k):
            r = orig_dc(*a, **k)
            rec["connector.fused"] = r
            return r
        arch.dense_connector = dc_wrapper
        orig_prep = model.prepare_inputs_labels_for_multimodal

        def prep_wrapper(*a, **k):
            res = orig_prep(*a, **k)
            if res[4] is not None and "inputs_embeds" not in rec:
                rec["inputs_embeds"] = res[4]
            return res
        model.prepare_inputs_labels_for_multimodal = prep_wrapper
        with torch.inference_mode():
            o = model(input_ids=input_ids.unsqueeze(0), images=images, image_sizes=image_sizes)
            gen = model.generate(input_ids.unsqueeze(0), images=images, image_sizes=image_sizes,
                                 do_sample=False, temperature=0, top_p=None, num_beams=1,
                                 eos_token_id=terminators, max_new_tokens=N_GREEDY, use_cache=True)
        arch.dense_connector = orig_dc
        for h in hooks:
            h.remove()
        logits = o.logits[0]
        greedy, stripped = strip_bos_placeholder(gen[0], tokenizer)
        pos, nvis = splice_positions(input_ids, logits.shape[0])
        visual = rec["inputs_embeds"][0, pos:pos + nvis]
        tensors = {"pixel_values": pixel_values, "input_ids": input_ids, "vision.features": rec["vision.features"],
                   "connector.fused": rec["connector.fused"], "projector.out": rec["projector.out"],
                   "visual_tokens": visual, "greedy": greedy}
        dedup = {}
        key = (tuple(pixel_values.shape), tower)
        if key in first_pixels:
            assert torch.equal(first_pixels[key][1], pixel_values)
            del tensors["pixel_values"]
            dedup["pixel_values"] = (f"identical to expected/{first_pixels[key][0]}.safetensors pixel_values "
                                     "(stored there as pixel_values.codes/.table; asserted)")
        else:
            first_pixels[key] = (name, pixel_values)
        if not anyres and torch.equal(rec["projector.out"][0], visual):
            del tensors["projector.out"]
            dedup["projector.out"] = "equal to visual_tokens[None] (pad path: the projector output is spliced as is; asserted)"
        info = {"release": name, "prompt": prompt, "question": QUESTION, "conv_mode": conv_mode,
                "image_size": list(image.size), "image_file": "expected/image.png",
                "config": config_subset(model.config), "versions": versions(),
                "visual_block": {"start": pos, "length": nvis}, "num_positions": int(logits.shape[0]),
                "is_siglip": bool(model.is_siglip()), "dense_connector_type": dc_type,
                "model_name_passed_to_builder": "llava-" + name,
                "greedy": {"how": "official generate(do_sample=False, num_beams=1, max_new_tokens=16, "
                                  f"eos_token_id={terminators}) as dc/eval/model_vqa_loader.py (stops at eos)",
                           "num_tokens": int(greedy.numel()), "stripped_leading_bos_placeholder": stripped,
                           "text": tokenizer.decode(greedy, skip_special_tokens=False),
                           "first_token_equals_argmax_last_logits": bool(int(greedy[0]) == int(logits[-1].argmax()))},
                "tokenizer_loaded_by_builder": type(tokenizer).__name__, "len_tokenizer": len(tokenizer),
                "not_stored_duplicates": dedup,
                "num_crops": int(pixel_values.shape[0] - 1) if pixel_values.dim() == 4 else 0,
                "dtype": "float32 (release weights bf16; builder's hard-coded fp16 switched to fp32)"}
        text_logits(logits, pos, nvis, tensors, info)
        vt = model.get_vision_tower()
        info["tower"] = {"path": tower, "class": type(vt).__name__,
                         "num_layers_built": len(vt.vision_tower.vision_model.encoder.layers)}
        if anyres:
            gw, gh = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, vt.config.image_size)
            info.update({"grid_cols": gw, "grid_rows": gh,
                         "newline_layout": "base tile tokens (P) first, then the crops re-laid as a (rows*side) x "
                                           "(cols*side) map, unpad_image() to the original aspect, image_newline "
                                           "appended at the end of every token row, flattened row-major",
                         "tokens_per_row_incl_newline": gw * vt.num_patches_per_side + 1})
            tensors["image_newline"] = m.image_newline.detach()
        write_dc = lambda n, t, j: (pack_pixels(t, j), save_tensors(os.path.join("expected", f"{n}.safetensors"), t),
                                    save_json(os.path.join("expected", f"{n}.json"), j))
        write_dc(name, tensors, info)
        del model


# ----------------------------------------------------------------------------- phase: clip-l
def phase_clipl(args):
    """Official GatedBlock + TextGuidedSampler.post_qformer at real CLIP-L geometry, weights
    regenerated from a seed (not stored)."""
    import torch
    torch.set_num_threads(1)
    install_stubs()
    sys.path.insert(0, os.path.abspath(args.slime_repo))
    from llava.model.multimodal_projector.builder import GatedBlock
    from llava.model.multimodal_resampler.builder import TextGuidedSampler
    cfg = types.SimpleNamespace(mm_hidden_size=1024, hidden_size=64, mm_learnable_gated=-1,
                                mm_resampler_dim=144, mm_resampler_topp=0.95, mm_resampler_temp=1.0,
                                pad_token_id=0)
    torch.manual_seed(0)
    gated = GatedBlock(cfg).eval().float()
    sampler = TextGuidedSampler("cosine", cfg).eval().float()
    # .float() upcast the fp16 position tables; the official constructors build them fp16 and released
    # checkpoints load into fp16 parameters, so keep them fp16 (get_abs_pos then rounds keys to fp16 too).
    for res in (gated.attn, sampler.post_qformer):
        res.pos_embed.data = res.pos_embed.data.half()
    mods = {"model.mm_projector.": gated, "model.sampler.": sampler}
    sd = {}
    for prefix, mod in mods.items():
        for k, v in mod.state_dict(keep_vars=True).items():
            sd[prefix + k] = v
    g = torch.Generator().manual_seed(CLIPL_SEED)
    recipe = []

    def scale_for(key, shape):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("w_gate", "w_noise"):
            return "w_gate", 2.0 / math.sqrt(shape[0])
        if ".ln_" in key:
            return ("ln_weight", 0.1) if leaf == "weight" else ("ln_bias", 0.1)
        if leaf == "query":
            return "query", 0.5
        if len(shape) >= 2:
            return "matrix", 1.0 / math.sqrt(shape[1])
        return "bias", 0.1

    for key in sorted(sd):
        t = sd[key]
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "pos_embed" or leaf in ("mean", "std"):
            recipe.append({"key": key, "shape": list(t.shape), "generated": False,
                           "value": "official fp16 sin-cos table (kept fp16)" if leaf == "pos_embed"
                           else "official buffer (bf16 0.0 / 1.0, unused at inference)"})
            continue
        kind, s = scale_for(key, tuple(t.shape))
        val = torch.randn(tuple(t.shape), generator=g) * s
        if kind == "ln_weight":
            val = val + 1.0
        with torch.no_grad():
            t.copy_(val)
        recipe.append({"key": key, "shape": list(t.shape), "generated": True, "kind": kind, "scale": s,
                       "formula": "1 + scale*randn" if kind == "ln_weight" else "scale*randn"})
    x = torch.randn((576, 1024), generator=g)
    crops = torch.randn((2, 576, 1024), generator=g)
    with torch.inference_mode():
        gates, _ = gated.noisy_top_k_gating(x)
        mlp_e = gated.projection(x)
        attn_e = gated.projection(gated.attn(x.unsqueeze(0)))[0]
        mix = gated(x)
        comp = sampler.post_qformer(crops)
    save_tensors(os.path.join(args.out, "expected", "clip-l-geometry.safetensors"),
                 {"global.gates": gates, "global.mlp_expert": mlp_e,
                  "global.attn_expert": attn_e, "global.mixture": mix, "local.compressed": comp[:1]})
    save_json(os.path.join(args.out, "expected", "clip-l-geometry.json"), {
        "what": "official GatedBlock (mm_projector) and TextGuidedSampler.post_qformer at CLIP-L geometry",
        "config": {"mm_hidden_size": 1024, "hidden_size": 64, "resampler_heads": 1024 // 128,
                   "mm_resampler_dim": 144, "mm_learnable_gated": -1},
        "seed": CLIPL_SEED,
        "stored": "local.compressed holds the first crop's output only (size); both crops are computed",
        "recipe": "modules built by the official constructors, then .float() (so w_gate/w_noise are fp32), then "
                  "pos_embed back to fp16 as the constructors build it. g = torch.Generator().manual_seed(seed); for "
                  "key in sorted(keys) (full official names below, 'model.mm_projector.*' and 'model.sampler.*' "
                  "together): skip pos_embed and the buffers mean/std; else value = torch.randn(shape, generator=g) "
                  "* scale (+1.0 for kind ln_weight). scale: w_gate/w_noise 2/sqrt(shape[0]); ln_* weight/bias 0.1; "
                  "query 0.5; other >=2-D tensors 1/sqrt(shape[1]); other 1-D (biases) 0.1. Then x = "
                  "torch.randn((576,1024), generator=g); crops = torch.randn((2,576,1024), generator=g).",
        "keys": recipe,
        "inputs_not_stored": "x [576,1024] and crops [2,576,1024] are regenerated from the generator (see recipe)",
        "input_checksums": {"x.sum": float(x.double().sum()), "x[0,:4]": x[0, :4].tolist(),
                            "crops.sum": float(crops.double().sum()), "crops[1,575,-4:]": crops[1, 575, -4:].tolist()},
        "outputs": {"global.gates": "noisy_top_k_gating(x)[0] in eval (no noise) [576,2]",
                    "global.mlp_expert": "projection(x)", "global.attn_expert": "projection(attn(x[None]))[0]",
                    "global.mixture": "GatedBlock(x)", "local.compressed": "sampler.post_qformer(crops) [2,144,1024]"},
        "versions": versions()})


# ----------------------------------------------------------------------------- phase: towers
def phase_towers(args):
    """Copy only the tower configs (+ preprocessor_config.json) into --out/towers; the weights
    stay in the scratch run root.  Check that every tower's weights are inside a release."""
    import torch
    from safetensors.torch import load_file
    src_root = os.path.join(run_root(args), "towers")
    towers = {}
    for name in sorted(os.listdir(src_root)):
        dst = os.path.join(args.out, "towers", name)
        os.makedirs(dst, exist_ok=True)
        for f in ("config.json", "preprocessor_config.json"):
            if os.path.exists(os.path.join(src_root, name, f)):
                shutil.copyfile(os.path.join(src_root, name, f), os.path.join(dst, f))
        towers["towers/" + name] = load_file(os.path.join(src_root, name, "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    held = {}
    rel_root = os.path.join(args.out, "releases")
    for rel in sorted(os.listdir(rel_root)):
        d = os.path.join(rel_root, rel)
        with open(os.path.join(d, "config.json")) as f:
            tower = json.load(f)["mm_vision_tower"]
        sd = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors") and f != "adapter_model.safetensors":
                sd.update({k[len(prefix):]: v for k, v in load_file(os.path.join(d, f)).items()
                           if k.startswith(prefix)})
        if not sd:
            continue     # slime-lora / slime-stage2-adapters: the tower is not in the release files
        ref = towers[tower]
        assert sorted(sd) == sorted(ref), (rel, tower)
        assert all(torch.equal(sd[k], ref[k]) for k in ref), (rel, tower)
        held.setdefault(tower, []).append(rel)
    missing = sorted(set(towers) - set(held))
    assert not missing, f"tower weights in no release: {missing}"
    print("[make_reference] tower weights (not stored in towers/) are inside: "
          + "; ".join(f"{t} -> {', '.join(r)}" for t, r in sorted(held.items())), flush=True)


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slime-repo", required=True)
    ap.add_argument("--dc-repo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=["common", "slime", "dc", "clipl", "towers"], default=None)
    ap.add_argument("--scratch", default=None)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    if args.phase:
        {"common": phase_common, "slime": phase_slime, "dc": phase_dc, "clipl": phase_clipl,
         "towers": phase_towers}[args.phase](args)
        return
    for d in ("releases", "towers", "bases", "expected"):
        shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix="slime-ref-")
    root = os.path.join(scratch, "root")          # see run_root()
    os.makedirs(os.path.join(root, "towers"))
    for d in ("releases", "bases", "expected"):
        os.makedirs(os.path.join(args.out, d), exist_ok=True)
        os.symlink(os.path.join(args.out, d), os.path.join(root, d))
    env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    try:
        for phase in ("common", "slime", "dc", "clipl", "towers"):
            print(f"[make_reference] phase {phase}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", phase,
                            "--slime-repo", os.path.abspath(args.slime_repo),
                            "--dc-repo", os.path.abspath(args.dc_repo), "--out", args.out,
                            "--scratch", scratch], check=True, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
