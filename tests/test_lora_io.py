import hashlib
import json
import re
import time
from functools import cache

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft

from runner.families.ldm import unet_to_ldm
from runner.families.registry import base_to_ldm, load_base, lora_family, save_pipeline
from runner.families.stable_diffusion import kohya_name
from runner.formats import kohya as lora_io
from runner.formats.kohya import (
    LoraFileError,
    TrainingFacts,
    effective_delta,
    read_lora,
    save_lora,
    training_metadata,
)
from runner.spec import TrainSpec
from runner.train.network import ADAPTER, add_lora, kohya_modules, kohya_state_dict, lora_modules


def make_spec(family: str = "sd15", **kw) -> TrainSpec:
    return TrainSpec(output_name="テスト🎨", base=f"tiny:{family}", train_data_dir=".", output_dir=".", **kw)


def trained(family: str = "sd15", **kw):
    """A tiny base with LoRA whose up weights are random, as after some training."""
    base = load_base(f"tiny:{family}")
    spec = make_spec(family, **kw)
    add_lora(base, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.1)
    return base, spec


FACTS = TrainingFacts(
    session_id="123",
    training_started_at=1700000000.5,
    num_train_images=20,
    num_batches_per_epoch=10,
    num_epochs=4,
    max_train_steps=40,
    tag_frequency={"10_demo": {"1girl": 5, "smile": 2}},
    dataset_dirs={"10_demo": {"n_repeats": 10, "img_count": 2}},
    bucket_info={"buckets": {"0": {"resolution": [64, 64], "count": 20}}, "mean_img_ar_error": 0.0},
    optimizer="torch.optim.adamw.AdamW(weight_decay=0.01)",
    lr_warmup_steps=4,
)


TINY = {"lora_unet_m.lora_down.weight": torch.ones(2, 3), "lora_unet_m.lora_up.weight": torch.ones(3, 2)}


def test_key_names_sd15():
    base, _ = trained("sd15")
    keys = kohya_state_dict(base)
    modules = {k.split(".")[0] for k in keys}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te_text_model_encoder_layers_4_mlp_fc2" in modules
    te = [m for m in modules if not m.startswith("lora_unet_")]
    assert te and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(keys)
    assert len(keys) == 3 * len(modules) == 3 * len(lora_modules(base))


def test_key_names_sdxl():
    base, _ = trained("sdxl")
    modules = {k.split(".")[0] for k in kohya_state_dict(base)}
    # kohya's sdxl_train_network.py names the UNet's modules by their original (LDM) paths.
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in modules
    assert not any(re.match(r"lora_unet_(down|mid|up)_block", m) for m in modules)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in modules
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in modules
    assert not any(m.startswith("lora_te_") for m in modules)
    assert not any("text_model_text_model" in m for m in modules)
    assert kohya_name("te2", "text_model.encoder.layers.3.self_attn.out_proj", "sdxl") == (
        "lora_te2_text_model_encoder_layers_3_self_attn_out_proj"
    )


def test_alpha_is_the_real_alpha_and_dtype_follows_save_precision():
    base, _ = trained("sd15", network_dim=8, network_alpha=2, conv_dim=4, conv_alpha=3)
    tensors = kohya_state_dict(base)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    conv3 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv3}.lora_down.weight"].shape[2:] == (3, 3)
    assert float(tensors[f"{conv3}.alpha"]) == 3.0
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    assert float(tensors[f"{linear}.alpha"]) == 2.0
    assert float(tensors["lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha"]) == 2.0
    assert tensors[f"{linear}.alpha"].dim() == 0
    assert kohya_state_dict(base, torch.float32)[f"{linear}.lora_up.weight"].dtype == torch.float32


