"""Z-Image on tiny:zimage: loading (built, folder, ComfyUI single file), detection, the training
objective against ZImagePipeline's own convention, LoRA files as ComfyUI and diffusers read them,
the Turbo training adapter, previews' CFG, presets and refused settings."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from runner.families import zimage
from runner.families.protocol import Batch, ImageSize, ModelError, SampleRequest
from runner.families.registry import (
    base_family,
    load_base,
    lora_family,
    save_pipeline,
)
from runner.spec import SpecError, TrainSpec
from runner.train.loop import concrete_spec
from runner.train.network import add_lora, kohya_state_dict, lora_modules

FAMILY = zimage.FAMILY


def spec_for(**settings) -> TrainSpec:
    return TrainSpec.parse(
        {
            "base": "tiny:zimage",
            "train_data_dir": "unused",
            "output_dir": "unused",
            "output_name": "z",
            "network_dim": 4,
            "network_alpha": 2,  # alpha != rank: every reader must apply alpha / rank
            **settings,
        }
    )


def lora_base():
    """tiny:zimage with LoRA on its transformer, the up weights random (fresh ones are 0)."""
    base = load_base("tiny:zimage")
    torch.manual_seed(1)
    add_lora(base, spec_for())
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.normal_(std=0.5)
    return base


@pytest.fixture(scope="module")
def trained():
    base = lora_base()
    return base, kohya_state_dict(base, torch.float32)


def probe(transformer, caps):
    """The transformer's raw outputs for fixed latents at two times."""
    gen = torch.Generator().manual_seed(3)
    x = list(torch.randn(2, 16, 1, 8, 8, generator=gen).unbind(0))
    with torch.no_grad():
        return torch.stack(transformer(x, torch.tensor([0.3, 0.8]), caps, return_dict=False)[0])


def captions(base, texts=("a cat", "a red fox in the snow")):
    pipe = FAMILY.pipeline(base, None)
    with torch.no_grad():
        return pipe.encode_prompt(list(texts), do_classifier_free_guidance=False)[0]


def merged_state_dict(transformer) -> dict[str, torch.Tensor]:
    """peft's own merge of every LoRA layer, on a copy, under the plain module names."""
    transformer = copy.deepcopy(transformer)
    for m in transformer.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    return {
        k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".lora_" not in k
    }


# ---- loading and detection ----


def test_tiny_model_is_deterministic_with_finite_pad_tokens_and_qwens_chat_template():
    a, b = load_base("tiny:zimage"), load_base("tiny:zimage")
    assert all(torch.equal(v, b.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())
    assert torch.isfinite(a.unet.x_pad_token).all() and torch.isfinite(a.unet.cap_pad_token).all()
    tok = a.tokenizers[0]
    assert type(tok).__name__ == "Qwen2Tokenizer"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert rendered == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert FAMILY.size_step(a) == 8


def test_random_model_is_z_image_turbos_size_on_the_meta_device():
    with torch.device("meta"):
        base = load_base("random:zimage", dtype=torch.bfloat16)
    n = sum(p.numel() for p in base.unet.parameters())
    assert 6.0e9 < n < 6.3e9, n  # Z-Image is a 6B transformer
    assert base.unet.dtype == torch.bfloat16 and base.unet.x_pad_token.is_meta
    qwen = base.text_encoders[0]
    assert qwen.config.hidden_size == base.unet.config.cap_feat_dim == 2560
    assert 3.9e9 < sum(p.numel() for p in qwen.parameters()) < 4.1e9  # Qwen3-4B without its LM head
    assert base.vae.config.latent_channels == base.unet.config.in_channels == 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny:zimage as a diffusers folder and as ComfyUI's single transformer file."""
    root = tmp_path_factory.mktemp("zimage")
    base = load_base("tiny:zimage")
    folder = save_pipeline(base, root / "zimage")  # also config_root/zimage for the single file
    single = root / "z_image_tiny.safetensors"
    save_file(FAMILY.single_file(base), str(single))
    return base, folder, single


def test_a_saved_folder_is_detected_and_loads_the_same_model(saved):
    base, folder, _ = saved
    assert base_family(str(folder)) is FAMILY
    loaded = load_base(str(folder))
    assert loaded.family == "zimage" and loaded.scheduler_config["shift"] == 3.0
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in base.unet.state_dict().items())
    assert loaded.tokenizers[0].chat_template == zimage.CHAT_TEMPLATE


