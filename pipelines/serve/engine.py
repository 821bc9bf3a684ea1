"""The vLLM engine for SliME: one construction path for serving (``AsyncLLM``), batch inference and
evaluation (``vllm.LLM``), and the request encoding they share with the HF ``Predictor``.

    model_dir(uri)          checkpoint (local or s3://) -> local dir vLLM can open (config.json + weights)
    engine_kwargs(...)      the EngineArgs every engine here is built with
    VllmChat                ChatRequest -> vLLM prompt (token ids with one <image>, the image, the
                            instruction ids + gamma as mm_processor_kwargs) + SamplingParams, and
                            vLLM output -> ChatResult (same fields as the Predictor's)

Prompts go to vLLM as token ids made by ``slime.predictor.ChatEncoder`` (the Predictor's own encoder),
so the template, the instruction mask and every validation error are the reference path's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from slime.checkpoint import architecture_config, load_config
from slime.config import VisualMode
from slime.predictor import ChatEncoder, ChatRequest, ChatResult, RequestLimits
from slime.storage import local_copy

# vLLM's import on CPU logs "Triton is installed, but doesn't include CPU backend. Disabling Triton." as a warning
# in every process that imports it (the job's driver too): the CPU backend never uses Triton, so it says nothing.
logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)

# Before vLLM is imported in this process or a child: on a 2-core machine vLLM's CPU backend would
# otherwise reserve one core for the front end and run the model on the other.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; vLLM's CPU default is 4
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def model_dir(uri: str, visual_mode: VisualMode | None = None, cache_root: str | None = None) -> Path:
    """A local directory vLLM can open for the checkpoint at ``uri``: ``config.json`` (a
    ``SlimeVllmConfig``) next to a link to the checkpoint's ``model.safetensors``. The checkpoint itself
    is never written to; the view lives under ``cache_root`` keyed by the config and by the files it links
    (path, size, mtime): an s3:// model's copy has a new path per content (``local_copy``), a local model
    re-exported in place has new files, so neither is served through a stale view.

    vLLM's CPU attention kernels take head sizes 32, 64, 80, ... only: the test-sized ``tiny`` preset
    (head size 16) runs on the HF Predictor alone; tests build vLLM models with 2 heads of 32."""
    from pipelines.serve.vllm_plugin import ARCHITECTURE, LLM_ARCHITECTURES

    local = Path(local_copy(str(uri))).resolve()
    if not (local / "slime_config.yaml").exists():
        raise FileNotFoundError(f"{uri} is not a slime model directory (no slime_config.yaml)")
    cfg = load_config(local)
    meta = json.loads((local / "metadata.json").read_text())
    text = architecture_config(json.loads((local / "llm_config.json").read_text()))
    text["architectures"] = [LLM_ARCHITECTURES[cfg.llm.kind]]
    from slime.config import to_dict

    config = {"model_type": "slime", "architectures": [ARCHITECTURE], "slime": to_dict(cfg), "text_config": text,
              "vision_config": json.loads((local / "vision_config.json").read_text()),
              "image_token_id": meta["image_token_id"], "separator_id": meta["separator_id"],
              "visual_mode": visual_mode or cfg.visual_mode, "dtype": cfg.dtype}
    body = json.dumps(config, sort_keys=True, default=str)
    # Links to the weights and the tokenizer files: vLLM opens one directory for all three.
    linked = [local / "model.safetensors", *sorted((local / "tokenizer").iterdir())]
    stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in linked]
    key = hashlib.sha256(json.dumps([stamps, body]).encode()).hexdigest()[:16]
    root = Path(cache_root or os.environ.get("SLIME_VLLM_CACHE", Path.home() / ".cache" / "slime" / "vllm"))
    out = root / key
    if not (out / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))  # per call: threads share a pid
        for src in linked:
            (tmp / src.name).symlink_to(src)
        (tmp / "config.json").write_text(body)
        tmp.chmod(0o755)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race: its view is identical
            shutil.rmtree(tmp)
    return out


def adapter_meta(uri: str) -> dict | None:
    """``slime_adapter.json`` when ``uri`` (local or s3://) is a LoRA adapter directory, else None."""
    import fsspec

    from slime.lora import ADAPTER_META

    fs, path = fsspec.core.url_to_fs(f"{str(uri).rstrip('/')}/{ADAPTER_META}")
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def vllm_unsupported(uri: str) -> str | None:
    """Why vLLM cannot run the checkpoint at ``uri`` (an adapter: its base) on this machine, or None if it can.
    ``auto`` engine choices (serving, evaluation) use it to fall back to the HF Predictor, and say so."""
    import fsspec
    import yaml

    from slime.config import ModelConfig, from_dict

    meta = adapter_meta(uri)
    if meta and meta.get("non_lora_trainables"):
        return (f"the adapter trained visual modules of its own ({meta['non_lora_trainables'][0]}, ...), and vLLM swaps "
                f"only the LLM's LoRA weights per request (slime merge it to serve it on vLLM)")
    uri = meta["base"]["uri"] if meta else uri

    def read(name: str) -> str:  # two small files, not a copy of the weights (s3:// models)
        with fsspec.open(f"{str(uri).rstrip('/')}/{name}", "r") as f:
            return f.read()

    cfg = from_dict(ModelConfig, yaml.safe_load(read("slime_config.yaml")))
    if cfg.local.selection != "topk":
        return f"local.selection={cfg.local.selection!r} masks tokens out of attention, which vLLM cannot"
    text = json.loads(read("llm_config.json"))
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            return f"vLLM's CPU attention takes head sizes {sizes}; this model's is {head}"
    return None


def resolve_engine(engine: str, uri: str) -> str:
    """``auto`` -> ``vllm`` when vLLM can run the model here, else ``hf`` (with a logged reason)."""
    if engine != "auto":
        return engine
    reason = vllm_unsupported(uri)
    if reason:
        logging.getLogger(__name__).warning("serving %s on the HF Predictor, not vLLM: %s", uri, reason)
        return "hf"
    return "vllm"


def engine_kwargs(uri: str, *, visual_mode: VisualMode | None = None, enforce_eager: bool = True,
                  max_num_seqs: int = 16, prefix_caching: bool = True, **overrides) -> dict:
    """EngineArgs for ``uri``. ``enforce_eager`` (default) skips torch.compile: starts take about half
    as long on CPU, and tiny models gain nothing from compilation."""
    from vllm.config import StructuredOutputsConfig
    from vllm.platforms import current_platform

    local = Path(local_copy(str(uri))).resolve()
    cfg = load_config(local)
    one_device = all((overrides.get(k) or 1) == 1 for k in ("tensor_parallel_size", "pipeline_parallel_size"))
    if current_platform.is_cpu() and one_device:
        # vLLM's CPU platform turns the one-process executor ("uni") into "mp": one more spawned process that
        # imports torch and vLLM again, ~8 s of an AsyncLLM start on 2 idle cores (15.6 -> 7.9 s measured,
        # same tokens) and far more while the cores serve. Given as a class, the uni executor runs the model
        # in the engine-core process; on GPU vLLM already picks it for one device.
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        overrides.setdefault("distributed_executor_backend", UniProcExecutor)
    return dict(model=str(model_dir(uri, visual_mode)), dtype=overrides.pop("dtype", None) or cfg.dtype,
                max_model_len=cfg.llm.max_position, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
                enable_prefix_caching=prefix_caching, limit_mm_per_prompt={"image": 1}, seed=0,
                # vLLM's per-request timestamps (RequestOutput.metrics): off unless asked (pipelines.serve.timings)
                disable_log_stats=overrides.pop("disable_log_stats", True),
                # JSON output without free whitespace (engine-wide in vLLM): otherwise a small model can
                # spend all of max_tokens on blanks inside an object.
                structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
                **overrides)


class VllmChat:
    """Request side of the engine: encode with the Predictor's ``ChatEncoder``, decode vLLM outputs."""

    def __init__(self, uri: str, *, limits: RequestLimits | None = None, mode: VisualMode | None = None,
                 serving: dict | None = None) -> None:
        from transformers import AutoTokenizer

        from slime.checkpoint import serving_config

        local = self.local_dir = Path(local_copy(str(uri))).resolve()
        self.cfg = load_config(local)
        if serving:  # an adapter's serving defaults (the visual mode and gamma its phase trained with)
            self.cfg = serving_config(self.cfg, visual_mode=serving["visual_mode"], gamma=serving["gamma"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(local / "tokenizer"))
        self.encoder = ChatEncoder(self.cfg, self.tokenizer, limits=limits, mode=mode)
        self.image_token_id = self.encoder.processor.image_token_id

    def prompt(self, req: ChatRequest) -> tuple[dict, dict]:
        """-> (vLLM prompt dict, sample info {prompt_tokens, visual_tokens, max_tokens}). InputError on bad input."""
        sample = self.encoder.encode(req, pixels=False)
        ids, instr = list(sample["input_ids"]), list(sample["instruction_mask"])
        info = {"prompt_tokens": len(ids), "visual_tokens": int(sample["num_visual_tokens"]),
                "max_tokens": self.encoder.params(req, len(ids)).max_new_tokens}
        if not req.images:
            return {"prompt_token_ids": ids}, info
        # vLLM expands the one <image> itself (PromptReplacement); the run the processor wrote collapses.
        first = ids.index(self.image_token_id)
        collapsed = ids[:first + 1] + ids[first + info["visual_tokens"]:]
        instruction_ids = [i for i, keep in zip(ids, instr) if keep]
        gamma = self.cfg.local.gamma if req.gamma is None else float(req.gamma)
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": req.images[0]},
                "mm_processor_kwargs": {"gamma": gamma, "instruction_ids": instruction_ids}}, info

    def sampling_params(self, req: ChatRequest, info: dict, **extra):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=info["max_tokens"], temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=list(req.stop) + list(self.encoder.stops),
                              stop_token_ids=sorted(self.encoder.eos_ids), skip_special_tokens=True, **extra)

    def completion_ids(self, token_ids) -> list[int]:
        """Generated ids without the end-of-turn id the Predictor never appends."""
        ids = list(token_ids)
        return ids[:-1] if ids and ids[-1] in self.encoder.eos_ids else ids

    def result(self, completion, info: dict, latency_s: float = 0.0) -> ChatResult:
        finish = completion.finish_reason or "length"  # vLLM's own: stop, length or abort
        return ChatResult(text=completion.text, finish_reason=finish, prompt_tokens=info["prompt_tokens"],
                          completion_tokens=len(self.completion_ids(completion.token_ids)),
                          visual_tokens=info["visual_tokens"], latency_s=latency_s)


