"""The one interface every model family implements, and the small types that cross it.

The trainer, LoRA I/O, generation, the worker and the bot know a family only through
:class:`Family`; everything that differs between SD1.5, SDXL, Flux.1 and Z-Image lives behind it
in that family's module. Importing this module (or a family module) never imports torch: the bot
reads a family's presets, settings and base detection without it, so heavy imports happen inside
the methods that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..spec import TrainSpec

Size = Literal["tiny", "random"]


class ModelError(ValueError):
    """A base model that cannot be used; the message says why and what to do."""


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config of a diffusers folder; ModelError naming it when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path.parent.name}/{path.name} is missing or damaged ({e})") from None


@dataclass
class Base:
    """Everything the trainer and the sampler need from one base checkpoint."""

    name: str
    family: str  # the family's name; runner.families.registry.family(name) gives its code
    # The denoiser: a UNet, or a DiT's transformer (kohya calls every denoiser "unet": lora_unet_…).
    unet: Any
    vae: AutoencoderKL
    text_encoders: list[PreTrainedModel]
    tokenizers: list[PreTrainedTokenizerBase]
    scheduler_config: dict[str, Any]
    native_resolution: int
    # The checkpoint file's SHA-256 (kohya's ss_new_sd_model_hash) and A1111's old 8-hex hash (kohya's
    # ss_sd_model_hash); None when there is no single file to hash (a diffusers folder, tiny/random).
    sha256: str | None = None
    legacy_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the checkpoint file's SHA-256."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self) -> DDPMScheduler:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Base:
        import torch

        # The VAE stays in fp32 (or bf16): SDXL's VAE overflows in fp16 and gives black images.
        vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        for m, want in (
            (self.unet, dtype),
            *((te, dtype) for te in self.text_encoders),
            (self.vae, vae_dtype),
        ):
            # A dtype is passed only when it changes: diffusers warns on every cast otherwise.
            m.to(device) if want in (None, m.dtype) else m.to(device, want)
        return self


@dataclass(frozen=True)
class Target:
    """One module that gets LoRA, with its own rank and alpha."""

    name: str
    rank: int
    alpha: float


@dataclass
class KohyaModule:
    """One module of a LoRA file: its key (``lora_unet_…``), weights and alpha."""

    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for a batch of captions."""

    hidden_states: torch.Tensor  # [B, tokens, D]
    pooled: torch.Tensor | None  # SDXL: CLIP-G's pooled output; Flux: CLIP-L's; else None
    # Which tokens are real, for families that mask padding (Z-Image); None: every token counts.
    mask: torch.Tensor | None = None

    @staticmethod
    def join(parts: Sequence[Conditioning]) -> Conditioning:
        """One batch from per-caption conditionings (the trainer's cache). Captions of different
        lengths (families whose encoders are not padded to a fixed length) are right-padded with
        zeros and masked."""
        import torch

        longest = max(p.hidden_states.shape[1] for p in parts)
        if all(p.hidden_states.shape[1] == longest for p in parts) and all(p.mask is None for p in parts):
            hidden, mask = torch.cat([p.hidden_states for p in parts]), None
        else:
            hidden = torch.cat(
                [
                    torch.nn.functional.pad(p.hidden_states, (0, 0, 0, longest - p.hidden_states.shape[1]))
                    for p in parts
                ]
            )
            masks = [
                torch.ones(p.hidden_states.shape[:2], dtype=torch.bool, device=p.hidden_states.device)
                if p.mask is None
                else p.mask.bool()
                for p in parts
            ]
            mask = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for m in masks])
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(hidden, pooled, mask)


@dataclass(frozen=True)
class ImageSize:
    """An image's original size and the bucket it trains at, both (width, height)."""

    original: tuple[int, int]
    bucket: tuple[int, int]


@dataclass
class Batch:
    latents: torch.Tensor
    cond: Conditioning
    sizes: list[ImageSize]  # SDXL's micro-conditioning is computed from these