def test_comfyui_single_file_has_fused_qkv_and_loads_back_exactly(saved, monkeypatch):
    base, folder, single = saved
    comfy = FAMILY.single_file(base)
    dim = base.unet.config.dim
    assert comfy["layers.0.attention.qkv.weight"].shape == (3 * dim, dim)
    assert "x_embedder.weight" in comfy and "layers.0.attention.out.weight" in comfy
    assert not any(".to_q." in k or "all_x_embedder" in k for k in comfy)
    assert base_family(str(single)) is FAMILY
    with pytest.raises(ModelError, match="LORACORD_ZIMAGE_COMPONENTS"):
        load_base(str(single))
    monkeypatch.setenv(zimage.COMPONENTS_ENV, str(folder))
    loaded = load_base(str(single), folder.parent)
    assert loaded.name == single.stem and loaded.sha256
    want = base.unet.state_dict()
    assert loaded.unet.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.unet.state_dict().items())


def test_single_files_of_other_models_are_not_taken_for_z_image():
    keys = {"cap_embedder.1.weight", "layers.0.attention.qkv.weight"}
    prefixed = {f"model.diffusion_model.{k}" for k in keys}
    assert FAMILY.claims_file("z.safetensors", prefixed, lambda k: (3840, 2560))
    with pytest.raises(ModelError, match="Lumina-Image 2.0"):
        FAMILY.claims_file("lumina.safetensors", keys, lambda k: (2304, 2304))
    for other in (
        {"double_blocks.0.img_attn.qkv.weight", "img_in.weight"},  # Flux
        {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"},  # SD1.5
        {"conditioner.embedders.1.model.ln_final.weight"},  # SDXL
    ):
        assert not FAMILY.claims_file("x.safetensors", other, lambda k: (1, 1))


def test_lora_files_are_told_apart_by_keys_and_by_version(trained):
    _, tensors = trained
    assert lora_family(tensors, {}) == "zimage"
    assert lora_family({}, {"ss_base_model_version": "zimage"}) == "zimage"
    musubi = {"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 3840)}
    assert lora_family(musubi, {}) == "zimage"
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    assert lora_family(flux, {}) == "flux"
    lumina = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 2304)}
    assert lora_family(lumina, {}) is None


# ---- the objective ----


