import pytest
import torch

from runner.spec import TrainSpec
from runner.train.optimizers import make_optimizer


def spec(**kw) -> TrainSpec:
    return TrainSpec(base="tiny:sd15", train_data_dir=".", output_dir=".", output_name="x", **kw)


def groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(4, 3))], "lr": 1e-4}]


def kohya_name(cls: type, kwargs: dict) -> str:
    """kohya's ss_optimizer (train_network.py): optimizer_class.__module__ + "." + __name__, then
    "(" + ",".join(f"{k}={v}") + ")" only when there are arguments."""
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def test_adamw_without_arguments_has_no_parentheses():
    optimizer, name = make_optimizer(spec(), groups(), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert name == "torch.optim.adamw.AdamW" == kohya_name(torch.optim.AdamW, {})


def test_injected_fused_and_tuple_arguments_are_listed():
    # On CUDA loracord adds fused=True; the text lists it with the member's own arguments.
    optimizer, name = make_optimizer(
        spec(optimizer_args="weight_decay=0.01 betas=0.9,0.99"), groups(), torch.device("cuda")
    )
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.9, 0.99)
    assert name == kohya_name(torch.optim.AdamW, {"weight_decay": 0.01, "betas": (0.9, 0.99), "fused": True})
    assert name == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99),fused=True)"


def test_plain_dadaptation_is_kohyas_dadapt_adam_preprint():
    experimental = pytest.importorskip("dadaptation.experimental")
    optimizer, name = make_optimizer(
        spec(optimizer_type="DAdaptation", learning_rate=1.0), groups(), torch.device("cpu")
    )
    assert type(optimizer) is experimental.DAdaptAdamPreprint
    assert name == "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"


def test_adafactor_at_the_set_learning_rate_lists_its_defaults():
    from transformers.optimization import Adafactor

    optimizer, name = make_optimizer(spec(optimizer_type="Adafactor"), groups(), torch.device("cpu"))
    fixed = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    assert {k: optimizer.defaults[k] for k in fixed} == fixed and optimizer.defaults["lr"] == 1e-4
    assert name == kohya_name(Adafactor, fixed)


@pytest.mark.parametrize("args", ["relative_step=True", "warmup_init=True"])
def test_adafactor_relative_step_ignores_the_learning_rate_as_kohya(args):
    from transformers.optimization import Adafactor

    params = groups()
    optimizer, name = make_optimizer(
        spec(optimizer_type="Adafactor", optimizer_args=args), params, torch.device("cpu")
    )
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    warmup = args == "warmup_init=True"
    assert name == kohya_name(
        Adafactor, {"scale_parameter": False, "relative_step": True, "warmup_init": warmup}
    )
    p = params[0]["params"][0]
    p.grad = torch.ones_like(p)
    optimizer.step()
    # Adafactor's own first step size: 1e-6 × 1 with warmup_init, else min(1e-2, 1/√1) = 1e-2
    # (scale_parameter off), applied to the clipped unit update; never the spec's 1e-4.
    step = 1e-6 if warmup else 1e-2
    torch.testing.assert_close(p, torch.full_like(p, -step))