def offline_engine(uri: str, *, in_process: bool = False, **kwargs):
    """A synchronous ``vllm.LLM`` (batch inference, evaluation, parity tests).

    ``in_process`` runs vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of
    a spawned one that imports torch and vLLM again: with the one-process executor (``engine_kwargs``) the tiny
    engine starts in ~5 s instead of ~17 s with both spawns on 2 cores. Only for a process that exists to
    hold the engine (a Ray Data actor): vLLM's CPU worker then turns ``torch.set_num_threads`` into a no-op
    and initialises ``torch.distributed`` in it, and it seeds the process's global RNGs. Generation is the
    same either way (same tokens; tests/test_evaluate.py checks the in-process engine against the Predictor).
    The asynchronous engine (serving) always has its own process: vLLM does not run ``AsyncLLM`` in-process."""
    from unittest import mock

    from vllm import LLM

    if not in_process:
        return LLM(**engine_kwargs(uri, **kwargs))
    # Read while the engine is built (platform check, EngineArgs, LLMEngine), and only then: restored after,
    # so an AsyncLLM or a child process started later in this process gets vLLM's default.
    with mock.patch.dict(os.environ, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        return LLM(**engine_kwargs(uri, **kwargs))


def async_engine(uri: str, cpu_threads: int | None = None, **kwargs):
    """An ``AsyncLLM`` (serving): continuous batching across concurrent requests.

    ``cpu_threads``: the OpenMP threads its engine-core process computes on (CPU backend). The spawned core reads
    ``OMP_NUM_THREADS`` when it starts; unset, it inherits this process's, which Ray sets to a replica's
    ``num_cpus`` (at least 1): a 0.5-CPU replica's engine computes on one thread whatever the node has."""
    from unittest import mock

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    env = {"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads else {}
    with mock.patch.dict(os.environ, env):  # only while the core is spawned: this process keeps its own
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(uri, **kwargs)))


