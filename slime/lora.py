"""LoRA on the LLM (PEFT) and the adapter as an artifact (SliME's LoRA recipe: LoRA on the LLM, projector,
adapters and compressor fully trained, saved as a PEFT adapter + ``non_lora_trainables``).

PEFT is the field's library for it and is pure PyTorch: the LLM is wrapped by ``peft.get_peft_model``, so the
adapter is a standard PEFT adapter of the HF LLM alone (what vLLM's LoRA loader and ``PeftModel`` read); the
visual modules a LoRA phase trains fully are saved beside it under their SlimeModel names.

An adapter directory::

    <dir>/adapter_config.json               PEFT's (``base_model_name_or_path`` = the base model URI)
    <dir>/adapter_model.safetensors         PEFT's LoRA weights (``base_model.model.<HF LLM name>.lora_A.weight``)
    <dir>/non_lora_trainables.safetensors   the fully trained visual modules (``projector.*``, ``compressor.*``, ...)
    <dir>/slime_adapter.json                base {uri, fingerprint}, rank, targets, serving defaults (visual mode,
                                            gamma of the phase that trained it), provenance

The base is named by URI and by a content fingerprint (sha256 of its model.safetensors), so an adapter put
on another base is refused with one line (``AdapterBaseMismatch``) instead of producing quiet garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_META = "slime_adapter.json"
NON_LORA = "non_lora_trainables.safetensors"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama and Qwen2


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """A phase's ``lora:`` section: rank, scale (alpha / r), dropout and the LLM module names it adapts."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one LLM module (e.g. q_proj)")


class AdapterBaseMismatch(ValueError):
    """An adapter was put on a base model other than the one it was trained on."""


