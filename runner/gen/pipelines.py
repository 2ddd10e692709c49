"""Warm pipelines for generation: one per base model, LoRAs hot-swapped as peft adapters.

A :class:`PipelineCache` lives on one worker. It keeps loaded bases (least recently used first
out) and, inside each, the LoRAs already loaded as adapters, within a memory budget. A new LoRA
or a new weight never reloads the base: LoRAs go in with diffusers' ``load_lora_weights`` (which
converts kohya keys) and are weighted with ``set_adapters``.

With ``compile_unet`` the UNet (or transformer) is compiled once and never recompiled for a new
LoRA: it holds one adapter slot, prepared for ranks up to ``hotswap_rank`` with diffusers'
``enable_lora_hotswap``, and the LoRAs of each request are written into that slot in place
(``load_lora_weights(..., hotswap=True)``), joined into one LoRA with their weights inside. Text
encoders are not compiled (and diffusers cannot hotswap them): their parts stay ordinary adapters.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)

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
    unet: dict[str, torch.Tensor] | None = None  # compile_unet: the file's UNet tensors, for the slot


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


HOT = "hot"  # compile_unet: the UNet's one adapter slot
COMPILE_ENV = "LORACORD_GEN_COMPILE"  # a torch.compile backend (inductor): the worker's /gen compiles
HOTSWAP_RANK_ENV = "LORACORD_GEN_HOTSWAP_RANK"  # the slot's rank: the most any request's LoRAs add up to


def worker_settings(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The worker's PipelineCache speed settings, from the server's environment (off by default
    until the GPU benchmark says they pay; docs/benchmarks.md)."""
    backend = env.get(COMPILE_ENV, "").strip()
    if not backend or backend.lower() in ("0", "false", "no", "off"):
        return {}
    if backend.lower() in ("1", "true", "yes", "on"):
        backend = "inductor"
    try:
        rank = int(env.get(HOTSWAP_RANK_ENV, "128"))
    except ValueError:
        raise SpecError(f"{HOTSWAP_RANK_ENV} must be a whole number (a LoRA rank)") from None
    return {"compile_unet": True, "compile_backend": backend, "hotswap_rank": rank}