class Objective(Protocol):
    """What one training step computes: caption encoding and the loss of one batch."""

    def encode_text(
        self, captions: list[str], grad: bool, cached: Conditioning | None = None
    ) -> Conditioning:
        """Encode ``captions``; ``cached`` holds the outputs of the encoders whose outputs are cached
        (:attr:`Family.trainable_text_encoders` excluded), so only the trained ones run."""
        ...

    def text_cached(self) -> None:
        """Called once every caption's conditioning is cached: frozen encoders may leave the GPU."""

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class SampleRequest:
    """One image to render: what a preview line or a /gen request asks for."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    guidance: float
    sampler: str | None
    seed: int
    clip_skip: int | None = None
    weighted: bool = True  # A1111's (word:1.2) emphasis


class Family(Protocol):
    """A model family: how to load it, train it, name its LoRA modules and generate with it."""

    name: str  # "sd15": what ``tiny:<name>`` and the bot's records say
    display_name: str  # "SD1.5": what members read
    short_name: str  # how setting messages name it ("Flux" for Flux.1)
    native_resolution: int
    text_encoders: tuple[str, ...]  # names, in the order of Base.text_encoders
    # The encoders train_text_encoder trains; the rest stay frozen and can always be cached.
    trainable_text_encoders: tuple[str, ...]
    blocks_per_side: int | None  # kohya's IN/OUT block count for block weights; None: no UNet blocks
    # Settings only some families use (Flux's guidance_scale); other families refuse them by name.
    own_settings: tuple[str, ...]
    refused: Mapping[str, str]  # settings this family cannot honour, and why
    sample_defaults: Mapping[str, Any]  # preview-prompt defaults (Flux: cfg_scale 1)
    # What Auto-caption writes unless the member picks the other: WD14 "tags" (what SD1.5/SDXL
    # anime checkpoints were trained on) or "sentences" (a VLM's, as Flux and Z-Image were).
    caption_style: Literal["tags", "sentences"]
    samplers: tuple[str, ...] | None  # kohya sampler names it renders with; None: its own only
    base_model_version: str  # kohya's ss_base_model_version
    version_prefixes: tuple[str, ...]  # ss_base_model_version values (prefixes) of this family's LoRAs
    pipeline_class: str  # diffusers' pipeline class name, as a folder's model_index.json says it

    # ---- knowing a base without loading it (torch-free) ----

    def claims_folder(self, model_index: Mapping[str, Any], folder: Path) -> bool:
        """Whether a diffusers folder is this family's; raises ModelError for a variant it refuses."""
        ...

    def claims_file(self, name: str, keys: set[str], shape: Callable[[str], tuple[int, ...]]) -> bool:
        """Whether the single-file checkpoint ``name`` with these keys is this family's (``shape(key)``
        reads a tensor's shape); raises ModelError for a variant it refuses."""
        ...

    def claims_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a LoRA file's tensors (its keys and shapes) were trained on this family."""
        ...

    def preset(self, kind: str) -> dict[str, Any]:
        """The settings of one preset (character, style, concept) for this family."""
        ...

    def size_step(self, base: Base) -> int:
        """Image sides (buckets, /gen sizes) must be multiples of this."""
        ...

    def check_settings(self, settings: Mapping[str, Any], base: Base) -> list[str]:
        """Family rules beyond ``refused`` (sizes, precision), as one message per problem."""
        ...

    # ---- loading (torch from here on) ----

    def build(self, size: Size, variant: str, dtype: torch.dtype) -> Base:
        """``tiny:`` (for tests) or ``random:`` (full size, for GPU timing) with random weights."""
        ...

    def from_folder(self, path: Path, dtype: torch.dtype) -> Base: ...

    def from_file(self, path: Path, dtype: torch.dtype, config_root: Path) -> Base: ...

    # ---- training ----

    def objective(
        self, base: Base, spec: TrainSpec, device: torch.device, autocast: torch.dtype
    ) -> Objective: ...

    def prepare_training(self, base: Base, spec: TrainSpec, weight_dtype: torch.dtype) -> None:
        """Changes to the frozen base on the host, before it moves to the device and LoRA is added
        (fp8 storage, a merged training adapter); ``weight_dtype`` is what its weights compute in."""
        ...

    def lora_targets(
        self, base: Base, spec: TrainSpec, block_weights: dict[str, float] | None
    ) -> dict[str, list[Target]]:
        """Modules that get LoRA, by component ("unet", "te1", …); modules of blocks weighted 0 get none."""
        ...

    def block_of(self, component: str, module: str, base: Base) -> str | None:
        """kohya's block label (IN00, MID, OUT11) of a LoRA module, for block learning rates."""
        ...

    # ---- LoRA files ----

    def kohya_modules(self, base: Base, modules: Sequence[Any]) -> list[KohyaModule]:
        """The live LoRA layers (:class:`runner.train.network.LoraModule`) under the file's keys."""
        ...

    def loadable_lora(self, tensors: dict[str, torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors as the family's pipeline's ``load_lora_weights`` takes them."""
        ...

    def metadata(self, spec: TrainSpec) -> dict[str, Any]:
        """``ss_*`` keys this family adds to the common ones."""
        ...

    def modelspec(self) -> tuple[str, str, str | None]:
        """(modelspec.architecture without ``/lora``, implementation, prediction_type or None)."""
        ...

    # ---- generation ----

    def pipeline(self, base: Base, scheduler: Any) -> DiffusionPipeline:
        """A diffusers pipeline over the base's own modules (no copies)."""
        ...

    def render_latents(
        self, base: Base, pipe: Any, request: SampleRequest, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """The denoised latents (unscaled, unshifted) of one image."""
        ...

    def gen_cfg_scale(self, requested: float, explicit: bool) -> float:
        """The CFG scale /gen uses when the member did (``explicit``) or did not set it."""
        ...

    def parameters_fields(self, base: Base, request: SampleRequest) -> dict[str, Any]:
        """A1111 parameters fields that differ from what the SD samplers write (Flux: Euler, Simple)."""
        ...

    # ---- writing bases out (tests and benchmarks build checkpoints this way) ----

    def save_folder(self, base: Base, folder: Path) -> Path: ...

    def single_file(self, base: Base) -> dict[str, torch.Tensor]:
        """The base as the single-file checkpoint A1111/ComfyUI load."""
        ...
