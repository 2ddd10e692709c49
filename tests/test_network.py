import math

import pytest
import torch
from diffusers import Transformer2DModel

from runner.families.registry import load_base
from runner.families.stable_diffusion import unet_block
from runner.spec import TrainSpec
from runner.train.network import (
    ADAPTER,
    add_lora,
    block_lr_weights,
    load_lora_state,
    lora_modules,
    lora_parameters,
    lora_state,
    param_groups,
)


def make_spec(family: str = "sd15", **kw) -> TrainSpec:
    return TrainSpec(output_name="t", base=f"tiny:{family}", train_data_dir=".", output_dir=".", **kw)


def lora_base(family: str = "sd15", **kw):
    base = load_base(f"tiny:{family}")
    spec = make_spec(family, **kw)
    add_lora(base, spec)
    return base, spec


def randomize_up(base, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.1)


def unet_out(base) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, base.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return base.unet(x, torch.tensor([10]), ctx).sample


def by_name(base) -> dict[tuple[str, str], object]:
    return {(m.component, m.name): m for m in lora_modules(base)}


def test_unet_targets_are_kohya_transformer_linears_and_pointwise_convs():
    base, spec = lora_base("sd15", network_dim=8, network_alpha=4)
    got = {name for comp, name in by_name(base) if comp == "unet"}
    want = set()
    for parent_name, parent in load_base("tiny:sd15").unet.named_modules():
        if isinstance(parent, Transformer2DModel):
            for child_name, child in parent.named_modules():
                if isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                ):
                    want.add(f"{parent_name}.{child_name}")
    assert got == want
    names = {n.split(".transformer_blocks.0.")[-1] for n in got if ".transformer_blocks.0." in n}
    assert names >= {
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "ff.net.0.proj",
        "ff.net.2",
    }
    assert any(n.endswith("proj_in") for n in got) and any(n.endswith("proj_out") for n in got)
    assert not any(".resnets." in n for n in got)


def test_text_encoder_targets_every_layer_projection():
    base, _ = lora_base("sdxl")
    for comp, te in (("te1", base.text_encoders[0]), ("te2", base.text_encoders[1])):
        names = {n for c, n in by_name(base) if c == comp}
        layers = te.config.num_hidden_layers
        assert len(names) == 6 * layers
        prefix = "text_model." if comp == "te2" else ""
        for i in range(layers):
            for leaf in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ):
                assert f"{prefix}encoder.layers.{i}.{leaf}" in names


def test_rank_alpha_scaling_and_kohya_init():
    base, _ = lora_base("sd15", network_dim=8, network_alpha=4)
    for m in lora_modules(base):
        assert (m.rank, m.alpha) == (8, 4.0)
        assert m.layer.scaling[ADAPTER] == pytest.approx(4.0 / 8)  # alpha/rank, no rslora
        assert torch.count_nonzero(m.up) == 0
        fan_in = m.down[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
        assert m.down.abs().max() <= bound + 1e-6
        assert m.down.abs().max() > 0.5 * bound
    # Zero up weights: adding the LoRA leaves the model's output untouched.
    assert torch.equal(unet_out(base), unet_out(load_base("tiny:sd15")))


def test_conv_dim_adds_locon_with_its_own_rank_and_alpha():
    base, _ = lora_base("sd15", network_dim=8, network_alpha=4, conv_dim=2, conv_alpha=3)
    mods = {n: m for (c, n), m in by_name(base).items() if c == "unet"}
    conv3 = [n for n, m in mods.items() if m.down.dim() == 4 and m.down.shape[2:] == (3, 3)]
    assert "down_blocks.0.resnets.0.conv1" in conv3 and "down_blocks.0.downsamplers.0.conv" in conv3
    assert "up_blocks.0.upsamplers.0.conv" in conv3
    assert all((mods[n].rank, mods[n].alpha) == (2, 3.0) for n in conv3)
    assert (
        mods["down_blocks.0.resnets.0.time_emb_proj"].rank,
        mods["down_blocks.0.resnets.0.time_emb_proj"].alpha,
    ) == (8, 4.0)
    shortcut = next(n for n in mods if n.endswith("conv_shortcut"))
    assert (mods[shortcut].rank, mods[shortcut].alpha) == (8, 4.0)
    assert mods[shortcut].down.shape[2:] == (1, 1)
    assert mods["down_blocks.0.resnets.0.conv1"].layer.scaling[ADAPTER] == pytest.approx(1.5)


def test_conv_alpha_defaults_to_one_like_kohya():
    base, _ = lora_base("sd15", conv_dim=4)
    conv1 = by_name(base)[("unet", "mid_block.resnets.0.conv1")]
    assert (conv1.rank, conv1.alpha) == (4, 1.0)


def test_train_flags_choose_components():
    base, _ = lora_base("sdxl", network_train_unet_only=True)
    assert {m.component for m in lora_modules(base)} == {"unet"}
    base, _ = lora_base("sdxl", network_train_text_encoder_only=True)
    assert {m.component for m in lora_modules(base)} == {"te1", "te2"}
    base, _ = lora_base("sd15", text_encoder_lr=0)
    assert {m.component for m in lora_modules(base)} == {"unet"}


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("down_blocks.0.attentions.0.proj_in", "IN01"),
        ("down_blocks.0.resnets.1.conv1", "IN02"),
        ("down_blocks.0.downsamplers.0.conv", "IN03"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "IN04"),
        ("down_blocks.3.resnets.1.conv2", "IN11"),
        ("mid_block.attentions.0.proj_out", "MID"),
        ("mid_block.resnets.1.conv1", "MID"),
        ("up_blocks.0.resnets.0.conv1", "OUT00"),
        ("up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("up_blocks.1.attentions.2.proj_in", "OUT05"),
        ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
        ("conv_in", None),
        ("time_embedding.linear_1", None),
    ],
)
def test_unet_block_labels_follow_kohya(name, label):
    # kohya's get_block_index for SD1.5 (3 = layers_per_block + 1 per block).
    assert unet_block(name, 2) == label


