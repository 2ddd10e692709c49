"""Text-to-image with the live base model, for training previews and for /gen.

A :class:`Sampler` wraps the family's diffusers pipeline around a
:class:`~runner.families.model.Base`'s own modules, so the images show the LoRA adapter being
trained without copying any weights. Prompts use kohya's sample-prompt syntax
(``a photo of sks --n lowres --w 512 --h 768 --d 42 --l 7 --s 20``), SD families encode them with
A1111's ``(word:1.2)`` emphasis and prompts longer than 75 tokens in chunks, and every image carries
A1111's ``parameters`` text.

Samplers follow A1111's implementations, since that is where members compare images: the
k-diffusion ones step through ``t = linspace(999, 0, n)``, DDIM and PLMS use CompVis' "leading"
timesteps, and DDIM does not clip x0 (kohya's previews do, A1111 does not).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..families.protocol import Base, SampleRequest
from ..families.registry import family
from ..formats.infotext import format_parameters
from ..spec import SamplePromptSettings
from .sample_prompts import SamplePrompt, read_sample_prompt

DEFAULT_SAMPLER = "euler_a"


# ---- samplers ----


@dataclass(frozen=True)
class SamplerDef:
    display: str  # A1111's name, written into the parameters text
    scheduler: type[SchedulerMixin]
    options: dict[str, Any] = field(default_factory=dict)
    # A1111's "Schedule type" when its "Automatic" would pick another schedule for this sampler.
    schedule_type: str | None = None
    # The older A1111 name that folds the schedule in ("DPM++ 2M Karras"); it replaces `display` as a name.
    alias: str | None = None
    seeded_noise: bool = False  # an SDE sampler whose Brownian noise takes the image's seed, as in A1111

    @property
    def name(self) -> str:
        return self.alias or self.display


_K_DIFFUSION = {"timestep_spacing": "linspace"}
_COMPVIS = {"timestep_spacing": "leading", "steps_offset": 1}

SAMPLERS: dict[str, SamplerDef] = {
    "euler_a": SamplerDef("Euler a", EulerAncestralDiscreteScheduler, _K_DIFFUSION),
    "euler": SamplerDef("Euler", EulerDiscreteScheduler, _K_DIFFUSION),
    "ddim": SamplerDef("DDIM", DDIMScheduler, {**_COMPVIS, "clip_sample": False, "set_alpha_to_one": False}),
    # A1111's "Automatic" schedule for DPM++ 2M is Karras; kohya's dpmsolver++ is not.
    "dpmsolver++": SamplerDef(
        "DPM++ 2M",
        DPMSolverMultistepScheduler,
        {**_K_DIFFUSION, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        schedule_type="Uniform",
    ),
    "dpm++_2m_karras": SamplerDef(
        "DPM++ 2M",
        DPMSolverMultistepScheduler,
        {**_K_DIFFUSION, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        schedule_type="Karras",
        alias="DPM++ 2M Karras",
    ),
    "dpm++_sde_karras": SamplerDef(
        "DPM++ SDE",
        DPMSolverSDEScheduler,
        {**_K_DIFFUSION, "use_karras_sigmas": True},
        schedule_type="Karras",
        alias="DPM++ SDE Karras",
        seeded_noise=True,
    ),
    "lms": SamplerDef("LMS", LMSDiscreteScheduler, _K_DIFFUSION),
    "heun": SamplerDef("Heun", HeunDiscreteScheduler, _K_DIFFUSION),
    "pndm": SamplerDef("PLMS", PNDMScheduler, {**_COMPVIS, "skip_prk_steps": True}),
    # A1111's UniPC defaults: variant bh1, order 3, time-uniform steps ending just above t=0 (bh1 also
    # turns NaN in diffusers when the last sigma is exactly 0).
    "unipc": SamplerDef(
        "UniPC",
        UniPCMultistepScheduler,
        {**_K_DIFFUSION, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    ),
}


def resolve_sampler(name: str) -> str:
    """The key for a kohya name (``euler_a``) or an A1111 name (``Euler a``, ``DPM++ 2M Karras``), any case."""
    wanted = name.strip().lower()
    for key, sampler in SAMPLERS.items():
        if wanted in (key, sampler.name.lower()):
            return key
    names = ", ".join(s.name for s in SAMPLERS.values())
    raise ValueError(f"unknown sampler '{name}': use one of {names}")


def parse_sample_prompt(entry: str | SamplePromptSettings, **defaults: Any) -> SamplePrompt:
    """:func:`runner.gen.sample_prompts.read_sample_prompt` (a prompt line or a prompt file's table)
    with sampler names checked and resolved."""
    return read_sample_prompt(entry, resolve_sampler=resolve_sampler, **defaults)


def make_scheduler(name: str, scheduler_config: dict[str, Any], seed: int | None = None) -> SchedulerMixin:
    """A fresh diffusers scheduler for a sampler name, on the base model's noise schedule."""
    sampler = SAMPLERS[resolve_sampler(name)]
    options = {**sampler.options, **({"noise_sampler_seed": seed} if sampler.seeded_noise else {})}
    return sampler.scheduler.from_config(scheduler_config, **options)


# ---- rendering ----


@contextmanager
def _sampling_mode(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Eval mode on ``device`` for the duration; each module's mode and place are put back after.

    Only what differs is changed: ``train``/``eval`` and ``to`` each walk every submodule (and
    diffusers' ``to`` checks its offloading hooks on each), about a quarter of a warm /gen's time on
    the tiny model when done for modules already in eval mode on the device.
    """
    if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU; modules say cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    saved = [(m, m.training, m.device) for m in modules]
    try:
        for m, training, place in saved:
            if training:
                m.eval()
            if place != device:
                m.to(device)
        yield
    finally:
        for m, training, place in saved:
            if training:
                m.train()
            if place != device:
                m.to(place)


class Sampler:
    """Renders :class:`SamplePrompt` s with one pipeline over a Base's live modules."""

    def __init__(
        self,
        base: Base,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        clip_skip: int | None = None,
        weighted: bool = True,
    ) -> None:
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.clip_skip = clip_skip
        self.weighted = weighted
        self.family = family(base.family)
        # Families with their own sampler (Flux) ignore the one given here.
        scheduler = make_scheduler(DEFAULT_SAMPLER, base.scheduler_config) if self.family.samplers else None
        self.pipe = self.family.pipeline(base, scheduler)

    def request(self, sp: SamplePrompt) -> SampleRequest:
        """What the family renders for ``sp`` (which must have its seed)."""
        return SampleRequest(
            prompt=sp.prompt,
            negative=sp.negative,
            width=sp.width,
            height=sp.height,
            steps=sp.steps,
            cfg_scale=sp.cfg_scale,
            guidance=sp.guidance,
            sampler=sp.sampler,
            seed=sp.seed,
            clip_skip=self.clip_skip,
            weighted=self.weighted,
        )

    def render(self, sp: SamplePrompt) -> Image.Image:
        """One image; the same prompt and seed give the same pixels on the same device and dtype.

        The starting noise comes from a CPU generator in fp32 (A1111's "RNG: CPU"), so it does not
        depend on the GPU or the model's dtype. A prompt without a seed gets a random one: call
        ``sp.seeded()`` first to know it.
        """
        sp = sp.seeded()
        base = self.base
        generator = torch.Generator("cpu").manual_seed(sp.seed)
        if self.family.samplers:
            self.pipe.scheduler = make_scheduler(
                sp.sampler or DEFAULT_SAMPLER, base.scheduler_config, sp.seed
            )
        modules = [base.unet, base.vae, *base.text_encoders]
        with torch.no_grad(), _sampling_mode(modules, self.device):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                latents = self.family.render_latents(
                    base, self.pipe, self.request(sp), generator, self.device
                )
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        # Decoded here, not by the pipeline: the pipelines hand the VAE latents in the UNet's dtype,
        # which fails when the VAE is kept in fp32 while the UNet runs in fp16/bf16.
        vae = self.base.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        if vae.config.get("shift_factor") is not None:  # Flux's VAE centres its latents
            latents = latents + vae.config.shift_factor
        image = vae.decode(latents).sample
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    def parameters_text(
        self, sp: SamplePrompt, model_name: str, model_hash: str | None, extra: dict[str, str] | None = None
    ) -> str:
        """A1111's ``parameters`` text for an image rendered from ``sp`` (which must have its seed)."""
        if sp.seed is None:
            raise ValueError("the prompt has no seed: render sp.seeded() and describe that")
        sampler = SAMPLERS[resolve_sampler(sp.sampler or DEFAULT_SAMPLER)]
        fields: dict[str, Any] = {
            "Steps": sp.steps,
            "Sampler": sampler.display,
            "Schedule type": sampler.schedule_type,
            "CFG scale": f"{sp.cfg_scale:g}",
            "Distilled CFG Scale": None,
            "Seed": sp.seed,
            "Size": f"{sp.width}x{sp.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Clip skip": self.clip_skip if self.clip_skip and self.clip_skip > 1 else None,
            "RNG": "CPU",  # the starting noise comes from a CPU generator; A1111 then draws the same
            **(extra or {}),
            "Version": f"loracord {version('loracord')}",
        }
        # Families with their own sampler say so here (Flux: Euler, Simple, its distilled guidance).
        fields.update(self.family.parameters_fields(self.base, self.request(sp)))
        return format_parameters(sp.prompt, sp.negative, fields)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Save ``image`` as PNG with A1111's ``parameters`` text chunk (iTXt when it is not Latin-1)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)
