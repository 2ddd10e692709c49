"""Base checkpoints, named by one string, loaded without ever touching the network.

- ``tiny:sd15`` / ``tiny:sdxl`` / ``tiny:flux``: tiny random models built from configs, deterministic, for tests
  and ``loracord selftest``; ``tiny:sd15-v`` is ``tiny:sd15`` with a v-prediction schedule.
- ``random:sd15`` / ``random:sdxl`` / ``random:flux``: the full-size architectures with random weights (configs in
  ``runner/configs``), for GPU benchmarks.
- a single-file checkpoint (``.safetensors`` as A1111/Civitai ship them) or a diffusers folder.

Flux bases are built in ``runner/flux_models.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..spec import Family

CONFIGS = Path(__file__).parent.parent / "configs"
CLIP_BPE = CONFIGS / "bpe_simple_vocab_16e6.txt.gz"
# The real CLIP vocabulary has 49152 - 256 - 2 merges (the rest of the file is unused), as in
# OpenAI's and open_clip's tokenizers.
CLIP_NUM_MERGES = 49152 - 256 - 2
TINY_NUM_MERGES = 1000
# Tokens besides the merges: 256 byte characters, their end-of-word forms, start and end.
CLIP_BASE_TOKENS = 2 * 256 + 2


class ModelError(ValueError):
    """A base model that cannot be used; the message says why and what to do."""


@dataclass
class Base:
    """Everything the trainer and the sampler need from one base checkpoint."""

    name: str
    family: Family
    # The denoiser: a UNet, or Flux's transformer (kohya calls both "unet": lora_unet_…).
    unet: UNet2DConditionModel | Any
    vae: AutoencoderKL
    # CLIP encoders; Flux: CLIP-L and T5-XXL.
    text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection | PreTrainedModel]
    tokenizers: list[CLIPTokenizer | PreTrainedTokenizerBase]
    scheduler_config: dict[str, Any]
    native_resolution: int
    # The checkpoint file's SHA-256 (kohya's ss_new_sd_model_hash) and A1111's old 8-hex hash (kohya's
    # ss_sd_model_hash); None when there is no single file to hash (a diffusers folder, tiny/random).
    sha256: str | None = None
    legacy_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the checkpoint file's SHA-256."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Base:
        # The VAE stays in fp32 (or bf16): SDXL's VAE overflows in fp16 and gives black images.
        vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        for m, want in (
            (self.unet, dtype),
            *((te, dtype) for te in self.text_encoders),
            (self.vae, vae_dtype),
        ):
            # A dtype is passed only when it changes: diffusers warns on every cast otherwise.
            m.to(device) if want in (None, m.dtype) else m.to(device, want)
        return self


# ---- tokenizers ----


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte→character table; transformers keeps it private, so it is restated here.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@cache
def _clip_vocab(num_merges: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    with gzip.open(CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = tuple(tuple(m.split()) for m in lines)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple((tok, i) for i, tok in enumerate(vocab)), merges


def clip_tokenizer(num_merges: int = CLIP_NUM_MERGES, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the vocabulary file shipped in the package (no download).

    ``num_merges`` below the full count gives the small vocabulary the tiny models use. SDXL's
    second tokenizer pads with ``!`` instead of ``<|endoftext|>``.
    """
    vocab, merges = _clip_vocab(num_merges)
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = 77
    return tok


# ---- configs ----


def _config(family: str, part: str) -> dict[str, Any]:
    return json.loads((CONFIGS / family / part / "config.json").read_text())


def _scheduler_config() -> dict[str, Any]:
    return json.loads((CONFIGS / "sd15" / "scheduler" / "scheduler_config.json").read_text())


TINY_UNET = {
    "sd15": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=False,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
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
    ),
}
TINY_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    sample_size=64,
)


def _tiny_text_config(vocab_size: int, act: str, hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _tiny(family: Family, prediction_type: str = "epsilon") -> Base:
    with torch.random.fork_rng(devices=[]):  # a load must not reset the caller's seed
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET[family])
        vae = AutoencoderKL(**TINY_VAE)
        tok = clip_tokenizer(TINY_NUM_MERGES)
        n = len(tok)
        if family == "sd15":
            encoders: list = [CLIPTextModel(_tiny_text_config(n, "quick_gelu"))]
            tokenizers = [tok]
        else:
            # Two widths (24 + 40 = the UNet's 64), as SDXL's 768 and 1280: single-file loaders tell the
            # encoders apart by width.
            encoders = [
                CLIPTextModel(_tiny_text_config(n, "quick_gelu", 24)),
                CLIPTextModelWithProjection(_tiny_text_config(n, "gelu", 40)),
            ]
            tokenizers = [tok, clip_tokenizer(TINY_NUM_MERGES, pad_token="!")]
        _biased_layer_norms(encoders)
    name = f"tiny:{family}" + ("-v" if prediction_type == "v_prediction" else "")
    schedule = {**_scheduler_config(), "prediction_type": prediction_type}
    return _finish(Base(name, family, unet, vae, encoders, tokenizers, schedule, 64))


