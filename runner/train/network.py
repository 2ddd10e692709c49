"""Which modules get LoRA and how they train: kohya's ``networks.lora`` targets, built with peft.

The UNet gets LoRA on every Linear and 1x1 conv inside its transformer blocks and, with
``conv_dim`` (LoCon), on the resnets, downsamplers and upsamplers too; the text encoders on the
attention and MLP projections. Init is kohya's (kaiming-uniform down, zero up) and the scale is
alpha/rank, so a file saved from these layers means the same thing to every loader.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from diffusers import Transformer2DModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.upsampling import Upsample2D
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from ..families.models import Base
from ..spec import Family, SpecError, TrainSpec

ADAPTER = "default"

# kohya's UNET_TARGET_REPLACE_MODULE, its CONV2D_3X3 additions, and TEXT_ENCODER_TARGET_REPLACE_MODULE.
_UNET_ATTN_PARENTS = (Transformer2DModel,)
_UNET_CONV_PARENTS = (ResnetBlock2D, Downsample2D, Upsample2D)
_TE_PARENTS = (CLIPAttention, CLIPMLP)
# kohya's FLUX_TARGET_REPLACE_MODULE_DOUBLE/_SINGLE: every Linear of the double and single blocks.
_FLUX_PARENTS = (FluxTransformerBlock, FluxSingleTransformerBlock)

# kohya numbers a full UNet's blocks IN00..IN11 / OUT00..OUT11 (SD1.5) and IN00..IN08 / OUT00..OUT08 (SDXL).
BLOCKS_PER_SIDE: dict[Family, int] = {"sd15": 12, "sdxl": 9}

_UPDOWN = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One module that gets LoRA, with its own rank and alpha."""

    name: str
    rank: int
    alpha: float


@dataclass(frozen=True)
class LoraModule:
    """A live peft LoRA layer inside one component of the base model."""

    component: str  # "unet", "te1", "te2"
    name: str  # module path inside the component
    layer: LoraLayer

    @property
    def down(self) -> torch.nn.Parameter:
        return self.layer.lora_A[ADAPTER].weight

    @property
    def up(self) -> torch.nn.Parameter:
        return self.layer.lora_B[ADAPTER].weight

    @property
    def rank(self) -> int:
        return self.layer.r[ADAPTER]

    @property
    def alpha(self) -> float:
        return float(self.layer.lora_alpha[ADAPTER])

    def weights(self) -> dict[str, torch.nn.Parameter]:
        """The trainable weights under their peft names."""
        return {f"{self.name}.lora_A": self.down, f"{self.name}.lora_B": self.up}


def components(base: Base) -> list[tuple[str, torch.nn.Module]]:
    """The base model's trainable parts under the names used in files and resume states."""
    return [("unet", base.unet)] + [(f"te{i + 1}", te) for i, te in enumerate(base.text_encoders)]


def unet_block(name: str, layers_per_block: int) -> str | None:
    """kohya's block label for a diffusers UNet module path (kohya's get_block_index, generalised)."""
    if name.startswith("mid_block."):
        return "MID"
    m = _UPDOWN.match(name)
    if not m:
        return None
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    per = layers_per_block + 1
    if side == "down":
        idx = (i + 1) * per if kind == "downsamplers" else i * per + j + 1
        return f"IN{idx:02d}"
    idx = i * per + (layers_per_block if kind == "upsamplers" else j)
    return f"OUT{idx:02d}"


def _preset(name: str, n: int) -> list[float]:
    # kohya's get_block_lr_weight presets, without the "+base" suffix the spec does not accept.
    ramp = [i / (n - 1) for i in range(n)]
    sine = [math.sin(math.pi * r / 2) for r in ramp]
    return {
        "sine": sine,
        "cosine": sine[::-1],
        "linear": ramp,
        "reverse_linear": ramp[::-1],
        "zeros": [0.0] * n,
    }[name]