def test_effective_delta_equals_peft_delta_for_linear_and_convs():
    base, _ = trained("sd15", network_dim=8, network_alpha=2, conv_dim=4, conv_alpha=3)
    tensors = kohya_state_dict(base, torch.float32)
    layers = {(m.component, m.name): m.layer for m in lora_modules(base)}
    cases = {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): 2,  # Linear
        ("unet", "down_blocks.0.attentions.0.proj_in"): 4,  # 1x1 conv (SD1.5 proj_in)
        ("unet", "down_blocks.0.resnets.0.conv1"): 4,  # 3x3 conv
        ("unet", "down_blocks.0.downsamplers.0.conv"): 4,  # 3x3 conv, stride 2
        ("te1", "encoder.layers.2.mlp.fc1"): 2,
    }
    for (comp, name), dims in cases.items():
        layer = layers[(comp, name)]
        delta = effective_delta(tensors, kohya_name(comp, name, "sd15"))
        want = layer.get_delta_weight(ADAPTER)
        assert delta.dim() == dims and delta.shape == layer.get_base_layer().weight.shape
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(effective_delta(tensors, kohya_name(comp, name, "sd15"), 0.5), want * 0.5)
    # And what the peft layer really adds in its forward pass.
    layer = layers[("unet", "down_blocks.0.resnets.0.conv1")]
    x = torch.randn(1, layer.get_base_layer().in_channels, 8, 8)
    with torch.no_grad():
        lora_out = layer(x) - layer.get_base_layer()(x)
    conv = layer.get_base_layer()
    direct = torch.nn.functional.conv2d(
        x,
        effective_delta(tensors, "lora_unet_down_blocks_0_resnets_0_conv1"),
        stride=conv.stride,
        padding=conv.padding,
    )
    torch.testing.assert_close(lora_out, direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="no LoRA module"):
        effective_delta(tensors, "lora_unet_nothing")


def test_effective_delta_without_alpha_means_alpha_equals_rank():
    tensors = {"m.lora_down.weight": torch.ones(2, 3), "m.lora_up.weight": torch.ones(4, 2)}
    torch.testing.assert_close(effective_delta(tensors, "m"), torch.full((4, 3), 2.0))


def _pipeline(base):
    parts = dict(
        unet=base.unet,
        vae=base.vae,
        text_encoder=base.text_encoders[0],
        tokenizer=base.tokenizers[0],
        scheduler=DDPMScheduler.from_config(base.scheduler_config),
    )
    if base.family == "sd15":
        return StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return StableDiffusionXLPipeline(
        **parts, text_encoder_2=base.text_encoders[1], tokenizer_2=base.tokenizers[1]
    )


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.randn(1, 6, generator=g),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10]), ctx, **extra).sample


