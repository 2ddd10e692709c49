"""The settings a member starts from, per LoRA kind; each family lays its own on top (``Family.preset``).

Values follow what the seeds (SeaArt's guide, the A1111 train-tools guide) and kohya's users
recommend: dim 32/alpha 16 for characters, unet-heavy training with LoCon for styles, min-SNR 5,
a small noise offset, 10 epochs. AdamW rather than AdamW8bit: a LoRA's optimizer state is a few
MB, so 8-bit states save nothing that matters and cost speed; members can still pick it.
Resolution and bucket bounds are left unset so they follow the base model's native size.
"""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = {
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

KINDS: dict[str, dict[str, Any]] = {
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

PRESETS = tuple(KINDS)


# The large DiTs (Flux.1, Z-Image): Civitai's Flux defaults (dim/alpha 16/16, lr 1e-4, cosine) and
# kohya's README recipe (shifted sigmoid timesteps, the raw prediction). The transformer alone
# trains, so every caption is encoded once; batch 1 with gradient checkpointing fits 24 GB cards.
# None of the UNet-only settings (min-SNR, noise offset, LoCon) apply. Each family adds its shift.
DIT: dict[str, Any] = {
    **{k: v for k, v in COMMON.items() if k != "min_snr_gamma"},
    "network_dim": 16,
    "network_alpha": 16,
    "learning_rate": 1e-4,
    "unet_lr": 1e-4,
    "network_train_unet_only": True,
    "gradient_checkpointing": True,
    "save_precision": "bf16",
    "train_batch_size": 1,
    "timestep_sampling": "shift",
    "model_prediction_type": "raw",
}
DIT_KINDS: dict[str, dict[str, Any]] = {
    "character": {},
    "style": {"flip_aug": True},
    "concept": {"flip_aug": True, "max_train_epochs": 8},
}