def block_lr_weights(spec: TrainSpec, family: Family) -> dict[str, float] | None:
    """Learning-rate multiplier per UNet block label, or None when no block weights are set."""
    if spec.down_lr_weight is None and spec.mid_lr_weight is None and spec.up_lr_weight is None:
        return None
    n = BLOCKS_PER_SIDE[family]
    weights: dict[str, float] = {"MID": 1.0 if spec.mid_lr_weight is None else spec.mid_lr_weight}
    for setting, label in (("down_lr_weight", "IN"), ("up_lr_weight", "OUT")):
        value = getattr(spec, setting)
        values = [1.0] * n if value is None else _preset(value, n) if isinstance(value, str) else list(value)
        if len(values) != n:
            raise SpecError(f"{setting} needs {n} values for {family} (got {len(values)})")
        weights.update({f"{label}{k:02d}": w for k, w in enumerate(values)})
    return weights


def _block_weight(weights: dict[str, float] | None, block: str | None) -> float:
    return 1.0 if weights is None or block is None else weights[block]


def _is_pointwise(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
    )


def _flux_targets(transformer: torch.nn.Module, spec: TrainSpec) -> list[Target]:
    return [
        Target(f"{parent_name}.{child_name}", spec.network_dim, spec.network_alpha)
        for parent_name, parent in transformer.named_modules()
        if isinstance(parent, _FLUX_PARENTS)
        for child_name, child in parent.named_modules()
        if isinstance(child, torch.nn.Linear)
    ]


def _unet_targets(unet: torch.nn.Module, spec: TrainSpec, weights: dict[str, float] | None) -> list[Target]:
    lpb = int(unet.config.layers_per_block)
    parents = _UNET_ATTN_PARENTS + (_UNET_CONV_PARENTS if spec.conv_dim else ())
    found: dict[str, Target] = {}
    for parent_name, parent in unet.named_modules():
        if not isinstance(parent, parents):
            continue
        for child_name, child in parent.named_modules():
            name = f"{parent_name}.{child_name}"
            if _is_pointwise(child):
                rank, alpha = spec.network_dim, spec.network_alpha
            elif isinstance(child, torch.nn.Conv2d) and spec.conv_dim:
                # kohya: conv_alpha defaults to 1 when only conv_dim is given.
                rank, alpha = spec.conv_dim, 1.0 if spec.conv_alpha is None else spec.conv_alpha
            else:
                continue
            # kohya drops the modules of blocks weighted 0 instead of training them at lr 0.
            if _block_weight(weights, unet_block(name, lpb)) > 0:
                found[name] = Target(name, rank, alpha)
    return list(found.values())


def _te_targets(te: torch.nn.Module, spec: TrainSpec) -> list[Target]:
    return [
        Target(f"{parent_name}.{child_name}", spec.network_dim, spec.network_alpha)
        for parent_name, parent in te.named_modules()
        if isinstance(parent, _TE_PARENTS)
        for child_name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear)
    ]


def _lora_config(targets: list[Target], spec: TrainSpec) -> LoraConfig:
    odd = [t for t in targets if (t.rank, t.alpha) != (spec.network_dim, spec.network_alpha)]
    # One alternation per (rank, alpha) keeps peft's per-module pattern lookup to a single regex.
    pattern_of: dict[tuple[int, float], list[str]] = {}
    for t in odd:
        pattern_of.setdefault((t.rank, t.alpha), []).append(re.escape(t.name))
    rank_pattern = {"|".join(names): r for (r, _), names in pattern_of.items()}
    alpha_pattern = {"|".join(names): a for (_, a), names in pattern_of.items()}
    return LoraConfig(
        r=spec.network_dim,
        lora_alpha=spec.network_alpha,
        target_modules=[t.name for t in targets],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
    )


def add_lora(base: Base, spec: TrainSpec) -> None:
    """Add a LoRA adapter to the UNet and/or the text encoders, as the spec asks.

    Components the spec does not train, and UNet blocks weighted 0, get no LoRA at all (as in kohya).
    Flux trains its transformer and CLIP-L; T5-XXL stays frozen (kohya's default). The LoRA weights
    are fp32 whatever the base's dtype, and seeded by torch's global RNG (see ``_init_fp32``).
    """
    flux = base.family == "flux"
    # peft's own draws are replaced by _init_fp32's; forking keeps them from shifting the seed.
    with torch.random.fork_rng(devices=[]):
        if spec.train_unet:
            if flux:
                targets = _flux_targets(base.unet, spec)
            else:
                targets = _unet_targets(base.unet, spec, block_lr_weights(spec, base.family))
            if targets:
                base.unet.add_adapter(_lora_config(targets, spec), adapter_name=ADAPTER)
        if spec.train_text_encoder:
            for te in base.text_encoders[:1] if flux else base.text_encoders:
                # transformers' own add_adapter refuses peft < 0.22 (none released yet); this is the call it makes.
                inject_adapter_in_model(_lora_config(_te_targets(te, spec), spec), te, adapter_name=ADAPTER)
    _init_fp32(base)


