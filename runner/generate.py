"""Text-to-image with the live base model: preview samples during training (and, later, ``/gen``).

A :class:`Sampler` wraps one diffusers pipeline around a :class:`~runner.models.Base`'s own
modules, so the images show the LoRA adapter being trained without copying any weights. Prompts
use kohya's sample-prompt syntax (``a photo of sks --n lowres --w 512 --h 768 --d 42 --l 7 --s 20``),
are encoded by :func:`runner.text.encode_prompts` (A1111's ``(word:1.2)`` emphasis, prompts longer
than 75 tokens in chunks), and every image carries A1111's ``parameters`` text.

Samplers follow A1111's implementations, since that is where members compare images: the
k-diffusion ones step through ``t = linspace(999, 0, n)``, DDIM and PLMS use CompVis' "leading"
timesteps, and DDIM does not clip x0 (kohya's previews do, A1111 does not).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .models import Base
from .text import encode_prompts

DEFAULT_SAMPLER = "euler_a"
MAX_SIDE = 4096
DEFAULT_NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, jpeg artifacts, signature, watermark, blurry"
)


# ---- samplers ----


@dataclass(frozen=True)
class SamplerDef:
    display: str  # A1111's name, written into the parameters text
    scheduler: type[SchedulerMixin]
    options: dict[str, Any] = field(default_factory=dict)
    # A1111's "Schedule type" when its "Automatic" would pick another schedule for this sampler.
    schedule_type: str | None = None


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
    """The kohya key for a kohya name (``euler_a``) or an A1111 name (``Euler a``), any case."""
    wanted = name.strip().lower()
    for key, sampler in SAMPLERS.items():
        if wanted in (key, sampler.display.lower()):
            return key
    raise ValueError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh diffusers scheduler for a sampler name, on the base model's noise schedule."""
    sampler = SAMPLERS[resolve_sampler(name)]
    return sampler.scheduler.from_config(scheduler_config, **sampler.options)


# ---- prompts ----


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None  # None: a fresh random seed each time
    cfg_scale: float = 7.5
    steps: int = 30
    sampler: str | None = None  # None: DEFAULT_SAMPLER

    def seeded(self) -> SamplePrompt:
        """This prompt with its seed fixed, drawing one if unset, so it can be rendered and recorded."""
        return self if self.seed is not None else replace(self, seed=random.randrange(2**32))


def _number(option: str, value: str, cast: type[int] | type[float]) -> Any:
    try:
        number = cast(value)
    except ValueError:
        raise ValueError(f"--{option} needs a number, got '{value}'") from None
    if number < 0:
        raise ValueError(f"--{option} cannot be negative, got {value}")
    return number


def _side(option: str, value: str) -> int:
    side = _number(option, value, int)
    if side > MAX_SIDE:
        raise ValueError(f"--{option} must be at most {MAX_SIDE}, got {side}")
    return max(64, side - side % 8)  # kohya rounds down to a multiple of 8, at least 64


def parse_sample_prompt(
    line: str, *, width: int, height: int, steps: int, sampler: str, seed: int
) -> SamplePrompt:
    """One line of kohya's sample-prompt syntax; the keyword arguments fill the options it leaves out.

    Options follow the prompt, each after `` --``: ``--n`` negative prompt, ``--w``/``--h`` size
    (rounded down to a multiple of 8), ``--d`` seed, ``--l`` CFG scale, ``--s`` steps (clamped to
    1-1000 as kohya does), ``--ss`` sampler. Option letters are case-insensitive. Anything else
    raises ValueError with a message meant for the member who wrote the line.
    """
    # The leading space lets a line of options alone (``--n lowres``) read as an empty prompt.
    prompt, *options = f" {line.strip()}".split(" --")
    sp = SamplePrompt(
        prompt.strip(),
        width=_side("w", str(width)),
        height=_side("h", str(height)),
        seed=seed,
        steps=steps,
        sampler=resolve_sampler(sampler),
    )
    try:
        for option in options:
            key, _, value = option.strip().partition(" ")
            key, value = key.lower(), value.strip()
            if key == "n":
                sp.negative = value
            elif key == "w":
                sp.width = _side(key, value)
            elif key == "h":
                sp.height = _side(key, value)
            elif key == "d":
                sp.seed = _number(key, value, int)
            elif key == "l":
                sp.cfg_scale = _number(key, value, float)
            elif key == "s":
                sp.steps = max(1, min(1000, _number(key, value, int)))
            elif key == "ss":
                sp.sampler = resolve_sampler(value)
            elif key:
                raise ValueError(f"unknown option --{key} (use --n, --w, --h, --d, --l, --s, --ss)")
    except ValueError as e:
        raise ValueError(f"sample prompt '{line.strip()}': {e}") from None
    return sp


_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")


