"""SDXL (and Pony, Illustrious, NoobAI): CLIP-L and CLIP-G, a 1024² UNet with micro-conditioning,
kohya's ``lora_unet_`` keys with the original (LDM) module paths and ``lora_te1_``/``lora_te2_``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .protocol import Base, ModelError, SampleRequest
from .stable_diffusion import StableDiffusion

if TYPE_CHECKING:
    import torch

    from ..spec import TrainSpec
    from .protocol import Objective


class SDXL(StableDiffusion):
    name = "sdxl"
    display_name = "SDXL"
    native_resolution = 1024
    text_encoders = ("CLIP-L", "CLIP-G")
    blocks_per_side = 9  # kohya's IN00..IN08 / OUT00..OUT08
    pipeline_class = "StableDiffusionXLPipeline"
    base_model_version = "sdxl_base_v1-0"
    version_prefixes = ("sdxl",)
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    cross_attention_width = 2048
    tiny_unet: Mapping[str, Any] = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,  # latents of a 64² image (TINY_VAE downsamples 4x)
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )

    def family_preset(self) -> dict[str, Any]:
        # kohya's fast SDXL recipe (sdxl_train_network with --cache_text_encoder_outputs
        # --network_train_unet_only): the text encoders are large and rarely worth training, and with
        # them frozen and captions neither shuffled nor dropped each caption is encoded once. Gradient
        # checkpointing keeps 1024² training inside 12–16 GB cards.
        return {
            "network_train_unet_only": True,
            "cache_text_encoder_outputs": True,
            "shuffle_caption": False,
            "caption_dropout_rate": 0.0,
            "gradient_checkpointing": True,
        }

    def check_settings(self, settings: Mapping[str, Any], base: Base) -> list[str]:
        if settings["clip_skip"] not in (None, 1, 2):
            return ["clip_skip: SDXL always uses the penultimate text-encoder layer; leave clip_skip unset"]
        return []

    def _claims_keys(self, name: str, keys: set[str]) -> bool:
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return True
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ModelError(
                f"{name} is an SDXL refiner; use an SDXL base checkpoint (SDXL, Pony, Illustrious)"
            )
        return False

    def _claims_text_encoder_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors)

    def _render_kwargs(self) -> dict[str, Any]:
        # force_zeros: an empty negative becomes zeros, as SDXL was trained; a given one is encoded.
        return dict(force_zeros_for_empty_prompt=True, add_watermarker=False)

    def zero_negative(self, request: SampleRequest) -> bool:
        return not request.negative

    def objective(
        self, base: Base, spec: TrainSpec, device: torch.device, autocast: torch.dtype
    ) -> Objective:
        from .noise_prediction import NoisePrediction

        return NoisePrediction(base, spec, device, autocast, micro_conditioning=True)

    def _tiny_encoders(self, vocab: int) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from .clip_text import TINY_NUM_MERGES, clip_tokenizer, tiny_clip_config

        # Two widths (24 + 40 = the UNet's 64), as SDXL's 768 and 1280: single-file loaders tell the
        # encoders apart by width.
        encoders = [
            CLIPTextModel(tiny_clip_config(vocab, "quick_gelu", 24)),
            CLIPTextModelWithProjection(tiny_clip_config(vocab, "gelu", 40)),
        ]
        return encoders, [clip_tokenizer(TINY_NUM_MERGES), clip_tokenizer(TINY_NUM_MERGES, pad_token="!")]

    def _random_encoders(self) -> tuple[list, list]:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from .clip_text import clip_tokenizer
        from .model import config

        encoders = [
            CLIPTextModel(CLIPTextConfig(**config(self.name, "text_encoder"))),
            CLIPTextModelWithProjection(CLIPTextConfig(**config(self.name, "text_encoder_2"))),
        ]
        return encoders, [clip_tokenizer(), clip_tokenizer(pad_token="!")]

    def _text_encoders_to_ldm(self, state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from .ldm import clip_to_ldm, open_clip_to_ldm

        return clip_to_ldm(state_dicts[0], "conditioner.embedders.0.transformer.") | open_clip_to_ldm(
            state_dicts[1], "conditioner.embedders.1.model."
        )


FAMILY = SDXL()
