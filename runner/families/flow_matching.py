"""The rectified-flow objective the DiT families (Flux.1, Z-Image) train with, as kohya's
``flux_train_utils`` computes it; each family supplies its transformer's call.

Flow matching: ``x_t = (1 - σ) x_0 + σ ε`` and the model predicts the velocity ``ε - x_0``
(kohya's ``target = noise - latents``). Timestep sampling follows kohya's ``--timestep_sampling``:
``sigma`` (uniform over the shifted training schedule), ``uniform``, ``sigmoid`` (of a scaled
normal), ``shift`` (sigmoid, then ``discrete_flow_shift``) and ``flux_shift`` (the shift FLUX.1 uses
for the image's size).

Torch is imported inside the methods, so that family modules can subclass this one and stay
importable without torch (the bot reads them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import DIT_KINDS

if TYPE_CHECKING:
    import torch

    from ..spec import TrainSpec
    from .protocol import Base, Batch, Conditioning

# The settings of flow-matching training (and fp8 storage of the DiT): UNet families refuse them.
FLOW_MATCHING_SETTINGS = (
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "model_prediction_type",
    "fp8_base",
)


def size_problems(settings: Mapping[str, Any], step: int, family: str) -> list[str]:
    """DiTs pack 2x2 latent patches, so every bucket side must divide by twice the VAE's factor."""
    sizes = {"bucket_reso_steps": [settings["bucket_reso_steps"]], "resolution": list(settings["resolution"])}
    return [
        f"{k} must be a multiple of {step} for {family} (got {'x'.join(map(str, v))})"
        for k, v in sizes.items()
        if any(side % step for side in v)
    ]


def store_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """fp8_base: keep the frozen transformer's weights in fp8, each layer upcast to ``compute_dtype``
    as it runs (diffusers' layerwise casting; the norms and embeddings it leaves out are cast to
    ``compute_dtype``). Call on the host, before the transformer moves to the GPU, so the GPU never
    holds it in more than fp8, and before the LoRA layers exist, so they stay fp32."""
    import torch

    transformer.to(compute_dtype)
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


class DiT:
    """What the flow-matching DiT families (Flux.1, Z-Image) share as families: their own Euler
    sampler, sentence captions, no UNet blocks, image sides in 2x2 latent patches, fp8 storage only
    with mixed precision, and no CFG at /gen unless the member asks."""

    blocks_per_side = None
    samplers = None  # the pipeline's own flow-matching Euler
    caption_style = "sentences"  # their text encoders (T5, Qwen3) read sentences, as they were trained
    pipeline_class: str
    short_name: str
    preset_settings: Mapping[str, Any]  # presets.DIT with the family's own shift
    objective_class: type[FlowMatching]

    def preset(self, kind: str) -> dict[str, Any]:
        return {**self.preset_settings, **DIT_KINDS[kind]}

    def size_step(self, base: Base) -> int:
        return 2 * base.vae_scale_factor

    def check_settings(self, settings: Mapping[str, Any], base: Base) -> list[str]:
        bad = size_problems(settings, self.size_step(base), self.short_name)
        if settings["fp8_base"] and settings["mixed_precision"] == "no":
            # kohya refuses it too: the fp8 weights are upcast to the mixed-precision dtype as they run.
            bad.append("fp8_base needs mixed_precision=bf16 (or fp16)")
        return bad

    def claims_folder(self, model_index: Mapping[str, Any], folder: Path) -> bool:
        return model_index.get("_class_name") == self.pipeline_class

    def block_of(self, component: str, module: str, base: Base) -> str | None:
        return None

    def objective(
        self, base: Base, spec: TrainSpec, device: torch.device, autocast: torch.dtype
    ) -> FlowMatching:
        return self.objective_class(base, spec, device, autocast)

    def gen_cfg_scale(self, requested: float, explicit: bool) -> float:
        # Guidance- or step-distilled: true CFG (two passes, twice the work) only when asked.
        return requested if explicit else 1.0


class FlowMatching:
    """Timestep sampling and the loss; subclasses encode captions and call their transformer."""

    def __init__(self, base: Base, spec: TrainSpec, device: torch.device, autocast_dtype: torch.dtype):
        self.base, self.spec, self.device = base, spec, device
        self.autocast_dtype = autocast_dtype
        from diffusers import FlowMatchEulerDiscreteScheduler

        # kohya's training schedule: 1000 steps shifted by discrete_flow_shift, no dynamic shift.
        self.schedule = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=spec.discrete_flow_shift
        )

    def _autocast(self) -> torch.autocast:
        import torch

        return torch.autocast(
            self.device.type, self.autocast_dtype, enabled=self.spec.mixed_precision != "no"
        )

    def text_cached(self) -> None:
        pass

    def encode_text(
        self, captions: list[str], grad: bool, cached: Conditioning | None = None
    ) -> Conditioning:
        raise NotImplementedError

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's prediction of ``ε - x_0`` for ``noisy`` latents [B, C, H, W] at ``sigmas``."""
        raise NotImplementedError

    def _sigmas(self, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        import torch
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

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
        import torch
        import torch.nn.functional as F

        latents = batch.latents
        b, _, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        # Both DiTs see the latents in 2x2 patches: the sequence is (h/2)(w/2) tokens long.
        sigmas = self._sigmas(b, (h // 2) * (w // 2), gen)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        with self._autocast():
            pred = self.velocity(noisy, sigmas, batch.cond).float()
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