def join_loras(parts: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Several kohya LoRAs at their weights as one: each module's ranks side by side.

    ``down`` rows and ``up`` columns are concatenated, each ``up`` scaled by its LoRA's weight ×
    alpha / rank, and alpha set to the joined rank (scale 1): the joined delta is the sum of the
    weighted deltas, the sum ``set_adapters`` would make.
    """
    modules = sorted({k.split(".", 1)[0] for t, _ in parts for k in t if k.endswith(".lora_down.weight")})
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        downs, ups = [], []
        for t, w in parts:
            down = t.get(f"{m}.lora_down.weight")
            if down is None:
                continue
            rank = down.shape[0]
            alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else float(rank)
            downs.append(down.float())
            ups.append(t[f"{m}.lora_up.weight"].float() * (w * alpha / rank))
        if len({d.shape[1:] for d in downs}) > 1:
            raise SpecError(f"these LoRAs shape {m} differently (LoCon kernels), so they cannot be joined")
        out[f"{m}.lora_down.weight"] = torch.cat(downs)
        out[f"{m}.lora_up.weight"] = torch.cat(ups, dim=1)
        out[f"{m}.alpha"] = torch.tensor(float(out[f"{m}.lora_down.weight"].shape[0]))
    return out


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
    # compile_unet: what the UNet's slot holds ((path, file stamp, weight) each), and those LoRAs.
    hot_key: tuple | None = None
    hot: list[tuple[dict[str, torch.Tensor], float]] = field(default_factory=list)
    compiled: bool = False
    # What the pipeline's LoRA layers were last set to (None: not known since an adapter came or went):
    # enable_lora and set_adapters each walk every layer of the UNet and text encoders, so a /gen
    # with the adapters already set skips them, and a swap among loaded LoRAs costs one set_adapters.
    lora_enabled: bool | None = None
    active: tuple[tuple[str, ...], tuple[float, ...]] | None = None

    def adapters_changed(self) -> None:
        self.lora_enabled, self.active = None, None

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
        compile_unet: bool = False,
        compile_backend: str = "inductor",
        hotswap_rank: int = 128,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.max_bytes = default_budget(self.device) if max_bytes is None else max_bytes
        self.max_loras = max_loras
        self.loader = loader
        self.compile_unet, self.compile_backend, self.hotswap_rank = (
            compile_unet,
            compile_backend,
            hotswap_rank,
        )
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
        if self.compile_unet:
            # Before the first LoRA: the slot is then made for every rank up to hotswap_rank, its
            # scale a tensor, so no later LoRA changes a shape or a constant the graph holds.
            base.unet.enable_lora_hotswap(target_rank=self.hotswap_rank)
        self.pipelines[base_name] = warm
        return warm

    def activate(self, warm: WarmPipeline, loras: Sequence[tuple[Path, float]]) -> list[LoadedLora]:
        """Load what is not loaded yet, then make exactly ``loras`` active with their weights."""
        keep = {p.resolve() for p, _ in loras}
        loaded = [self._lora(warm, path, keep) for path, _ in loras]
        pipe = warm.sampler.pipe
        if self.compile_unet:
            self._text_encoder_adapters(warm, loaded, [w for _, w in loras])
            self._fill_slot(warm, loaded, [w for _, w in loras])
            return loaded
        wanted = (tuple(lora.adapter for lora in loaded), tuple(w for _, w in loras))
        if loaded:
            if warm.lora_enabled is not True:
                warm.adapters_changed()  # set again below if this fails half-way
                pipe.enable_lora()
                warm.lora_enabled = True
            if warm.active != wanted:
                warm.active = None
                pipe.set_adapters(list(wanted[0]), list(wanted[1]))
                warm.active = wanted
        elif warm.loras and warm.lora_enabled is not False:
            warm.lora_enabled = None
            pipe.disable_lora()
            warm.lora_enabled = False
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
        unet = None
        if self.compile_unet:
            # The UNet's part goes to the slot when the LoRA is used; the rest is an adapter here.
            unet = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
            tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_")}
        warm.adapters_changed()  # a new adapter's layers come enabled and active as diffusers leaves them
        try:
            if tensors:
                tensors = family(base.family).loadable_lora(tensors, base)
                with _quiet_transformers():
                    warm.sampler.pipe.load_lora_weights(tensors, adapter_name=adapter)
        except Exception as e:  # diffusers/peft raise many types for keys or shapes that do not fit
            self._drop_adapter(warm, adapter)
            why = "it was made for another model" if trained_on is None else str(e).splitlines()[0]
            raise LoraFileError(f"{path.name} does not fit {base.name} ({why})") from e
        lora = LoadedLora(adapter, key, stamp, lora_short_hash(key, metadata), nbytes, unet)
        warm.loras[key] = lora
        return lora

    def _text_encoder_adapters(
        self, warm: WarmPipeline, loaded: list[LoadedLora], weights: list[float]
    ) -> None:
        """compile_unet: the requested LoRAs' text-encoder adapters on, weighted; all others off."""
        listed = warm.sampler.pipe.get_list_adapters()
        for part in warm.sampler.pipe._lora_loadable_modules:
            module = getattr(warm.sampler.pipe, part, None)
            if part == "unet" or part == "transformer" or module is None or part not in listed:
                continue
            chosen = [
                (lo.adapter, w) for lo, w in zip(loaded, weights, strict=True) if lo.adapter in listed[part]
            ]
            if chosen:
                enable_lora_for_text_encoder(module)
                set_adapters_for_text_encoder([a for a, _ in chosen], module, [w for _, w in chosen])
            else:
                disable_lora_for_text_encoder(module)

    def _fill_slot(self, warm: WarmPipeline, loaded: list[LoadedLora], weights: list[float]) -> None:
        """compile_unet: write the requested LoRAs, joined and weighted, into the UNet's one slot.

        No LoRA is the slot's last LoRAs at weight 0 (an exact no-op); before any LoRA was ever
        used the UNet has no slot and runs uncompiled.
        """
        parts = [(lo.unet, w) for lo, w in zip(loaded, weights, strict=True) if lo.unet]
        key = tuple((lo.path, lo.stamp, w) for lo, w in zip(loaded, weights, strict=True) if lo.unet)
        if not parts:
            if not warm.hot:
                return
            parts, key = [(t, 0.0) for t, _ in warm.hot], ("off",)
        if key == warm.hot_key:
            return
        base = warm.base
        joined = join_loras(parts)
        rank = max((v.shape[0] for k, v in joined.items() if k.endswith("lora_down.weight")), default=0)
        if rank > self.hotswap_rank:
            raise SpecError(
                f"these LoRAs together have rank {rank}; this worker's compiled UNet takes at most "
                f"{self.hotswap_rank} (use fewer at once)"
            )
        tensors = family(base.family).loadable_lora(joined, base)
        pipe = warm.sampler.pipe
        try:
            with _quiet_transformers():
                pipe.load_lora_weights(tensors, adapter_name=HOT, hotswap=warm.hot_key is not None)
        except Exception:
            if warm.hot_key is None:
                raise
            # A LoRA on layers the slot was not made for: a new slot, and one recompile.
            self._drop_adapter(warm, HOT)
            with _quiet_transformers():
                pipe.load_lora_weights(tensors, adapter_name=HOT)
        if not warm.compiled:
            base.unet.compile(backend=self.compile_backend)
            warm.compiled = True
        warm.hot_key, warm.hot = key, parts if key != ("off",) else warm.hot

    def _drop_adapter(self, warm: WarmPipeline, adapter: str) -> None:
        pipe = warm.sampler.pipe
        if any(adapter in names for names in pipe.get_list_adapters().values()):
            warm.adapters_changed()
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
