"""Flux.1 LoRAs on tiny:flux: kohya's fused key names and alphas, exact effective weights, loading in
diffusers, training (files, metadata, determinism, previews), generation, and refused settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.training_utils import cast_training_params
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runner.families.flow_matching import store_fp8
from runner.families.flux import FlowMatching, diffusers_state_dict
from runner.families.protocol import Batch
from runner.families.registry import load_base
from runner.formats.kohya import effective_delta
from runner.gen.generate import gen_images
from runner.gen.pipelines import PipelineCache
from runner.selftest import make_demo_dataset
from runner.spec import DoneEvent, FailedEvent, GenSpec, SpecError, TrainSpec
from runner.train.loop import concrete_spec, train
from runner.train.network import add_lora, kohya_state_dict, lora_modules


def spec_for(**settings) -> TrainSpec:
    return TrainSpec.parse(
        {
            "base": "tiny:flux",
            "train_data_dir": "unused",
            "output_dir": "unused",
            "output_name": "f",
            "network_dim": 4,
            "network_alpha": 2,
            **settings,
        }
    )


def lora_base(**settings):
    """tiny:flux with LoRA on the transformer and CLIP-L, its up weights random (fresh ones are 0)."""
    base = load_base("tiny:flux")
    torch.manual_seed(1)
    add_lora(base, spec_for(**settings))
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.normal_(std=0.5)
    return base


def test_fused_kohya_modules_hold_exactly_the_trained_weights():
    base = lora_base()
    tensors = kohya_state_dict(base, torch.float32)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    per_double = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin"]
    per_double += [n.replace("img", "txt") for n in per_double]
    expected = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in per_double}
    expected |= {
        f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2", "modulation_lin")
    }
    expected |= {
        f"lora_te1_text_model_encoder_layers_{i}_{n}"
        for i in range(5)
        for n in (
            "self_attn_q_proj",
            "self_attn_k_proj",
            "self_attn_v_proj",
            "self_attn_out_proj",
            "mlp_fc1",
            "mlp_fc2",
        )
    }
    assert names == expected
    # q/k/v fused: rank 3r and alpha 3α, so alpha/rank stays 2/4; linear1 fuses q, k, v and the MLP.
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 16)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (48, 12)
    assert float(tensors[f"{qkv}.alpha"]) == 6.0
    assert float(tensors["lora_unet_single_blocks_1_linear1.alpha"]) == 8.0
    assert float(tensors["lora_unet_double_blocks_1_txt_mod_lin.alpha"]) == 2.0

    # Every diffusers module's own up·down·α/r is its rows of the fused module's delta.
    live = {m.name: m for m in lora_modules(base) if m.component == "unet"}
    checked = 0
    for key in sorted(n for n in expected if n.startswith("lora_unet")):
        match = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+)", key)
        kind, i, rest = match.groups()
        prefix = f"transformer_blocks.{i}." if kind == "double" else f"single_transformer_blocks.{i}."
        parts = {
            "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
            "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
        }.get(rest, [None])
        deltas = []
        for part in parts:
            name = prefix + part if part else next(n for n in live if n.startswith(prefix) and _bfl(n) == key)
            m = live[name]
            deltas.append(m.up.detach() @ m.down.detach() * (m.alpha / m.rank))
            checked += 1
        torch.testing.assert_close(effective_delta(tensors, key), torch.cat(deltas), rtol=1e-5, atol=1e-6)
    assert checked == len(live)


def _bfl(name: str) -> str:
    from runner.families.flux import kohya_module

    return kohya_module(name)[0]


def transformer_output(base, seed: int = 0) -> torch.Tensor:
    t = base.unet
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, 16, t.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, t.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, t.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }
    with torch.no_grad():
        return t(**{k: v.to(t.device, t.dtype) for k, v in inputs.items()}, return_dict=False)[0]


def pipeline_of(base) -> FluxPipeline:
    from runner.families.flux import flux_pipeline

    return flux_pipeline(base)


def clip_pooled(base) -> torch.Tensor:
    ids = base.tokenizers[0](
        ["a photo of sks"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return base.text_encoders[0](ids).pooler_output


def test_diffusers_own_kohya_loader_gives_the_trained_outputs():
    # diffusers' converter hard-codes FLUX.1's single-block widths, so this file has double blocks only
    # (the GPU test below loads a full-size file with single blocks).
    # Transformer keys only: with transformers 5 (no text_model wrapper in CLIPTextModel) diffusers'
    # converter does not put lora_te1_ weights where they belong; the generation loader below does.
    trained = lora_base()
    trained.unet.single_transformer_blocks = torch.nn.ModuleList()
    tensors = {
        k: v for k, v in kohya_state_dict(trained, torch.float32).items() if k.startswith("lora_unet_")
    }
    fresh = load_base("tiny:flux")
    fresh.unet.single_transformer_blocks = torch.nn.ModuleList()
    before = transformer_output(fresh)
    pipeline_of(fresh).load_lora_weights(tensors)
    after = transformer_output(fresh)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, transformer_output(trained), rtol=1e-4, atol=1e-5)


def test_generation_loader_gives_the_trained_outputs_for_any_size():
    trained = lora_base()
    tensors = kohya_state_dict(trained, torch.float32)
    fresh = load_base("tiny:flux")
    pipeline_of(fresh).load_lora_weights(diffusers_state_dict(tensors, fresh.unet, fresh.text_encoders[0]))
    torch.testing.assert_close(transformer_output(fresh), transformer_output(trained), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip_pooled(fresh), clip_pooled(trained), rtol=1e-4, atol=1e-5)


def test_split_is_exact_for_files_whose_fused_up_is_not_block_diagonal():
    base = load_base("tiny:flux")
    g = torch.Generator().manual_seed(3)
    key = "lora_unet_single_blocks_0_linear1"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(6, 16, generator=g),
        f"{key}.lora_up.weight": torch.randn(112, 6, generator=g),
        f"{key}.alpha": torch.tensor(3.0),
    }
    split = diffusers_state_dict(tensors, base.unet, base.text_encoders[0])
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    rows = [
        split[f"transformer.single_transformer_blocks.0.{p}.lora_B.weight"]
        @ split[f"transformer.single_transformer_blocks.0.{p}.lora_A.weight"]
        for p in parts
    ]
    torch.testing.assert_close(torch.cat(rows), effective_delta(tensors, key))
    with pytest.raises(ValueError, match="lora_unet_nowhere"):
        diffusers_state_dict(
            {
                "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1),
            },
            base.unet,
            base.text_encoders[0],
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clip_skip": 2}, "clip_skip: Flux reads"),
        ({"max_token_length": 150}, "t5xxl_max_token_length"),
        ({"min_snr_gamma": 5}, "flow matching"),
        ({"conv_dim": 4}, "LoCon"),
        (
            {"noise_offset": 0.05, "weighted_captions": True},
            "noise_offset.*weighted_captions|weighted_captions.*noise_offset",
        ),
        ({"bucket_reso_steps": 10}, r"bucket_reso_steps must be a multiple of 8 for Flux \(got 10\)"),
    ],
)
def test_settings_that_do_not_apply_to_flux_are_refused_with_the_reason(settings, message):
    with pytest.raises(SpecError, match=message):
        concrete_spec(spec_for(**settings), load_base("tiny:flux"))


def test_flux_only_settings_are_refused_for_sd():
    spec = spec_for(base="tiny:sd15", guidance_scale=1.0, timestep_sampling="shift")
    with pytest.raises(SpecError, match="guidance_scale applies to Flux bases only; timestep_sampling"):
        concrete_spec(spec, load_base("tiny:sd15"))


def test_flux_presets_use_flux_settings():
    spec = concrete_spec(spec_for(preset="character"), load_base("tiny:flux"))
    assert spec.network_dim == 4  # the member's own settings win
    assert (spec.timestep_sampling, spec.model_prediction_type, spec.guidance_scale) == ("shift", "raw", 1.0)
    assert spec.min_snr_gamma is None and spec.network_train_unet_only


@pytest.mark.parametrize("kind", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_timestep_sampling_gives_sigmas_in_range(kind):
    base = load_base("tiny:flux")
    objective = FlowMatching(base, spec_for(timestep_sampling=kind), torch.device("cpu"), torch.float32)
    sigmas = objective._sigmas(4000, 64, torch.Generator().manual_seed(0))
    assert sigmas.shape == (4000,) and bool(((sigmas > 0) & (sigmas <= 1)).all())
    if kind == "shift":  # a shift of 3 moves training towards the noisy end
        plain = FlowMatching(base, spec_for(timestep_sampling="sigmoid"), torch.device("cpu"), torch.float32)
        assert sigmas.mean() > plain._sigmas(4000, 64, torch.Generator().manual_seed(0)).mean() + 0.1


def kohya_flux_loss(base, batch: Batch, gen: torch.Generator, kind: str) -> torch.Tensor:
    """kohya's flux_train_network loss for timestep_sampling=uniform, written out from its source:
    noise, σ ~ U(0, 1), x_t = (1 - σ) x_0 + σ ε, then flux_train_utils.apply_model_prediction_type:
    raw: pred; additive: pred + x_t; sigma_scaled: pred · (-σ) + x_t (weighting_scheme uniform: 1);
    target = noise - latents; MSE."""
    latents = batch.latents
    b, c, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=gen)
    sigmas = torch.rand(b, generator=gen).view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * latents + sigmas * noise
    with torch.no_grad():
        packed = base.unet(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=sigmas.flatten(),
            guidance=torch.full((b,), 3.5),
            pooled_projections=batch.cond.pooled,
            encoder_hidden_states=batch.cond.hidden_states,
            txt_ids=torch.zeros(batch.cond.hidden_states.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype),
            return_dict=False,
        )[0]
    pred = FluxPipeline._unpack_latents(packed, h * 2, w * 2, 2)
    pred = {"raw": pred, "additive": pred + noisy, "sigma_scaled": pred * (-sigmas) + noisy}[kind]
    return ((pred - (noise - latents)) ** 2).mean()


@pytest.mark.parametrize("kind", ["raw", "additive", "sigma_scaled", None])
def test_model_prediction_type_is_kohyas_with_kohyas_default(kind):
    base = load_base("tiny:flux")
    settings = {"timestep_sampling": "uniform", "t5xxl_max_token_length": 16}
    spec = spec_for(**settings, **({"model_prediction_type": kind} if kind else {}))
    objective = FlowMatching(base, spec, torch.device("cpu"), torch.float32)
    cond = objective.encode_text(["a photo of sks", "sks"], grad=False)
    batch = Batch(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), cond, None)
    with torch.no_grad():
        loss = objective.loss(batch, torch.Generator().manual_seed(0))
    # Unset, it is kohya's flux_train_network default: sigma_scaled.
    expected = kohya_flux_loss(base, batch, torch.Generator().manual_seed(0), kind or "sigma_scaled")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert spec.model_prediction_type == (kind or "sigma_scaled")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), count=3, repeats=1)


def run(out: Path, data: Path, **settings):
    defaults = {
        "train_data_dir": str(data),
        "output_dir": str(out),
        "trigger_word": "sks",
        "max_train_epochs": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "sample_every_n_epochs": 0,
        "t5xxl_max_token_length": 16,
    }
    spec = spec_for(**(defaults | settings))
    events: list = []
    result = train(spec, events.append, device="cpu")
    return result, events


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("flux")
    result, events = run(
        out,
        data,
        max_train_epochs=2,
        sample_every_n_epochs=2,
        sample_steps=2,
        sample_prompts=["sks --g 2.5 --d 5"],
    )
    assert isinstance(result, DoneEvent), result
    return result, events


def test_training_writes_kohya_flux_files_with_metadata_and_previews(trained):
    result, events = trained
    assert [Path(p).name for p in result.epoch_files] == ["f-000001.safetensors", "f-000002.safetensors"]
    tensors = load_file(result.lora_file)
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in tensors)
    assert not any(k.startswith(("lora_te2_", "lora_te3_")) for k in tensors)  # T5 stays frozen
    assert all(tensors[k].abs().sum() > 0 for k in tensors if k.endswith("lora_up.weight"))
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_guidance_scale"]) == (
        "4",
        "2.0",
        "3.5",
    )
    assert meta["ss_timestep_sampling"] == "sigma" and json.loads(meta["ss_tag_frequency"])
    assert "modelspec.prediction_type" not in meta
    (epoch2,) = [e for e in events if getattr(e, "epoch", None) == 2 and e.type == "epoch"]
    text = Image.open(epoch2.sample_images[0]).info["parameters"]
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 5" in text


def test_clip_l_trained_caches_t5_alone_and_only_clip_l_runs_in_a_step(tmp_path, data, monkeypatch):
    import runner.train.loop as train_module

    log: list = []  # the trainer's events and each text encoder's forward calls, in order

    def hooked(name, **kwargs):
        base = load_base(name, **kwargs)
        for label, encoder in zip(("clip", "t5"), base.text_encoders, strict=True):
            encoder.register_forward_hook(lambda *_, label=label: log.append(label))
        return base

    monkeypatch.setattr(train_module, "load_base", hooked)
    spec = spec_for(
        train_data_dir=str(data),
        output_dir=str(tmp_path),
        trigger_word="sks",
        max_train_epochs=2,
        sample_every_n_epochs=0,
        t5xxl_max_token_length=16,
    )
    result = train(spec, log.append, device="cpu")
    assert isinstance(result, DoneEvent), result
    notes = [e.message for e in log if getattr(e, "stage", None) == "text_encoders"]
    assert notes == ["CLIP-L runs on every step (CLIP-L trained); T5-XXL encodes each caption once"]
    first_step = next(i for i, e in enumerate(log) if getattr(e, "type", None) == "progress")
    steps = sum(getattr(e, "type", None) == "progress" for e in log)
    assert log[:first_step].count("t5") == 3  # the three captions, once each
    assert "t5" not in log[first_step:] and log[first_step:].count("clip") == steps - 1
    tensors = load_file(result.lora_file)
    te_ups = [v for k, v in tensors.items() if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert te_ups and all(v.abs().sum() > 0 for v in te_ups)  # CLIP-L trained beside the cached T5


def test_same_seed_same_lora(tmp_path, data):
    first, _ = run(tmp_path / "a", data, max_train_steps=2, max_train_epochs=None)
    again, _ = run(tmp_path / "b", data, max_train_steps=2, max_train_epochs=None)
    a, b = load_file(first.lora_file), load_file(again.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_base_stores_the_frozen_transformer_in_fp8_and_trains_lora_in_fp32():
    base = load_base("tiny:flux")
    spec = spec_for(
        fp8_base=True, mixed_precision="bf16", network_train_unet_only=True, t5xxl_max_token_length=16
    )
    store_fp8(base.unet, torch.float32)
    objective = FlowMatching(base, spec, torch.device("cpu"), torch.float32)
    add_lora(base, spec)
    cast_training_params(base.unet, torch.float32)  # as the trainer does; peft made them fp8 like their base
    assert base.unet.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(m.down.dtype == m.up.dtype == torch.float32 for m in lora_modules(base))
    cond = objective.encode_text(["a photo of sks"], grad=False)
    gen = torch.Generator().manual_seed(0)
    loss = objective.loss(Batch(torch.randn(1, 4, 8, 8, generator=gen), cond, None), gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(m.up.grad is not None and m.up.grad.abs().sum() > 0 for m in lora_modules(base))


def test_fp8_base_loads_in_bf16_and_is_fp8_before_it_reaches_the_device(tmp_path, data, monkeypatch):
    import runner.train.loop as train_module

    loaded: list = []
    moves: list = []  # (the dtype of a frozen transformer weight, the .to() call's arguments)

    def recording(name, **kwargs):
        base = load_base(name, **kwargs)
        unet = base.unet
        loaded.append({p.dtype for p in unet.parameters()})
        to = unet.to

        def record_to(*args, **kw):
            moves.append((unet.transformer_blocks[0].attn.to_q.weight.dtype, args, kw))
            return to(*args, **kw)

        unet.to = record_to
        return base

    monkeypatch.setattr(train_module, "load_base", recording)
    result, _ = run(tmp_path, data, fp8_base=True, mixed_precision="bf16", max_train_epochs=1)
    assert isinstance(result, DoneEvent), result
    assert loaded == [{torch.bfloat16}]  # never fp32 on the host
    to_device = [
        m for m in moves if any(isinstance(a, (str, torch.device)) for a in m[1]) or "device" in m[2]
    ]
    assert to_device and all(dtype == torch.float8_e4m3fn for dtype, *_ in to_device)
    with pytest.raises(SpecError, match="fp8_base needs mixed_precision=bf16"):
        concrete_spec(spec_for(fp8_base=True), load_base("tiny:flux"))


def test_refusals_reach_the_member_as_failed_events(tmp_path, data):
    result, _ = run(tmp_path, data, clip_skip=2)
    assert isinstance(result, FailedEvent) and result.kind == "bad_input" and "clip_skip" in result.reason


def test_gen_with_the_trained_lora_changes_the_image_and_describes_it(trained, tmp_path):
    result, _ = trained
    cache = PipelineCache("cpu")
    common = {
        "base": "tiny:flux",
        "output_dir": str(tmp_path),
        "seed": 3,
        "steps": 2,
        "lora_dir": str(Path(result.lora_file).parent),
    }
    (plain,) = gen_images(GenSpec.parse({**common, "prompt": "sks"}), cache)
    (with_lora,) = gen_images(
        GenSpec.parse({**common, "prompt": "sks <lora:f:1>", "guidance_scale": 2}), cache
    )
    (again,) = gen_images(GenSpec.parse({**common, "prompt": "sks <lora:f:1>", "guidance_scale": 2}), cache)
    px = [torch.tensor(list(img.image.getdata()), dtype=torch.float32) for img in (plain, with_lora, again)]
    assert (px[0] - px[1]).abs().mean() > 1 and torch.equal(px[1], px[2])
    assert "CFG scale: 1, Distilled CFG Scale: 2," in with_lora.parameters
    assert 'Lora hashes: "f: ' in with_lora.parameters
    sd = tmp_path / "sd.safetensors"
    down = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    save_file(
        {down: torch.zeros(1, 768), down.replace("down", "up"): torch.zeros(1, 1)},
        str(sd),
        {"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(
        SpecError, match="is an SD1.5 LoRA; it cannot be used with tiny:flux, an Flux.1 model"
    ):
        gen_images(GenSpec.parse({**common, "prompt": "sks", "loras": [{"name": str(sd)}]}), cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_flux_lora_trains_on_the_gpu_and_loads_in_diffusers(tmp_path, monkeypatch):
    """random:flux at 1024², batch 1, rank 16, bf16, fp8 base, gradient checkpointing, cached text: the
    README's 24 GB claim. Peak VRAM and samples/s are printed as one JSON line (bench/run_all.py's
    "flux fp8_base" step records it for docs/benchmarks.md); first, diffusers' own converter (which
    only knows FLUX.1's sizes) reading a full-size file, single blocks included, as peft computes."""
    import time

    import runner.train.loop as train_module

    with torch.device("cuda"):  # random init of 17B parameters takes seconds here, minutes on a CPU
        base = load_base("random:flux", dtype=torch.bfloat16)
    # diffusers' own converter at FLUX.1's real sizes, single blocks included, before any training.
    add_lora(base, spec_for(network_dim=16, network_alpha=16, network_train_unet_only=True))
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.normal_(std=0.01)
    with_lora = transformer_output(base).float()
    tensors = kohya_state_dict(base, torch.float32)
    assert "lora_unet_single_blocks_37_linear1.lora_down.weight" in tensors
    pipe = pipeline_of(base)
    base.unet.delete_adapters("default")
    pipe.load_lora_weights(tensors)
    torch.testing.assert_close(transformer_output(base).float(), with_lora, rtol=0.02, atol=0.02)
    pipe.unload_lora_weights()
    # The trainer starts from the host, where load_base leaves a base (in bf16): the peak below is
    # what a member's run holds on the GPU.
    base.to("cpu")
    torch.cuda.empty_cache()
    monkeypatch.setattr(train_module, "load_base", lambda name, **_: base)
    data = make_demo_dataset(tmp_path / "data", count=4, repeats=1, size=(1024, 1024))
    spec = spec_for(
        train_data_dir=str(data),
        output_dir=str(tmp_path / "out"),
        base="random:flux",
        network_dim=16,
        network_alpha=16,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        fp8_base=True,
        network_train_unet_only=True,
        max_train_steps=4,
        max_train_epochs=None,
        sample_every_n_epochs=0,
        resolution=1024,
    )
    torch.cuda.reset_peak_memory_stats()
    events: list = []
    started = time.monotonic()
    result = train(spec, events.append, device="cuda")
    assert isinstance(result, DoneEvent), result
    last = [e for e in events if e.type == "progress"][-1]
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(
        json.dumps(
            {
                "bench": "train random:flux 1024² batch 1 rank 16 bf16 fp8_base gradient_checkpointing cached text",
                "device": torch.cuda.get_device_name(),
                "peak_vram_gib": round(peak_gib, 2),
                "peak_vram_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "samples_per_s": round(last.samples_per_s, 3),
                "seconds": round(time.monotonic() - started, 1),
            }
        ),
        flush=True,
    )
    assert "lora_unet_single_blocks_37_linear1.lora_down.weight" in load_file(result.lora_file)
    assert base.unet.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert base.text_encoders[1].device.type == "cpu"  # T5 left the GPU once the captions were cached
    # A 24 GB card has 24 GiB, less the CUDA context and the allocator's slack.
    assert torch.cuda.max_memory_reserved() / 2**30 < 23, "fp8_base does not fit a 24 GB card"