class OfflineVllm:
    """Batch generation on a ``vllm.LLM`` with the Predictor's interface (``encode`` validates one
    request, ``generate`` answers many): Ray Data batch inference and evaluation run on the engine the
    endpoint serves."""

    def __init__(self, uri: str, *, limits: RequestLimits | None = None, mode: VisualMode | None = None,
                 in_process: bool = False, **engine_overrides) -> None:
        meta, self.lora = adapter_meta(uri), None
        if meta:  # an adapter directory: its base on the engine, every request through the adapter
            from vllm.lora.request import LoRARequest

            from pipelines.serve.ingress import LORA_RANKS

            self.lora = LoRARequest("adapter", 1, str(Path(local_copy(str(uri))).resolve()))
            mode = mode or meta["serving"]["visual_mode"]
            engine_overrides.update(enable_lora=True, max_loras=1, max_cpu_loras=1,
                                    max_lora_rank=min(r for r in LORA_RANKS if r >= int(meta["r"])))
            uri = meta["base"]["uri"]
        self.chat = VllmChat(uri, limits=limits, mode=mode, serving=meta["serving"] if meta else None)
        self.cfg, self.processor = self.chat.cfg, self.chat.encoder.processor
        self.llm = offline_engine(uri, visual_mode=mode, in_process=in_process, **engine_overrides)

    def encode(self, req: ChatRequest) -> dict:
        return self.chat.prompt(req)[1]

    def generate(self, reqs: list[ChatRequest]) -> list[ChatResult]:
        """Answers in request order; each ``latency_s`` is that request's own, from the batch's submission to
        the engine step that finished it (``LLM.generate`` would only give the batch's time). The step loop is
        ``LLM.generate``'s own (``enqueue`` + ``llm_engine.step``), outputs ordered by its request counter."""
        import time

        start = time.perf_counter()
        prompts, infos = zip(*(self.chat.prompt(r) for r in reqs))
        params = [self.chat.sampling_params(r, i) for r, i in zip(reqs, infos)]
        self.llm.enqueue(list(prompts), params, lora_request=self.lora, use_tqdm=False)
        finished, engine = [], self.llm.llm_engine
        while engine.has_unfinished_requests():
            finished += [(o, time.perf_counter()) for o in engine.step() if o.finished]
        if len(finished) != len(reqs):
            raise RuntimeError(f"vLLM finished {len(finished)} requests for a batch of {len(reqs)}")
        finished.sort(key=lambda item: int(item[0].request_id))
        return [self.chat.result(o.outputs[0], i, done - start) for (o, done), i in zip(finished, infos)]
