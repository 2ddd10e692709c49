"""Text-to-image with the live base model: preview samples during training (and, later, ``/gen``).

A :class:`Sampler` wraps one diffusers pipeline around a :class:`~runner.families.model.Base`'s own
modules, so the images show the LoRA adapter being trained without copying any weights. Prompts
use kohya's sample-prompt syntax (``a photo of sks --n lowres --w 512 --h 768 --d 42 --l 7 --s 20``),
are encoded by :func:`runner.families.clip_text.encode_prompts` (A1111's ``(word:1.2)`` emphasis, prompts longer
than 75 tokens in chunks), and every image carries A1111's ``parameters`` text.

Samplers follow A1111's implementations, since that is where members compare images: the
k-diffusion ones step through ``t = linspace(999, 0, n)``, DDIM and PLMS use CompVis' "leading"
timesteps, and DDIM does not clip x0 (kohya's previews do, A1111 does not).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from ..families.model import Base
from ..families.protocol import ModelError, SampleRequest
from ..families.registry import family
from ..formats.infotext import format_parameters, lora_tag, split_lora_tags
from ..formats.kohya import LoraFileError
from ..outcome import Cancelled, run_to_event
from ..spec import FailedEvent, GenSpec, ImagesEvent, LoraWeight, SamplePromptSettings, SpecError
from .grid import Grid, image_grid
from .loras import find_lora
from .sample_prompts import (  # noqa: F401 (re-exported: the trainer and tests read them here)
    DEFAULT_NEGATIVE,
    MAX_SIDE,
    SamplePrompt,
    default_sample_prompts,
    read_sample_prompt,
)

if TYPE_CHECKING:
    from .pipelines import PipelineCache

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


# ---- generation with LoRAs (/gen, `loracord gen`, grids) ----


@dataclass
class GenImage:
    image: Image.Image
    parameters: str  # A1111's parameters text
    seed: int


# A1111 removes these from a LoRA's name in "Lora hashes", whose own syntax uses them.
_HASH_NAME = str.maketrans("", "", ":,")


def size_limits(base: Base) -> tuple[int, int]:
    """Sides a family renders well: half to twice its native size (SD1.5 256-1024, SDXL 512-2048)."""
    return max(64, base.native_resolution // 2), base.native_resolution * 2


def _size(spec: GenSpec, base: Base) -> tuple[int, int]:
    lo, hi = size_limits(base)
    fam = family(base.family)
    step = fam.size_step(base)
    width, height = spec.width or base.native_resolution, spec.height or base.native_resolution
    for what, side in (("width", width), ("height", height)):
        if not lo <= side <= hi or side % step:
            raise SpecError(
                f"{what} {side} does not suit {base.name} ({fam.display_name}): "
                f"use {lo}-{hi}, a multiple of {step}"
            )
    return width, height


def gen_images(spec: GenSpec, cache: PipelineCache, cancel: threading.Event | None = None) -> list[GenImage]:
    """Render ``spec.count`` images (image i with seed + i) on the cache's warm pipeline for the base.

    LoRAs come from ``spec.loras`` and the prompt's ``<lora:name:w>`` tags (a tag wins over the same
    LoRA in ``spec.loras``); each image's parameters carry every LoRA as a tag, so A1111 applies them.
    Raises SpecError, LoraFileError or ModelError for bad input, Cancelled when ``cancel`` is set.
    """
    try:
        prompt, tags = split_lora_tags(spec.prompt)
    except ValueError as e:
        raise SpecError(str(e)) from None
    # The prompt's tags first, then spec.loras: the order the parameters text lists them in, so that a
    # re-roll from it sums the adapters in the same order and gets the same pixels.
    weights = {t.name: t.weight for t in tags}
    tagged = set(weights)
    weights |= {lw.name: lw.weight for lw in spec.loras if lw.name not in tagged}
    # Names are checked before a base is loaded: a typo should not wait for a checkpoint.
    files = [(find_lora(name, spec.lora_dir), weight) for name, weight in weights.items()]
    warm = cache.pipeline(spec.base)
    base = warm.base
    width, height = _size(spec, base)
    loaded = cache.activate(warm, files)
    # A LoRA given by path is named as A1111 would name it: by its file name.
    shown = {n: Path(n).stem if n.lower().endswith(".safetensors") else n for n in weights}
    shown_prompt = spec.prompt + "".join(
        f" {lora_tag(shown[n], w)}" for n, w in weights.items() if n not in tagged
    )
    hashes = ", ".join(
        f"{shown[n].translate(_HASH_NAME)}: {lora.short_hash}"
        for n, lora in zip(weights, loaded, strict=True)
    )
    seed = random.randrange(2**32) if spec.seed is None else spec.seed
    warm.sampler.clip_skip = spec.clip_skip
    cfg_scale = family(base.family).gen_cfg_scale(spec.cfg_scale, "cfg_scale" in spec.model_fields_set)
    out = []
    for i in range(spec.count):
        if cancel is not None and cancel.is_set():
            raise Cancelled
        sp = SamplePrompt(
            prompt,
            negative=spec.negative_prompt,
            width=width,
            height=height,
            seed=(seed + i) % 2**32,
            cfg_scale=cfg_scale,
            steps=spec.steps,
            sampler=resolve_sampler(spec.sampler),
            guidance=spec.guidance_scale,
        )
        text = warm.sampler.parameters_text(
            replace(sp, prompt=shown_prompt),
            base.name,
            base.model_hash,
            extra={"Lora hashes": hashes or None},
        )
        out.append(GenImage(warm.sampler.render(sp), text, sp.seed))
    return out


def save_images(images: Sequence[GenImage], out_dir: Path) -> list[Path]:
    """Save as A1111 names them, ``00012-1234.png`` (a running number, then the seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    start = max(numbers, default=-1) + 1
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"{start + i:05d}-{img.seed}.png"
        save_png(img.image, path, img.parameters)
        paths.append(path)
    return paths


def generate(spec: GenSpec, cache: PipelineCache, cancel: threading.Event | None = None) -> ImagesEvent:
    """``gen_images`` saved to ``spec.output_dir``; the event lists the files and their parameters."""
    started = time.monotonic()
    images = gen_images(spec, cache, cancel)
    paths = save_images(images, Path(spec.output_dir))
    return ImagesEvent(
        images=[str(p) for p in paths],
        parameters=[img.parameters for img in images],
        seeds=[img.seed for img in images],
        seconds=time.monotonic() - started,
    )


def epoch_files(lora_dir: Path, name: str) -> dict[str, Path]:
    """A training run's LoRAs by label: ``epoch 1`` … from ``NAME-000001.safetensors`` …, in order,
    or ``NAME`` alone when only ``NAME.safetensors`` is there."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.safetensors")
    epochs = sorted(
        (int(m.group(1)), p)
        for p in lora_dir.glob(f"{name}-*.safetensors")
        if (m := pattern.fullmatch(p.name))
    )
    files = {f"epoch {n}": p for n, p in epochs}
    if not files and (lora_dir / f"{name}.safetensors").is_file():
        files[name] = lora_dir / f"{name}.safetensors"
    return files


def lora_grid(
    template: GenSpec,
    name: str,
    weights: Sequence[float],
    prompts: Sequence[str],
    cache: PipelineCache,
    epochs: Sequence[int] | None = None,
    cancel: threading.Event | None = None,
) -> Grid:
    """Epochs × prompts (rows) by weights (columns) of one LoRA, every cell with the template's seed.

    ``epochs`` None takes every saved epoch in ``template.lora_dir``. The grid's parameters are its
    first cell's, as A1111 does for its grids.
    """
    if template.lora_dir is None:
        raise SpecError("a grid needs the LoRA folder of the training run")
    files = epoch_files(Path(template.lora_dir), name)
    if epochs is not None:
        missing = [n for n in epochs if f"epoch {n}" not in files]
        if missing:
            have = ", ".join(files) or "none"
            raise SpecError(f"{name} has no saved epoch {', '.join(map(str, missing))} (saved: {have})")
        files = {f"epoch {n}": files[f"epoch {n}"] for n in epochs}
    if not files:
        find_lora(name, template.lora_dir)  # names the LoRAs that do exist
        raise SpecError(f"no epochs of {name} in {template.lora_dir}")
    seed = random.randrange(2**32) if template.seed is None else template.seed
    rows, row_labels, first = [], [], None
    for label, path in files.items():
        for k, prompt in enumerate(prompts):
            row = []
            for weight in weights:
                spec = template.model_copy(
                    update={
                        "prompt": prompt,
                        "loras": [LoraWeight(name=str(path), weight=weight)],
                        "seed": seed,
                        "count": 1,
                    }
                )
                (cell,) = gen_images(spec, cache, cancel)
                first = first or cell
                row.append(cell.image)
            rows.append(row)
            row_labels.append(label if len(prompts) == 1 else f"{label}\nprompt {k + 1}")
    return image_grid(rows, row_labels, [f"weight {w:g}" for w in weights], parameters=first.parameters)


def run_gen(
    spec: GenSpec, cache: PipelineCache, emit: Callable[[Any], None], cancel: threading.Event | None = None
) -> ImagesEvent | FailedEvent:
    """One gen job for a worker or the CLI: every outcome is an event, emitted and returned."""
    return run_to_event(
        lambda: generate(spec, cache, cancel),
        emit,
        bad_input=(SpecError, LoraFileError, ModelError),
        cancelled="cancelled; images made so far were not saved",
        out_of_memory=lambda: "lower the size or the count, or use fewer LoRAs at once",
    )