def test_block_weight_presets_and_lengths():
    w = block_lr_weights(make_spec(down_lr_weight="sine", up_lr_weight="cosine", mid_lr_weight=0.5), "sd15")
    sine = [math.sin(math.pi * (i / 11) / 2) for i in range(12)]
    assert [w[f"IN{i:02d}"] for i in range(12)] == pytest.approx(sine)
    assert [w[f"OUT{i:02d}"] for i in range(12)] == pytest.approx(sine[::-1])
    assert w["MID"] == 0.5
    w = block_lr_weights(make_spec("sdxl", down_lr_weight="linear", up_lr_weight="reverse_linear"), "sdxl")
    assert [w[f"IN{i:02d}"] for i in range(9)] == pytest.approx([i / 8 for i in range(9)])
    assert [w[f"OUT{i:02d}"] for i in range(9)] == pytest.approx([i / 8 for i in range(9)][::-1])
    assert w["MID"] == 1.0
    w = block_lr_weights(make_spec(down_lr_weight="zeros"), "sd15")
    assert all(w[f"IN{i:02d}"] == 0 for i in range(12)) and w["OUT03"] == 1.0
    assert block_lr_weights(make_spec(), "sd15") is None
    with pytest.raises(ValueError, match=r"down_lr_weight.*12.*got 9"):
        block_lr_weights(make_spec(down_lr_weight=[1.0] * 9), "sd15")
    with pytest.raises(ValueError, match=r"up_lr_weight.*9.*got 12"):
        block_lr_weights(make_spec("sdxl", up_lr_weight=[1.0] * 12), "sdxl")
    with pytest.raises(ValueError, match="up_lr_weight"):
        add_lora(load_base("tiny:sdxl"), make_spec("sdxl", up_lr_weight=[1.0] * 12))