def _init_fp32(base: Base) -> None:
    """kohya's init (kaiming-uniform down, zero up), drawn in fp32 on the host, LoRA weights kept fp32.

    peft draws the same init but then casts the new layers to their base layer's dtype, so a bf16 or
    fp8 base would quantise it before training starts. Drawing on the host gives the same numbers on
    every device: one draw per LoRA module from torch's global RNG, in ``lora_modules`` order.
    """
    for m in lora_modules(base):
        down = torch.empty(m.down.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        m.layer.lora_A[ADAPTER].to(torch.float32)
        m.layer.lora_B[ADAPTER].to(torch.float32)
        with torch.no_grad():
            m.down.copy_(down)
            m.up.zero_()


def lora_modules(base: Base) -> list[LoraModule]:
    """Every live LoRA layer, UNet first, in module order."""
    return [
        LoraModule(component, name, module)
        for component, model in components(base)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    ]


def lora_parameters(base: Base) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(component, qualified parameter name, parameter) for every trainable LoRA parameter."""
    return [
        (m.component, name, p)
        for m in lora_modules(base)
        for name, p in m.weights().items()
        if p.requires_grad
    ]


_GROUP_ORDER = {"text_encoder": 0, "unet": 1, "unet_IN": 1, "unet_MID": 2, "unet_OUT": 3}


def param_groups(base: Base, spec: TrainSpec) -> list[dict]:
    """Optimizer groups: text encoders at text_encoder_lr, UNet at unet_lr × its block's weight.

    Groups come in a fixed order (text encoders, then UNet blocks IN, MID, OUT); a group whose
    learning rate is 0 is left out and its parameters frozen.
    """
    weights = block_lr_weights(spec, base.family)
    groups: dict[str, dict] = {}
    for m in lora_modules(base):
        if m.component == "unet":
            block = (
                unet_block(m.name, int(base.unet.config.layers_per_block)) if weights is not None else None
            )
            name = "unet" if block is None else f"unet_{block}"
            lr = spec.effective_unet_lr * _block_weight(weights, block)
        else:
            name, lr = "text_encoder", spec.effective_text_encoder_lr
        group = groups.setdefault(name, {"name": name, "lr": lr, "params": []})
        group["params"] += m.weights().values()

    result = []
    for name in sorted(groups, key=lambda n: (_GROUP_ORDER[n.rstrip("0123456789")], n)):
        group = groups[name]
        if group["lr"] == 0:
            for p in group["params"]:
                p.requires_grad_(False)
        else:
            result.append(group)
    return result


def lora_state(base: Base) -> dict[str, torch.Tensor]:
    """Every LoRA weight, namespaced by component, to resume training exactly."""
    # Read from the layers: peft's get_peft_model_state_dict needs the peft_config attribute that only
    # the models' add_adapter sets, and the text encoders cannot use it (see add_lora).
    return {
        f"{m.component}.{name}": p.detach().clone()
        for m in lora_modules(base)
        for name, p in m.weights().items()
    }


def load_lora_state(base: Base, state: dict[str, torch.Tensor]) -> None:
    """Load a state from lora_state into a base prepared with add_lora and the same spec."""
    params = {f"{m.component}.{name}": p for m in lora_modules(base) for name, p in m.weights().items()}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise SpecError(
            f"resume state does not match the network: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, p in params.items():
        if state[key].shape != p.shape:
            raise SpecError(
                f"resume state does not match the network: {key} is {tuple(state[key].shape)}, "
                f"the network has {tuple(p.shape)}"
            )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])
