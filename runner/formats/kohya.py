"""LoRA files in kohya's format: the keys, ``ss_*`` metadata and hashes that A1111, ComfyUI,
Civitai and kohya's own tools read.

Each family names its modules (``Family.kohya_modules``): ``lora_unet_<module>`` / ``lora_te_<module>``
for SD1.5, ``lora_te1_``/``lora_te2_`` and LDM paths for SDXL, BFL's names for Flux. Every module is
written with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (the real alpha). Hashes follow
kohya's ``train_util.precalculate_safetensors_hashes``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from io import BytesIO
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..families.protocol import Base
from ..families.registry import family, lora_family
from ..spec import TrainSpec


class LoraFileError(ValueError):
    """A file that cannot be used as a LoRA; the message names the file and says why."""


@dataclass
class TrainingFacts:
    """What the trainer knows at the start of a run that the spec alone does not say."""

    session_id: str
    training_started_at: float  # unix time
    num_train_images: int  # images × repeats
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    tag_frequency: dict[str, dict[str, int]]  # {dataset dir: {tag: count}}
    dataset_dirs: dict[str, dict[str, int]]  # {dataset dir: {"n_repeats": n, "img_count": n}}
    bucket_info: dict[str, Any] | None
    optimizer: str  # as kohya writes it, e.g. "torch.optim.adamw.AdamW(weight_decay=0.01,fused=True)"
    lr_warmup_steps: int


# ---- tensors ----


def effective_delta(tensors: dict[str, torch.Tensor], module: str, multiplier: float = 1.0) -> torch.Tensor:
    """The weight change a loader adds to ``module``'s base weight: up·down × alpha/rank × multiplier.

    Conv layers follow kohya's math (a 3x3 down composed with a 1x1 up), the same as A1111 and peft.
    """
    try:
        down = tensors[f"{module}.lora_down.weight"].float()
        up = tensors[f"{module}.lora_up.weight"].float()
    except KeyError:
        raise KeyError(f"no LoRA module named {module}") from None
    rank = down.shape[0]
    alpha = tensors.get(f"{module}.alpha")
    # kohya: a missing (or 0) alpha means alpha = rank.
    scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / rank
    if down.dim() == 2:
        delta = up @ down
    elif down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return delta * (scale * multiplier)


# ---- metadata ----


def _network_args(spec: TrainSpec) -> dict[str, str]:
    # kohya passes network_args as key=value strings and records them as given.
    args: dict[str, str] = {}
    if spec.conv_dim is not None:
        args["conv_dim"] = str(spec.conv_dim)
        args["conv_alpha"] = str(1.0 if spec.conv_alpha is None else spec.conv_alpha)
    if any(getattr(spec, s) is not None for s in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        for setting in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
            value = getattr(spec, setting)
            if value is not None:
                args[setting] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return args


def training_metadata(spec: TrainSpec, base: Base, facts: TrainingFacts) -> dict[str, str]:
    """kohya's ``ss_*`` metadata as train_network.py writes it at the start of training."""
    meta: dict[str, Any] = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": spec.output_name,
        "ss_learning_rate": spec.learning_rate,
        "ss_text_encoder_lr": spec.text_encoder_lr,
        "ss_unet_lr": spec.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": spec.gradient_checkpointing,
        "ss_gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.lr_warmup_steps,
        "ss_lr_scheduler": spec.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": spec.network_dim,
        "ss_network_alpha": spec.network_alpha,
        "ss_network_dropout": None,
        "ss_mixed_precision": spec.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": family(base.family).base_model_version,
        "ss_clip_skip": spec.clip_skip,
        # kohya's max_token_length is unset (None) for CLIP's 75 tokens; 150 and 225 are its only values.
        "ss_max_token_length": None if spec.max_token_length == 75 else spec.max_token_length,
        "ss_cache_latents": spec.cache_latents,
        "ss_seed": spec.seed,
        "ss_noise_offset": spec.noise_offset,
        "ss_multires_noise_iterations": spec.multires_noise_iterations,
        "ss_multires_noise_discount": spec.multires_noise_discount,
        "ss_training_comment": spec.training_comment,
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": spec.max_grad_norm,
        "ss_caption_dropout_rate": spec.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": spec.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": spec.caption_tag_dropout_rate,
        "ss_min_snr_gamma": spec.min_snr_gamma,
        "ss_sd_model_name": base.name,
        # Dataset keys, as kohya writes them for a single dataset.
        "ss_batch_size_per_device": spec.train_batch_size,
        "ss_total_batch_size": spec.train_batch_size * spec.gradient_accumulation_steps,
        "ss_resolution": tuple(spec.resolution or (base.native_resolution, base.native_resolution)),
        "ss_color_aug": False,
        "ss_flip_aug": spec.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": spec.shuffle_caption,
        "ss_enable_bucket": spec.enable_bucket,
        "ss_bucket_no_upscale": spec.bucket_no_upscale,
        "ss_min_bucket_reso": spec.min_bucket_reso,
        "ss_max_bucket_reso": spec.max_bucket_reso,
        "ss_keep_tokens": spec.keep_tokens,
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info),
    }
    # kohya hashes the base only when it is a file; a folder or a built model has no hash to give.
    if base.sha256 is not None:
        meta["ss_sd_model_hash"] = base.legacy_hash
        meta["ss_new_sd_model_hash"] = base.sha256
    meta.update(family(base.family).metadata(spec))
    network_args = _network_args(spec)
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    # kohya writes every value with str(): "True"/"False", "None", 1e-4 as "0.0001".
    result = {k: str(v) for k, v in meta.items()}
    if spec.trigger_word:
        result["modelspec.trigger_phrase"] = spec.trigger_word
    return result