def test_param_groups_apply_block_weights_and_drop_zero_blocks():
    # The tiny SD1.5 UNet has attentions in IN01, IN02, MID and OUT03..OUT05.
    down = [1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    base, spec = lora_base("sd15", unet_lr=1e-3, text_encoder_lr=1e-4, down_lr_weight=down, mid_lr_weight=0.0)
    groups = param_groups(base, spec)
    names = [g["name"] for g in groups]
    assert names[0] == "text_encoder" and names[1:] == sorted(
        names[1:], key=lambda n: ("IN", "MID", "OUT").index(n[5:].rstrip("0123456789"))
    )
    assert [g["name"] for g in param_groups(base, spec)] == names  # deterministic
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["text_encoder"] == 1e-4
    assert lrs["unet_IN01"] == pytest.approx(2e-3)
    assert lrs["unet_OUT03"] == pytest.approx(1e-3) and lrs["unet_OUT05"] == pytest.approx(1e-3)
    assert "unet_IN02" not in lrs and "unet_MID" not in lrs
    # Zero-weight blocks get no LoRA at all (kohya leaves them out of the network).
    lpb = base.unet.config.layers_per_block
    blocks = {unet_block(m.name, lpb) for m in lora_modules(base) if m.component == "unet"}
    assert "IN02" not in blocks and "MID" not in blocks and {"IN01", "OUT03"} <= blocks
    assert not any(p.requires_grad for n, p in base.unet.named_parameters() if n.startswith("mid_block."))
    # Every trainable LoRA parameter is in exactly one group.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for _, _, p in lora_parameters(base))
    assert len(grouped) == len(set(grouped))


def test_param_groups_freeze_groups_with_zero_lr():
    base, _ = lora_base("sd15", unet_lr=1e-3)
    later = make_spec(unet_lr=1e-3, up_lr_weight=[0.0] * 12)
    groups = param_groups(base, later)
    assert not any(g["name"].startswith("unet_OUT") for g in groups)
    ups = [m for m in lora_modules(base) if m.name.startswith("up_blocks.")]
    assert ups and not any(m.up.requires_grad or m.down.requires_grad for m in ups)
    assert all(m.up.requires_grad for m in lora_modules(base) if m.name.startswith("down_blocks."))
    assert {g["name"] for g in param_groups(base, make_spec(unet_lr=1e-3))} == {"text_encoder", "unet"}


def test_lora_parameters_name_every_trainable_lora_weight():
    base, _ = lora_base("sdxl", conv_dim=2)
    params = lora_parameters(base)
    assert {c for c, _, _ in params} == {"unet", "te1", "te2"}
    assert len(params) == 2 * len(lora_modules(base))
    assert all(p.requires_grad for _, _, p in params)
    assert ("unet", "down_blocks.0.resnets.0.conv1.lora_A") in {(c, n) for c, n, _ in params}
    trainable = sum(p.requires_grad for m in (base.unet, *base.text_encoders) for p in m.parameters())
    assert trainable == len(params)


def test_resume_state_round_trip():
    base, spec = lora_base("sdxl", conv_dim=2)
    randomize_up(base)
    state = lora_state(base)
    assert {k.split(".")[0] for k in state} == {"unet", "te1", "te2"}
    fresh = load_base("tiny:sdxl")
    add_lora(fresh, spec)
    randomize_up(fresh, seed=2)
    load_lora_state(fresh, state)
    for key, value in lora_state(fresh).items():
        assert torch.equal(value, state[key]), key
    other = load_base("tiny:sdxl")
    add_lora(other, make_spec("sdxl", network_dim=4, conv_dim=2))
    with pytest.raises(ValueError, match="does not match"):
        load_lora_state(other, state)
    unet_only = load_base("tiny:sdxl")
    add_lora(unet_only, make_spec("sdxl", conv_dim=2, network_train_unet_only=True))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state(unet_only, state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_lora_init_is_fp32_on_a_low_precision_base(dtype):
    # kohya initialises LoRA in fp32; a bf16 or fp8 base must not quantise the initial weights.
    spec = make_spec("sdxl", conv_dim=2)
    torch.manual_seed(3)
    full = load_base("tiny:sdxl")
    add_lora(full, spec)
    low = load_base("tiny:sdxl").to("cpu", dtype)
    torch.manual_seed(3)
    add_lora(low, spec)
    assert low.unet.conv_in.weight.dtype == dtype  # the frozen base keeps its dtype
    want, got = by_name(full), by_name(low)
    assert want.keys() == got.keys()
    for key, m in got.items():
        assert m.down.dtype == m.up.dtype == torch.float32, key
        assert m.layer.get_base_layer().weight.dtype == dtype, key
        assert torch.equal(m.down, want[key].down) and torch.equal(m.up, want[key].up), key


def test_lora_init_draws_kaiming_uniform_per_module_in_order_from_the_seed():
    # The convention the reference loop in test_parity.py relies on.
    torch.manual_seed(5)
    base, _ = lora_base("sdxl")
    torch.manual_seed(5)
    for m in lora_modules(base):
        want = torch.nn.init.kaiming_uniform_(torch.empty(m.down.shape), a=math.sqrt(5))
        assert torch.equal(m.down, want), m.name
        assert torch.count_nonzero(m.up) == 0