@pytest.mark.parametrize("kind", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_loss_is_zimage_pipelines_convention_for_every_timestep_sampling(kind):
    base = load_base("tiny:zimage")
    spec = spec_for(timestep_sampling=kind, model_prediction_type="raw")
    objective = FAMILY.objective(base, spec, torch.device("cpu"), torch.float32)
    texts = ["a cat", "a red fox in the snow"]
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = Batch(
        latents,
        objective.encode_text(texts, grad=False),
        [ImageSize((64, 64), (64, 64))] * 2,
    )
    loss = objective.loss(batch, torch.Generator().manual_seed(5))

    # The same draws: noise first, then σ (flow_matching.FlowMatching.loss's order).
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    sigmas = objective._sigmas(2, 64, gen)
    assert ((sigmas > 0) & (sigmas <= 1)).all()
    # ZImagePipeline: the transformer is called with (1000 - 1000σ) / 1000 on a list of (C, 1, H, W)
    # latents and per-caption embeddings, and the Euler step uses minus its output as dx/dσ; the
    # flow x_σ = (1 - σ) x_0 + σ ε has dx/dσ = ε - x_0.
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    out = base.unet(
        list(noisy.unsqueeze(2).unbind(0)),
        (1000 - 1000 * sigmas) / 1000,
        captions(base, texts),
    )[0]
    want = torch.mean((-torch.stack(out).squeeze(2) - (noise - latents)) ** 2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_captions_encoded_alone_and_joined_give_the_batchs_conditioning():
    base = load_base("tiny:zimage")
    objective = FAMILY.objective(base, spec_for(), torch.device("cpu"), torch.float32)
    texts = ["a cat", "a red fox in the snow, detailed"]
    together = objective.encode_text(texts, grad=False)
    joined = type(together).join([objective.encode_text([t], grad=False) for t in texts])
    assert together.mask.sum(1).tolist() == [len(c) for c in captions(base, texts)]
    assert torch.equal(joined.mask, together.mask)
    noisy = torch.randn(2, 16, 8, 8)
    sigmas = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(
            objective.velocity(noisy, sigmas, joined),
            objective.velocity(noisy, sigmas, together),
        )


# ---- LoRA files ----


def comfy_key_map(config) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """ComfyUI's Z-Image LoRA keys (comfy/lora.py model_lora_keys_unet, Lumina2 branch, over
    comfy/utils.py z_image_to_diffusers): ``diffusion_model.<diffusers module>`` -> (the weight it
    patches in ComfyUI's model, (dim, start, length) of the fused qkv or None)."""
    dim = config.dim
    keys = {}
    blocks = [
        *((f"layers.{i}", True) for i in range(config.n_layers)),
        *((f"noise_refiner.{i}", True) for i in range(config.n_refiner_layers)),
        *((f"context_refiner.{i}", False) for i in range(config.n_refiner_layers)),
    ]
    for block, adaln in blocks:
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            keys[f"{block}.attention.{part}"] = (
                f"{block}.attention.qkv.weight",
                (0, i * dim, dim),
            )
        keys[f"{block}.attention.to_out.0"] = (f"{block}.attention.out.weight", None)
        for w in ("w1", "w2", "w3"):
            keys[f"{block}.feed_forward.{w}"] = (
                f"{block}.feed_forward.{w}.weight",
                None,
            )
        if adaln:
            keys[f"{block}.adaLN_modulation.0"] = (
                f"{block}.adaLN_modulation.0.weight",
                None,
            )
    keys["all_final_layer.2-1.linear"] = ("final_layer.linear.weight", None)
    keys["all_x_embedder.2-1"] = ("x_embedder.weight", None)
    return {f"diffusion_model.{k}": v for k, v in keys.items()}


def test_every_saved_key_is_one_comfyui_maps_and_patching_the_comfy_way_equals_peft(
    trained,
):
    base, tensors = trained
    key_map = comfy_key_map(base.unet.config)
    # ComfyUI's LoRAAdapter.load: "<key>.lora_up.weight" + "<key>.lora_down.weight", "<key>.alpha".
    modules = {re.sub(r"\.(lora_up\.weight|lora_down\.weight|alpha)$", "", k) for k in tensors}
    assert len(tensors) == 3 * len(modules) == 3 * len(lora_modules(base))
    assert modules <= key_map.keys(), sorted(modules - key_map.keys())[:3]

    plain = {
        k.replace(".base_layer.", "."): v for k, v in base.unet.state_dict().items() if ".lora_" not in k
    }
    comfy = {k: v.clone() for k, v in zimage.to_comfy(plain).items()}
    for key in modules:
        target, offset = key_map[key]
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        patch = comfy[target] if offset is None else comfy[target].narrow(*offset)
        patch += (tensors[f"{key}.alpha"] / down.shape[0]) * (up @ down)
    want = zimage.to_comfy(merged_state_dict(base.unet))
    assert comfy.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(comfy[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        want["layers.0.attention.qkv.weight"],
        zimage.to_comfy(plain)["layers.0.attention.qkv.weight"],
    )


@pytest.mark.parametrize("convert", [True, False], ids=["loadable_lora", "diffusers_own_converter"])
def test_zimage_pipeline_loads_the_file_and_gives_the_trained_outputs(trained, convert):
    base, tensors = trained
    fresh = load_base("tiny:zimage")
    pipe = FAMILY.pipeline(fresh, None)
    caps = captions(fresh)
    untouched = probe(fresh.unet, caps)
    pipe.load_lora_weights(
        FAMILY.loadable_lora(tensors, fresh) if convert else dict(tensors),
        adapter_name="user",
    )
    want = probe(base.unet, caps)
    torch.testing.assert_close(probe(pipe.transformer, caps), want, rtol=1e-4, atol=1e-5)
    assert (want - untouched).abs().max() > 1e-3


def test_ai_toolkit_lora_a_b_files_without_alpha_read_as_scale_one(trained):
    base, tensors = trained
    renamed = {
        k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
        for k, v in tensors.items()
        if not k.endswith(".alpha")
    }
    ours = FAMILY.loadable_lora(tensors, base)
    theirs = FAMILY.loadable_lora(renamed, base)
    key = "transformer.layers.0.attention.to_q.lora_A.weight"
    torch.testing.assert_close(theirs[key] * 2 / 4, ours[key])  # alpha 2, rank 4
    with pytest.raises(ValueError, match="no module of this model"):
        FAMILY.loadable_lora(
            {
                "diffusion_model.layers.9.attention.to_q.lora_A.weight": torch.zeros(4, 32),
                "diffusion_model.layers.9.attention.to_q.lora_B.weight": torch.zeros(32, 4),
            },
            base,
        )


# ---- the Turbo training adapter ----


def adapter_file(path: Path, base) -> Path:
    """A LoRA in ai-toolkit's layout, as ostris' training adapter is: attention of every layer."""
    gen = torch.Generator().manual_seed(7)
    dim = base.unet.config.dim
    tensors = {}
    for i in range(base.unet.config.n_layers):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"diffusion_model.layers.{i}.attention.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, dim, generator=gen) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(dim, 8, generator=gen) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_training_adapter_is_merged_left_out_of_files_and_taken_off_for_previews(
    tmp_path,
):
    base = load_base("tiny:zimage")
    path = adapter_file(tmp_path / "zimage_turbo_training_adapter_v2.safetensors", base)
    FAMILY.prepare_training(base, spec_for(training_adapter=str(path)), torch.float32)

    # Merged exactly as diffusers fuses the same file.
    reference = load_base("tiny:zimage")
    ref_pipe = FAMILY.pipeline(reference, None)
    ref_pipe.load_lora_weights(str(path), adapter_name="adapter")
    ref_pipe.fuse_lora(lora_scale=1.0)
    ref_pipe.unload_lora_weights()
    for k, v in reference.unet.state_dict().items():
        torch.testing.assert_close(base.unet.state_dict()[k], v, rtol=1e-5, atol=1e-6)

    torch.manual_seed(1)
    add_lora(base, spec_for())
    with torch.no_grad():
        for m in lora_modules(base):
            m.up.normal_(std=0.5)
    tensors = kohya_state_dict(base, torch.float32)
    assert len(tensors) == 3 * len(lora_modules(base))  # the user's LoRA only

    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    caps = captions(base)
    with_adapter = probe(base.unet, caps)
    with zimage.without_adapter(base):
        previewed = probe(base.unet, caps)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in weights.items())  # untouched
    assert torch.equal(probe(base.unet, caps), with_adapter)
    # Turbo + the user's LoRA, without the adapter: the original weights with the LoRA loaded.
    original_pipe = FAMILY.pipeline(load_base("tiny:zimage"), None)
    original_pipe.load_lora_weights(FAMILY.loadable_lora(tensors, base), adapter_name="user")
    torch.testing.assert_close(previewed, probe(original_pipe.transformer, caps), rtol=1e-4, atol=1e-5)
    assert (previewed - with_adapter).abs().max() > 1e-3

    meta = FAMILY.metadata(spec_for(training_adapter=str(path)))
    assert meta["ss_training_adapter"] == path.name
    assert meta["ss_training_adapter_hash"] == zimage.file_sha256(path)


def test_a_training_adapter_for_another_model_is_refused(tmp_path):
    base = load_base("tiny:zimage")
    path = tmp_path / "other.safetensors"
    save_file(
        {
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 3840),
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(3840, 4),
        },
        str(path),
    )
    with pytest.raises(ModelError, match="does not fit this model"):
        FAMILY.prepare_training(base, spec_for(training_adapter=str(path)), torch.float32)