def _modelspec(meta: dict[str, str], timestamp: float) -> dict[str, str]:
    """The ``modelspec.*`` keys kohya's sai_model_spec.build_metadata writes for a LoRA."""
    # kohya's sai_model_spec also falls back to SD v1 when the metadata names no base.
    fam = family(lora_family({}, meta) or "sd15")
    arch, impl, prediction_type = fam.modelspec()
    sizes = [int(n) for n in re.findall(r"\d+", meta.get("ss_resolution", ""))]
    width, height = (sizes * 2)[:2] if sizes else (fam.native_resolution,) * 2
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": meta.get("ss_output_name") or f"LoRA@{timestamp}",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.implementation_version": f"loracord/{version('loracord')}",
    }
    if prediction_type is not None:  # kohya writes none for Flux
        spec["modelspec.prediction_type"] = prediction_type
    if meta.get("ss_clip_skip", "None") != "None":
        spec["modelspec.encoder_layer"] = meta["ss_clip_skip"]
    return spec


# ---- hashes (kohya's train_util, which sd-webui-additional-networks and A1111 read back) ----


def addnet_hash_safetensors(b: BytesIO) -> str:
    """SHA-256 of everything after the safetensors header: the tensor data."""
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    return hashlib.sha256(b.read()).hexdigest()


def addnet_hash_legacy(b: BytesIO) -> str:
    """SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def lora_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) over the tensors written with only the ``ss_*`` metadata."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, training_only))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)


# ---- files ----


def save_lora(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, epoch: int, steps: int
) -> dict[str, str]:
    """Write a kohya-format LoRA with its save-time metadata; a crash never leaves half a file.

    Returns the metadata as written (with its hashes)."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    now = time.time()
    meta = {**metadata, "ss_training_finished_at": str(now), "ss_steps": str(steps), "ss_epoch": str(epoch)}
    meta = {**_modelspec(meta, now), **meta}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_hashes(tensors, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not named after the file (a name at the byte limit leaves no room for a longer sibling), and
    # not tempfile's: its 0600 mode would stay on the LoRA, which other users may have to read.
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _is_lora_key(key: str) -> bool:
    # kohya/LyCORIS ("lora_unet_…") and diffusers/peft ("….lora_A.weight", "….lora.down.weight") layouts.
    return key.startswith("lora_") or ".lora" in key


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file; LoraFileError if it is missing, corrupt or not a LoRA."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path.name}: file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise LoraFileError(f"{path.name} is not a readable .safetensors file ({e})") from None
    if not any(_is_lora_key(k) for k in tensors):
        raise LoraFileError(f"{path.name} holds no LoRA weights (is it a checkpoint or a VAE?)")
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            up = tensors.get(key.replace(".lora_down.", ".lora_up."))
            if up is None or up.dim() < 2 or up.shape[1] != down.shape[0]:
                raise LoraFileError(f"{path.name} is damaged: {key} has no matching lora_up weight")
    return tensors, metadata
