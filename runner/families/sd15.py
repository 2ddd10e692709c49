"""Stable Diffusion 1.5 (and its anime and photo fine-tunes): one CLIP-L, a 512² UNet, kohya's
``lora_unet_``/``lora_te_`` keys with diffusers module paths."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .protocol import ModelError
from .stable_diffusion import StableDiffusion

if TYPE_CHECKING:
    import torch


class SD15(StableDiffusion):
    name = "sd15"
    display_name = "SD1.5"
    native_resolution = 512
    text_encoders = ("CLIP-L",)
    blocks_per_side = 12  # kohya's IN00..IN11 / OUT00..OUT11
    pipeline_class = "StableDiffusionPipeline"
    base_model_version = "sd_v1"
    version_prefixes = ("sd_v1",)
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = "diffusers"
    cross_attention_width = 768
    tiny_unet: Mapping[str, Any] = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,  # latents of a 64² image (TINY_VAE downsamples 4x)
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=False,
    )

    def family_preset(self) -> dict[str, Any]:
        return {"clip_skip": 2}  # SD1.5 anime checkpoints are trained and used at clip skip 2

    def _claims_keys(self, name: str, keys: set[str]) -> bool:
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            raise ModelError(
                f"{name} looks like a Stable Diffusion 2.x checkpoint; only SD1.5 and SDXL are supported"
            )
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    def _claims_text_encoder_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        widths = {
            v.shape[1]
            for k, v in tensors.items()
            if k.startswith("lora_te_") and k.endswith("q_proj.lora_down.weight")
        }
        return bool(widths) and 1024 not in widths  # 1024 wide: SD2's OpenCLIP

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def _tiny_encoders(self, vocab: int) -> tuple[list, list]:
        from transformers import CLIPTextModel

        from .clip_text import TINY_NUM_MERGES, clip_tokenizer, tiny_clip_config

        return [CLIPTextModel(tiny_clip_config(vocab, "quick_gelu"))], [clip_tokenizer(TINY_NUM_MERGES)]

    def _random_encoders(self) -> tuple[list, list]:
        from transformers import CLIPTextConfig, CLIPTextModel

        from .clip_text import clip_tokenizer
        from .model import config

        return [CLIPTextModel(CLIPTextConfig(**config(self.name, "text_encoder")))], [clip_tokenizer()]

    def _text_encoders_to_ldm(self, state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from .ldm import clip_to_ldm

        return clip_to_ldm(state_dicts[0], "cond_stage_model.transformer.")


FAMILY = SD15()