def _te_out(te) -> torch.Tensor:
    ids = torch.randint(0, 900, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return te(ids).last_hidden_state


def _diffusers_named(base, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with the UNet keys named by diffusers paths, as loracord wrote SDXL files before."""
    old = {
        kohya_name("unet", m.name, "sdxl", base.unet.config): "lora_unet_" + m.name.replace(".", "_")
        for m in lora_modules(base)
        if m.component == "unet"
    }
    renamed = {}
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        renamed[f"{old.get(module, module)}.{part}"] = value
    assert len(renamed) == len(tensors) and set(renamed) != set(tensors)
    return renamed


@pytest.mark.parametrize(
    "family, naming", [("sd15", "kohya"), ("sdxl", "kohya"), ("sdxl", "diffusers paths (older files)")]
)
def test_saved_file_loads_in_diffusers_with_the_trained_weights(tmp_path, family, naming):
    base, spec = trained(family, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    path = tmp_path / "lora.safetensors"
    tensors = kohya_state_dict(base, torch.float32)
    if naming != "kohya":
        tensors = _diffusers_named(base, tensors)
    save_lora(path, tensors, training_metadata(spec, base, FACTS), epoch=1, steps=10)

    plain = load_base(f"tiny:{family}")
    pipe = _pipeline(load_base(f"tiny:{family}"))
    pipe.load_lora_weights(str(path))
    loaded = _unet_out(pipe.unet)
    trained_out, plain_out = _unet_out(base.unet), _unet_out(plain.unet)
    assert (trained_out - plain_out).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained_out, rtol=1e-4, atol=1e-4)

    pipe_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for te, pipe_te, plain_te in zip(base.text_encoders, pipe_tes, plain.text_encoders, strict=True):
        assert (_te_out(te) - _te_out(plain_te)).abs().max() > 1e-2
        torch.testing.assert_close(_te_out(pipe_te), _te_out(te), rtol=1e-4, atol=1e-4)


def test_training_metadata_keys_and_values():
    base, spec = trained(
        "sdxl",
        resolution=(512, 512),
        network_dim=8,
        network_alpha=4,
        conv_dim=2,
        clip_skip=2,
        down_lr_weight="sine",
        mid_lr_weight=0.5,
        trigger_word="zkz",
    )
    meta = training_metadata(spec, base, FACTS)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in (
        "ss_session_id",
        "ss_training_started_at",
        "ss_output_name",
        "ss_learning_rate",
        "ss_text_encoder_lr",
        "ss_unet_lr",
        "ss_num_train_images",
        "ss_num_batches_per_epoch",
        "ss_num_epochs",
        "ss_gradient_checkpointing",
        "ss_gradient_accumulation_steps",
        "ss_max_train_steps",
        "ss_lr_warmup_steps",
        "ss_lr_scheduler",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_mixed_precision",
        "ss_v2",
        "ss_base_model_version",
        "ss_clip_skip",
        "ss_max_token_length",
        "ss_cache_latents",
        "ss_seed",
        "ss_noise_offset",
        "ss_multires_noise_iterations",
        "ss_multires_noise_discount",
        "ss_training_comment",
        "ss_optimizer",
        "ss_max_grad_norm",
        "ss_caption_dropout_rate",
        "ss_min_snr_gamma",
        "ss_sd_model_name",
        "ss_resolution",
        "ss_batch_size_per_device",
        "ss_total_batch_size",
        "ss_flip_aug",
        "ss_shuffle_caption",
        "ss_enable_bucket",
        "ss_min_bucket_reso",
        "ss_max_bucket_reso",
        "ss_keep_tokens",
        "ss_dataset_dirs",
        "ss_tag_frequency",
        "ss_bucket_info",
    ):
        assert key in meta, key
    assert meta["ss_output_name"] == "テスト🎨"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_unet_lr"] == "None" and meta["ss_learning_rate"] == str(spec.learning_rate)
    assert meta["ss_noise_offset"] == "None" and meta["ss_clip_skip"] == "2"
    assert meta["ss_cache_latents"] == "True" and meta["ss_flip_aug"] == "False"
    assert meta["ss_sd_model_name"] == "tiny:sdxl"
    # A built model has no file: kohya's file hashes are left out, not made up.
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta
    assert meta["ss_max_token_length"] == "None"  # kohya's unset value: CLIP's 75 tokens
    assert meta["ss_optimizer"] == FACTS.optimizer and meta["ss_lr_warmup_steps"] == "4"
    assert meta["ss_resolution"] == "(512, 512)"
    assert json.loads(meta["ss_tag_frequency"]) == FACTS.tag_frequency
    assert json.loads(meta["ss_dataset_dirs"]) == FACTS.dataset_dirs
    assert json.loads(meta["ss_bucket_info"]) == FACTS.bucket_info
    args = json.loads(meta["ss_network_args"])
    assert args == {"conv_dim": "2", "conv_alpha": "1.0", "down_lr_weight": "sine", "mid_lr_weight": "0.5"}
    assert meta["modelspec.trigger_phrase"] == "zkz"

    sd15, spec15 = trained("sd15", up_lr_weight=[1.0] * 11 + [0.5])
    meta15 = training_metadata(spec15, sd15, FACTS)
    assert meta15["ss_base_model_version"] == "sd_v1"
    assert meta15["ss_resolution"] == "(64, 64)"  # unset: the base's native size
    assert json.loads(meta15["ss_network_args"]) == {"up_lr_weight": ",".join(["1.0"] * 11 + ["0.5"])}
    plain = training_metadata(make_spec(), sd15, FACTS)
    assert "ss_network_args" not in plain and "modelspec.trigger_phrase" not in plain


def test_long_captions_are_recorded_as_kohyas_max_token_length():
    base, spec = trained("sd15", max_token_length=150)
    assert training_metadata(spec, base, FACTS)["ss_max_token_length"] == "150"


def test_single_file_base_hashes_are_kohyas(tmp_path):
    tiny = load_base("tiny:sd15")
    save_pipeline(tiny, tmp_path / "configs" / "sd15")
    for weights in (tmp_path / "configs").rglob("*.safetensors"):
        weights.unlink()
    path = tmp_path / "my_model.safetensors"
    safetensors.torch.save_file(base_to_ldm(tiny), str(path))
    data = path.read_bytes()
    assert len(data) > 0x110000
    base = load_base(str(path), config_root=tmp_path / "configs")
    meta = training_metadata(make_spec(), base, FACTS)
    # kohya's train_util.calculate_sha256 (the whole file) and model_hash (64 KiB at 1 MiB, 8 hex).
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # A1111's "Model hash" is the first 10 hex digits of the same SHA-256.
    assert base.model_hash == hashlib.sha256(data).hexdigest()[:10]


def _kohya_hashes(file_bytes: bytes, tensors) -> tuple[str, str]:
    """kohya's precalculate_safetensors_hashes, restated: hash a re-serialisation with only ss_* metadata."""
    header_len = int.from_bytes(file_bytes[:8], "little")
    header = json.loads(file_bytes[8 : 8 + header_len])
    ss_only = {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, ss_only)
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n :]).hexdigest(), hashlib.sha256(
        blob[0x100000 : 0x100000 + 0x10000]
    ).hexdigest()[:8]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_save_adds_epoch_modelspec_and_kohya_hashes(tmp_path, family):
    base, spec = trained(family, clip_skip=2, resolution=(512, 768))
    tensors = kohya_state_dict(base)
    # A fixed extra tensor makes the file pass 1 MiB, so the legacy hash reads real bytes.
    tensors["lora_unet_pad.lora_down.weight"] = torch.arange(300_000, dtype=torch.float32).reshape(1000, 300)
    tensors["lora_unet_pad.lora_up.weight"] = torch.ones(2, 1000)
    path = tmp_path / "out" / "テスト-000003.safetensors"
    before = time.time()
    save_lora(path, tensors, training_metadata(spec, base, FACTS), epoch=3, steps=30)
    data = path.read_bytes()
    assert len(data) > 0x110000
    _, meta = read_lora(path)
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("3", "30")
    assert before <= float(meta["ss_training_finished_at"]) <= time.time()
    arch = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "テスト🎨"
    assert meta["modelspec.resolution"] == "512x768"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.implementation"] == (
        "diffusers" if family == "sd15" else "https://github.com/Stability-AI/generative-models"
    )
    assert meta["modelspec.date"].startswith(time.strftime("%Y-"))
    model_hash, legacy = _kohya_hashes(data, tensors)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (model_hash, legacy)
    # The tensor-data hash is also what A1111 computes from the written file itself.
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"previous epoch")
    tensors = TINY

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(lora_io.safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, tensors, {}, epoch=1, steps=1)
    assert path.read_bytes() == b"previous epoch"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_save_refuses_non_string_metadata(tmp_path):
    tensors = TINY
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora(tmp_path / "x.safetensors", tensors, {"ss_network_dim": 4}, epoch=1, steps=1)
    assert list(tmp_path.iterdir()) == []


