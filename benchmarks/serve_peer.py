"""The peer of ``benchmarks.serve_load``: the same LLM as a LLaVA-NeXT model (transformers'
``LlavaNextForConditionalGeneration``, random weights, a CLIP of our tiny size, LLaVA-NeXT's pinpoint shapes on our
tile) served by stock vLLM's own OpenAI server, a subprocess started and stopped by its pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from benchmarks.serve_parts import IMAGES, QUESTION

# --------------------------------------------------------------------------- the peer: stock vLLM + LLaVA-NeXT

TILE = 56  # our tiny CLIP's image size
PINPOINTS = [[TILE * a, TILE * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]  # LLaVA-NeXT's shapes
VICUNA = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
          "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def peer_model(model: str, out_dir: str) -> tuple[str, dict]:
    """Our checkpoint's LLM shape (and tokenizer) as a random-weight LLaVA-NeXT with a CLIP of our tiny size ->
    (directory, visual tokens per request for each benchmark image, from its processor)."""
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from slime.checkpoint import load_config
    from slime.storage import local_copy

    local = local_copy(model)
    cfg = load_config(local)
    tok = AutoTokenizer.from_pretrained(os.path.join(local, "tokenizer"))
    tok.chat_template = VICUNA
    image_id = tok.convert_tokens_to_ids("<image>")
    v, t = cfg.vision, cfg.llm
    vision = CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_dim,
                              intermediate_size=v.intermediate_dim, num_hidden_layers=v.num_layers,
                              num_attention_heads=v.num_heads, projection_dim=v.hidden_dim)
    text = LlamaConfig(hidden_size=t.hidden_dim, intermediate_size=t.intermediate_dim, num_hidden_layers=t.num_layers,
                       num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=len(tok),
                       max_position_embeddings=t.max_position, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, tie_word_embeddings=False)
    import torch

    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).to(torch.float32).save_pretrained(out_dir)
    # transformers 5 writes the CLIP tower's weights as vision_tower.<module>; vLLM's llava_next loads the layout
    # of the published LLaVA-NeXT checkpoints, vision_tower.vision_model.<module>
    from safetensors.torch import load_file, save_file

    weights = os.path.join(out_dir, "model.safetensors")
    tensors = {(f"vision_tower.vision_model.{k[len('vision_tower.'):]}" if k.startswith("vision_tower.") and
                not k.startswith("vision_tower.vision_model.") else k): v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=v.patch_size, vision_feature_select_strategy="default", image_token="<image>",
        chat_template=VICUNA, num_additional_image_tokens=1)
    proc.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    visual = {}
    for name, (w, h) in IMAGES.items():
        enc = proc(images=Image.new("RGB", (w, h)), text=f"USER: <image>\n{QUESTION} ASSISTANT:", return_tensors="pt")
        visual[name] = int((enc["input_ids"] == image_id).sum())
    return out_dir, visual


# vLLM 0.32's llava family imports ``_num_image_tokens`` from transformers' torchvision-backed Pixtral image
# processor module (models/pixtral.py), so stock vLLM cannot load LLaVA-NeXT without torchvision, which this project
# keeps out. In the peer's processes only (a sitecustomize on its PYTHONPATH, inherited by the engine core it
# spawns), that module name resolves to transformers' own PIL Pixtral module, which defines the same function.
# Nothing else changes: LLaVA-NeXT's processor, model and vLLM server are stock.
PEER_SITECUSTOMIZE = """
import importlib
import importlib.abc
import importlib.util
import sys

_NAME = "transformers.models.pixtral.image_processing_pixtral"
_PIL = "transformers.models.pixtral.image_processing_pil_pixtral"


class _PilPixtral(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != _NAME or importlib.util.find_spec("torchvision") is not None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return importlib.import_module(_PIL)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _PilPixtral())
"""


class PeerServer:
    """Stock vLLM's OpenAI server on ``model_dir``, a subprocess on a free 127.0.0.1 port, stopped by its pid."""

    def __init__(self, model_dir: str, max_len: int, log_path: str, threads: int | None = None) -> None:
        from pipelines.serve.ingress import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", "peer", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", "16", "--enforce-eager",
               "--seed", "0", "--limit-mm-per-prompt", json.dumps({"image": 1}), "--disable-uvicorn-access-log"]
        shim = os.path.join(os.path.dirname(log_path), "peer_site")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(PEER_SITECUSTOMIZE)
        path = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
               **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(600)
        self.start_s = time.perf_counter() - t0

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode} (log: {self.log.name})")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling a condition with a deadline
        raise TimeoutError(f"vLLM's server not ready in {timeout} s (log: {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and the engine core it spawned
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

