"""Z-Image (Tongyi-MAI): a 6B single-stream DiT (``ZImageTransformer2DModel``), Qwen3-4B as its one
text encoder, Flux's 16-channel VAE; trained by flow matching; LoRA files in the key format ComfyUI
and ai-toolkit use (``diffusion_model.<diffusers module>``).

A Z-Image :class:`~runner.families.protocol.Base` holds the transformer in ``base.unet`` as Flux does.
Nothing is downloaded: Qwen's 151k-token BPE vocabulary ships with no package, so real checkpoints
take the tokenizer from their diffusers folder; the tiny and random models get a small byte-level BPE
in Qwen's tokenizer class, built here.

Conventions (diffusers' ``ZImagePipeline``, checked against ai-toolkit and musubi-tuner):

- Captions go through Qwen3's chat template (one user turn, generation prompt), and the
  second-to-last hidden layer of the real tokens is the conditioning: one variable-length tensor a
  caption. A batch holds them right-padded with a mask (``Conditioning.mask``, as
  ``Conditioning.join`` joins cached captions); :meth:`FlowMatching.velocity` hands the transformer
  the real tokens only, as the pipeline does.
- ``x_σ = (1 - σ) x_0 + σ ε`` as for Flux, but the transformer is told ``t = 1 - σ`` (0 is pure
  noise) and predicts ``x_0 - ε``: the pipeline negates its output before the Euler step. So
  :meth:`FlowMatching.velocity` returns minus the output, the ``ε - x_0`` every flow-matching
  family here predicts, and the shared loss applies unchanged.
- Z-Image-Turbo is step-distilled: it samples in 8 steps without CFG. diffusers' ``guidance_scale``
  g mixes ``pos + g (pos - neg)``, which is ComfyUI's and A1111's CFG scale minus 1; loracord's
  cfg_scale is the latter, so previews pass ``cfg_scale - 1`` and use CFG only above 1.

LoRA files: ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
with diffusers' (unfused) module names, as the generic kohya writer writes any key. ComfyUI maps
``diffusion_model.<diffusers module>`` for Z-Image (``comfy/lora.py`` ``model_lora_keys_unet``, the
``comfy.model_base.Lumina2`` branch, built from ``comfy.utils.z_image_to_diffusers``: to_q/to_k/to_v
patch row blocks of the fused ``attention.qkv`` by offset) and reads ``.lora_up.weight`` /
``.lora_down.weight`` first among its suffixes, ``.lora_B``/``.lora_A`` next
(``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``), with ``.alpha`` as kohya's. diffusers'
``ZImageLoraLoaderMixin`` converts ``diffusion_model.`` keys with ``lora_down``/``lora_up`` and
alpha too (``_convert_non_diffusers_z_image_lora_to_diffusers``). ai-toolkit writes ``lora_A`` /
``lora_B`` under the same module keys; both spellings are read here.

Turbo and training: training a LoRA on the distilled Turbo model directly breaks its distillation
within a few hundred steps. Two ways around it, both as the community trains:

1. Turbo + a training adapter (``training_adapter``: ostris' zimage_turbo_training_adapter, a LoRA
   that undoes the distillation). It is merged into the frozen transformer's weights for the whole
   run (before fp8 storage), so the LoRA learns on a de-distilled model and the adapter, being no
   LoRA layer, is never saved. Previews must show Turbo + LoRA, as members will use it: while they
   render, the adapter's own low-rank product is subtracted from the merged layers' outputs by
   forward hooks (ai-toolkit samples with the adapter at multiplier -1). Hooks rather than
   subtracting the delta from the weights: in bf16 (or fp8) ``(W + Δ) - Δ + Δ`` does not round back
   to ``W + Δ``, so every preview would shift the frozen weights a little; the hooks leave them
   untouched.
2. A de-distilled base (ostris' Z-Image-De-Turbo, or the non-distilled Z-Image): no adapter;
   previews need more steps and true CFG (sample prompts with ``--s 25 --l 3``), and the LoRA is
   then used on Turbo.

Torch and diffusers are imported inside the functions: the bot reads this family without them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import flow_matching
from .presets import DIT
from .protocol import Base, KohyaModule, ModelError, SampleRequest, Size, Target

if TYPE_CHECKING:
    import torch
    from diffusers import ZImagePipeline
    from transformers import Qwen2Tokenizer

    from ..spec import TrainSpec
    from .protocol import Conditioning

# Where a single-file transformer (z_image_turbo_bf16.safetensors, as ComfyUI keeps it) finds the
# rest of the model: a diffusers Z-Image folder with vae/, text_encoder/, tokenizer/ and scheduler/.
COMPONENTS_ENV = "LORACORD_ZIMAGE_COMPONENTS"
# The TrainSpec setting naming a training adapter (a LoRA file in the format above).
ADAPTER_SETTING = "training_adapter"
# Caption tokens at most, as ZImagePipeline's max_sequence_length default.
MAX_TOKENS = 512
PREFIX = "diffusion_model."

TINY_TRANSFORMER = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,  # the VAE's latent channels: Z-Image patches 2x2 latents itself
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 16,  # Qwen3's hidden size
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (8, 4, 4),  # sums to dim / n_heads
    "axes_lens": (256, 32, 32),
}
TINY_TEXT_ENCODER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,  # the pipeline reads the second-to-last layer
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": MAX_TOKENS,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Three blocks: a 4x reduction, so 64-pixel test images are 16x16 latents (8x8 patches) and the
# trainer's default bucket step for a 64-pixel model (8) divides by the size step (2 x 4).
TINY_ZIMAGE_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# What the real Qwen3 template renders for the one case the pipeline uses (one user turn,
# add_generation_prompt, enable_thinking): "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_FLOW_NOISE = "Z-Image's flow-matching noise is plain Gaussian"
_BLOCKS = "block weights name a UNet's IN/MID/OUT blocks; Z-Image has one stream of transformer layers"
_FROZEN_QWEN = (
    "Z-Image trains its transformer only: Qwen3-4B gets no LoRA (ai-toolkit and musubi-tuner keep it frozen)"
)
# TrainSpec settings that mean nothing to Z-Image, and why. Left at their defaults, the text encoder
# settings train nothing here: Qwen3 gets no LoRA layers (lora_targets), so it has no optimizer group.
NOT_FOR_ZIMAGE = {
    "clip_skip": "Z-Image reads Qwen3's second-to-last layer, as it was trained; there is no CLIP to skip",
    "max_token_length": f"Z-Image's Qwen3 reads up to {MAX_TOKENS} tokens of every caption already",
    "weighted_captions": "(word:1.2) weighting is for CLIP-conditioned UNets; Z-Image reads captions as written",
    "min_snr_gamma": "min-SNR weighting is for noise-prediction models; Z-Image trains by flow matching",
    "noise_offset": _FLOW_NOISE,
    "multires_noise_iterations": _FLOW_NOISE,
    "conv_dim": "Z-Image's transformer has no convolutions for LoCon",
    "conv_alpha": "Z-Image's transformer has no convolutions for LoCon",
    "down_lr_weight": _BLOCKS,
    "mid_lr_weight": _BLOCKS,
    "up_lr_weight": _BLOCKS,
    "sample_sampler": "Z-Image previews use its own flow-matching Euler sampler",
    "guidance_scale": "Z-Image has no distilled-guidance input (that is Flux.1-dev's); "
    "previews take CFG from --l",
    "t5xxl_max_token_length": "Z-Image has no T5; its Qwen3 reads up to 512 tokens",
    "network_train_text_encoder_only": _FROZEN_QWEN,
    "text_encoder_lr": _FROZEN_QWEN,
    "channels_last": "Z-Image's transformer works on token sequences; channels_last is for a UNet's convolutions",
}

# The transformer only, at the Flux preset's dim/alpha 16/16 and lr 1e-4 (not checked against a
# Z-Image trainer's defaults). Timesteps: sigmoid of a normal, shifted by 3 (musubi-tuner's Z-Image
# flow shift and the scheduler's own; ai-toolkit's default is the unshifted sigmoid); the raw output
# against noise - x_0 (both trainers' target). Previews: Turbo's 8 steps. Captions are not shuffled
# (Qwen3 reads sentences) nor dropped, so each is encoded once.
PRESET: dict[str, Any] = {**DIT, "discrete_flow_shift": 3.0, "sample_steps": 8}

# Every Linear of attention and feed-forward in the three block lists (7 a block, 238 in the real
# model), as the notes' study of ai-toolkit and musubi-tuner files recommends; adaLN modulation,
# embedders and the final layer are left alone.
LORA_MODULE = re.compile(
    r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"
)
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)\.weight|(.+)\.alpha")
_LORA_CLAIM = re.compile(
    r"^(diffusion_model\.|transformer\.)?(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\."
    r"|^lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attention|feed_forward)_"
)
# Lumina-Image 2.0 shares Z-Image's layout (ComfyUI runs both as Lumina2); its width is 2304.
LUMINA2_DIM = 2304

# diffusers -> ComfyUI (the original Z-Image) names; q, k and v are fused in ComfyUI's files.
_TO_COMFY = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)


# ---- LoRA tensors ----


def lora_parts(
    tensors: Mapping[str, torch.Tensor], modules: Mapping[str, str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A Z-Image LoRA's (down, up, alpha/rank scale) by diffusers module name.

    Reads the ComfyUI/ai-toolkit keys (``diffusion_model.<module>.lora_A|lora_down…``), diffusers'
    (``transformer.``) and musubi-tuner's underscored ones (``lora_unet_layers_0_attention_to_q``,
    which ``modules``, {kohya name: module}, resolves). A missing (or 0) alpha means alpha = rank,
    as for kohya. Raises ValueError naming keys it cannot read.
    """
    modules = modules or {}
    downs: dict[str, Any] = {}
    ups: dict[str, Any] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        name, leaf = (m[1], m[2]) if m[1] else (m[3], "alpha")
        for prefix in (PREFIX, "transformer."):
            name = name.removeprefix(prefix)
        name = modules.get(name, name)
        if leaf == "alpha":
            alphas[name] = float(value)
        else:
            (downs if leaf in ("lora_A", "lora_down") else ups)[name] = value
    unknown += [f"{m} (down or up missing)" for m in set(downs) ^ set(ups)]
    if unknown:
        raise ValueError(
            f"not a Z-Image LoRA key: {', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}"
        )
    out = {}
    for name, down in downs.items():
        rank = down.shape[0]
        alpha = alphas.get(name) or rank
        out[name] = (down, ups[name], alpha / rank)
    return out