def test_read_lora_errors(tmp_path):
    with pytest.raises(LoraFileError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(LoraFileError, match="junk.safetensors is not a readable"):
        read_lora(junk)
    good = tmp_path / "good.safetensors"
    tensors = TINY
    save_lora(good, tensors, {}, epoch=1, steps=1)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(LoraFileError, match="not a readable"):
        read_lora(truncated)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, str(checkpoint)
    )
    with pytest.raises(LoraFileError, match="no LoRA weights"):
        read_lora(checkpoint)
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({"lora_unet_m.lora_down.weight": torch.ones(2, 3)}, str(broken))
    with pytest.raises(LoraFileError, match="damaged"):
        read_lora(broken)
    loaded, meta = read_lora(good)
    assert set(loaded) == set(tensors) and meta["ss_epoch"] == "1"


def test_lora_family():
    sd15, _ = trained("sd15")
    sdxl, _ = trained("sdxl")
    assert lora_family(kohya_state_dict(sd15), {}) == "sd15"
    assert lora_family(kohya_state_dict(sdxl), {}) == "sdxl"
    unet_only = {k: v for k, v in kohya_state_dict(sdxl).items() if k.startswith("lora_unet_")}
    assert lora_family(unet_only, {}) is None
    assert lora_family(unet_only, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert lora_family(unet_only, {"ss_base_model_version": "sd_v1"}) == "sd15"
    assert lora_family(unet_only, {"ss_base_model_version": "sd_v2"}) is None

    def attn2(width):
        return {
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(
                4, width
            )
        }

    assert lora_family(attn2(768), {}) == "sd15"
    assert lora_family(attn2(2048), {}) == "sdxl"
    assert lora_family(attn2(1024), {}) is None
    assert (
        lora_family({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)}, {})
        == "flux"
    )


