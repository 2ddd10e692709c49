"""kohya's optimizer names → each optimizer from its own package."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from .spec import SpecError, TrainSpec

# name → (module, class, pip package, default kwargs). Defaults are kohya's where it sets any:
# Adafactor with an explicit lr must not also pick its own relative step size.
_OPTIMIZERS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "AdamW": ("torch.optim", "AdamW", "torch", {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}),
    "Adafactor": (
        "transformers.optimization",
        "Adafactor",
        "transformers",
        {"scale_parameter": False, "relative_step": False, "warmup_init": False},
    ),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch", {}),
    # kohya maps plain "DAdaptation" to DAdaptAdam as well.
    "DAdaptation": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
}


def make_optimizer(
    spec: TrainSpec, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    module_name, class_name, package, defaults = _OPTIMIZERS[spec.optimizer_type]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        raise SpecError(
            f"optimizer_type {spec.optimizer_type} needs the '{package}' package ({e}); "
            "install it with: pip install 'loracord[optim]'"
        ) from None
    kwargs = {**defaults, **spec.optimizer_args}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        choices = sorted(p for p in accepted if p not in ("self", "params", "lr"))
        raise SpecError(
            f"optimizer_args {unknown} not understood by {spec.optimizer_type}; it takes {choices}"
        )
    if cls is torch.optim.AdamW and device.type == "cuda" and "fused" not in kwargs:
        kwargs["fused"] = True  # one kernel for all LoRA tensors instead of one launch per tensor
    return cls(groups, lr=spec.learning_rate, **kwargs)


def describe_optimizer(optimizer: torch.optim.Optimizer, spec: TrainSpec) -> str:
    """kohya's ss_optimizer text, e.g. ``torch.optim.adamw.AdamW(weight_decay=0.01)``."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in spec.optimizer_args.items())
    return f"{cls.__module__}.{cls.__name__}({args})"
