"""LoRA layers on a base model, built with peft: kohya's ``networks.lora`` init, scale and
learning-rate groups. Which modules get LoRA is the family's answer (``Family.lora_targets``).

Init is kohya's (kaiming-uniform down, zero up) and the scale is alpha/rank, so a file saved from
these layers means the same thing to every loader.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ..families.protocol import Base, KohyaModule, Target
from ..families.registry import family
from ..spec import SpecError, TrainSpec

ADAPTER = "default"


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


def block_lr_weights(spec: TrainSpec, family_name: str) -> dict[str, float] | None:
    """Learning-rate multiplier per UNet block label, or None when no block weights are set (families
    without UNet blocks refuse them: see their ``refused``)."""
    if spec.down_lr_weight is None and spec.mid_lr_weight is None and spec.up_lr_weight is None:
        return None
    n = family(family_name).blocks_per_side
    if n is None:
        raise SpecError(f"block weights need a UNet; {family_name} has none")
    weights: dict[str, float] = {"MID": 1.0 if spec.mid_lr_weight is None else spec.mid_lr_weight}
    for setting, label in (("down_lr_weight", "IN"), ("up_lr_weight", "OUT")):
        value = getattr(spec, setting)
        values = [1.0] * n if value is None else _preset(value, n) if isinstance(value, str) else list(value)
        if len(values) != n:
            raise SpecError(f"{setting} needs {n} values for {family_name} (got {len(values)})")
        weights.update({f"{label}{k:02d}": w for k, w in enumerate(values)})
    return weights


def _block_weight(weights: dict[str, float] | None, block: str | None) -> float:
    return 1.0 if weights is None or block is None else weights[block]


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
    """Add a LoRA adapter to the modules the family targets for this spec.

    Components the spec does not train, and UNet blocks weighted 0, get no LoRA at all (as in kohya).
    The LoRA weights are fp32 whatever the base's dtype, and seeded by torch's global RNG (see
    ``_init_fp32``).
    """
    targets = family(base.family).lora_targets(base, spec, block_lr_weights(spec, base.family))
    models = dict(components(base))
    # peft's own draws are replaced by _init_fp32's; forking keeps them from shifting the seed.
    with torch.random.fork_rng(devices=[]):
        for component, wanted in targets.items():
            if not wanted:
                continue
            if component == "unet":
                base.unet.add_adapter(_lora_config(wanted, spec), adapter_name=ADAPTER)
            else:
                # transformers' own add_adapter refuses peft < 0.22 (none released yet); this is the call it makes.
                inject_adapter_in_model(_lora_config(wanted, spec), models[component], adapter_name=ADAPTER)
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
    fam = family(base.family)
    groups: dict[str, dict] = {}
    for m in lora_modules(base):
        if m.component == "unet":
            block = fam.block_of(m.component, m.name, base) if weights is not None else None
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


# ---- as a LoRA file ----


def kohya_modules(base: Base) -> list[KohyaModule]:
    """The live LoRA layers under the keys the family's LoRA files use."""
    return family(base.family).kohya_modules(base, lora_modules(base))


def kohya_state_dict(base: Base, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The live LoRA layers as a kohya state dict, on the CPU in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for m in kohya_modules(base):
        tensors[f"{m.key}.lora_down.weight"] = m.down.to("cpu", dtype).contiguous()
        tensors[f"{m.key}.lora_up.weight"] = m.up.to("cpu", dtype).contiguous()
        # kohya stores alpha in the save dtype too.
        tensors[f"{m.key}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
    return tensors