def kohya_names(transformer: torch.nn.Module) -> dict[str, str]:
    """musubi-tuner's ``lora_unet_<module, dots as underscores>`` for every Linear of ``transformer``."""
    import torch

    paths = (
        p.removesuffix(".base_layer")
        for p, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    return {"lora_unet_" + path.replace(".", "_"): path for path in paths}


def diffusers_state_dict(
    tensors: Mapping[str, torch.Tensor], transformer: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A Z-Image LoRA as peft keys ``transformer.<module>.lora_A/lora_B.weight`` with alpha/rank baked
    into lora_A: ZImagePipeline.load_lora_weights loads it as is. Raises ValueError for modules this
    transformer does not have."""
    parts = lora_parts(tensors, kohya_names(transformer))
    names = {path for path, _ in transformer.named_modules()}
    missing = sorted(m for m in parts if m not in names)
    if missing:
        raise ValueError(
            f"no module of this model for {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
        )
    out = {}
    for module, (down, up, scale) in parts.items():
        out[f"transformer.{module}.lora_A.weight"] = down.float() * scale
        out[f"transformer.{module}.lora_B.weight"] = up.float()
    return out


def to_comfy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict in ComfyUI's single-file layout (fused qkv,
    the original names); diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers`` inverts it."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # fused with to_q below
        if ".attention.to_q." in key:
            parts = [state_dict[key.replace(".to_q.", f".{p}.")] for p in ("to_q", "to_k", "to_v")]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts)
            continue
        for old, new in _TO_COMFY:
            key = key.replace(old, new)
        out[key] = value
    return out


# ---- the training adapter ----


def read_adapter(
    path: str | Path, transformer: torch.nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A training adapter file's (down, up, scale) per module, checked against ``transformer``."""
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"training_adapter {file.name} could not be read ({e})") from e
    try:
        parts = lora_parts(tensors, kohya_names(transformer))
    except ValueError as e:
        raise ModelError(f"training_adapter {file.name}: {e}") from None
    for module, (down, up, _) in parts.items():
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            raise ModelError(
                f"training_adapter {file.name} has {module}, which this Z-Image model lacks"
            ) from None
        if tuple(layer.weight.shape) != (up.shape[0], down.shape[1]):
            raise ModelError(
                f"training_adapter {file.name} does not fit this model ({module}: {tuple(up.shape[:1])}x"
                f"{tuple(down.shape[1:])} for a {tuple(layer.weight.shape)} weight)"
            )
    return parts


def merge_adapter(
    transformer: torch.nn.Module,
    parts: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> None:
    """W += scale · up @ down for each module, computed in fp32 and stored in the weight's dtype."""
    import torch

    with torch.no_grad():
        for module, (down, up, scale) in parts.items():
            weight = transformer.get_submodule(module).weight
            if weight.is_meta:
                continue  # a random: base on the meta device has no values to change
            delta = (up.float() @ down.float()) * scale
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


@contextmanager
def without_adapter(base: Base, device: Any = None) -> Iterator[None]:
    """The merged training adapter's effect taken off the transformer's outputs for the duration
    (forward hooks subtracting its low-rank product); the weights are never touched."""

    import torch.nn.functional as F

    merged = base.extra.get(ADAPTER_SETTING)
    if not merged:
        yield
        return
    handles = []

    def hook(down: torch.Tensor, up: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
        def subtract(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            x = args[0]
            return output - F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale

        return subtract

    try:
        for module, (down, up, scale) in merged["parts"].items():
            layer = base.unet.get_submodule(module)
            layer = getattr(layer, "base_layer", layer)  # the frozen Linear inside a peft LoRA layer
            where = device or layer.weight.device
            handles.append(layer.register_forward_hook(hook(down.to(where), up.to(where), scale)))
        yield
    finally:
        for h in handles:
            h.remove()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


# ---- loading ----


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen's tokenizer class (byte-level BPE, Qwen's pre-tokenizer and chat template) over a small
    vocabulary trained here, for the tiny and random models. Qwen's own 151k-token vocabulary ships
    with no package; random weights make token identity meaningless anyway, and every id of the
    small vocabulary is a valid row of the full-size embedding."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "a photo of a cat sitting on a chair",
        "a painting of a red fox in the snow, detailed",
        "user assistant",
    ]
    bpe.train_from_iterator(corpus * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(pair) for pair in model["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials[1:],
        chat_template=CHAT_TEMPLATE,
    )
    tok.model_max_length = MAX_TOKENS
    return tok


def fill_pad_tokens(transformer: torch.nn.Module) -> None:
    # The pad tokens are made with torch.empty (checkpoints overwrite them): random models would pad
    # with whatever memory held, NaN included. Drawn from a fixed seed so tiny models are the same.
    import torch

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in (transformer.x_pad_token, transformer.cap_pad_token):
            if not p.is_meta:
                p.copy_(torch.randn(p.shape) * 0.02)


def zimage_pipeline(base: Base, scheduler: Any = None) -> ZImagePipeline:
    """A ZImagePipeline over the base's own modules (no copies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config),
        vae=base.vae,
        text_encoder=base.text_encoders[0],
        tokenizer=base.tokenizers[0],
        transformer=base.unet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_components(folder: Path, what: str) -> None:
    missing = [p for p in ("vae", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise ModelError(
            f"{what} lacks {', '.join(missing)}: copy them from a diffusers Z-Image download "
            "(Qwen3's vocabulary is not shipped with loracord)"
        )


class FlowMatching(flow_matching.FlowMatching):
    """Captions through Qwen3-4B (frozen); the transformer told ``1 - σ``, its output negated."""

    def __init__(
        self,
        base: Base,
        spec: TrainSpec,
        device: torch.device,
        autocast_dtype: torch.dtype,
    ):
        super().__init__(base, spec, device, autocast_dtype)
        self.pipe = zimage_pipeline(base)

    def encode_text(
        self, captions: list[str], grad: bool, cached: Conditioning | None = None
    ) -> Conditioning:
        """The pipeline's own encoding (up to MAX_TOKENS real tokens a caption); ``mask`` says which
        tokens are real. No encoder trains, so ``cached`` is the answer when given."""
        import torch

        from .protocol import Conditioning

        if cached is not None:
            return cached
        with torch.set_grad_enabled(grad), self._autocast():
            embeds, _ = self.pipe.encode_prompt(
                list(captions),
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_TOKENS,
            )
        # Right-padded to the batch's longest caption and masked, as Conditioning.join pads cached ones.
        longest = max(len(e) for e in embeds)
        hidden = embeds[0].new_zeros((len(embeds), longest, embeds[0].shape[-1]))
        mask = torch.zeros((len(embeds), longest), dtype=torch.bool, device=hidden.device)
        for i, e in enumerate(embeds):
            hidden[i, : len(e)] = e
            mask[i, : len(e)] = True
        return Conditioning(hidden, None, mask)

    def text_cached(self) -> None:
        """Every caption is cached: Qwen3-4B (8 GB in bf16) waits on the CPU until the next preview."""
        import torch

        if self.device.type == "cuda":
            self.base.text_encoders[0].to("cpu")
            torch.cuda.empty_cache()

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        import torch

        transformer = self.base.unet
        hidden = cond.hidden_states
        captions = (
            list(hidden.unbind(0))
            if cond.mask is None
            else [h[m] for h, m in zip(hidden, cond.mask, strict=True)]
        )
        out = transformer(
            list(noisy.to(transformer.dtype).unsqueeze(2).unbind(0)),  # one (C, frames=1, H, W) an image
            1 - sigmas,  # ZImagePipeline: (1000 - t) / 1000 with t = 1000 σ
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)


class ZImage(flow_matching.DiT):
    name = "zimage"
    display_name = "Z-Image"
    short_name = "Z-Image"
    native_resolution = 1024
    text_encoders = ("Qwen3-4B",)
    trainable_text_encoders: tuple[str, ...] = ()  # ai-toolkit and musubi-tuner keep Qwen3 frozen
    own_settings = (ADAPTER_SETTING, *flow_matching.FLOW_MATCHING_SETTINGS)
    refused = NOT_FOR_ZIMAGE
    # Turbo is step-distilled: no CFG unless a prompt asks (--l above 1). Its 8 steps are the
    # preset's sample_steps, so a member's own sample_steps still wins.
    sample_defaults: Mapping[str, Any] = {"cfg_scale": 1.0}
    base_model_version = "zimage"  # ai-toolkit's ss_base_model_version
    version_prefixes = (
        "zimage",
        "z_image",
        "z-image",
    )  # musubi-tuner's architecture is z_image
    pipeline_class = "ZImagePipeline"
    preset_settings = PRESET
    objective_class = FlowMatching

    def check_settings(self, settings: Mapping[str, Any], base: Base) -> list[str]:
        bad = super().check_settings(settings, base)
        adapter = settings.get(ADAPTER_SETTING)
        if adapter:
            path = Path(adapter).expanduser()
            if path.suffix.lower() != ".safetensors" or not path.is_file():
                bad.append(f"{ADAPTER_SETTING} must be a .safetensors LoRA file that exists (got {adapter})")
        return bad

    # ---- detection ----

    def claims_file(self, name: str, keys: set[str], shape: Callable[[str], tuple[int, ...]]) -> bool:
        # ComfyUI's NextDiT layout (Z-Image and Lumina 2): the caption embedder and fused-qkv layers.
        for prefix in ("", "model.diffusion_model."):
            if f"{prefix}cap_embedder.1.weight" in keys and f"{prefix}layers.0.attention.qkv.weight" in keys:
                if shape(f"{prefix}cap_embedder.1.weight")[0] == LUMINA2_DIM:
                    raise ModelError(
                        f"{name} is a Lumina-Image 2.0 model; of its family only Z-Image is supported"
                    )
                return True
        return False

    def claims_lora(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        keys = [k for k in tensors if _LORA_CLAIM.search(k)]
        if not keys:
            return False
        # Lumina 2 LoRAs have the same names; their layers are 2304 wide.
        widths = {tensors[k].shape[-1] for k in keys if re.search(r"to_q\.(lora_A|lora_down)\.weight$", k)}
        return LUMINA2_DIM not in widths

    # ---- loading ----

    def build(self, size: Size, variant: str, dtype: torch.dtype) -> Base:
        import torch
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from .model import config, default_dtype, finish, scheduler_config

        if variant:
            raise ModelError(f"unknown variant '{variant}' of {size}:zimage")
        schedule = scheduler_config("zimage")
        tok = qwen_tokenizer()
        if size == "random":
            # Z-Image-Turbo's architecture; build under ``with torch.device(...)``.
            with torch.random.fork_rng(devices=[]), default_dtype(dtype):
                torch.manual_seed(0)
                transformer = ZImageTransformer2DModel.from_config(config("zimage", "transformer"))
                vae = AutoencoderKL.from_config(config("zimage", "vae"))
                qwen = Qwen3Model(Qwen3Config(**config("zimage", "text_encoder")))
            fill_pad_tokens(transformer)
            return finish(
                Base(
                    "random:zimage",
                    "zimage",
                    transformer,
                    vae,
                    [qwen],
                    [tok],
                    schedule,
                    1024,
                )
            )
        with torch.random.fork_rng(devices=[]):  # a load must not reset the caller's seed
            torch.manual_seed(0)
            transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
            vae = AutoencoderKL(**TINY_ZIMAGE_VAE)
            qwen = Qwen3Model(Qwen3Config(vocab_size=len(tok), **TINY_TEXT_ENCODER))
        fill_pad_tokens(transformer)
        # Built in fp32 and cast, so every dtype holds the same (rounded) tiny model.
        for m in (transformer, vae, qwen):
            m.to(dtype)
        return finish(Base("tiny:zimage", "zimage", transformer, vae, [qwen], [tok], schedule, 64))

    def from_folder(self, path: Path, dtype: torch.dtype, transformer: Any = None) -> Base:
        """A diffusers Z-Image folder (ZImagePipeline) in ``dtype``; ``transformer`` replaces the folder's own."""
        from diffusers import ZImagePipeline

        from .model import finish

        _check_components(path, path.name)
        kwargs = {"transformer": transformer} if transformer is not None else {}
        try:
            pipe = ZImagePipeline.from_pretrained(
                str(path), local_files_only=True, torch_dtype=dtype, **kwargs
            )
        except Exception as e:  # diffusers raises many error types for damaged folders
            raise ModelError(f"{path.name} could not be loaded as a Z-Image diffusers model ({e})") from e
        base = Base(
            path.name,
            "zimage",
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder],
            [pipe.tokenizer],
            dict(pipe.scheduler.config),
            1024,
        )
        return finish(base)

    def from_file(self, path: Path, dtype: torch.dtype, config_root: Path) -> Base:
        """A single-file Z-Image transformer (ComfyUI's layout, with or without ``model.diffusion_model.``)
        built against ``config_root/zimage``, with the VAE, Qwen3 and its tokenizer from the diffusers
        folder named by ``$LORACORD_ZIMAGE_COMPONENTS``."""
        from diffusers import ZImageTransformer2DModel

        from .model import components_folder, named_after_file, transformer_from_file

        unset = (
            f"{path.name} holds only the Z-Image transformer; set {COMPONENTS_ENV} to a diffusers Z-Image "
            "folder with the VAE, Qwen3-4B and its tokenizer, or give that folder as the base"
        )
        folder = components_folder(COMPONENTS_ENV, unset, _check_components)
        config = config_root / "zimage"
        transformer = transformer_from_file(path, ZImageTransformer2DModel, config, dtype, "Z-Image")
        return named_after_file(self.from_folder(folder, dtype, transformer), path)

    # ---- training ----

    def prepare_training(self, base: Base, spec: TrainSpec, weight_dtype: torch.dtype) -> None:
        adapter = spec.training_adapter
        if adapter:
            # Merged before fp8 storage, so it is added at full precision.
            parts = read_adapter(adapter, base.unet)
            merge_adapter(base.unet, parts)
            base.extra[ADAPTER_SETTING] = {"name": Path(adapter).name, "parts": parts}
        if spec.fp8_base:
            flow_matching.store_fp8(base.unet, weight_dtype)

    def lora_targets(
        self, base: Base, spec: TrainSpec, block_weights: dict[str, float] | None
    ) -> dict[str, list[Target]]:
        import torch

        # No "te1": Qwen3 never gets LoRA, whatever train_text_encoder says (see NOT_FOR_ZIMAGE).
        if not spec.train_unet:
            return {}
        return {
            "unet": [
                Target(path, spec.network_dim, spec.network_alpha)
                for path, module in base.unet.named_modules()
                if isinstance(module, torch.nn.Linear) and LORA_MODULE.fullmatch(path)
            ]
        }

    # ---- LoRA files ----

    def kohya_modules(self, base: Base, modules: Sequence[Any]) -> list[KohyaModule]:
        """``diffusion_model.<diffusers module>``: the key ComfyUI maps for Z-Image (see the module doc)."""
        others = [m.name for m in modules if m.component != "unet"]
        if others:
            raise ValueError(f"Z-Image LoRA files hold transformer modules only, not {others[0]}")
        return [KohyaModule(f"{PREFIX}{m.name}", m.down.detach(), m.up.detach(), m.alpha) for m in modules]

    def loadable_lora(self, tensors: dict[str, torch.Tensor], base: Base) -> dict[str, torch.Tensor]:
        return diffusers_state_dict(tensors, base.unet)

    def metadata(self, spec: TrainSpec) -> dict[str, Any]:
        # What ai-toolkit and musubi-tuner record, and the SD settings Z-Image does not use.
        meta: dict[str, Any] = {
            "ss_model_type": "zimage",
            "ss_weighting_scheme": "uniform",
            "ss_timestep_sampling": spec.timestep_sampling,
            "ss_sigmoid_scale": spec.sigmoid_scale,
            "ss_model_prediction_type": spec.model_prediction_type,
            "ss_discrete_flow_shift": spec.discrete_flow_shift,
            "ss_max_token_length": None,
            "ss_fp8_base": spec.fp8_base,
        }
        adapter = spec.training_adapter
        if adapter:
            path = Path(adapter).expanduser()
            meta["ss_training_adapter"] = path.name
            meta["ss_training_adapter_hash"] = file_sha256(path) if path.is_file() else None
        return meta

    def modelspec(self) -> tuple[str, str, str | None]:
        # musubi-tuner's modelspec architecture for Z-Image; no prediction type, as for Flux.
        return "Z-Image", "https://github.com/Tongyi-MAI/Z-Image", None

    # ---- generation ----

    def pipeline(self, base: Base, scheduler: Any) -> ZImagePipeline:
        return zimage_pipeline(base)  # its own flow-matching Euler, whatever sampler was asked

    def render_latents(
        self,
        base: Base,
        pipe: Any,
        request: SampleRequest,
        generator: torch.Generator,
        device: torch.device,
    ) -> torch.Tensor:
        # ZImagePipeline's Euler at the scheduler's shift 3; CFG (two passes) only above cfg_scale 1,
        # given to diffusers as cfg_scale - 1 (see the module doc). A merged training adapter is
        # taken off, so previews show Turbo + LoRA.
        import torch

        scale = base.vae_scale_factor
        width, height = (side // (2 * scale) * 2 * scale for side in (request.width, request.height))
        noise = torch.randn(
            (1, base.unet.config.in_channels, height // scale, width // scale),
            generator=generator,
        )
        cfg = request.cfg_scale > 1
        with without_adapter(base, device):
            return pipe(
                prompt=request.prompt,
                negative_prompt=request.negative if cfg else None,
                guidance_scale=request.cfg_scale - 1 if cfg else 0.0,
                width=width,
                height=height,
                num_inference_steps=request.steps,
                generator=generator,
                latents=noise.to(device),  # the pipeline keeps its latents in fp32
                max_sequence_length=MAX_TOKENS,
                output_type="latent",
            ).images

    def parameters_fields(self, base: Base, request: SampleRequest) -> dict[str, Any]:
        # Flow-matching Euler at a fixed shift: what Forge and ComfyUI call Euler with the Simple schedule.
        return {"Sampler": "Euler", "Schedule type": "Simple"}

    # ---- writing bases out ----

    def save_folder(self, base: Base, folder: Path) -> Path:
        zimage_pipeline(base).save_pretrained(folder)
        return folder

    def single_file(self, base: Base) -> dict[str, torch.Tensor]:
        """The transformer as ComfyUI's ``diffusion_models`` file holds it (the VAE and Qwen3 are
        separate files there)."""
        return to_comfy({k: v.detach().cpu().contiguous() for k, v in base.unet.state_dict().items()})


FAMILY = ZImage()
