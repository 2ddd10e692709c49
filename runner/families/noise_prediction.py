"""SD1.5 and SDXL's training objective: epsilon or v prediction on DDPM's schedule, as kohya's
train_network computes it (noise offset, multires noise, min-SNR weighting, SDXL's micro-conditioning)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..spec import TrainSpec
from .clip_text import encode_prompts
from .protocol import Base, Batch, Conditioning, ImageSize


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, gen: torch.Generator, scales: random.Random
) -> torch.Tensor:
    """kohya's ``pyramid_noise_like`` (multires noise): ``noise`` plus up to ``iterations`` octaves.

    Octave ``i`` (from 0) is fresh noise drawn at ``1 / r**i`` of the latent size, ``r`` uniform in
    [2, 4) and drawn anew per octave (so octave 0 is full-size noise), upsampled bilinearly and
    weighted ``discount**i``; the octaves stop once one is 1 pixel wide or high, and the sum is
    rescaled to unit standard deviation. Neither diffusers nor peft ships it. The scale factors
    come from a host-side RNG, as in kohya, so drawing them never waits for the GPU.
    """
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = scales.random() * 2 + 2
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn(b, c, hi, wi, generator=gen, device=noise.device)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hi == 1 or wi == 1:
            break
    return noise / noise.std()


class NoisePrediction:
    """SD1.5/SDXL: epsilon or v prediction on the base's DDPM schedule, as kohya's train_network."""

    def __init__(
        self,
        base: Base,
        spec: TrainSpec,
        device: torch.device,
        autocast_dtype: torch.dtype,
        micro_conditioning: bool = False,
    ):
        self.base, self.spec, self.device = base, spec, device
        self.micro_conditioning = micro_conditioning  # SDXL's size and crop conditioning
        self.autocast_dtype = autocast_dtype
        self.noise_scheduler = base.noise_scheduler()
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self._scales_seed: int | None = None
        self._scales_rng = random.Random()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, self.autocast_dtype, enabled=self.spec.mixed_precision != "no"
        )

    def encode_text(
        self, captions: list[str], grad: bool, cached: Conditioning | None = None
    ) -> Conditioning:
        with torch.set_grad_enabled(grad), self._autocast():
            return encode_prompts(
                self.base,
                captions,
                max_token_length=self.spec.max_token_length,
                clip_skip=self.spec.clip_skip,
                weighted=self.spec.weighted_captions,
            )

    def text_cached(self) -> None:
        pass  # CLIP encoders are small enough to stay where they are

    def _scales(self, gen: torch.Generator) -> random.Random:
        # New draws every step, restarting whenever the trainer reseeds `gen` (each epoch), so a
        # resumed run draws exactly what an uninterrupted one does.
        if self._scales_seed != gen.initial_seed():
            self._scales_seed = gen.initial_seed()
            self._scales_rng = random.Random(self._scales_seed)
        return self._scales_rng

    def _noise(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # kohya's order (train_util.get_noise_noisy_latents_and_timesteps): base noise, then the
        # noise offset, then the pyramid on top of the offset noise.
        spec = self.spec
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        if spec.noise_offset:
            b, c = latents.shape[:2]
            noise = noise + spec.noise_offset * torch.randn((b, c, 1, 1), generator=gen, device=self.device)
        if spec.multires_noise_iterations:
            noise = pyramid_noise(
                noise,
                spec.multires_noise_iterations,
                spec.multires_noise_discount,
                gen,
                self._scales(gen),
            )
        return noise

    def _time_ids(self, sizes: list[ImageSize]) -> torch.Tensor:
        # SDXL's micro-conditioning: original size, crop offset, target size. They follow from the
        # sizes alone (load_image resizes to cover and crops the centre), so cached latents need no
        # image reads here.
        rows = []
        for size in sizes:
            (ow, oh), (bw, bh) = size.original, size.bucket
            scale = max(bw / ow, bh / oh)
            rw, rh = round(ow * scale), round(oh * scale)
            rows.append([oh, ow, (rh - bh) // 2, (rw - bw) // 2, bh, bw])
        return torch.tensor(rows, device=self.device, dtype=torch.float32)

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """Draws from ``gen`` in kohya's order: noise, noise offset, pyramid octaves, timesteps."""
        sched = self.noise_scheduler
        latents = batch.latents
        noise = self._noise(latents, gen)
        t = torch.randint(
            0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=self.device
        )
        noisy = sched.add_noise(latents, noise, t)
        prediction_type = sched.config.prediction_type
        target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        added = None
        if self.micro_conditioning:
            added = {"text_embeds": batch.cond.pooled, "time_ids": self._time_ids(batch.sizes)}
        with self._autocast():
            pred = self.base.unet(noisy, t, batch.cond.hidden_states, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.spec.min_snr_gamma:
            # kohya's apply_snr_weight (Hang et al. 2023): min(snr, gamma) / snr for epsilon,
            # min(snr, gamma) / (snr + 1) for v-prediction; diffusers' compute_snr is kohya's all_snr.
            snr = compute_snr(sched, t)
            weight = torch.clamp(snr, max=self.spec.min_snr_gamma)
            weight = weight / (snr + 1) if prediction_type == "v_prediction" else weight / snr
            loss = loss * weight
        return loss.mean()
