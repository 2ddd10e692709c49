"""Flux LoRA keys: diffusers' transformer modules ↔ kohya's names, which are BFL's original modules.

kohya, ComfyUI and Forge name Flux modules as Black Forest Labs' code does, where q, k and v are one
fused ``qkv`` Linear (and a single block's ``linear1`` is q, k, v and the MLP input fused);
diffusers' ``FluxTransformer2DModel`` keeps them separate. LoRAs on the separate modules fuse
exactly: ``down = cat(down_q, down_k, down_v)`` (rank 3r), ``up = block_diag(up_q, up_k, up_v)``, and
alpha scaled by 3 so alpha/rank is unchanged; each part's rows of ``up @ down`` are then its own
``up_i @ down_i``. Splitting back (for generation) is exact for any kohya file, block-diagonal or not.

diffusers has the reverse conversion (``_convert_kohya_flux_lora_to_diffusers``), but it hard-codes
FLUX.1's 19/38 blocks and 3072/12288 widths, so it cannot load into any other size (the tiny test
model); :func:`diffusers_state_dict` reads the sizes from the live model instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..train.network import LoraModule

_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0),
    "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0),
    "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0),
    "norm1_context.linear": ("txt_mod_lin", 0),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation_lin", 0),
}
# Outside the blocks (kohya trains these only with its in_dims option; other trainers' files have them).
_OUTER = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def kohya_module(path: str) -> tuple[str, int] | None:
    """kohya's module name for a diffusers transformer module path, and its slot in a fused module."""
    if path in _OUTER:
        return f"lora_unet_{_OUTER[path]}", 0
    m = _BLOCK.fullmatch(path)
    if not m:
        return None
    kind, i, rest = m.groups()
    table, label = (_DOUBLE, "double") if kind == "transformer_blocks" else (_SINGLE, "single")
    if rest not in table:
        return None
    name, slot = table[rest]
    return f"lora_unet_{label}_blocks_{i}_{name}", slot


@dataclass
class KohyaModule:
    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def fuse(modules: Iterable[LoraModule]) -> Iterator[KohyaModule]:
    """The transformer's LoRA layers as kohya modules, fused where BFL's modules are."""
    groups: dict[str, dict[int, LoraModule]] = {}
    for m in modules:
        named = kohya_module(m.name)
        if named is None:
            raise ValueError(f"{m.name} has no kohya name in the Flux format")
        groups.setdefault(named[0], {})[named[1]] = m
    for key, parts in groups.items():
        ordered = [parts[s] for s in sorted(parts)]
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{key}: LoRA on only some of its fused parts ({[p.name for p in ordered]})")
        scales = {p.alpha / p.rank for p in ordered}
        if len(scales) > 1:
            raise ValueError(
                f"{key}: its fused parts have different alpha/rank, which one module cannot hold"
            )
        rank = sum(p.rank for p in ordered)
        yield KohyaModule(
            key,
            torch.cat([p.down.detach() for p in ordered]),
            torch.block_diag(*(p.up.detach() for p in ordered)),
            scales.pop() * rank,
        )


def _split(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per part whose ``up @ down`` are the row blocks of the fused ``up @ down``."""
    rank, n = down.shape[0], len(sizes)
    ups = torch.split(up, sizes)
    if rank % n == 0:
        r = rank // n
        blocks = [u[:, i * r : (i + 1) * r] for i, u in enumerate(ups)]
        if all(
            torch.count_nonzero(u).item() == torch.count_nonzero(b).item()
            for u, b in zip(ups, blocks, strict=True)
        ):
            return list(zip(torch.chunk(down, n), blocks, strict=True))  # block-diagonal: ranks stay r
    return [(down, u) for u in ups]  # general: every part keeps the whole down


def diffusers_state_dict(
    tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A kohya-format Flux LoRA as diffusers' peft keys for these live modules, alpha/rank baked in.

    ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<module>…`` for
    CLIP-L (``lora_te1_``); FluxPipeline.load_lora_weights loads the result as is. Raises ValueError
    naming keys that fit none of the modules.
    """
    from .kohya import kohya_name  # here: lora_io imports this module to save Flux files

    targets: dict[str, list[tuple[str, int]]] = {}
    for path, module in transformer.named_modules():
        named = kohya_module(path) if isinstance(module, torch.nn.Linear) else None
        if named is not None:
            targets.setdefault(named[0], []).append((path, named[1]))
    parts = {
        key: [(p, transformer.get_submodule(p).out_features) for p, _ in sorted(v, key=lambda t: t[1])]
        for key, v in targets.items()
    }
    te_paths = {
        kohya_name("te1", path, "flux"): path
        for path, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for down_key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
        key = down_key.removesuffix(".lora_down.weight")
        down = tensors[down_key].float()
        up = tensors[f"{key}.lora_up.weight"].float()
        alpha = tensors.get(f"{key}.alpha")
        # kohya: a missing (or 0) alpha means alpha = rank.
        scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / down.shape[0]
        if key in parts:
            split = _split(down, up, [size for _, size in parts[key]])
            for (path, _), (d, u) in zip(parts[key], split, strict=True):
                out[f"transformer.{path}.lora_A.weight"] = d * scale
                out[f"transformer.{path}.lora_B.weight"] = u.contiguous()
        elif key in te_paths:
            out[f"text_encoder.{te_paths[key]}.lora_A.weight"] = down * scale
            out[f"text_encoder.{te_paths[key]}.lora_B.weight"] = up
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"no module of this model for {', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}"
        )
    return out