def _biased_layer_norms(encoders: list) -> None:
    # Trained CLIP encoders have non-zero LayerNorm biases, so their outputs have a non-zero mean;
    # fresh ones output exactly zero-mean tokens, and A1111's emphasis, which restores the mean
    # after weighting, would divide by ~0. Random models should behave like real ones.
    for encoder in encoders:
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)


def _random(family: Family) -> Base:
    """Full size; build it under ``with torch.device("meta"):`` to get the architecture without memory."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(_config(family, "unet"))
        vae = AutoencoderKL.from_config(_config(family, "vae"))
        te1 = CLIPTextModel(CLIPTextConfig(**_config(family, "text_encoder")))
        if family == "sd15":
            encoders: list = [te1]
            tokenizers = [clip_tokenizer()]
        else:
            encoders = [te1, CLIPTextModelWithProjection(CLIPTextConfig(**_config(family, "text_encoder_2")))]
            tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")]
        _biased_layer_norms(encoders)
    res = 512 if family == "sd15" else 1024
    return _finish(
        Base(f"random:{family}", family, unet, vae, encoders, tokenizers, _scheduler_config(), res)
    )


def _finish(base: Base) -> Base:
    for m in (base.unet, base.vae, *base.text_encoders):
        m.eval()
        m.requires_grad_(False)
    return base


# ---- real checkpoints ----

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_PIPELINES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}


def detect_family(path: Path) -> Family:
    """SD1.5, SDXL or Flux (its transformer alone) from a single-file checkpoint's keys; anything
    else is refused by name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            in_ch = f.get_slice(_UNET_IN).get_shape()[1] if _UNET_IN in keys else None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelError(f"{path.name} is not a readable .safetensors checkpoint ({e})") from None

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("conditioner.embedders.1."):
        family: Family = "sdxl"
    elif has("cond_stage_model.transformer."):
        family = "sd15"
    elif has("conditioner.embedders.0.model."):
        raise ModelError(
            f"{path.name} is an SDXL refiner; use an SDXL base checkpoint (SDXL, Pony, Illustrious)"
        )
    elif has("cond_stage_model.model."):
        raise ModelError(
            f"{path.name} looks like a Stable Diffusion 2.x checkpoint; only SD1.5 and SDXL are supported"
        )
    elif has("double_blocks.", "model.diffusion_model.double_blocks."):
        return "flux"
    elif has("lora_", "lycoris_") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelError(f"{path.name} is a LoRA, not a base model; give a full SD1.5 or SDXL checkpoint")
    elif has("encoder.", "decoder.", "first_stage_model."):
        raise ModelError(f"{path.name} is a VAE, not a base model; give a full SD1.5 or SDXL checkpoint")
    else:
        raise ModelError(f"{path.name} is not an SD1.5 or SDXL checkpoint (no text encoder keys found)")
    if in_ch is None:
        raise ModelError(f"{path.name} has no UNet weights (model.diffusion_model.*); give a full checkpoint")
    if not has("first_stage_model."):
        raise ModelError(
            f"{path.name} has no VAE baked in (first_stage_model.*); give a checkpoint that includes one"
        )
    if in_ch != 4:
        raise ModelError(
            f"{path.name} is an inpainting or edit checkpoint ({in_ch} input channels); use a normal one"
        )
    return family


def _file_hashes(path: Path) -> tuple[str, str]:
    """The file's SHA-256 and A1111's legacy hash (SHA-256 of the 64 KiB at 1 MiB, first 8 hex), as
    kohya's train_util.calculate_sha256 and model_hash compute them."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return sha.hexdigest(), legacy


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path.parent.name}/{path.name} is missing or damaged ({e})") from None


def _missing_tokenizers(folder: Path, family: Family) -> dict[str, CLIPTokenizer]:
    """Tokenizers ``folder`` lacks, cut from the shipped CLIP vocabulary to their text encoder's size."""
    wanted = [("tokenizer", "text_encoder", "<|endoftext|>")]
    if family == "sdxl":
        wanted.append(("tokenizer_2", "text_encoder_2", "!"))
    out = {}
    for tok, te, pad in wanted:
        if not (folder / tok).is_dir():
            vocab = _read_config(folder / te / "config.json")["vocab_size"]
            out[tok] = clip_tokenizer(vocab - CLIP_BASE_TOKENS, pad_token=pad)
    return out


