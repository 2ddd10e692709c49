"""Which family a base model or a LoRA file belongs to, and what follows from it for every family alike:
loading, presets, settings a family refuses, which text encoders run when.

A base is named by one string: ``tiny:<family>`` (tiny random models from configs, for tests and
``loracord selftest``; ``tiny:sd15-v`` has a v-prediction schedule), ``random:<family>`` (full-size
architectures with random weights, for GPU benchmarks), a single-file ``.safetensors`` checkpoint or
a diffusers folder. Torch-free until a model is loaded: the bot detects bases and reads presets here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spec import SpecError, TextEncoding, TrainSpec, layer_settings, varying_caption_settings
from . import flux, sd15, sdxl, zimage
from .presets import PRESETS
from .protocol import Base, Family, ModelError, read_config

if TYPE_CHECKING:
    import torch


# In the order they are told apart: SDXL's keys include SD1.5's, so SDXL is asked first.
_DETECTION_ORDER: tuple[Family, ...] = (sdxl.FAMILY, sd15.FAMILY, flux.FAMILY, zimage.FAMILY)
FAMILIES: dict[str, Family] = {f.name: f for f in (sd15.FAMILY, sdxl.FAMILY, flux.FAMILY, zimage.FAMILY)}
# Variants of the tiny models, for tests of one setting (v-prediction).
TINY_VARIANTS = {"sd15": ("v",)}


def family(name: str) -> Family:
    """The family called ``name`` ("sd15", "sdxl", "flux", "zimage")."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown family '{name}': use one of {', '.join(FAMILIES)}") from None


def _listed(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _built_names() -> list[str]:
    names = [f"tiny:{n}" + (f"-{v}" if v else "") for n in FAMILIES for v in ("", *TINY_VARIANTS.get(n, ()))]
    return names + [f"random:{n}" for n in FAMILIES]


# ---- telling a base's family without loading it ----


def _header(path: Path) -> tuple[set[str], Any]:
    from safetensors import safe_open  # the header only; numpy keeps torch out of the bot

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.endswith(".weight")}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelError(f"{path.name} is not a readable .safetensors checkpoint ({e})") from None
    return keys, lambda key: tuple(shapes[key])


def file_family(path: Path) -> Family:
    """The family of a single-file checkpoint, from its keys; anything else is refused by name."""
    keys, shape = _header(path)
    for fam in _DETECTION_ORDER:
        if fam.claims_file(path.name, keys, shape):
            return fam

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("lora_", "lycoris_") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelError(f"{path.name} is a LoRA, not a base model; give a full SD1.5 or SDXL checkpoint")
    if has("encoder.", "decoder.", "first_stage_model."):
        raise ModelError(f"{path.name} is a VAE, not a base model; give a full SD1.5 or SDXL checkpoint")
    others = _listed([f.display_name for f in FAMILIES.values() if f.name not in ("sd15", "sdxl")])
    raise ModelError(
        f"{path.name} is not an SD1.5 or SDXL checkpoint (no text encoder keys found), nor a {others} transformer"
    )


def folder_family(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json."""
    index = read_config(folder / "model_index.json")
    for fam in _DETECTION_ORDER:
        if fam.claims_folder(index, folder):
            return fam
    names = _listed([f.display_name for f in FAMILIES.values()])
    classes = ", ".join(f.pipeline_class for f in FAMILIES.values())
    raise ModelError(
        f"{folder.name} is a {index.get('_class_name', '?')} diffusers model; only {names} text-to-image "
        f"models ({classes}) are supported"
    )


def _split_name(name: str) -> tuple[str, str, str] | None:
    """("tiny"|"random", family, variant) for a built base's name; None for a path."""
    size, _, rest = name.partition(":")
    if size not in ("tiny", "random") or not rest:
        return None
    fam, _, variant = rest.partition("-")
    if fam not in FAMILIES or (
        variant and variant not in TINY_VARIANTS.get(fam, ()) or size != "tiny" and variant
    ):
        listed = ", ".join(n for n in _built_names() if n.startswith(f"{size}:"))
        raise ModelError(f"unknown family '{rest}' in '{name}': use {listed}")
    return size, fam, variant


def base_family(name: str) -> Family:
    """The family of the base ``name`` (``tiny:…``, ``random:…``, a file or a folder), without loading it."""
    built = _split_name(name)
    if built is not None:
        return FAMILIES[built[1]]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        return folder_family(path)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(
                f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code)"
            )
        return file_family(path)
    raise ModelError(
        f"unknown base model '{name}': give {', '.join(_built_names())}, a .safetensors checkpoint or a "
        "diffusers folder"
    )


# ---- loading ----


