"""LoRA kinds × model families → the settings a member starts from.

Values follow what the seeds (SeaArt's guide, the A1111 train-tools guide) and kohya's users
recommend: dim 32/alpha 16 for characters, unet-heavy training with LoCon for styles, min-SNR 5,
a small noise offset, 10 epochs. AdamW rather than AdamW8bit: a LoRA's optimizer state is a few
MB, so 8-bit states save nothing that matters and cost speed; members can still pick it.
Resolution and bucket bounds are left unset so they follow the base model's native size.
"""

from __future__ import annotations

from typing import Any

from ..spec import Family, SpecError, TrainSpec, layer_settings

_COMMON: dict[str, Any] = {
    "optimizer_type": "AdamW",
    "optimizer_args": {"weight_decay": 0.01},
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 0.05,
    "min_snr_gamma": 5.0,
    "max_train_epochs": 10,
    "save_every_n_epochs": 1,
    "cache_latents": True,
    "enable_bucket": True,
    "save_precision": "fp16",
    "mixed_precision": "bf16",
}

_KINDS: dict[str, dict[str, Any]] = {
    # A person or character: captions describe everything except what the trigger word should hold.
    "character": {
        "network_dim": 32,
        "network_alpha": 16,
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "train_batch_size": 2,
        "noise_offset": 0.03,
    },
    # A look: learnt mostly by the UNet; LoCon's conv layers carry texture and brushwork.
    "style": {
        "network_dim": 32,
        "network_alpha": 16,
        "conv_dim": 8,
        "conv_alpha": 4,
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 2e-5,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "caption_dropout_rate": 0.05,
        "flip_aug": True,
        "train_batch_size": 2,
        "noise_offset": 0.05,
    },
    # An object, pose or clothing item.
    "concept": {
        "network_dim": 16,
        "network_alpha": 8,
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "flip_aug": True,
        "train_batch_size": 2,
        "max_train_epochs": 8,
        "noise_offset": 0.03,
    },
}

_FAMILY: dict[str, dict[str, Any]] = {
    # SD1.5 anime checkpoints are trained and used at clip skip 2.
    "sd15": {"clip_skip": 2},
    # SDXL: kohya's fast SDXL recipe (sdxl_train_network with --cache_text_encoder_outputs
    # --network_train_unet_only): the text encoders are large and rarely worth training, and with them
    # frozen and captions neither shuffled nor dropped each caption is encoded once. Gradient
    # checkpointing keeps 1024² training inside 12–16 GB cards.
    "sdxl": {
        "network_train_unet_only": True,
        "cache_text_encoder_outputs": True,
        "shuffle_caption": False,
        "caption_dropout_rate": 0.0,
        "gradient_checkpointing": True,
    },
}

# Flux.1: Civitai's Flux defaults (dim/alpha 16/16, lr 1e-4, cosine) and kohya's README
# recommendation for Flux LoRAs (timestep_sampling shift, discrete_flow_shift 3.1582,
# model_prediction_type raw, guidance_scale 1.0). CLIP-L stays frozen so every caption is encoded
# once; captions are not shuffled (T5 reads sentences) nor dropped, which would also undo that cache.
# None of the UNet-only settings above (min-SNR, noise offset, LoCon) apply.
_FLUX_COMMON: dict[str, Any] = {
    **{k: v for k, v in _COMMON.items() if k != "min_snr_gamma"},
    "network_dim": 16,
    "network_alpha": 16,
    "learning_rate": 1e-4,
    "unet_lr": 1e-4,
    "network_train_unet_only": True,
    "gradient_checkpointing": True,
    "save_precision": "bf16",
    "train_batch_size": 1,
    "timestep_sampling": "shift",
    "discrete_flow_shift": 3.1582,
    "model_prediction_type": "raw",
    "guidance_scale": 1.0,
}
_FLUX_KINDS: dict[str, dict[str, Any]] = {
    "character": {},
    "style": {"flip_aug": True},
    "concept": {"flip_aug": True, "max_train_epochs": 8},
}

PRESETS = tuple(_KINDS)


def preset_settings(preset: str, family: Family) -> dict[str, Any]:
    """Settings of one preset for one family; the caller lays member overrides on top."""
    if preset not in _KINDS:
        raise SpecError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    if family == "flux":
        return {**_FLUX_COMMON, **_FLUX_KINDS[preset]}
    settings = {**_COMMON, **_KINDS[preset], **_FAMILY[family]}
    if family == "sdxl" and settings.get("network_train_unet_only"):
        settings.pop("text_encoder_lr", None)
    return settings


def with_preset(spec: TrainSpec, family: Family) -> dict[str, Any]:
    """Every setting of ``spec``, its preset laid under the settings the member gave (an epoch count
    of the preset does not beat the member's max_train_steps: see layer_settings)."""
    preset = preset_settings(spec.preset, family) if spec.preset else {}
    own = spec.model_dump(include=spec.model_fields_set)
    return {**spec.model_dump(), **layer_settings(preset, own)}
