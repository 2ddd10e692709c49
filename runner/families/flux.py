"""Flux.1 (dev and schnell): a 12B MMDiT transformer, CLIP-L (pooled) and T5-XXL, Flux's 16-channel
VAE, trained by flow matching; LoRA files in kohya's Flux format, which ComfyUI and Forge load.

A Flux :class:`~runner.families.model.Base` holds the transformer where SD bases hold their UNet
(``base.unet``; kohya names both ``lora_unet``). Nothing is downloaded: T5's SentencePiece
vocabulary is not shipped with any package, so real checkpoints take theirs from a diffusers folder
(``tokenizer_2/``); the tiny and random models get a small T5 tokenizer built here. Flux bases load
in the dtype the caller asks (FLUX.1 is released in bf16; its transformer is 48 GB in fp32).

LoRA keys: kohya, ComfyUI and Forge name Flux modules as Black Forest Labs' code does, where q, k and
v are one fused ``qkv`` Linear (and a single block's ``linear1`` is q, k, v and the MLP input fused);
diffusers' ``FluxTransformer2DModel`` keeps them separate. LoRAs on the separate modules fuse
exactly: ``down = cat(down_q, down_k, down_v)`` (rank 3r), ``up = block_diag(up_q, up_k, up_v)``, and
alpha scaled by 3 so alpha/rank is unchanged; each part's rows of ``up @ down`` are then its own
``up_i @ down_i``. Splitting back (for generation) is exact for any kohya file, block-diagonal or
not. diffusers has the reverse conversion (``_convert_kohya_flux_lora_to_diffusers``), but it
hard-codes FLUX.1's 19/38 blocks and 3072/12288 widths, so it cannot load into any other size (the
tiny test model); :func:`diffusers_state_dict` reads the sizes from the live model instead.

Torch and diffusers are imported inside the functions: the bot reads this family without them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import flow_matching
from .presets import DIT
from .protocol import Base, KohyaModule, ModelError, SampleRequest, Size, Target

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from transformers import T5Tokenizer

    from ..spec import TrainSpec
    from .protocol import Conditioning

# Where a single-file transformer (flux1-dev.safetensors, as ComfyUI and Forge keep it) finds the
# rest of the model: a diffusers FLUX.1 folder with vae/, text_encoder(_2)/ and tokenizer(_2)/.
COMPONENTS_ENV = "LORACORD_FLUX_COMPONENTS"

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # the tiny VAE's 4 latent channels in 2x2 patches
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(2, 2, 4),
    guidance_embeds=True,
)


# TrainSpec settings a UNet uses that mean nothing to Flux, and why (kohya ignores most of them
# silently; a member should know their setting did nothing).
NOT_FOR_FLUX = {
    "clip_skip": "Flux reads CLIP-L's pooled output and T5's last layer; there is no layer to skip",
    "max_token_length": "Flux's CLIP-L reads 77 tokens and T5 t5xxl_max_token_length; set that instead",
    "weighted_captions": "(word:1.2) weighting is for CLIP-conditioned UNets; Flux reads captions as written",
    "min_snr_gamma": "min-SNR weighting is for noise-prediction models; Flux trains by flow matching",
    "noise_offset": "Flux's flow-matching noise is plain Gaussian (kohya ignores it for Flux)",
    "multires_noise_iterations": "Flux's flow-matching noise is plain Gaussian (kohya ignores it for Flux)",
    "conv_dim": "Flux's transformer has no convolutions for LoCon",
    "conv_alpha": "Flux's transformer has no convolutions for LoCon",
    "down_lr_weight": "block weights name a UNet's IN/MID/OUT blocks; Flux has double and single blocks",
    "mid_lr_weight": "block weights name a UNet's IN/MID/OUT blocks; Flux has double and single blocks",
    "up_lr_weight": "block weights name a UNet's IN/MID/OUT blocks; Flux has double and single blocks",
    "sample_sampler": "Flux previews use its own flow-matching Euler sampler",
    "channels_last": "Flux's transformer works on token sequences; channels_last is for a UNet's convolutions",
}

# Flux.1: Civitai's Flux defaults (dim/alpha 16/16, lr 1e-4, cosine) and kohya's README
# recommendation for Flux LoRAs (timestep_sampling shift, discrete_flow_shift 3.1582,
# model_prediction_type raw, guidance_scale 1.0). CLIP-L stays frozen so every caption is encoded
# once; captions are not shuffled (T5 reads sentences) nor dropped, which would also undo that cache.
# None of the UNet-only settings (min-SNR, noise offset, LoCon) apply.
PRESET: dict[str, Any] = {**DIT, "discrete_flow_shift": 3.1582, "guidance_scale": 1.0}

# ---- kohya's (BFL's) module names ----

_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0),
    "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0),
    "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0),
    "norm1_context.linear": ("txt_mod_lin", 0),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation_lin", 0),
}
# Outside the blocks (kohya trains these only with its in_dims option; other trainers' files have them).
_OUTER = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def kohya_module(path: str) -> tuple[str, int] | None:
    """kohya's module name for a diffusers transformer module path, and its slot in a fused module."""
    if path in _OUTER:
        return f"lora_unet_{_OUTER[path]}", 0
    m = _BLOCK.fullmatch(path)
    if not m:
        return None
    kind, i, rest = m.groups()
    table, label = (_DOUBLE, "double") if kind == "transformer_blocks" else (_SINGLE, "single")
    if rest not in table:
        return None
    name, slot = table[rest]
    return f"lora_unet_{label}_blocks_{i}_{name}", slot


