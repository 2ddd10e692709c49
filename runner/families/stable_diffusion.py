"""What SD1.5 and SDXL share: a UNet, CLIP text encoders, DDPM's noise schedule and kohya's
``lora_unet_``/``lora_te_`` names. :mod:`.sd15` and :mod:`.sdxl` fill in what differs.

Torch and diffusers are imported inside the methods: the bot reads presets and detects bases
through these classes without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import COMMON, KINDS
from .protocol import Base, KohyaModule, ModelError, SampleRequest, Size, Target, read_config

if TYPE_CHECKING:
    import torch

    from ..spec import TrainSpec
    from .protocol import Objective

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_UPDOWN = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def unet_block(name: str, layers_per_block: int) -> str | None:
    """kohya's block label for a diffusers UNet module path (kohya's get_block_index, generalised)."""
    if name.startswith("mid_block."):
        return "MID"
    m = _UPDOWN.match(name)
    if not m:
        return None
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    per = layers_per_block + 1
    if side == "down":
        idx = (i + 1) * per if kind == "downsamplers" else i * per + j + 1
        return f"IN{idx:02d}"
    idx = i * per + (layers_per_block if kind == "upsamplers" else j)
    return f"OUT{idx:02d}"


def kohya_name(component: str, module: str, family: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """kohya's LoRA key for a module (``lora_unet_…``, ``lora_te_…`` or ``lora_te1_``/``lora_te2_``).

    SDXL UNet modules are named by their original (LDM) paths (``lora_unet_input_blocks_4_1_…``), as
    kohya's ``sdxl_train_network.py`` writes them: its SDXL UNet keeps the original module names, and
    A1111 maps SDXL's diffusers-style names with SD1.5's block layout, losing modules such as
    ``up_blocks.0.upsamplers.0``. SD1.5 keeps diffusers paths, as kohya's ``train_network.py`` writes.
    ``unet_config`` (the UNet's diffusers config) is needed for SDXL UNet modules.
    """
    from .clip_text import te_key

    if component != "unet":
        return te_key("lora_te" if family == "sd15" else f"lora_{component}", module)
    if family == "sdxl":
        from .ldm import unet_module_to_ldm

        if unet_config is None:
            raise ValueError("SDXL UNet modules need the UNet's config to get their kohya names")
        module = unet_module_to_ldm(module, unet_config)
    return f"lora_unet_{module}".replace(".", "_")


class StableDiffusion:
    """The UNet + CLIP families. Subclasses set the class attributes below and the presets."""

    name: str
    display_name: str
    native_resolution: int
    text_encoders: tuple[str, ...]
    blocks_per_side: int
    pipeline_class: str  # diffusers' pipeline class name, as model_index.json says it
    base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    tiny_unet: Mapping[str, Any]
    cross_attention_width: int
    version_prefixes: tuple[str, ...]
    own_settings: tuple[str, ...] = ()
    refused: Mapping[str, str] = {}
    sample_defaults: Mapping[str, Any] = {}
    caption_style = "tags"
    samplers = ("euler_a", "euler", "ddim", "dpmsolver++", "lms", "heun", "pndm", "unipc")

    @property
    def short_name(self) -> str:
        return self.display_name

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        return self.text_encoders

    # ---- presets and settings ----

    def preset(self, kind: str) -> dict[str, Any]:
        settings = {**COMMON, **KINDS[kind], **self.family_preset()}
        if settings.get("network_train_unet_only"):
            settings.pop("text_encoder_lr", None)  # nothing it would apply to
        return settings

    def family_preset(self) -> dict[str, Any]:
        return {}

    def size_step(self, base: Base) -> int:
        return 8

    def check_settings(self, settings: Mapping[str, Any], base: Base) -> list[str]:
        return []

    # ---- detection ----

    def claims_folder(self, model_index: Mapping[str, Any], folder: Path) -> bool:
        if model_index.get("_class_name") != self.pipeline_class:
            return False
        unet = read_config(folder / "unet" / "config.json")
        if unet.get("cross_attention_dim") == 1024:
            raise ModelError(
                f"{folder.name} looks like a Stable Diffusion 2.x model; only SD1.5 and SDXL are supported"
            )
        if unet.get("in_channels", 4) != 4:
            raise ModelError(
                f"{folder.name} is an inpainting or edit model ({unet['in_channels']} input channels); "
                "use a normal one"
            )
        return True

    def _claims_keys(self, name: str, keys: set[str]) -> bool:
        raise NotImplementedError

    def claims_file(self, name: str, keys: set[str], shape: Callable[[str], tuple[int, ...]]) -> bool:
        if not self._claims_keys(name, keys):
            return False
        if UNET_IN not in keys:
            raise ModelError(f"{name} has no UNet weights (model.diffusion_model.*); give a full checkpoint")
        if not any(k.startswith("first_stage_model.") for k in keys):
            raise ModelError(
                f"{name} has no VAE baked in (first_stage_model.*); give a checkpoint that includes one"
            )
        in_ch = shape(UNET_IN)[1]
        if in_ch != 4:
            raise ModelError(
                f"{name} is an inpainting or edit checkpoint ({in_ch} input channels); use a normal one"
            )
        return True

    def claims_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        # The cross-attention width tells SD1.5 (768) from SDXL (2048) and SD2 (1024, neither); other
        # widths (test models) leave it to the text encoders' keys.
        for key, value in tensors.items():
            if re.search(r"attn2[._]to_k\.lora_down\.weight$", key) and value.shape[1] in (768, 1024, 2048):
                return value.shape[1] == self.cross_attention_width
        return self._claims_text_encoder_lora(tensors)

    def _claims_text_encoder_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    # ---- loading ----

    def _scheduler(self, prediction_type: str = "epsilon") -> dict[str, Any]:
        from .model import scheduler_config

        return {**scheduler_config("sd15"), "prediction_type": prediction_type}

    def _tiny_encoders(self, vocab: int) -> tuple[list, list]:
        raise NotImplementedError

    def _random_encoders(self) -> tuple[list, list]:
        raise NotImplementedError

    def build(self, size: Size, variant: str, dtype: torch.dtype) -> Base:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .clip_text import TINY_NUM_MERGES, clip_tokenizer
        from .model import TINY_VAE, biased_layer_norms, config, finish

        prediction = {"": "epsilon", "v": "v_prediction"}.get(variant)
        if prediction is None or (variant and size != "tiny"):
            raise ModelError(f"unknown variant '{variant}' of {size}:{self.name}")
        with torch.random.fork_rng(devices=[]):  # a load must not reset the caller's seed
            torch.manual_seed(0)
            if size == "tiny":
                unet = UNet2DConditionModel(**self.tiny_unet)
                vae = AutoencoderKL(**TINY_VAE)
                encoders, tokenizers = self._tiny_encoders(len(clip_tokenizer(TINY_NUM_MERGES)))
            else:
                unet = UNet2DConditionModel.from_config(config(self.name, "unet"))
                vae = AutoencoderKL.from_config(config(self.name, "vae"))
                encoders, tokenizers = self._random_encoders()
            biased_layer_norms(encoders)
        name = f"{size}:{self.name}" + (f"-{variant}" if variant else "")
        res = 64 if size == "tiny" else self.native_resolution
        # SD bases are built (and loaded) in fp32 whatever ``dtype`` says: the trainer casts them.
        return finish(
            Base(name, self.name, unet, vae, encoders, tokenizers, self._scheduler(prediction), res)
        )

    def _missing_tokenizers(self, folder: Path) -> dict[str, Any]:
        """Tokenizers ``folder`` lacks, cut from the shipped CLIP vocabulary to their text encoder's size."""
        from .clip_text import CLIP_BASE_TOKENS, clip_tokenizer

        wanted = [("tokenizer", "text_encoder", "<|endoftext|>"), ("tokenizer_2", "text_encoder_2", "!")]
        out = {}
        for tok, te, pad in wanted[: len(self.text_encoders)]:
            if not (folder / tok).is_dir():
                vocab = read_config(folder / te / "config.json")["vocab_size"]
                out[tok] = clip_tokenizer(vocab - CLIP_BASE_TOKENS, pad_token=pad)
        return out

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return {}

    def _pipeline_type(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def from_folder(self, path: Path, dtype: torch.dtype) -> Base:
        import torch

        kwargs = self._missing_tokenizers(path) | self._pipeline_kwargs()
        try:
            pipe = self._pipeline_type().from_pretrained(
                str(path), local_files_only=True, torch_dtype=torch.float32, **kwargs
            )
        except Exception as e:  # diffusers raises many error types for damaged folders
            raise ModelError(
                f"{path.name} could not be loaded as an {self.name} diffusers model ({e})"
            ) from e
        return self._from_pipeline(pipe, path.name)

    def from_file(self, path: Path, dtype: torch.dtype, config_root: Path) -> Base:
        import torch

        from .model import file_hashes

        config = config_root / self.name
        kwargs = self._missing_tokenizers(config) | self._pipeline_kwargs()
        # diffusers raises many error types for damaged or odd checkpoints; the user needs the file name.
        try:
            pipe = self._pipeline_type().from_single_file(
                str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32, **kwargs
            )
        except Exception as e:
            raise ModelError(f"{path.name} could not be loaded as an {self.name} checkpoint ({e})") from e
        return self._from_pipeline(pipe, path.stem, *file_hashes(path))

    def _from_pipeline(
        self, pipe: Any, name: str, sha256: str | None = None, legacy: str | None = None
    ) -> Base:
        from .model import finish

        suffixes = [f"_{i + 1}" if i else "" for i in range(len(self.text_encoders))]
        encoders = [getattr(pipe, f"text_encoder{s}") for s in suffixes]
        tokenizers = [getattr(pipe, f"tokenizer{s}") for s in suffixes]
        scheduler = dict(pipe.scheduler.config)
        base = Base(
            name, self.name, pipe.unet, pipe.vae, encoders, tokenizers, scheduler, self.native_resolution,
            sha256=sha256, legacy_hash=legacy,
        )  # fmt: skip
        return finish(base)

    # ---- training ----

    def objective(
        self, base: Base, spec: TrainSpec, device: torch.device, autocast: torch.dtype
    ) -> Objective:
        from .noise_prediction import NoisePrediction

        return NoisePrediction(base, spec, device, autocast)

    def prepare_training(self, base: Base, spec: TrainSpec, weight_dtype: torch.dtype) -> None:
        pass

    def block_of(self, component: str, module: str, base: Base) -> str | None:
        if component != "unet":
            return None
        return unet_block(module, int(base.unet.config.layers_per_block))

    def lora_targets(
        self, base: Base, spec: TrainSpec, block_weights: dict[str, float] | None
    ) -> dict[str, list[Target]]:
        from .clip_text import clip_targets

        targets: dict[str, list[Target]] = {}
        if spec.train_unet:
            targets["unet"] = self._unet_targets(base, spec, block_weights)
        if spec.train_text_encoder:
            for i, te in enumerate(base.text_encoders):
                targets[f"te{i + 1}"] = clip_targets(te, spec)
        return targets

    def _unet_targets(self, base: Base, spec: TrainSpec, weights: dict[str, float] | None) -> list[Target]:
        # kohya's UNET_TARGET_REPLACE_MODULE, and its CONV2D_3X3 additions for LoCon (conv_dim).
        import torch
        from diffusers import Transformer2DModel
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        unet = base.unet
        lpb = int(unet.config.layers_per_block)
        parents: tuple[type, ...] = (Transformer2DModel,)
        if spec.conv_dim:
            parents += (ResnetBlock2D, Downsample2D, Upsample2D)
        found: dict[str, Target] = {}
        for parent_name, parent in unet.named_modules():
            if not isinstance(parent, parents):
                continue
            for child_name, child in parent.named_modules():
                name = f"{parent_name}.{child_name}"
                pointwise = isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                )
                if pointwise:
                    rank, alpha = spec.network_dim, spec.network_alpha
                elif isinstance(child, torch.nn.Conv2d) and spec.conv_dim:
                    # kohya: conv_alpha defaults to 1 when only conv_dim is given.
                    rank, alpha = spec.conv_dim, 1.0 if spec.conv_alpha is None else spec.conv_alpha
                else:
                    continue
                # kohya drops the modules of blocks weighted 0 instead of training them at lr 0.
                block = unet_block(name, lpb)
                if weights is None or block is None or weights[block] > 0:
                    found[name] = Target(name, rank, alpha)
        return list(found.values())

    # ---- LoRA files ----

    def kohya_modules(self, base: Base, modules: Sequence[Any]) -> list[KohyaModule]:
        return [
            KohyaModule(
                kohya_name(m.component, m.name, self.name, base.unet.config),
                m.down.detach(),
                m.up.detach(),
                m.alpha,
            )
            for m in modules
        ]

    def loadable_lora(self, tensors: dict[str, torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
        return tensors  # diffusers' load_lora_weights converts kohya's SD keys itself

    def metadata(self, spec: TrainSpec) -> dict[str, Any]:
        return {}

    def modelspec(self) -> tuple[str, str, str | None]:
        return self.modelspec_architecture, self.modelspec_implementation, "epsilon"

    # ---- generation ----

    def _parts(self, base: Base, scheduler: Any) -> dict[str, Any]:
        parts = dict(vae=base.vae, unet=base.unet, scheduler=scheduler)
        for i, (te, tok) in enumerate(zip(base.text_encoders, base.tokenizers, strict=True)):
            suffix = f"_{i + 1}" if i else ""
            parts |= {f"text_encoder{suffix}": te, f"tokenizer{suffix}": tok}
        return parts

    def pipeline(self, base: Base, scheduler: Any) -> Any:
        pipe = self._pipeline_type()(**self._parts(base, scheduler), **self._render_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _render_kwargs(self) -> dict[str, Any]:
        return self._pipeline_kwargs()

    def zero_negative(self, request: SampleRequest) -> bool:
        """Whether an empty negative prompt is given to the UNet as zeros instead of encoded."""
        return False

    def render_latents(
        self, base: Base, pipe: Any, request: SampleRequest, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        import torch

        scale = base.vae_scale_factor
        shape = (1, base.unet.config.in_channels, request.height // scale, request.width // scale)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return pipe(
            **self._embeds(base, request),
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            generator=generator,
            latents=noise.to(device, base.unet.dtype),
            output_type="latent",
        ).images

    def _embeds(self, base: Base, request: SampleRequest) -> dict[str, torch.Tensor]:
        from .clip_text import encode_prompts

        # Prompt and negative are encoded together so they get the same number of 77-token chunks.
        zero_negative = self.zero_negative(request)
        texts = [request.prompt] if zero_negative else [request.prompt, request.negative]
        cond = encode_prompts(
            base, texts, max_token_length=None, clip_skip=request.clip_skip, weighted=request.weighted
        )
        embeds = {"prompt_embeds": cond.hidden_states[:1]}
        if not zero_negative:
            embeds["negative_prompt_embeds"] = cond.hidden_states[1:]
        if cond.pooled is not None:
            embeds["pooled_prompt_embeds"] = cond.pooled[:1]
            if not zero_negative:
                embeds["negative_pooled_prompt_embeds"] = cond.pooled[1:]
        return embeds

    def gen_cfg_scale(self, requested: float, explicit: bool) -> float:
        return requested

    def parameters_fields(self, base: Base, request: SampleRequest) -> dict[str, Any]:
        return {}

    # ---- writing bases out ----

    def save_folder(self, base: Base, folder: Path) -> Path:
        parts = self._parts(base, base.noise_scheduler())
        self._pipeline_type()(**parts, **self._pipeline_kwargs()).save_pretrained(folder)
        return folder

    def single_file(self, base: Base) -> dict[str, torch.Tensor]:
        from .ldm import unet_to_ldm, vae_to_ldm

        sd = unet_to_ldm(base.unet.state_dict(), base.unet.config)
        sd |= vae_to_ldm(base.vae.state_dict(), len(base.vae.config.block_out_channels))
        sd |= self._text_encoders_to_ldm([t.state_dict() for t in base.text_encoders])
        return {k: v.contiguous() for k, v in sd.items()}

    def _text_encoders_to_ldm(self, state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