# ---- previews ----


def test_previews_skip_cfg_at_scale_1_and_use_diffusers_guidance_as_cfg_minus_1():
    base = load_base("tiny:zimage")
    pipe = FAMILY.pipeline(base, None)
    calls = []
    hook = base.unet.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))

    def render(cfg, steps):
        request = SampleRequest("a cat", "", 64, 64, steps, cfg, 0.0, None, seed=1)
        return FAMILY.render_latents(
            base, pipe, request, torch.Generator().manual_seed(1), torch.device("cpu")
        )

    render(1.0, 3)
    assert calls == [1, 1, 1]  # Turbo: one pass a step, no negative
    calls.clear()
    latents = render(3.0, 1)
    hook.remove()
    assert calls == [2]
    # One step from σ = 1 to 0: x_0 = noise - dx/dσ, with A1111's/ComfyUI's CFG neg + cfg (pos - neg)
    # on the raw outputs (minus dx/dσ).
    noise = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    x = [noise.unsqueeze(2)[0]]
    with torch.no_grad():
        pos = base.unet(x, torch.zeros(1), captions(base, ["a cat"]))[0][0].squeeze(1)
        neg = base.unet(x, torch.zeros(1), captions(base, [""]))[0][0].squeeze(1)
    torch.testing.assert_close(latents[0], noise[0] + neg + 3.0 * (pos - neg), rtol=1e-4, atol=1e-5)
    assert (
        FAMILY.gen_cfg_scale(7.0, explicit=False) == 1.0 and FAMILY.gen_cfg_scale(3.0, explicit=True) == 3.0
    )