# ---- full-size key names, checked against the original checkpoint layout and other loaders ----


def _meta_base(family: str, **lora):
    """The full-size architecture on the meta device (no memory), with LoRA when settings are given."""
    with torch.device("meta"):
        base = load_base(f"random:{family}")
        if lora:
            add_lora(
                base, TrainSpec(output_name="x", base=base.name, train_data_dir=".", output_dir=".", **lora)
            )
    return base


@cache  # peft takes seconds to add ~1000 LoRA layers; the tests only read these bases
def _meta_lora_base(family: str, conv_dim: int | None, text_encoders: bool = True):
    return _meta_base(family, conv_dim=conv_dim, network_train_unet_only=not text_encoders)


@cache
def _original_unet_layout(family: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The UNet of an original (LDM) single-file checkpoint: {LDM module path: diffusers module path},
    and its weights by LDM key, as diffusers' own single-file converter reads that layout."""
    plain = _meta_base(family)
    sd = plain.unet.state_dict()
    ldm = unet_to_ldm(sd, plain.unet.config)
    converted = convert_ldm_unet_checkpoint(ldm, dict(plain.unet.config))
    # diffusers' converter gives every weight back under its own name: the layout is the original one.
    assert set(converted) == set(sd) and all(converted[k] is sd[k] for k in sd)
    ldm_key = {id(v): k.removeprefix("model.diffusion_model.") for k, v in ldm.items()}
    modules = {ldm_key[id(v)].rpartition(".")[0]: k.rpartition(".")[0] for k, v in converted.items()}
    return modules, {k.removeprefix("model.diffusion_model."): v for k, v in ldm.items()}


def _kohya_sdxl_targets(ldm: dict[str, torch.Tensor], conv: bool) -> set[str]:
    """kohya's networks.lora targets in its SDXL UNet, from the checkpoint layout: every Linear/Conv2d
    (weights of 2+ dims) inside a Transformer2DModel; with conv_dim also inside the ResnetBlock2D,
    Downsample2D and Upsample2D rows (input_blocks 1…, middle_block, output_blocks)."""
    transformers = {k.split(".transformer_blocks.")[0] for k in ldm if ".transformer_blocks." in k}
    blocks = re.compile(r"(input_blocks\.[1-9]\d*|middle_block|output_blocks\.\d+)\.")
    return {
        key.removesuffix(".weight")
        for key, w in ldm.items()
        if key.endswith(".weight")
        and w.dim() >= 2
        and (any(key.startswith(f"{t}.") for t in transformers) or (conv and blocks.match(key)))
    }


@pytest.mark.parametrize("conv_dim", [None, 4])
def test_full_size_sdxl_keys_are_kohyas_ldm_module_names_and_map_back(conv_dim):
    layout, ldm = _original_unet_layout("sdxl")
    expected = _kohya_sdxl_targets(ldm, conv=conv_dim is not None)
    if conv_dim is None:
        # 70 BasicTransformerBlocks × 10 Linear + 11 Transformer2DModels × proj_in/proj_out.
        assert len(expected) == 722
    assert "output_blocks.2.2.conv" in expected or conv_dim is None  # up_blocks.0's upsampler

    base = _meta_lora_base("sdxl", conv_dim, conv_dim is not None)
    unet = [m for m in lora_modules(base) if m.component == "unet"]
    saved = {m.key for m in kohya_modules(base) if m.key.startswith("lora_unet_")}
    assert saved == {"lora_unet_" + path.replace(".", "_") for path in expected}
    # Underscored names stay unambiguous, so each key names one module of the original layout…
    by_key = {"lora_unet_" + path.replace(".", "_"): path for path in layout}
    assert len(by_key) == len(layout)
    # …and it is the module that was trained, by diffusers' reading of the original layout.
    keys = {m.name: kohya_name("unet", m.name, "sdxl", base.unet.config) for m in unet}
    assert {m.name: layout[by_key[keys[m.name]]] for m in unet} == {m.name: m.name for m in unet}
    assert len(set(keys.values())) == len(unet) == len(saved)

    # Back: diffusers' own LoRA reader (what /gen uses) puts every weight on the module it came from.
    tensors = {}
    for m in unet:
        tensors |= {f"{keys[m.name]}.lora_down.weight": m.down, f"{keys[m.name]}.lora_up.weight": m.up}
        tensors[f"{keys[m.name]}.alpha"] = torch.tensor(m.alpha)
    read, _ = StableDiffusionXLPipeline.lora_state_dict(tensors, unet_config=base.unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in read.items()})
    assert len(peft) == 2 * len(unet)
    for m in unet:
        assert peft[f"{m.name}.lora_A.weight"] is m.down and peft[f"{m.name}.lora_B.weight"] is m.up


