"""Warm pipelines for generation: one per base model, LoRAs hot-swapped as peft adapters.

A :class:`PipelineCache` lives on one worker. It keeps loaded bases (least recently used first
out) and, inside each, the LoRAs already loaded as adapters, within a memory budget. A new LoRA
or a new weight never reloads the base: LoRAs go in with diffusers' ``load_lora_weights`` (which
converts kohya keys) and are weighted with ``set_adapters``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from ..families.protocol import Base
from ..families.registry import family, load_base, lora_family
from ..formats.kohya import LoraFileError, read_lora
from ..spec import SpecError
from .loras import lora_short_hash
from .sampler import Sampler


@dataclass
class LoadedLora:
    adapter: str  # the peft adapter name inside the pipeline
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size): a file rewritten under the same name is loaded again
    short_hash: str
    nbytes: int


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading a LoRA into a text encoder prints transformers' load report, which lists every LoRA
    # weight as "MISSING" although they are loaded (diffusers fills them in afterwards).
    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


# ---- the cache ----


def _module_bytes(modules: Sequence[torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def default_budget(device: torch.device) -> int:
    """Bytes the cache may fill: 80% of the GPU, or half the machine's memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class WarmPipeline:
    base: Base
    sampler: Sampler
    nbytes: int
    loras: OrderedDict[Path, LoadedLora] = field(default_factory=OrderedDict)  # least recently used first
    next_id: int = 0

    @property
    def total_bytes(self) -> int:
        return self.nbytes + sum(lora.nbytes for lora in self.loras.values())


class PipelineCache:
    """Warm pipelines by base name, and their LoRA adapters, least recently used evicted first."""

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        max_bytes: int | None = None,
        max_loras: int = 16,
        loader: Callable[[str], Base] = load_base,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.max_bytes = default_budget(self.device) if max_bytes is None else max_bytes
        self.max_loras = max_loras
        self.loader = loader
        self.pipelines: OrderedDict[str, WarmPipeline] = OrderedDict()

    def used_bytes(self) -> int:
        return sum(w.total_bytes for w in self.pipelines.values())

    def pipeline(self, base_name: str) -> WarmPipeline:
        """The warm pipeline for ``base_name``, loading the base (on the CPU, then moved) if needed."""
        if base_name in self.pipelines:
            self.pipelines.move_to_end(base_name)
            return self.pipelines[base_name]
        base = self.loader(base_name)
        # On a GPU the weights live in the compute dtype; on a CPU fp32 keeps results reproducible.
        weight_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        # Sized at its final dtype (the VAE stays fp32) before it moves, so room is made on the device first.
        scale = torch.finfo(weight_dtype).bits / 32
        nbytes = int(_module_bytes([base.unet, *base.text_encoders]) * scale) + _module_bytes([base.vae])
        self._make_room(nbytes, keep=None)
        base.to(self.device, weight_dtype)
        warm = WarmPipeline(base, Sampler(base, device=self.device, dtype=self.dtype), nbytes)
        self.pipelines[base_name] = warm
        return warm

    def activate(self, warm: WarmPipeline, loras: Sequence[tuple[Path, float]]) -> list[LoadedLora]:
        """Load what is not loaded yet, then make exactly ``loras`` active with their weights."""
        keep = {p.resolve() for p, _ in loras}
        loaded = [self._lora(warm, path, keep) for path, _ in loras]
        pipe = warm.sampler.pipe
        if loaded:
            pipe.enable_lora()
            pipe.set_adapters([lora.adapter for lora in loaded], [w for _, w in loras])
        elif warm.loras:
            pipe.disable_lora()
        return loaded

    def _lora(self, warm: WarmPipeline, path: Path, keep: set[Path]) -> LoadedLora:
        key = path.resolve()
        stamp = _stamp(key)
        known = warm.loras.get(key)
        if known is not None and known.stamp == stamp:
            warm.loras.move_to_end(key)
            return known
        if known is not None:
            self._unload(warm, key)
        tensors, metadata = read_lora(key)
        trained_on = lora_family(tensors, metadata)
        base = warm.base
        if trained_on is not None and trained_on != base.family:
            raise SpecError(
                f"{path.name} is an {family(trained_on).display_name} LoRA; it cannot be used with "
                f"{base.name}, an {family(base.family).display_name} model"
            )
        nbytes = sum(t.numel() for t in tensors.values()) * torch.finfo(self.dtype).bits // 8
        while len(warm.loras) >= self.max_loras and self._evict_lora(warm, keep):
            pass
        self._make_room(nbytes, keep=warm, keep_loras=keep)
        adapter = f"lora{warm.next_id}"
        warm.next_id += 1
        try:
            tensors = family(base.family).loadable_lora(tensors, base)
            with _quiet_transformers():
                warm.sampler.pipe.load_lora_weights(tensors, adapter_name=adapter)
        except Exception as e:  # diffusers/peft raise many types for keys or shapes that do not fit
            self._drop_adapter(warm, adapter)
            why = "it was made for another model" if trained_on is None else str(e).splitlines()[0]
            raise LoraFileError(f"{path.name} does not fit {base.name} ({why})") from e
        lora = LoadedLora(adapter, key, stamp, lora_short_hash(key, metadata), nbytes)
        warm.loras[key] = lora
        return lora

    def _drop_adapter(self, warm: WarmPipeline, adapter: str) -> None:
        pipe = warm.sampler.pipe
        if any(adapter in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters([adapter])

    def _unload(self, warm: WarmPipeline, key: Path) -> None:
        self._drop_adapter(warm, warm.loras.pop(key).adapter)

    def _evict_lora(self, warm: WarmPipeline, keep: Collection[Path]) -> bool:
        for key in warm.loras:
            if key not in keep:
                self._unload(warm, key)
                return True
        return False

    def _make_room(self, nbytes: int, keep: WarmPipeline | None, keep_loras: Collection[Path] = ()) -> None:
        """Unload unused LoRAs, then whole pipelines, least recently used first, until ``nbytes`` fit."""
        for warm in list(self.pipelines.values()):
            while self.used_bytes() + nbytes > self.max_bytes and self._evict_lora(
                warm, keep_loras if warm is keep else ()
            ):
                pass
        for name, warm in list(self.pipelines.items()):
            if self.used_bytes() + nbytes <= self.max_bytes:
                break
            if warm is not keep:
                del self.pipelines[name]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