def fuse(modules: Iterable[Any]) -> Iterator[KohyaModule]:
    """The transformer's LoRA layers (:class:`runner.train.network.LoraModule`) as kohya modules,
    fused where BFL's modules are."""
    import torch

    groups: dict[str, dict[int, Any]] = {}
    for m in modules:
        named = kohya_module(m.name)
        if named is None:
            raise ValueError(f"{m.name} has no kohya name in the Flux format")
        groups.setdefault(named[0], {})[named[1]] = m
    for key, parts in groups.items():
        ordered = [parts[s] for s in sorted(parts)]
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{key}: LoRA on only some of its fused parts ({[p.name for p in ordered]})")
        scales = {p.alpha / p.rank for p in ordered}
        if len(scales) > 1:
            raise ValueError(
                f"{key}: its fused parts have different alpha/rank, which one module cannot hold"
            )
        rank = sum(p.rank for p in ordered)
        yield KohyaModule(
            key,
            torch.cat([p.down.detach() for p in ordered]),
            torch.block_diag(*(p.up.detach() for p in ordered)),
            scales.pop() * rank,
        )


def _split(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per part whose ``up @ down`` are the row blocks of the fused ``up @ down``."""
    import torch

    rank, n = down.shape[0], len(sizes)
    ups = torch.split(up, sizes)
    if rank % n == 0:
        r = rank // n
        blocks = [u[:, i * r : (i + 1) * r] for i, u in enumerate(ups)]
        if all(
            torch.count_nonzero(u).item() == torch.count_nonzero(b).item()
            for u, b in zip(ups, blocks, strict=True)
        ):
            return list(zip(torch.chunk(down, n), blocks, strict=True))  # block-diagonal: ranks stay r
    return [(down, u) for u in ups]  # general: every part keeps the whole down


def diffusers_state_dict(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A kohya-format Flux LoRA as diffusers' peft keys for these live modules, alpha/rank baked in.

    ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<module>…`` for
    CLIP-L (``lora_te1_``); FluxPipeline.load_lora_weights loads the result as is. Raises ValueError
    naming keys that fit none of the modules.
    """
    import torch

    from .clip_text import te_key

    targets: dict[str, list[tuple[str, int]]] = {}
    for path, module in transformer.named_modules():
        named = kohya_module(path) if isinstance(module, torch.nn.Linear) else None
        if named is not None:
            targets.setdefault(named[0], []).append((path, named[1]))
    parts = {
        key: [(p, transformer.get_submodule(p).out_features) for p, _ in sorted(v, key=lambda t: t[1])]
        for key, v in targets.items()
    }
    te_paths = {
        te_key("lora_te1", path): path
        for path, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for down_key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
        key = down_key.removesuffix(".lora_down.weight")
        down = tensors[down_key].float()
        up = tensors[f"{key}.lora_up.weight"].float()
        alpha = tensors.get(f"{key}.alpha")
        # kohya: a missing (or 0) alpha means alpha = rank.
        scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / down.shape[0]
        if key in parts:
            split = _split(down, up, [size for _, size in parts[key]])
            for (path, _), (d, u) in zip(parts[key], split, strict=True):
                out[f"transformer.{path}.lora_A.weight"] = d * scale
                out[f"transformer.{path}.lora_B.weight"] = u.contiguous()
        elif key in te_paths:
            out[f"text_encoder.{te_paths[key]}.lora_A.weight"] = down * scale
            out[f"text_encoder.{te_paths[key]}.lora_B.weight"] = up
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"no module of this model for {', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}"
        )
    return out


# ---- loading ----


def t5_tokenizer() -> T5Tokenizer:
    """A small Unigram vocabulary in T5's layout (pad 0, ``</s>`` 1, ``<unk>`` 2) for the tiny and
    random models: T5's own SentencePiece file ships with no package, and the tiny encoder's
    embedding only needs ids that are stable."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(f"▁{ch}", -3.0), (ch, -4.0)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def _check_components(folder: Path, what: str) -> None:
    missing = [p for p in ("vae", "text_encoder", "text_encoder_2", "tokenizer") if not (folder / p).is_dir()]
    tok2 = folder / "tokenizer_2"
    if not any((tok2 / f).is_file() for f in ("spiece.model", "tokenizer.json")):
        missing.append("tokenizer_2 (T5's spiece.model or tokenizer.json)")
    if missing:
        raise ModelError(
            f"{what} lacks {', '.join(missing)}: copy them from a diffusers FLUX.1 download "
            "(T5's vocabulary is not shipped with loracord)"
        )


def t5_length(base: Base, requested: int | None = None) -> int:
    """``requested``, or kohya's default: 512 T5 tokens for dev, 256 for schnell (no guidance input)."""
    if requested:
        return requested
    return 512 if base.unet.config.guidance_embeds else 256


def flux_pipeline(base: Base, scheduler: Any = None) -> FluxPipeline:
    """A FluxPipeline over the base's own modules (no copies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    te, tok = base.text_encoders, base.tokenizers
    pipe = FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config),
        vae=base.vae,
        text_encoder=te[0],
        tokenizer=tok[0],
        text_encoder_2=te[1],
        tokenizer_2=tok[1],
        transformer=base.unet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FlowMatching(flow_matching.FlowMatching):
    """Captions through CLIP-L (pooled) and T5-XXL; FLUX.1-dev is guidance-distilled, so it is told
    ``guidance_scale`` while training."""

    def __init__(self, base: Base, spec: TrainSpec, device: torch.device, autocast_dtype: torch.dtype):
        super().__init__(base, spec, device, autocast_dtype)
        self.pipe = flux_pipeline(base)
        self.t5_length = t5_length(base, spec.t5xxl_max_token_length)

    def encode_text(
        self, captions: list[str], grad: bool, cached: Conditioning | None = None
    ) -> Conditioning:
        """T5's hidden states (``hidden_states``) and CLIP-L's pooled output (``pooled``); given
        ``cached`` (T5's outputs for these captions), only CLIP-L runs."""
        import torch

        from .protocol import Conditioning

        with torch.set_grad_enabled(grad), self._autocast():
            if cached is not None:
                # encode_prompt runs both encoders or neither; its CLIP-L half alone is this helper.
                pooled = self.pipe._get_clip_prompt_embeds(captions, device=self.device)
                return Conditioning(cached.hidden_states, pooled)
            t5, pooled, _ = self.pipe.encode_prompt(
                captions, device=self.device, max_sequence_length=self.t5_length
            )
        return Conditioning(t5, pooled)

    def text_cached(self) -> None:
        """Every caption is cached: T5-XXL (9.5 GB in bf16) waits on the CPU until the next preview."""
        import torch

        if self.device.type == "cuda":
            self.base.text_encoders[1].to("cpu")
            torch.cuda.empty_cache()

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        transformer = self.base.unet
        guidance = (
            torch.full((b,), self.spec.guidance_scale, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )
        packed = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=sigmas,  # the transformer scales σ by 1000 itself
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.hidden_states,
            txt_ids=torch.zeros(cond.hidden_states.shape[1], 3, device=self.device),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, noisy.dtype),
            return_dict=False,
        )[0]
        scale = self.base.vae_scale_factor
        return FluxPipeline._unpack_latents(packed, h * scale, w * scale, scale)


class Flux(flow_matching.DiT):
    name = "flux"
    display_name = "Flux.1"
    short_name = "Flux"
    native_resolution = 1024
    text_encoders = ("CLIP-L", "T5-XXL")
    # kohya trains CLIP-L only; T5-XXL stays frozen (its train_t5xxl defaults to off).
    trainable_text_encoders = ("CLIP-L",)
    own_settings = ("guidance_scale", "t5xxl_max_token_length", *flow_matching.FLOW_MATCHING_SETTINGS)
    refused = NOT_FOR_FLUX
    # A guidance-distilled model samples without true CFG unless a prompt asks (kohya's --l 1.0).
    sample_defaults: Mapping[str, Any] = {"cfg_scale": 1.0}
    base_model_version = "flux1"
    version_prefixes = ("flux",)
    pipeline_class = "FluxPipeline"
    preset_settings = PRESET
    objective_class = FlowMatching

    # ---- detection ----

    def claims_file(self, name: str, keys: set[str], shape: Callable[[str], tuple[int, ...]]) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def claims_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any(
            re.search(r"(double|single)_blocks|single_transformer_blocks|add_q_proj", k) for k in tensors
        )

    # ---- loading ----

    def build(self, size: Size, variant: str, dtype: torch.dtype) -> Base:
        import torch
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from .clip_text import TINY_NUM_MERGES, clip_tokenizer, tiny_clip_config
        from .model import TINY_VAE, biased_layer_norms, config, default_dtype, finish, scheduler_config

        if variant:
            raise ModelError(f"unknown variant '{variant}' of {size}:flux")
        schedule = scheduler_config("flux")
        if size == "random":
            # FLUX.1-dev's architecture; build under ``with torch.device(...)``.
            with torch.random.fork_rng(devices=[]), default_dtype(dtype):
                torch.manual_seed(0)
                transformer = FluxTransformer2DModel.from_config(config("flux", "transformer"))
                vae = AutoencoderKL.from_config(config("flux", "vae"))
                clip = CLIPTextModel(CLIPTextConfig(**config("flux", "text_encoder")))
                t5 = T5EncoderModel(T5Config(**config("flux", "text_encoder_2")))
                biased_layer_norms([clip])
            tokenizers = [clip_tokenizer(), t5_tokenizer()]
            return finish(
                Base("random:flux", "flux", transformer, vae, [clip, t5], tokenizers, schedule, 1024)
            )
        with torch.random.fork_rng(devices=[]):  # a load must not reset the caller's seed
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
            vae = AutoencoderKL(**TINY_VAE, shift_factor=0.1159, scaling_factor=0.3611)
            clip_tok = clip_tokenizer(TINY_NUM_MERGES)
            t5_tok = t5_tokenizer()
            clip = CLIPTextModel(tiny_clip_config(len(clip_tok), "quick_gelu", 32))
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_tok),
                    d_model=32,
                    d_kv=8,
                    d_ff=37,
                    num_layers=2,
                    num_heads=4,
                    feed_forward_proj="gated-gelu",
                    dropout_rate=0.0,
                    decoder_start_token_id=0,
                    pad_token_id=0,
                    eos_token_id=1,
                )
            )
            biased_layer_norms([clip])
        # Built in fp32 and cast, so every dtype holds the same (rounded) tiny model.
        for m in (transformer, vae, clip, t5):
            m.to(dtype)
        base = Base("tiny:flux", "flux", transformer, vae, [clip, t5], [clip_tok, t5_tok], schedule, 64)
        return finish(base)

    def from_folder(self, path: Path, dtype: torch.dtype, transformer: Any = None) -> Base:
        """A diffusers FLUX.1 folder (FluxPipeline) loaded in ``dtype``; ``transformer`` replaces the folder's own."""
        from diffusers import FluxPipeline

        from .model import finish

        _check_components(path, path.name)
        kwargs = {"transformer": transformer} if transformer is not None else {}
        try:
            pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype, **kwargs)
        except Exception as e:  # diffusers raises many error types for damaged folders
            raise ModelError(f"{path.name} could not be loaded as a Flux diffusers model ({e})") from e
        base = Base(
            path.name,
            "flux",
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder, pipe.text_encoder_2],
            [pipe.tokenizer, pipe.tokenizer_2],
            dict(pipe.scheduler.config),
            1024,
        )
        return finish(base)

    def from_file(self, path: Path, dtype: torch.dtype, config_root: Path) -> Base:
        """A single-file Flux transformer (bf16, fp16 or fp8, BFL's or ComfyUI's key names), with the VAE,
        text encoders and tokenizers from the diffusers folder named by ``$LORACORD_FLUX_COMPONENTS``."""
        from diffusers import FluxTransformer2DModel

        from .model import CONFIGS, components_folder, named_after_file, transformer_from_file

        unset = (
            f"{path.name} holds only the Flux transformer; set {COMPONENTS_ENV} to a diffusers FLUX.1 "
            "folder with the VAE, CLIP-L, T5-XXL and their tokenizers, or give that folder as the base"
        )
        folder = components_folder(COMPONENTS_ENV, unset, _check_components)
        transformer = transformer_from_file(path, FluxTransformer2DModel, CONFIGS / "flux", dtype, "Flux")
        return named_after_file(self.from_folder(folder, dtype, transformer), path)

    # ---- training ----

    def prepare_training(self, base: Base, spec: TrainSpec, weight_dtype: torch.dtype) -> None:
        if spec.fp8_base:
            flow_matching.store_fp8(base.unet, weight_dtype)

    def lora_targets(
        self, base: Base, spec: TrainSpec, block_weights: dict[str, float] | None
    ) -> dict[str, list[Target]]:
        # kohya's FLUX_TARGET_REPLACE_MODULE_DOUBLE/_SINGLE: every Linear of the double and single
        # blocks; and CLIP-L's attention and MLP when the text encoder trains.
        import torch
        from diffusers.models.transformers.transformer_flux import (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        from .clip_text import clip_targets

        targets: dict[str, list[Target]] = {}
        if spec.train_unet:
            targets["unet"] = [
                Target(f"{parent_name}.{child_name}", spec.network_dim, spec.network_alpha)
                for parent_name, parent in base.unet.named_modules()
                if isinstance(parent, (FluxTransformerBlock, FluxSingleTransformerBlock))
                for child_name, child in parent.named_modules()
                if isinstance(child, torch.nn.Linear)
            ]
        if spec.train_text_encoder:
            targets["te1"] = clip_targets(base.text_encoders[0], spec)
        return targets

    # ---- LoRA files ----

    def kohya_modules(self, base: Base, modules: Sequence[Any]) -> list[KohyaModule]:
        """The transformer's q/k/v (and linear1) fused as kohya's; CLIP-L as ``lora_te1_``."""
        from .clip_text import te_key

        fused = list(fuse(m for m in modules if m.component == "unet"))
        return fused + [
            KohyaModule(te_key("lora_te1", m.name), m.down.detach(), m.up.detach(), m.alpha)
            for m in modules
            if m.component != "unet"
        ]

    def loadable_lora(self, tensors: dict[str, torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
        # kohya's Flux keys split for this model's sizes (diffusers' converter assumes FLUX.1's).
        return diffusers_state_dict(tensors, base.unet, base.text_encoders[0])

    def metadata(self, spec: TrainSpec) -> dict[str, Any]:
        # What kohya's flux_train_network.update_metadata adds, and the SD settings Flux does not use.
        return {
            "ss_model_type": "flux",
            "ss_apply_t5_attn_mask": False,
            "ss_weighting_scheme": "uniform",
            "ss_guidance_scale": spec.guidance_scale,
            "ss_timestep_sampling": spec.timestep_sampling,
            "ss_sigmoid_scale": spec.sigmoid_scale,
            "ss_model_prediction_type": spec.model_prediction_type,
            "ss_discrete_flow_shift": spec.discrete_flow_shift,
            "ss_max_token_length": None,
            "ss_fp8_base": spec.fp8_base,
        }

    def modelspec(self) -> tuple[str, str, str | None]:
        # kohya tells dev from schnell by its arguments; a LoRA trained with guidance is for dev. It
        # writes no prediction type for Flux.
        return "flux-1-dev", "https://github.com/black-forest-labs/flux", None

    # ---- generation ----

    def pipeline(self, base: Base, scheduler: Any) -> FluxPipeline:
        return flux_pipeline(base)  # its own flow-matching Euler, whatever sampler was asked

    def render_latents(
        self, base: Base, pipe: Any, request: SampleRequest, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        # FluxPipeline's flow-matching Euler with FLUX.1's size-dependent shift; true CFG (two passes)
        # only for a CFG scale above 1 with a negative prompt, as Forge does.
        import torch

        scale = base.vae_scale_factor
        # Latents are packed in 2x2 patches: sides go down to a multiple of twice the VAE's factor.
        width, height = (side // (2 * scale) * 2 * scale for side in (request.width, request.height))
        channels = base.unet.config.in_channels // 4
        noise = torch.randn((1, channels, height // scale, width // scale), generator=generator)
        packed = pipe._pack_latents(noise, 1, channels, height // scale, width // scale)
        true_cfg = request.cfg_scale > 1 and bool(request.negative)
        latents = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative if true_cfg else None,
            true_cfg_scale=request.cfg_scale,
            guidance_scale=request.guidance,
            width=width,
            height=height,
            num_inference_steps=request.steps,
            generator=generator,
            latents=packed.to(device, base.unet.dtype),
            max_sequence_length=t5_length(base),
            output_type="latent",
        ).images
        return pipe._unpack_latents(latents, height, width, scale)

    def parameters_fields(self, base: Base, request: SampleRequest) -> dict[str, Any]:
        # Flow-matching Euler at FLUX.1's shift: what Forge writes as Euler with the Simple schedule.
        return {
            "Sampler": "Euler",
            "Schedule type": "Simple",
            "Distilled CFG Scale": f"{request.guidance:g}" if base.unet.config.guidance_embeds else None,
        }

    # ---- writing bases out ----

    def save_folder(self, base: Base, folder: Path) -> Path:
        flux_pipeline(base).save_pretrained(folder)
        return folder

    def single_file(self, base: Base) -> dict[str, torch.Tensor]:
        raise ModelError("writing a Flux single file is not supported; save a diffusers folder instead")


FAMILY = Flux()
