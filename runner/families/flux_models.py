"""Flux.1 bases: the tiny and full-size random models, a diffusers folder, or a single-file transformer.

A Flux :class:`~runner.families.models.Base` holds the transformer where SD bases hold their UNet
(``base.unet``; kohya names both ``lora_unet``), CLIP-L and T5-XXL as its two text encoders, and
Flux's 16-channel VAE. Nothing is downloaded: T5's SentencePiece vocabulary is not shipped with any
package, so real checkpoints take theirs from a diffusers folder (``tokenizer_2/``); the tiny and
random models get a small T5 tokenizer built here.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from .models import (
    CONFIGS,
    TINY_NUM_MERGES,
    TINY_VAE,
    Base,
    ModelError,
    _biased_layer_norms,
    _config,
    _file_hashes,
    _finish,
    _tiny_text_config,
    clip_tokenizer,
)

FLUX_CONFIG = CONFIGS / "flux"
# Where a single-file transformer (flux1-dev.safetensors, as ComfyUI and Forge keep it) finds the
# rest of the model: a diffusers FLUX.1 folder with vae/, text_encoder(_2)/ and tokenizer(_2)/.
COMPONENTS_ENV = "LORACORD_FLUX_COMPONENTS"

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # the tiny VAE's 4 latent channels in 2x2 patches
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(2, 2, 4),
    guidance_embeds=True,
)
TINY_FLUX_VAE = {**TINY_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}


def t5_tokenizer() -> T5Tokenizer:
    """A small Unigram vocabulary in T5's layout (pad 0, ``</s>`` 1, ``<unk>`` 2) for the tiny and
    random models: T5's own SentencePiece file ships with no package, and the tiny encoder's
    embedding only needs ids that are stable."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(f"▁{ch}", -3.0), (ch, -4.0)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def _scheduler_config() -> dict[str, Any]:
    return json.loads((FLUX_CONFIG / "scheduler" / "scheduler_config.json").read_text())


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Modules built from a config take torch's default dtype; a full-size Flux built in fp32 and cast
    # afterwards would hold 48 GB of fp32 transformer on the host first.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def tiny_flux(dtype: torch.dtype = torch.float32) -> Base:
    with torch.random.fork_rng(devices=[]):  # a load must not reset the caller's seed
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKL(**TINY_FLUX_VAE)
        clip_tok = clip_tokenizer(TINY_NUM_MERGES)
        t5_tok = t5_tokenizer()
        clip = CLIPTextModel(_tiny_text_config(len(clip_tok), "quick_gelu", 32))
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        _biased_layer_norms([clip])
    # Built in fp32 and cast, so every dtype holds the same (rounded) tiny model.
    for m in (transformer, vae, clip, t5):
        m.to(dtype)
    base = Base(
        "tiny:flux", "flux", transformer, vae, [clip, t5], [clip_tok, t5_tok], _scheduler_config(), 64
    )
    return _finish(base)


def random_flux(dtype: torch.dtype = torch.float32) -> Base:
    """FLUX.1-dev's architecture with random weights; build under ``with torch.device(...)``."""
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel.from_config(_config("flux", "transformer"))
        vae = AutoencoderKL.from_config(_config("flux", "vae"))
        clip = CLIPTextModel(CLIPTextConfig(**_config("flux", "text_encoder")))
        t5 = T5EncoderModel(T5Config(**_config("flux", "text_encoder_2")))
        _biased_layer_norms([clip])
    tokenizers = [clip_tokenizer(), t5_tokenizer()]
    base = Base("random:flux", "flux", transformer, vae, [clip, t5], tokenizers, _scheduler_config(), 1024)
    return _finish(base)


def _check_components(folder: Path, what: str) -> None:
    missing = [p for p in ("vae", "text_encoder", "text_encoder_2", "tokenizer") if not (folder / p).is_dir()]
    tok2 = folder / "tokenizer_2"
    if not any((tok2 / f).is_file() for f in ("spiece.model", "tokenizer.json")):
        missing.append("tokenizer_2 (T5's spiece.model or tokenizer.json)")
    if missing:
        raise ModelError(
            f"{what} lacks {', '.join(missing)}: copy them from a diffusers FLUX.1 download "
            "(T5's vocabulary is not shipped with loracord)"
        )


def _from_pipeline(pipe: Any, name: str) -> Base:
    base = Base(
        name,
        "flux",
        pipe.transformer,
        pipe.vae,
        [pipe.text_encoder, pipe.text_encoder_2],
        [pipe.tokenizer, pipe.tokenizer_2],
        dict(pipe.scheduler.config),
        1024,
    )
    return _finish(base)


def flux_from_folder(
    path: Path, transformer: FluxTransformer2DModel | None = None, dtype: torch.dtype = torch.float32
) -> Base:
    """A diffusers FLUX.1 folder (FluxPipeline) loaded in ``dtype``; ``transformer`` replaces the folder's own."""
    from diffusers import FluxPipeline

    _check_components(path, path.name)
    kwargs = {"transformer": transformer} if transformer is not None else {}
    try:
        pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype, **kwargs)
    except Exception as e:  # diffusers raises many error types for damaged folders
        raise ModelError(f"{path.name} could not be loaded as a Flux diffusers model ({e})") from e
    return _from_pipeline(pipe, path.name)


def flux_from_single_file(path: Path, dtype: torch.dtype = torch.float32) -> Base:
    """A single-file Flux transformer (bf16, fp16 or fp8, BFL's or ComfyUI's key names), with the VAE,
    text encoders and tokenizers from the diffusers folder named by ``$LORACORD_FLUX_COMPONENTS``."""
    components = os.environ.get(COMPONENTS_ENV)
    if not components:
        raise ModelError(
            f"{path.name} holds only the Flux transformer; set {COMPONENTS_ENV} to a diffusers FLUX.1 "
            "folder with the VAE, CLIP-L, T5-XXL and their tokenizers, or give that folder as the base"
        )
    folder = Path(components).expanduser()
    _check_components(folder, f"{COMPONENTS_ENV} ({folder})")
    try:
        transformer = FluxTransformer2DModel.from_single_file(
            str(path),
            config=str(FLUX_CONFIG),
            subfolder="transformer",
            local_files_only=True,
            torch_dtype=dtype,
        )
    except Exception as e:  # as in flux_from_folder
        raise ModelError(f"{path.name} could not be loaded as a Flux transformer ({e})") from e
    base = flux_from_folder(folder, transformer, dtype)
    base.name = path.stem
    base.sha256, base.legacy_hash = _file_hashes(path)
    return base
