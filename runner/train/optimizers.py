"""kohya's optimizer names → each optimizer from its own package, as kohya's
``train_util.get_optimizer`` picks them."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from ..spec import SpecError, TrainSpec

# name → (module, class, pip package, default kwargs): the class kohya uses for that name.
_OPTIMIZERS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "AdamW": ("torch.optim", "AdamW", "torch", {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}),
    # kohya's Adafactor defaults to relative_step=True (with transformers' scale_parameter=True,
    # warmup_init=False) and then ignores every learning rate for Adafactor's own step size. loracord
    # trains at the learning rates the member set, so its defaults are kohya's fixed-rate Adafactor
    # recipe; optimizer_args relative_step=True (or warmup_init=True) gives kohya's default behaviour.
    "Adafactor": (
        "transformers.optimization",
        "Adafactor",
        "transformers",
        {"scale_parameter": False, "relative_step": False, "warmup_init": False},
    ),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch", {}),
    # kohya maps plain "DAdaptation" to dadaptation's experimental DAdaptAdamPreprint, not DAdaptAdam.
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
}


def make_optimizer(
    spec: TrainSpec, groups: list[dict[str, Any]], device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer, and kohya's ``ss_optimizer`` text for it: the class's full name, then every
    argument it was given besides the learning rate, as ``AdamW(weight_decay=0.01,fused=True)``."""
    module_name, class_name, package, defaults = _OPTIMIZERS[spec.optimizer_type]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        raise SpecError(
            f"optimizer_type {spec.optimizer_type} needs the '{package}' package ({e}); "
            "install it with: pip install 'loracord[optim]'"
        ) from None
    # kohya reads "betas=0.9,0.99" as a tuple.
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.optimizer_args.items()}
    kwargs = {**defaults, **given}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        choices = sorted(p for p in accepted if p not in ("self", "params", "lr"))
        raise SpecError(
            f"optimizer_args {unknown} not understood by {spec.optimizer_type}; it takes {choices}"
        )
    if cls is torch.optim.AdamW and device.type == "cuda" and "fused" not in kwargs:
        kwargs["fused"] = True  # one kernel for all LoRA tensors instead of one launch per tensor
    lr: float | None = spec.learning_rate
    if spec.optimizer_type == "Adafactor" and (kwargs["relative_step"] or kwargs["warmup_init"]):
        # kohya: warmup_init needs the relative step; with it Adafactor takes no learning rate.
        kwargs["relative_step"], lr = True, None
    optimizer = cls(groups, lr=lr, **kwargs)
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return optimizer, f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")