def _pipeline_class(family: Family) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline


def _no_safety_checker(family: Family) -> dict[str, Any]:
    if family == "sd15":
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return {}


def _from_single_file(path: Path, config_root: Path) -> Base:
    family = detect_family(path)
    config = config_root / family
    kwargs = _missing_tokenizers(config, family) | _no_safety_checker(family)
    # diffusers raises many error types for damaged or odd checkpoints; the user needs the file name.
    try:
        pipe = _pipeline_class(family).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32, **kwargs
        )
    except Exception as e:
        raise ModelError(f"{path.name} could not be loaded as an {family} checkpoint ({e})") from e
    return _from_pipeline(pipe, path.stem, family, *_file_hashes(path))


def _folder_family(path: Path) -> Family:
    index = _read_config(path / "model_index.json")
    cls_name = index.get("_class_name", "?")
    if cls_name not in _PIPELINES:
        raise ModelError(
            f"{path.name} is a {cls_name} diffusers model; only SD1.5, SDXL and Flux.1 text-to-image "
            "models (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline) are supported"
        )
    if _PIPELINES[cls_name] == "flux":
        return "flux"
    unet = _read_config(path / "unet" / "config.json")
    if unet.get("cross_attention_dim") == 1024:
        raise ModelError(
            f"{path.name} looks like a Stable Diffusion 2.x model; only SD1.5 and SDXL are supported"
        )
    if unet.get("in_channels", 4) != 4:
        raise ModelError(
            f"{path.name} is an inpainting or edit model ({unet['in_channels']} input channels); "
            "use a normal one"
        )
    return _PIPELINES[cls_name]


def _from_folder(path: Path) -> Base:
    family = _folder_family(path)
    kwargs = _missing_tokenizers(path, family) | _no_safety_checker(family)
    try:
        pipe = _pipeline_class(family).from_pretrained(
            str(path), local_files_only=True, torch_dtype=torch.float32, **kwargs
        )
    except Exception as e:  # as in _from_single_file
        raise ModelError(f"{path.name} could not be loaded as an {family} diffusers model ({e})") from e
    return _from_pipeline(pipe, path.name, family)


def _from_pipeline(
    pipe: Any, name: str, family: Family, sha256: str | None = None, legacy: str | None = None
) -> Base:
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    res = 512 if family == "sd15" else 1024
    base = Base(
        name,
        family,
        pipe.unet,
        pipe.vae,
        encoders,
        tokenizers,
        dict(pipe.scheduler.config),
        res,
        sha256=sha256,
        legacy_hash=legacy,
    )
    return _finish(base)


def load_base(name: str, config_root: Path = CONFIGS, *, flux_dtype: torch.dtype = torch.float32) -> Base:
    """Load a base model on the CPU, SD bases in fp32; the caller moves it where it trains.

    ``config_root`` holds one diffusers config folder per family (``sd15/``, ``sdxl/``) that a
    single-file checkpoint is built from; the default is the shipped full-size one. Flux bases are
    loaded in ``flux_dtype``: FLUX.1 is released in bf16, and its 12B-parameter transformer takes
    48 GB of host memory in fp32.
    """
    kind, _, arg = name.partition(":")
    if name == "tiny:sd15-v":
        return _tiny("sd15", prediction_type="v_prediction")
    if kind in ("tiny", "random") and arg:
        if arg not in ("sd15", "sdxl", "flux"):
            raise ModelError(
                f"unknown family '{arg}' in '{name}': use {kind}:sd15, {kind}:sdxl or {kind}:flux"
            )
        if arg == "flux":
            from .flux_models import random_flux, tiny_flux

            return tiny_flux(flux_dtype) if kind == "tiny" else random_flux(flux_dtype)
        return _tiny(arg) if kind == "tiny" else _random(arg)  # type: ignore[arg-type]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        if _folder_family(path) == "flux":
            from .flux_models import flux_from_folder

            return flux_from_folder(path, dtype=flux_dtype)
        return _from_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(
                f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files can run code)"
            )
        if detect_family(path) == "flux":
            from .flux_models import flux_from_single_file

            return flux_from_single_file(path, flux_dtype)
        return _from_single_file(path, config_root)
    raise ModelError(
        f"unknown base model '{name}': give tiny:sd15, tiny:sd15-v, tiny:sdxl, random:sd15, random:sdxl, tiny:flux, "
        "random:flux, a .safetensors checkpoint or a diffusers folder"
    )
