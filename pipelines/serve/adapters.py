"""The LoRA adapters one vLLM endpoint serves beside its base model, the request's ``model`` field choosing one.

    adapters: {name: uri}   registered when the replica starts (local or s3://)
    lora_dir: <dir>         any ``<lora_dir>/<name>/`` (local or s3://) is loaded the first time a request names
                            it: adapters are added at run time by copying them there, no redeploy (every replica
                            resolves the same name the same way, which a POST to one replica could not promise)

Each adapter is checked once, before vLLM sees it (``slime.lora.check_servable``: readable files, this base's
fingerprint, rank within ``max_lora_rank``, LoRA shapes that fit, visual modules equal to the base's), then handed
to the engine with ``add_lora``, whose failures come back to the caller (the engine stays up). A bad adapter is a
400 naming what is wrong; a name that is neither the base, a registered adapter nor a folder of ``lora_dir`` is a
404. vLLM keeps at most ``max_loras`` adapters per batch and ``max_cpu_loras`` loaded, evicting the least recently
used; a name evicted there is reloaded from its path on its next request, transparently.

An adapter whose fully trained visual modules differ from the base's is refused: vLLM swaps the LLM's LoRA weights
per request, not the vision side, so serving it would silently answer with the base's projector. The honest path
for such an adapter is ``slime merge`` and a deployment of the merged model (its full cost, said up front); a LoRA
phase trained with ``trainable: []`` makes adapters this endpoint serves.

On vLLM's CPU platform a row without an adapter reads the last slot's weights (``slime.lora.save_null_adapter``),
so base requests travel through an adapter that changes nothing; its slot is added to ``max_loras``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from slime.errors import InputError

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Loaded:
    name: str
    lora_id: int
    path: str  # local directory vLLM reads
    meta: dict


class ServedAdapters:
    def __init__(self, engine, base_uri: str, base_local: Path, *, adapters: dict[str, str], lora_dir: str | None,
                 max_lora_rank: int, mode: str, null_adapter: bool) -> None:
        from slime.lora import fingerprint

        self.engine, self.base_local, self.max_rank, self.mode = engine, Path(base_local), max_lora_rank, mode
        self.static, self.lora_dir = dict(adapters), (lora_dir.rstrip("/") if lora_dir else None)
        self.base_fingerprint = fingerprint(str(base_local))
        self.loaded: dict[str, Loaded] = {}
        self._lock = asyncio.Lock()
        self._null = None
        if null_adapter:
            from slime.lora import save_null_adapter

            root = Path(os.environ.get("SLIME_VLLM_CACHE", Path.home() / ".cache" / "slime" / "vllm"))
            out = root / f"null-{self.base_fingerprint.split(':')[1][:16]}"
            if not (out / "adapter_model.safetensors").exists():
                save_null_adapter(str(base_local), out)  # atomic rename: concurrent replicas write the same files
            self._null = Loaded("<base>", 1, str(out), {})
        self._next_id = 2

    async def start(self) -> None:
        """Load the registered adapters (a bad one fails the replica's start, naming it)."""
        for name in self.static:
            await self.resolve(name)

    def base_request(self):
        return self._lora_request(self._null) if self._null else None

    @staticmethod
    def _lora_request(a: Loaded):
        from vllm.lora.request import LoRARequest

        return LoRARequest(a.name, a.lora_id, a.path)

    def _uri(self, name: str) -> str | None:
        if name in self.static:
            return self.static[name]
        if self.lora_dir and name and "/" not in name and not name.startswith("."):
            uri = f"{self.lora_dir}/{name}"
            from slime.lora import ADAPTER_META

            if _exists(f"{uri}/{ADAPTER_META}"):
                return uri
        return None

    async def resolve(self, name: str) -> tuple[object, dict]:
        """The ``LoRARequest`` and metadata for adapter ``name``; InputError 404 (unknown) or 400 (unservable)."""
        if name in self.loaded:
            a = self.loaded[name]
            return self._lora_request(a), a.meta
        async with self._lock:  # one load per name, whatever the concurrency
            if name in self.loaded:
                a = self.loaded[name]
                return self._lora_request(a), a.meta
            uri = await asyncio.to_thread(self._uri, name)
            if uri is None:
                where = f" or a folder of {self.lora_dir}" if self.lora_dir else ""
                raise InputError(f"model {name!r} is not served here: not the base, a registered adapter{where}",
                                 param="model", code="model_not_found", status=404)
            a = await asyncio.to_thread(self._check, name, uri)
            try:
                await self.engine.add_lora(self._lora_request(a))
            except Exception as e:  # vLLM's own refusal comes back as the utility call's failure
                raise InputError(f"adapter {name!r} failed to load: {str(e)[:200]}", param="model",
                                 code="adapter_load_failed") from None
            self.loaded[name] = a
            logger.info("adapter %s loaded from %s (rank %s)", name, uri, a.meta.get("r"))
            return self._lora_request(a), a.meta

    def _check(self, name: str, uri: str) -> Loaded:
        from slime.lora import AdapterError, check_servable
        from slime.storage import local_copy

        try:
            local = Path(local_copy(uri)).resolve()
            meta = check_servable(local, self.base_local, base_fingerprint=self.base_fingerprint,
                                  max_rank=self.max_rank, llm_only=True)
        except (AdapterError, OSError) as e:  # named by its URI, not by the local copy's path
            why = str(e).replace(str(local), uri) if "local" in locals() else str(e)
            raise InputError(f"adapter {name!r} cannot be served: {why}", param="model",
                             code="adapter_load_failed") from None
        trained = meta.get("serving", {}).get("visual_mode")
        if trained not in (None, self.mode):
            raise InputError(f"adapter {name!r} was trained on {trained!r} visual tokens and this endpoint feeds "
                             f"{self.mode!r} (one mode per engine): serve it where mode={trained}", param="model",
                             code="adapter_load_failed")
        lora_id = self._next_id
        self._next_id += 1
        return Loaded(name, lora_id, str(local), meta)

    def names(self) -> list[str]:
        """Registered and loaded adapters, plus every adapter folder of ``lora_dir`` (what a request may name)."""
        names = set(self.static) | set(self.loaded)
        if self.lora_dir:
            names |= set(_adapter_folders(self.lora_dir))
        return sorted(names)


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()  # a folder copied in after the last look must be seen
    return fs.exists(path)


def _adapter_folders(root: str) -> list[str]:
    import fsspec

    from slime.lora import ADAPTER_META

    fs, path = fsspec.core.url_to_fs(root)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    try:
        found = fs.glob(f"{path.rstrip('/')}/*/{ADAPTER_META}")
    except FileNotFoundError:
        return []
    return [p.rstrip("/").split("/")[-2] for p in found]

