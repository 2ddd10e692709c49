from importlib.metadata import version
from typing import get_args

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from peft import LoraConfig
from PIL import Image

from runner.families.registry import load_base
from runner.gen.sample_prompts import DEFAULT_NEGATIVE, SamplePrompt, default_sample_prompts
from runner.gen.sampler import (
    SAMPLERS,
    Sampler,
    _sampling_mode,
    make_scheduler,
    parse_sample_prompt,
    resolve_sampler,
    save_png,
)
from runner.spec import GenSampler, SampleSampler

DEFAULTS = dict(width=64, height=64, steps=2, sampler="euler_a", seed=7)
VERSION = version("loracord")


def sp(prompt: str = "a photo of sks", **kw) -> SamplePrompt:
    return SamplePrompt(prompt, **{"width": 64, "height": 64, "steps": 2, "seed": 1, **kw})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd15() -> Sampler:
    return Sampler(load_base("tiny:sd15"), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sdxl() -> Sampler:
    return Sampler(load_base("tiny:sdxl"), device="cpu", dtype=torch.float32)


# ---- prompt lines ----


def test_parse_kohya_example():
    got = parse_sample_prompt(
        "a photo of sks --n lowres, bad hands --w 512 --h 768 --d 42 --l 7 --s 20", **DEFAULTS
    )
    assert got == SamplePrompt(
        "a photo of sks",
        negative="lowres, bad hands",
        width=512,
        height=768,
        seed=42,
        cfg_scale=7.0,
        steps=20,
        sampler="euler_a",
    )


def test_parse_fills_defaults_and_follows_kohya_rules():
    assert parse_sample_prompt("  just a prompt  ", **DEFAULTS) == SamplePrompt(
        "just a prompt", width=64, height=64, seed=7, steps=2, sampler="euler_a"
    )
    got = parse_sample_prompt("x --W 100 --H 30 --S 5000 --ss Euler a --L 4.5", **DEFAULTS)
    assert (got.width, got.height, got.steps, got.sampler, got.cfg_scale) == (96, 64, 1000, "euler_a", 4.5)
    assert parse_sample_prompt("x --s 0 --ss dpmsolver++", **DEFAULTS).steps == 1
    assert parse_sample_prompt("x --ss DPM++ 2M", **DEFAULTS).sampler == "dpmsolver++"
    assert parse_sample_prompt("--n lowres --d 3", **DEFAULTS) == SamplePrompt(
        "", negative="lowres", width=64, height=64, seed=3, steps=2, sampler="euler_a"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("x --q 3", "unknown option --q"),
        ("x --w wide", "--w needs a number"),
        ("x --d -5", "--d cannot be negative"),
        ("x --h 8192", "--h must be at most 4096"),
        ("x --ss k_dpm_99", "unknown sampler 'k_dpm_99'"),
    ],
)
def test_parse_rejects_bad_options_with_a_clear_message(line, message):
    with pytest.raises(ValueError, match="sample prompt 'x --") as e:
        parse_sample_prompt(line, **DEFAULTS)
    assert message in str(e.value)


def test_default_prompts_lead_with_trigger_and_common_tags():
    tags = ["sks", "1girl", "solo", "hatsune miku (cosplay)", "smile", "a", "b", "c", "d", "e", "f", "g"]
    lines = default_sample_prompts("sks", tags, n=3)
    parsed = [parse_sample_prompt(line, **DEFAULTS) for line in lines]
    assert parsed[0].prompt == r"sks, 1girl, solo, hatsune miku \(cosplay\), smile, a, b, c, d"
    assert parsed[1].prompt == "sks"
    assert parsed[2].prompt == "sks, e, f, g"
    assert all(p.negative == DEFAULT_NEGATIVE for p in parsed)
    assert len(default_sample_prompts("sks", tags)) == 2
    assert (
        parse_sample_prompt(default_sample_prompts(None, ["cat", "grass"])[1], **DEFAULTS).prompt
        == "cat, grass"
    )


# ---- samplers ----


