import hashlib
import json
import time

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from runner import lora_io
from runner.lora_io import (
    LoraFileError,
    TrainingFacts,
    effective_delta,
    kohya_name,
    kohya_state_dict,
    lora_family,
    read_lora,
    save_lora,
    training_metadata,
)
from runner.models import load_base
from runner.network import ADAPTER, add_lora, lora_modules
from runner.spec import TrainSpec


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
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k" in modules
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


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_file_loads_in_diffusers_with_the_trained_weights(tmp_path, family):
    base, spec = trained(family, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    path = tmp_path / "lora.safetensors"
    save_lora(
        path, kohya_state_dict(base, torch.float32), training_metadata(spec, base, FACTS), epoch=1, steps=10
    )

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
        "ss_sd_model_hash",
        "ss_new_sd_model_hash",
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
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == (base.legacy_hash, base.model_hash)
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
