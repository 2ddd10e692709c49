"""Training Flux.1: captions through CLIP-L (pooled) and T5-XXL, timesteps sampled as kohya's
``flux_train_utils`` does, and the flow-matching loss; plus which settings Flux refuses and why.

Flow matching: ``x_t = (1 - σ) x_0 + σ ε`` and the transformer predicts the velocity ``ε - x_0``
(kohya's ``target = noise - latents``). Timestep sampling follows kohya's ``--timestep_sampling``:
``sigma`` (uniform over the shifted training schedule), ``uniform``, ``sigmoid`` (of a scaled
normal), ``shift`` (sigmoid, then ``discrete_flow_shift``) and ``flux_shift`` (the shift FLUX.1 uses
for the image's size). Flux.1-dev is guidance-distilled: it is told ``guidance_scale`` while training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..spec import SpecError, TrainSpec
from .clip_text import Conditioning
from .models import Base

if TYPE_CHECKING:
    from ..train.objectives import Batch

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
}
FLUX_ONLY = (
    "guidance_scale",
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "model_prediction_type",
    "t5xxl_max_token_length",
    "fp8_base",
)


def check_family_settings(settings: dict[str, Any], base: Base) -> None:
    """Refuse settings that do not apply to the base's family, each with its reason."""
    fields = TrainSpec.model_fields
    changed = [k for k in fields if settings[k] != fields[k].default]
    if base.family != "flux":
        bad = [f"{k} applies to Flux bases only" for k in FLUX_ONLY if k in changed]
    else:
        bad = [f"{k}: {why}" for k, why in NOT_FOR_FLUX.items() if k in changed]
        # Flux packs 2x2 latent patches, so every bucket side must divide by twice the VAE's factor.
        step = 2 * base.vae_scale_factor
        sizes = {
            "bucket_reso_steps": [settings["bucket_reso_steps"]],
            "resolution": list(settings["resolution"]),
        }
        bad += [
            f"{k} must be a multiple of {step} for Flux (got {'x'.join(map(str, v))})"
            for k, v in sizes.items()
            if any(side % step for side in v)
        ]
        if settings["fp8_base"] and settings["mixed_precision"] == "no":
            # kohya refuses it too: the fp8 weights are upcast to the mixed-precision dtype as they run.
            bad.append("fp8_base needs mixed_precision=bf16 (or fp16)")
    if bad:
        raise SpecError("; ".join(bad))


def store_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """fp8_base: keep the frozen transformer's weights in fp8, each layer upcast to ``compute_dtype``
    as it runs (diffusers' layerwise casting; the norms and embeddings it leaves out are cast to
    ``compute_dtype``). Call on the host, before the transformer moves to the GPU, so the GPU never
    holds it in more than fp8, and before the LoRA layers exist, so they stay fp32."""
    transformer.to(compute_dtype)
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def t5_length(base: Base, requested: int | None = None) -> int:
    """``requested``, or kohya's default: 512 T5 tokens for dev, 256 for schnell (no guidance input)."""
    if requested:
        return requested
    return 512 if base.unet.config.guidance_embeds else 256


def flux_pipeline(base: Base, scheduler: Any = None) -> FluxPipeline:
    """A FluxPipeline over the base's own modules (no copies)."""
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


class FlowMatching:
    """The Flux objective the trainer calls: caption encoding and the loss of one batch."""

    # A guidance-distilled model samples without true CFG unless a prompt asks (kohya's --l 1.0).
    sample_defaults: dict[str, Any] = {"cfg_scale": 1.0}

    def __init__(self, base: Base, spec: TrainSpec, device: torch.device, autocast_dtype: torch.dtype):
        self.base, self.spec, self.device = base, spec, device
        self.autocast_dtype = autocast_dtype
        self.pipe = flux_pipeline(base)
        self.t5_length = t5_length(base, spec.t5xxl_max_token_length)
        # kohya's training schedule: 1000 steps shifted by discrete_flow_shift, no dynamic shift.
        self.schedule = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=spec.discrete_flow_shift
        )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, self.autocast_dtype, enabled=self.spec.mixed_precision != "no"
        )

    def encode_text(self, captions: list[str], grad: bool, t5: torch.Tensor | None = None) -> Conditioning:
        """T5's hidden states (``hidden_states``) and CLIP-L's pooled output (``pooled``); given ``t5``
        (its cached outputs for these captions), only CLIP-L runs."""
        with torch.set_grad_enabled(grad), self._autocast():
            if t5 is not None:
                # encode_prompt runs both encoders or neither; its CLIP-L half alone is this helper.
                return Conditioning(t5, self.pipe._get_clip_prompt_embeds(captions, device=self.device))
            t5, pooled, _ = self.pipe.encode_prompt(
                captions, device=self.device, max_sequence_length=self.t5_length
            )
        return Conditioning(t5, pooled)

    def text_cached(self) -> None:
        """Every caption is cached: T5-XXL (9.5 GB in bf16) waits on the CPU until the next preview."""
        if self.device.type == "cuda":
            self.base.text_encoders[1].to("cpu")
            torch.cuda.empty_cache()

    def _sigmas(self, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        spec, kind = self.spec, self.spec.timestep_sampling
        if kind == "sigma":
            index = (torch.rand(n, generator=gen, device=self.device) * 1000).long()
            return self.schedule.sigmas.to(self.device)[index]
        if kind == "uniform":
            return torch.rand(n, generator=gen, device=self.device)
        sigmas = torch.sigmoid(spec.sigmoid_scale * torch.randn(n, generator=gen, device=self.device))
        if kind == "shift":
            shift = spec.discrete_flow_shift
            return sigmas * shift / (1 + (shift - 1) * sigmas)
        if kind == "flux_shift":
            return self.schedule.time_shift(calculate_shift(seq_len), 1.0, sigmas)
        return sigmas  # sigmoid

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        latents, cond = batch.latents, batch.cond
        b, c, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        sigmas = self._sigmas(b, (h // 2) * (w // 2), gen)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        transformer = self.base.unet
        guidance = (
            torch.full((b,), self.spec.guidance_scale, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )
        with self._autocast():
            packed = transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
                timestep=sigmas,  # the transformer scales σ by 1000 itself
                guidance=guidance,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.hidden_states,
                txt_ids=torch.zeros(cond.hidden_states.shape[1], 3, device=self.device),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, latents.dtype),
                return_dict=False,
            )[0]
        scale = self.base.vae_scale_factor
        pred = FluxPipeline._unpack_latents(packed, h * scale, w * scale, scale).float()
        # kohya's apply_model_prediction_type; the target stays noise - latents for all three.
        # (kohya's sigma_scaled also weights the loss by its weighting_scheme, uniform by default:
        # loracord has no weighting_scheme, so the weight is always 1.)
        kind = self.spec.model_prediction_type
        if kind == "additive":
            pred = pred + noisy
        elif kind == "sigma_scaled":
            pred = pred * -s + noisy
        target = noise - latents
        return F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