def add_lora(model, spec: LoraSpec) -> list[str]:
    """Wrap ``model.llm`` with PEFT LoRA layers (frozen base, trainable A/B); returns the LoRA parameter names.
    Call after ``set_trainable``: PEFT freezes every non-LoRA LLM weight, the visual modules keep their flags."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets), bias="none", task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, config)
    names = [n for n, p in model.named_parameters() if ".lora_" in n]
    if not names:
        raise ValueError(f"lora.targets {list(spec.targets)} match no module of the LLM")
    return names


def has_lora(model) -> bool:
    return hasattr(model.llm, "peft_config")


def fingerprint(model_dir: str) -> str:
    """Content fingerprint of a model directory: sha256 of its model.safetensors (local path or s3://)."""
    from slime.storage import local_copy

    digest = hashlib.sha256()
    with open(Path(local_copy(str(model_dir))) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_META).exists()


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    return json.loads((Path(adapter_dir) / ADAPTER_META).read_text())


def save_adapter(model, out_dir: str | Path, *, base_uri: str, base_fingerprint: str, serving: dict,
                 trainable: list[str], state: dict[str, torch.Tensor] | None = None,
                 metadata: dict | None = None) -> Path:
    """Write ``model``'s adapter (its LoRA weights + the non-LoRA trainables) to ``out_dir`` atomically.
    ``state`` (default ``model.state_dict()``) is the full state, e.g. gathered from a ZeRO-3 engine."""
    from peft import get_peft_model_state_dict

    state = state if state is not None else model.state_dict()
    llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    lora = get_peft_model_state_dict(model.llm, state_dict=llm_state)
    non_lora = {n: state[n].detach().cpu().contiguous() for n in trainable if not n.startswith("llm.")}
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = model.llm.peft_config["default"]
    config.base_model_name_or_path = str(base_uri)
    config.save_pretrained(str(tmp))
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    save_file(non_lora, str(tmp / NON_LORA), metadata={"format": "pt"})
    meta = {"base": {"uri": str(base_uri), "fingerprint": base_fingerprint}, "r": config.r,
            "alpha": config.lora_alpha, "targets": sorted(config.target_modules),
            "llm_architecture": type(model.llm.get_base_model()).__name__,
            "non_lora_trainables": sorted(non_lora), "serving": serving, **(metadata or {})}
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def check_base(adapter_dir: str, base_dir: str, base_fingerprint: str | None = None) -> None:
    """Raise ``AdapterBaseMismatch`` (one line) unless ``base_dir`` is the base the adapter was trained on."""
    from slime.storage import local_copy

    meta = read_adapter_meta(local_copy(str(adapter_dir)))
    want = meta["base"]["fingerprint"]
    got = base_fingerprint or fingerprint(base_dir)
    if got != want:
        raise AdapterBaseMismatch(f"adapter {adapter_dir} belongs to base {meta['base']['uri']} ({want[:19]}), "
                                  f"not to {base_dir} ({got[:19]})")


def apply_adapter(model, adapter_dir: str, *, merge: bool) -> None:
    """Put a (local) adapter on ``model`` in place: its non-LoRA trainables replace the visual modules' weights,
    its LoRA weights wrap the LLM through ``PeftModel`` (``merge``: folded into the weights, PEFT removed)."""
    from peft import PeftModel

    non_lora = load_file(str(Path(adapter_dir) / NON_LORA))
    params = dict(model.named_parameters())
    unknown = sorted(set(non_lora) - set(params))
    if unknown:
        raise ValueError(f"adapter {adapter_dir}: non-LoRA trainables {unknown[:3]} are not parameters of the base")
    with torch.no_grad():
        for name, value in non_lora.items():
            params[name].copy_(value.to(params[name].dtype))
    model.llm = PeftModel.from_pretrained(model.llm, adapter_dir, is_trainable=False)
    if merge:
        model.llm = model.llm.merge_and_unload()


def load_adapter(adapter_dir: str, *, base: str | None = None, merge: bool = False,
                 device: str | torch.device = "cpu", dtype: str | None = None):
    """(model, tokenizer): the base the adapter names (or ``base``, which must have the same fingerprint) with
    the adapter applied; the model's serving defaults are the adapter's."""
    from slime.checkpoint import load_pretrained, serving_config
    from slime.storage import local_copy

    local = local_copy(str(adapter_dir))
    meta = read_adapter_meta(local)
    base = base or meta["base"]["uri"]
    check_base(str(adapter_dir), base)
    model, tokenizer = load_pretrained(base, device=device, dtype=dtype)
    apply_adapter(model, local, merge=merge)
    serving = meta["serving"]
    model.cfg = serving_config(model.cfg, visual_mode=serving["visual_mode"], gamma=serving["gamma"])
    return model.eval(), tokenizer


def load_model(uri: str, *, merge: bool = False, device: str | torch.device = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a model directory or an adapter directory (its base with the adapter on it)."""
    from slime.checkpoint import load_pretrained
    from slime.storage import local_copy

    if is_adapter_dir(local_copy(str(uri))):
        return load_adapter(uri, merge=merge, device=device, dtype=dtype)
    return load_pretrained(uri, device=device, dtype=dtype)


def merge_to_model(adapter_dir: str, out_dir: str, *, base: str | None = None) -> Path:
    """``slime merge``: the base with the adapter folded in, written as a full model directory."""
    from slime.checkpoint import save_pretrained
    from slime.storage import local_copy

    model, tokenizer = load_adapter(adapter_dir, base=base, merge=True)
    meta = read_adapter_meta(local_copy(str(adapter_dir)))
    return save_pretrained(model, tokenizer, out_dir, metadata={"merged_from": {"adapter": str(adapter_dir),
                                                                                "base": meta["base"]}})


def save_null_adapter(base_dir: str, out_dir: str | Path) -> Path:
    """An adapter of ``base_dir`` that changes nothing (PEFT's initial B = 0, so every LoRA term is exactly 0).

    Why it exists: vLLM's CPU LoRA ops (``vllm/lora/ops/torch_ops``) index the adapter slots with the row's
    slot id, and a row without an adapter has id -1, which Python indexing turns into the LAST slot: when
    every slot holds an adapter, base requests batched with them get that adapter's weights. Sending base
    requests through this adapter on CPU keeps them exact (measured: base rows wrong in a batch with two
    adapters at max_loras=2, right through the null adapter). GPU kernels skip -1 and need none of this."""
    from slime.checkpoint import load_pretrained
    from slime.model import set_trainable

    model, _ = load_pretrained(base_dir)
    set_trainable(model, [])
    names = add_lora(model, LoraSpec(r=1, alpha=1.0, dropout=0.0))
    if any(float(p.abs().max()) != 0.0 for n, p in model.named_parameters() if ".lora_B." in n):
        raise RuntimeError("PEFT no longer initialises lora_B to zero: the null adapter would change outputs")
    return save_adapter(model, out_dir, base_uri=base_dir, base_fingerprint=fingerprint(base_dir),
                        serving={"visual_mode": model.cfg.visual_mode, "gamma": model.cfg.local.gamma},
                        trainable=names, metadata={"null": True})


class AdapterError(ValueError):
    """An adapter that cannot be served on this base: the message names the one thing wrong with it."""


def check_servable(adapter_dir: str | Path, base_dir: str | Path, *, base_fingerprint: str, max_rank: int,
                   llm_only: bool) -> dict:
    """Everything an engine needs to trust before loading the (local) adapter at ``adapter_dir`` onto the base at
    ``base_dir``; returns its ``slime_adapter.json``. ``AdapterError`` (one line) when its metadata or weights are
    unreadable (a corrupt file), it belongs to another base, its rank exceeds ``max_rank``, a LoRA tensor does not
    fit the base's projection, or (``llm_only``: an engine that swaps LLM LoRA weights alone, as vLLM does) its
    fully trained visual modules differ from the base's."""
    from safetensors import safe_open

    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    try:
        meta = read_adapter_meta(adapter_dir)
        rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
        lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
        non_lora = load_file(str(adapter_dir / NON_LORA)) if (adapter_dir / NON_LORA).exists() else {}
    except Exception as e:  # OSError, JSON and key errors, safetensors' own SafetensorError: all mean unreadable
        raise AdapterError(f"adapter {adapter_dir} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    want = meta.get("base", {}).get("fingerprint")
    if want != base_fingerprint:
        raise AdapterError(f"adapter {adapter_dir} belongs to base {meta.get('base', {}).get('uri')} "
                           f"({str(want)[:19]}), not to the served base ({base_fingerprint[:19]})")
    if rank > max_rank:
        raise AdapterError(f"adapter {adapter_dir} has rank {rank}, above this endpoint's max_lora_rank {max_rank}")
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as base:
        shapes = {k: tuple(base.get_slice(k).get_shape()) for k in base.keys()}  # noqa: SIM118 (safe_open API)
        for key, value in lora.items():
            # PEFT: base_model.model.<HF LLM module>.lora_A.weight -> ours: llm.<HF LLM module>.weight
            module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            target = shapes.get(f"llm.{module}.weight")
            ok = (target is not None and value.dim() == 2 and part in ("A.weight", "B.weight")
                  and value.shape[1 if part == "A.weight" else 0] == target[1 if part == "A.weight" else 0]
                  and value.shape[0 if part == "A.weight" else 1] == rank)
            if not ok:
                raise AdapterError(f"adapter {adapter_dir}: {key} {tuple(value.shape)} fits no projection of the base")
        if llm_only:
            for name, value in non_lora.items():
                own = base.get_tensor(name) if name in shapes else None
                if own is None or not torch.equal(value.to(own.dtype), own):
                    raise AdapterError(f"adapter {adapter_dir} trains visual modules of its own ({name}); this "
                                       f"engine swaps LLM LoRA weights only: `slime merge` it and serve the merged "
                                       f"model, or train the LoRA phase with trainable: []")
    return meta