def load_base(name: str, config_root: Path | None = None, *, dtype: torch.dtype | None = None) -> Base:
    """Load a base model on the CPU; the caller moves it where it trains.

    ``config_root`` holds one diffusers config folder per family (``sd15/``, ``sdxl/``) that an SD
    single-file checkpoint is built from; the default is the shipped full-size one. ``dtype`` is
    what the large DiT families (Flux.1, Z-Image) load in (default fp32): they are released in bf16,
    and Flux's transformer takes 48 GB of host memory in fp32. SD bases always load in fp32.
    """
    import torch

    from .model import CONFIGS

    dtype = dtype or torch.float32
    built = _split_name(name)
    if built is not None:
        size, fam, variant = built
        return FAMILIES[fam].build(size, variant, dtype)  # type: ignore[arg-type]
    fam = base_family(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return fam.from_folder(path, dtype)
    return fam.from_file(path, dtype, config_root or CONFIGS)


# ---- LoRA files ----


def lora_family(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file was trained on, from its ss_base_model_version or its keys and shapes;
    None when neither tells (or it is a family loracord does not know, such as SD2)."""
    version_tag = metadata.get("ss_base_model_version", "")
    if version_tag:
        found = [f.name for f in FAMILIES.values() if version_tag.startswith(f.version_prefixes)]
        return found[0] if found else None
    # DiT key names are unambiguous; SDXL is asked before SD1.5 as for checkpoints.
    for fam in (flux.FAMILY, zimage.FAMILY, sdxl.FAMILY, sd15.FAMILY):
        if fam.claims_lora(tensors):
            return fam.name
    return None


# ---- settings ----


def preset_settings(preset: str, family_name: str) -> dict[str, Any]:
    """Settings of one preset for one family; the caller lays member overrides on top."""
    if preset not in PRESETS:
        raise SpecError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    return family(family_name).preset(preset)


def with_preset(spec: TrainSpec, family_name: str) -> dict[str, Any]:
    """Every setting of ``spec``, its preset laid under the settings the member gave (an epoch count
    of the preset does not beat the member's max_train_steps: see layer_settings)."""
    preset = preset_settings(spec.preset, family_name) if spec.preset else {}
    own = spec.model_dump(include=spec.model_fields_set)
    return {**spec.model_dump(), **layer_settings(preset, own)}


def check_settings(settings: Mapping[str, Any], base: Base) -> None:
    """Refuse settings that do not apply to the base's family, each with its reason."""
    fam = family(base.family)
    fields = TrainSpec.model_fields
    changed = [k for k in fields if settings[k] != fields[k].default]
    bad = []
    for key in changed:
        if key in fam.refused:
            bad.append(f"{key}: {fam.refused[key]}")
            continue
        owners = [f for f in FAMILIES.values() if key in f.own_settings]
        if owners and fam not in owners:
            bad.append(f"{key} applies to {_listed([f.short_name for f in owners])} bases only")
    bad += fam.check_settings(settings, base)
    if bad:
        raise SpecError("; ".join(bad))


def text_encoding(spec: TrainSpec, family_name: str) -> TextEncoding:
    """Where the trainer runs each text encoder, for ``spec`` with its preset already applied.

    Captions are encoded once and cached unless ``cache_text_encoder_outputs`` is off, a setting
    changes captions between steps, or a text encoder is trained. A family that trains only some of
    its encoders (Flux: CLIP-L, not T5-XXL) caches the others' outputs on their own and runs the
    trained ones each step (kohya's partial caching). Weighted captions are cached like any other.
    """
    fam = family(family_name)
    names, trainable = fam.text_encoders, fam.trainable_text_encoders
    varying = varying_caption_settings(spec)
    reasons = [] if spec.cache_text_encoder_outputs else ["cache_text_encoder_outputs=False"]
    reasons += varying
    if spec.train_text_encoder and trainable:
        reasons.append(f"{' and '.join(trainable)} trained")
    if not spec.cache_text_encoder_outputs or varying:
        every, cached = names, ()
    elif spec.train_text_encoder and trainable:
        every, cached = trainable, tuple(n for n in names if n not in trainable)
    else:
        every, cached = (), names
    return TextEncoding(every_step=every, cached=cached, reasons=tuple(reasons))


# ---- writing bases out (tests and benchmarks build checkpoints without downloading one) ----


def save_pipeline(base: Base, folder: Path) -> Path:
    """``base`` as a diffusers folder (``model_index.json`` and one subfolder a part)."""
    return family(base.family).save_folder(base, folder)


def base_to_ldm(base: Base) -> dict[str, Any]:
    """The whole checkpoint, keyed as the single file A1111/ComfyUI load for ``base``'s family."""
    return family(base.family).single_file(base)