def test_every_sampler_name_has_a_scheduler():
    assert set(get_args(SampleSampler)) <= set(SAMPLERS)  # kohya's names, for training samples
    assert {resolve_sampler(name) for name in get_args(GenSampler)} == set(SAMPLERS)  # A1111's, for /gen
    karras = make_scheduler("DPM++ 2M Karras", load_base("tiny:sd15").scheduler_config)
    assert isinstance(karras, DPMSolverMultistepScheduler) and karras.config.use_karras_sigmas
    sde = make_scheduler("dpm++ sde karras", load_base("tiny:sd15").scheduler_config, seed=5)
    assert isinstance(sde, DPMSolverSDEScheduler)
    assert (sde.config.use_karras_sigmas, sde.config.noise_sampler_seed) == (True, 5)
    config = load_base("tiny:sd15").scheduler_config
    euler_a = make_scheduler("euler_a", config)
    assert isinstance(euler_a, EulerAncestralDiscreteScheduler)
    assert euler_a.config.timestep_spacing == "linspace"  # A1111's k-diffusion steps
    dpm = make_scheduler("DPM++ 2M", config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert (dpm.config.algorithm_type, dpm.config.solver_order, dpm.config.use_karras_sigmas) == (
        "dpmsolver++",
        2,
        False,
    )
    assert isinstance(make_scheduler("unipc", config), UniPCMultistepScheduler)
    assert make_scheduler("ddim", config).config.clip_sample is False
    assert resolve_sampler("plms") == "pndm"
    with pytest.raises(ValueError, match="unknown sampler 'karras'"):
        make_scheduler("karras", config)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_renders_an_image(sd15, name):
    image = sd15.render(sp(sampler=name, steps=3))
    assert image.size == (64, 64)
    assert pixels(image).std() > 1  # not a flat (NaN-turned-black) image


# ---- rendering ----


def test_same_seed_same_pixels_other_seed_other_pixels(sd15):
    first = pixels(sd15.render(sp(seed=42)))
    assert np.array_equal(first, pixels(sd15.render(sp(seed=42))))
    assert not np.array_equal(first, pixels(sd15.render(sp(seed=43))))


def test_unseeded_prompt_gets_a_seed_to_record():
    seeded = sp(seed=None).seeded()
    assert isinstance(seeded.seed, int)
    assert seeded.seeded() is seeded


def test_width_height_and_long_prompts(sd15):
    long_prompt = ", ".join(f"(tag{i}:1.2)" for i in range(120))  # several 77-token chunks, a short negative
    image = sd15.render(sp(long_prompt, negative="lowres", width=96, height=64))
    assert image.size == (96, 64)
    assert pixels(image).std() > 1


def test_render_uses_the_live_lora_adapter():
    base = load_base("tiny:sd15")
    sampler = Sampler(base, device="cpu", dtype=torch.float32)
    before = pixels(sampler.render(sp()))
    base.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert np.array_equal(before, pixels(sampler.render(sp())))  # up weights start at zero
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    assert not np.array_equal(before, pixels(sampler.render(sp())))


def test_modules_are_in_eval_mode_while_sampling_and_restored_after():
    base = load_base("tiny:sd15")
    sampler = Sampler(base, device="cpu", dtype=torch.float32)
    seen: list[bool] = []
    for m in (base.unet, base.vae, base.text_encoders[0]):
        m.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    base.unet.train()
    base.text_encoders[0].train()
    sampler.render(sp())
    assert seen and not any(seen)
    assert base.unet.training and base.text_encoders[0].training and not base.vae.training


def test_sdxl_renders_and_uses_its_negative(sdxl):
    plain = pixels(sdxl.render(sp(seed=5)))
    assert plain.shape == (64, 64, 3)
    assert np.array_equal(plain, pixels(sdxl.render(sp(seed=5))))
    assert not np.array_equal(plain, pixels(sdxl.render(sp(seed=5, negative="lowres"))))


def test_half_precision_model_with_fp32_vae():
    base = load_base("tiny:sd15")
    for m in (base.unet, *base.text_encoders):
        m.to(torch.bfloat16)
    image = Sampler(base, device="cpu", dtype=torch.bfloat16).render(sp())
    assert pixels(image).std() > 1


# ---- parameters text and PNG ----


def test_parameters_text_matches_a1111_format(sd15):
    text = sd15.parameters_text(
        sp(negative="lowres, bad hands", steps=20, seed=42, sampler="euler_a"), "tiny", "0123456789"
    )
    assert text == (
        "a photo of sks\n"
        "Negative prompt: lowres, bad hands\n"
        f"Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 0123456789, "
        f"Model: tiny, RNG: CPU, Version: loracord {VERSION}"
    )


def test_parameters_text_optional_fields_and_quoting():
    sampler = Sampler(load_base("tiny:sd15"), device="cpu", dtype=torch.float32, clip_skip=2)
    text = sampler.parameters_text(
        sp(sampler="dpmsolver++", cfg_scale=7.0, width=512, height=768, steps=30, seed=9),
        "tiny:sd15",
        "abcdef0123",
        extra={"Lora hashes": "sks: 0123456789ab"},
    )
    assert text == (
        "a photo of sks\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7, Seed: 9, Size: 512x768, "
        'Model hash: abcdef0123, Model: "tiny:sd15", Clip skip: 2, RNG: CPU, Lora hashes: "sks: 0123456789ab", '
        f"Version: loracord {VERSION}"
    )
    with pytest.raises(ValueError, match="no seed"):
        sampler.parameters_text(sp(seed=None), "tiny", "0123456789")


def test_png_carries_parameters(tmp_path, sd15):
    image = sd15.render(sp())
    for name, text in [
        ("a.png", sd15.parameters_text(sp(), "tiny", "0123456789")),
        ("b.png", "猫耳 ✨\nSteps: 2"),
    ]:
        save_png(image, tmp_path / name, text)
        with Image.open(tmp_path / name) as back:
            assert back.format == "PNG"
            assert back.info["parameters"] == text
            assert np.array_equal(pixels(back.convert("RGB")), pixels(image))


def test_sampling_changes_a_modules_mode_and_place_only_when_they_differ_and_puts_them_back(monkeypatch):
    base = load_base("tiny:sd15")
    unet, te = base.unet, base.text_encoders[0]
    unet.train()  # a training run's preview
    te.eval()  # a warm /gen pipeline's text encoder
    moves = []
    for m in (unet, te):
        real = m.to
        monkeypatch.setattr(m, "to", lambda *a, _real=real, _m=m, **k: (moves.append(_m), _real(*a, **k))[1])
    with _sampling_mode([unet, te], torch.device("cpu")):
        assert not any(m.training for m in unet.modules()) and not te.training
    assert all(m.training for m in unet.modules()) and not any(m.training for m in te.modules())
    assert moves == []  # both were on the device already: nothing walked them to move nothing