_A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _a1111_compvis(name: str) -> str:
    """AUTOMATIC1111's convert_diffusers_name_to_compvis (extensions-builtin/Lora/networks.py), restated
    for the modules loracord trains. It assumes SD1.5's block layout for diffusers names."""
    if m := re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        row = 1 + i * 3 + j if side == "down" else i * 3 + j
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"diffusion_model_{blocks}_{row}_0_{_A1111_RESNET.get(rest, rest)}"
        return f"diffusion_model_{blocks}_{row}_1_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        if m[1] == "resnets":
            return f"diffusion_model_middle_block_{int(m[2]) * 2}_{_A1111_RESNET.get(m[3], m[3])}"
        return f"diffusion_model_middle_block_1_{m[3]}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):
        rest = (
            m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        )
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return name


def _a1111_module(name: str, layers: set[str]) -> str | None:
    """The model module A1111's load_network applies LoRA module ``name`` to, or None (skipped)."""
    key = _a1111_compvis(name)
    if key in layers:
        return key
    if (m := re.fullmatch(r"(.*)_[qkv]_proj", key)) and m[1] in layers:
        return m[1]  # q/k/v of OpenCLIP's fused attention
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")  # names that are already LDM paths
        return key if key in layers else None
    for wrapper in ("0_transformer_text_model", "transformer_text_model"):
        key = name.replace("lora_te1_text_model", wrapper)
        if key in layers:
            return key
    return None


def _a1111_layers(base) -> set[str]:
    """A1111's network_layer_mapping names: the checkpoint's module paths with ``_`` for ``.``; the UNet
    under ``diffusion_model``, SDXL's text encoders numbered by embedder, SD1.5's without a prefix."""
    names = set()
    for key in base_to_ldm(base):
        module = key.rpartition(".")[0]
        module = re.sub(r"^model\.|^conditioner\.embedders\.(\d)\.|^cond_stage_model\.", r"\1_", module)
        names.add(module.lstrip("_").replace(".", "_"))
    return names


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a1111_applies_every_module_to_the_layer_it_was_trained_on(family):
    layout, _ = _original_unet_layout(family)
    ldm_path = {diffusers: ldm for ldm, diffusers in layout.items()}
    layers = _a1111_layers(_meta_base(family))
    base = _meta_lora_base(family, 4, True)
    modules = lora_modules(base)
    keys = [kohya_name(m.component, m.name, family, base.unet.config) for m in modules]
    assert any(m.component != "unet" for m in modules) and any("upsamplers" in m.name for m in modules)
    for m, key in zip(modules, keys, strict=True):
        found = _a1111_module(key, layers)
        assert found is not None, f"A1111 skips {key}"
        if m.component == "unet":
            assert found == "diffusion_model_" + ldm_path[m.name].replace(".", "_"), key
    assert len(set(keys)) == len(modules)
    if family == "sdxl":
        # What loracord wrote before: A1111 reads SDXL's diffusers names with SD1.5's layout.
        assert _a1111_module("lora_unet_up_blocks_0_upsamplers_0_conv", layers) is None
