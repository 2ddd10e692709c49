"""Generation with LoRAs: /gen, ``loracord gen`` and epoch × weight grids, on a warm pipeline."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..families.protocol import Base, ModelError
from ..families.registry import family
from ..formats.infotext import lora_tag, split_lora_tags
from ..formats.kohya import LoraFileError
from ..outcome import Cancelled, run_to_event
from ..spec import FailedEvent, GenSpec, GridSpec, ImagesEvent, LoraWeight, SpecError, StageEvent
from .grid import Grid, image_grid
from .loras import find_lora
from .pipelines import PipelineCache
from .sample_prompts import SamplePrompt
from .sampler import resolve_sampler, save_png

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
    on_cell: Callable[[int, int], None] | None = None,
) -> Grid:
    """Epochs × prompts (rows) by weights (columns) of one LoRA, every cell with the template's seed.

    ``epochs`` None takes every saved epoch in ``template.lora_dir``. The grid's parameters are its
    first cell's, as A1111 does for its grids. ``on_cell(done, total)`` is called after each cell.
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
    total = len(files) * len(prompts) * len(weights)
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
                if on_cell is not None:
                    on_cell(len(rows) * len(weights) + len(row), total)
            rows.append(row)
            row_labels.append(label if len(prompts) == 1 else f"{label}\nprompt {k + 1}")
    return image_grid(rows, row_labels, [f"weight {w:g}" for w in weights], parameters=first.parameters)


def _grid_path(out_dir: Path, seed: int) -> Path:
    """``grid-00003-1234.png``: a running number (as A1111 numbers its grids), then the seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in out_dir.glob("grid-*.png") if (m := re.match(r"grid-(\d+)-", p.name))]
    return out_dir / f"grid-{max(numbers, default=-1) + 1:05d}-{seed}.png"


def render_grid(
    spec: GridSpec, cache: PipelineCache, emit: Callable[[Any], None], cancel: threading.Event | None = None
) -> ImagesEvent:
    """A grid job: ``lora_grid`` of the spec saved to ``spec.output_dir`` with its first cell's
    parameters. A stage event follows each cell: a large grid runs for minutes, and the bot's
    watchdog restarts a worker that stays silent."""
    started = time.monotonic()
    # Drawn here rather than in lora_grid so that the event can carry it.
    seed = random.randrange(2**32) if spec.seed is None else spec.seed

    def cell_done(done: int, total: int) -> None:
        emit(StageEvent(stage="grid", message=f"cell {done}/{total}", current=done, total=total))

    grid = lora_grid(
        spec.template(seed=seed), spec.name, spec.weights, spec.prompts, cache, spec.epochs, cancel, cell_done
    )
    path = _grid_path(Path(spec.output_dir), seed)
    save_png(grid.image, path, grid.parameters)
    return ImagesEvent(
        images=[str(path)], parameters=[grid.parameters], seeds=[seed], seconds=time.monotonic() - started
    )


def run_grid(
    spec: GridSpec, cache: PipelineCache, emit: Callable[[Any], None], cancel: threading.Event | None = None
) -> ImagesEvent | FailedEvent:
    """One grid job for a worker: every outcome is an event, emitted and returned."""
    return run_to_event(
        lambda: render_grid(spec, cache, emit, cancel),
        emit,
        bad_input=(SpecError, LoraFileError, ModelError),
        cancelled="cancelled; the grid was not saved",
        out_of_memory=lambda: "lower the size (each cell is rendered alone)",
    )


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
