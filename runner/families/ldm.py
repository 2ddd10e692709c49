"""The original (LDM) single-file layout A1111 and Civitai ship SD1.5 and SDXL in: diffusers' UNet,
VAE and CLIP weights under LDM's names.

diffusers only converts LDM → diffusers (``convert_ldm_*_checkpoint`` in
``diffusers/loaders/single_file_utils.py``, and ``_maybe_map_sgm_blocks_to_diffusers`` for LoRA
names); these functions are their inverse, so tests and benchmarks can build single-file
checkpoints without downloading one (``runner.families.registry.base_to_ldm``), and
:func:`unet_module_to_ldm` gives SDXL LoRA files kohya's module names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _renamed(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def unet_module_to_ldm(module: str, config: Mapping[str, Any]) -> str:
    """The original (LDM) path of a diffusers UNet module, e.g. ``up_blocks.0.upsamplers.0.conv`` →
    ``output_blocks.2.2.conv`` for SDXL. kohya's SDXL UNet (``sdxl_original_unet.py``) names its
    modules this way, so its LoRA keys are these paths; A1111 and ComfyUI map them directly."""
    # LDM numbers the resnets, attentions and resampler of a block in one row.
    n = int(config["layers_per_block"]) + 1
    if module in _UNET_FIXED:
        return _UNET_FIXED[module]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        row = f"input_blocks.{1 + i * n + j}" if side == "down" else f"output_blocks.{i * n + j}"
        return f"{row}.0.{_renamed(rest, _RESNET)}" if kind == "resnets" else f"{row}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", module):
        i = int(m[1])
        # The upsampler follows the attention in blocks that have one (SDXL's up_blocks.0; not SD1.5's).
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        return f"output_blocks.{i * n + n - 1}.{slot}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}"
    return module.replace("mid_block.attentions.0.", "middle_block.1.")


def unet_to_ldm(sd: dict[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for key, v in sd.items():
        module, _, param = key.rpartition(".")
        out[f"model.diffusion_model.{unet_module_to_ldm(module, config)}.{param}"] = v
    return out


def vae_to_ldm(sd: dict[str, Tensor], num_blocks: int) -> dict[str, Tensor]:
    out = {}
    for key, v in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(.*)", new):
            # LDM numbers the decoder's blocks from the bottom up.
            i = int(m[3]) if m[2] == "down" else num_blocks - 1 - int(m[3])
            rest = m[4].replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
            new = f"{m[1]}.{m[2]}.{i}.{rest.replace('resnets.', 'block.')}".replace(
                "conv_shortcut", "nin_shortcut"
            )
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", new):
            new = f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTN)}"
            if v.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                v = v[:, :, None, None]
        out[f"first_stage_model.{new}"] = v
    return out


def clip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    # transformers 5's CLIPTextModel lost the ``text_model.`` wrapper that LDM files keep.
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {
        f"{prefix}token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": sd["text_model.final_layer_norm.weight"],
        f"{prefix}ln_final.bias": sd["text_model.final_layer_norm.bias"],
        f"{prefix}text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    renames = (
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
        ("self_attn.out_proj", "attn.out_proj"),
    )
    for key, v in sd.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if not m or re.match(r"self_attn\.[qkv]_proj", m[2]):
            continue
        out[f"{prefix}transformer.resblocks.{m[1]}.{_renamed(m[2], renames)}"] = v
        if m[2].startswith("self_attn.out_proj."):
            part = m[2].rpartition(".")[2]
            qkv = [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{part}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{part}"] = torch.cat(qkv)
    return out