# ---- settings ----


def test_presets_train_the_transformer_by_flow_matching_with_turbos_preview_steps():
    for kind in ("character", "style", "concept"):
        preset = FAMILY.preset(kind)
        assert preset["network_train_unet_only"] and preset["sample_steps"] == 8
        assert preset["timestep_sampling"] == "shift" and preset["discrete_flow_shift"] == 3.0
        assert preset["model_prediction_type"] == "raw" and "min_snr_gamma" not in preset
    # A preset passes its own family's rules; the member's own settings win over it.
    spec = concrete_spec(spec_for(preset="style", sample_steps=12), load_base("tiny:zimage"))
    assert (spec.network_dim, spec.sample_steps, spec.timestep_sampling) == (4, 12, "shift")
    assert FAMILY.sample_defaults["cfg_scale"] == 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clip_skip": 2}, "clip_skip: Z-Image reads Qwen3's second-to-last layer"),
        (
            {"min_snr_gamma": 5.0},
            "min_snr_gamma: min-SNR weighting is for noise-prediction models",
        ),
        (
            {"guidance_scale": 2.0},
            "guidance_scale: Z-Image has no distilled-guidance input",
        ),
        ({"conv_dim": 4}, "conv_dim: Z-Image's transformer has no convolutions"),
        ({"text_encoder_lr": 5e-5}, "text_encoder_lr: Z-Image trains its transformer only"),
        ({"fp8_base": True, "mixed_precision": "no"}, "fp8_base needs mixed_precision"),
        ({"bucket_reso_steps": 12}, "bucket_reso_steps must be a multiple of 8 for Z-Image (got 12)"),
    ],
)
def test_settings_that_do_not_apply_to_z_image_are_refused_with_the_reason(settings, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        concrete_spec(spec_for(**settings), load_base("tiny:zimage"))