def default_sample_prompts(trigger: str | None, common_tags: Sequence[str], n: int = 2) -> list[str]:
    """``n`` kohya-syntax prompt lines for a dataset: the trigger word first, then its common tags.

    The first shows the trigger with the most common tags, the second the trigger alone (does the
    word carry the concept?), further ones the trigger with the next few tags in turn. Tags are
    escaped so that parentheses in tag names are not read as emphasis.
    """
    trigger = (trigger or "").strip()
    tags = [
        _UNESCAPED_PAREN.sub(r"\\\1", t.strip()) for t in common_tags if t.strip() and t.strip() != trigger
    ]
    lead = [trigger] if trigger else []
    bodies = [lead + tags[:8], lead or tags[:2]]
    for i in range(2, n):
        start = 8 + 4 * (i - 2)
        bodies.append(lead + (tags[start : start + 4] or tags[:4]))
    return [f"{', '.join(body)} --n {DEFAULT_NEGATIVE}" for body in bodies[:n]]


# ---- rendering ----


@contextmanager
def _sampling_mode(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Eval mode on ``device`` for the duration; each module's mode and place are put back after."""
    saved = [(m, m.training, m.device) for m in modules]
    try:
        for m in modules:
            m.eval()
            m.to(device)
        yield
    finally:
        for m, training, place in saved:
            m.train(training)
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
        scheduler = make_scheduler(DEFAULT_SAMPLER, base.scheduler_config)
        te, tok = base.text_encoders, base.tokenizers
        if base.family == "sd15":
            self.pipe: StableDiffusionPipeline | StableDiffusionXLPipeline = StableDiffusionPipeline(
                vae=base.vae,
                text_encoder=te[0],
                tokenizer=tok[0],
                unet=base.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            # force_zeros: an empty negative becomes zeros, as SDXL was trained; a given one is encoded.
            self.pipe = StableDiffusionXLPipeline(
                vae=base.vae,
                text_encoder=te[0],
                text_encoder_2=te[1],
                tokenizer=tok[0],
                tokenizer_2=tok[1],
                unet=base.unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        self.pipe.set_progress_bar_config(disable=True)

    def render(self, sp: SamplePrompt) -> Image.Image:
        """One image; the same prompt and seed give the same pixels on the same device and dtype.

        The starting noise comes from a CPU generator in fp32 (A1111's "RNG: CPU"), so it does not
        depend on the GPU or the model's dtype. A prompt without a seed gets a random one: call
        ``sp.seeded()`` first to know it.
        """
        sp = sp.seeded()
        base = self.base
        self.pipe.scheduler = make_scheduler(sp.sampler or DEFAULT_SAMPLER, base.scheduler_config)
        generator = torch.Generator("cpu").manual_seed(sp.seed)
        scale = base.vae_scale_factor
        shape = (1, base.unet.config.in_channels, sp.height // scale, sp.width // scale)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        modules = [base.unet, base.vae, *base.text_encoders]
        with torch.no_grad(), _sampling_mode(modules, self.device):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                latents = self.pipe(
                    **self._embeds(sp),
                    width=sp.width,
                    height=sp.height,
                    num_inference_steps=sp.steps,
                    guidance_scale=sp.cfg_scale,
                    generator=generator,
                    latents=noise.to(self.device, base.unet.dtype),
                    output_type="latent",
                ).images
            return self._decode(latents)

    def _embeds(self, sp: SamplePrompt) -> dict[str, torch.Tensor]:
        # Prompt and negative are encoded together so they get the same number of 77-token chunks.
        zero_negative = self.base.family == "sdxl" and not sp.negative
        texts = [sp.prompt] if zero_negative else [sp.prompt, sp.negative]
        cond = encode_prompts(
            self.base, texts, max_token_length=None, clip_skip=self.clip_skip, weighted=self.weighted
        )
        embeds = {"prompt_embeds": cond.hidden_states[:1]}
        if not zero_negative:
            embeds["negative_prompt_embeds"] = cond.hidden_states[1:]
        if cond.pooled is not None:
            embeds["pooled_prompt_embeds"] = cond.pooled[:1]
            if not zero_negative:
                embeds["negative_pooled_prompt_embeds"] = cond.pooled[1:]
        return embeds

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        # Decoded here, not by the pipeline: the pipelines hand the VAE latents in the UNet's dtype,
        # which fails when the VAE is kept in fp32 while the UNet runs in fp16/bf16.
        vae = self.base.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    def parameters_text(
        self, sp: SamplePrompt, model_name: str, model_hash: str, extra: dict[str, str] | None = None
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
            "Seed": sp.seed,
            "Size": f"{sp.width}x{sp.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Clip skip": self.clip_skip if self.clip_skip and self.clip_skip > 1 else None,
            **(extra or {}),
            "Version": f"loracord {version('loracord')}",
        }
        line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
        negative = f"\nNegative prompt: {sp.negative}" if sp.negative else ""
        return f"{sp.prompt}{negative}\n{line}"


def _quote(value: Any) -> str:
    # A1111's own quoting rule for infotext values, so its parser splits the line back correctly.
    text = str(value)
    if any(c in text for c in ",\n:"):
        return json.dumps(text, ensure_ascii=False)
    return text


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Save ``image`` as PNG with A1111's ``parameters`` text chunk (iTXt when it is not Latin-1)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)
