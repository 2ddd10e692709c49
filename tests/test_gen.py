"""Generation with LoRAs on the tiny models: warm pipelines, adapters, infotext, grids, bad input."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from runner.cli import main as cli_main
from runner.families.registry import load_base
from runner.families.stable_diffusion import kohya_name
from runner.formats.infotext import LoraTag, parse_parameters, split_lora_tags
from runner.formats.kohya import effective_delta, lora_hashes
from runner.gen.generate import epoch_files, gen_images, lora_grid
from runner.gen.grid import image_grid
from runner.gen.pipelines import PipelineCache
from runner.spec import FailedEvent, GenSpec, ImagesEvent, SpecError, TrainSpec
from runner.train.network import add_lora, kohya_state_dict
from runner.worker import Worker

VERSION = version("loracord")
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def make_lora(path, family="sd15", seed=1, scale=0.3):
    """A kohya-format LoRA (UNet and text encoder) with random up weights, as after training."""
    base = load_base(f"tiny:{family}")
    add_lora(
        base,
        TrainSpec(
            output_name="x",
            base=f"tiny:{family}",
            train_data_dir=".",
            output_dir=".",
            network_dim=4,
            network_alpha=2,
        ),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*base.unet.named_parameters(), *base.text_encoders[0].named_parameters()]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    tensors = kohya_state_dict(base, torch.float32)
    meta = {"ss_base_model_version": "sd_v1" if family == "sd15" else "sdxl_base_v1-0"}
    safetensors.torch.save_file(
        tensors, str(path), {**meta, "sshs_model_hash": lora_hashes(tensors, meta)[0]}
    )
    return tensors


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    (folder / "sub").mkdir()
    tensors = {
        "キャラ": make_lora(folder / "キャラ.safetensors", seed=1),
        "style": make_lora(folder / "sub" / "style.safetensors", seed=2),
    }
    make_lora(folder / "xl.safetensors", family="sdxl")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return folder, tensors


@pytest.fixture(scope="module")
def loads():
    return []


@pytest.fixture(scope="module")
def cache(loads):
    def counting_loader(name):
        loads.append(name)
        return load_base(name)

    return PipelineCache("cpu", loader=counting_loader)


def spec(lora_files, prompt="portrait", **kw) -> GenSpec:
    folder, _ = lora_files
    return GenSpec.parse(
        {"prompt": prompt, "base": "tiny:sd15", "lora_dir": str(folder), "output_dir": str(folder / "out")}
        | {"seed": 1, "steps": 2, "width": 64, "height": 64}
        | kw
    )


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def render(cache, loras, prompt="portrait", **kw) -> np.ndarray:
    (img,) = gen_images(spec(loras, prompt, **kw), cache)
    return pixels(img.image)


def to_q_out(cache, x):
    module = cache.pipeline("tiny:sd15").base.unet.get_submodule(TO_Q)
    with torch.no_grad():
        return module(x)


# ---- prompt tags and infotext ----


def test_lora_tags_are_split_from_the_prompt():
    text, tags = split_lora_tags("<lora:キャラ:0.8> portrait, <lora:style:-0.5> <LORA:plain>smile")
    assert text == " portrait,  smile"
    assert tags == [LoraTag("キャラ", 0.8), LoraTag("style", -0.5), LoraTag("plain", 1.0)]
    for bad, message in [
        ("<lora::1>", "no LoRA name"),
        ("<lora:a:x>", "must be a number"),
        ("<lora:a:1:0.5>", "only one weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            split_lora_tags(bad)


def test_parser_reads_a1111_text_in_both_sampler_styles():
    # Written from A1111's documented format, the way A1111 1.10 writes it.
    new = (
        "masterpiece, 1girl, <lora:キャラ:0.8>\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "キャラ: 0123456789ab", '
        "Version: v1.10.1"
    )
    info = parse_parameters(new)
    assert info.prompt == "masterpiece, 1girl, <lora:キャラ:0.8>"
    assert info.negative_prompt == "lowres, bad anatomy"
    assert info.fields["Lora hashes"] == "キャラ: 0123456789ab"
    assert info.gen_settings() == {
        "prompt": "masterpiece, 1girl, <lora:キャラ:0.8>",
        "negative_prompt": "lowres, bad anatomy",
        "width": 512,
        "height": 768,
        "steps": 20,
        "cfg_scale": 7.0,
        "seed": 1234,
        "clip_skip": 2,
        "sampler": "DPM++ 2M Karras",
    }
    old = "a cat\nSteps: 30, Sampler: DPM++ SDE Karras, CFG scale: 5.5, Seed: 7, Size: 512x512, Model: x"
    assert parse_parameters(old).gen_settings()["sampler"] == "DPM++ SDE Karras"
    assert parse_parameters("a prompt only").prompt == "a prompt only"


def test_gen_parameters_match_a1111_line_by_line_and_round_trip(loras, cache):
    folder, _ = loras
    (img,) = gen_images(
        spec(
            loras,
            "<lora:キャラ:0.8> portrait",
            negative_prompt="lowres",
            loras=[{"name": "style", "weight": 0.5}],
        ),
        cache,
    )
    h1 = safetensors.safe_open(str(folder / "キャラ.safetensors"), "pt").metadata()["sshs_model_hash"][:12]
    h2 = safetensors.safe_open(str(folder / "sub" / "style.safetensors"), "pt").metadata()["sshs_model_hash"][
        :12
    ]
    assert img.parameters.split("\n") == [
        "<lora:キャラ:0.8> portrait <lora:style:0.5>",
        "Negative prompt: lowres",
        "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, "
        # A built model has no checkpoint file, so no "Model hash" (A1111 hashes the file).
        f'Model: "tiny:sd15", RNG: CPU, Lora hashes: "キャラ: {h1}, style: {h2}", '
        f"Version: loracord {VERSION}",
    ]
    again = GenSpec.parse(
        parse_parameters(img.parameters).gen_settings()
        | {"base": "tiny:sd15", "lora_dir": str(folder), "output_dir": "."}
    )
    (reroll,) = gen_images(again, cache)
    assert np.array_equal(pixels(reroll.image), pixels(img.image))
    assert reroll.parameters == img.parameters


# ---- LoRAs on the warm pipeline ----


def test_same_seed_same_pixels_and_seed_plus_i(loras, cache):
    first = render(cache, loras, "<lora:キャラ:1> portrait")
    assert np.array_equal(first, render(cache, loras, "<lora:キャラ:1> portrait"))
    two = gen_images(spec(loras, "<lora:キャラ:1> portrait", count=2), cache)
    assert [i.seed for i in two] == [1, 2]
    assert np.array_equal(pixels(two[0].image), first)
    assert np.array_equal(pixels(two[1].image), render(cache, loras, "<lora:キャラ:1> portrait", seed=2))


def test_weight_zero_is_the_base_image_and_weights_scale_the_delta(loras, cache):
    _, tensors = loras
    plain = render(cache, loras)
    assert np.array_equal(render(cache, loras, "<lora:キャラ:0> portrait"), plain)
    assert not np.array_equal(render(cache, loras, "<lora:キャラ:0.8> portrait"), plain)

    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    delta = effective_delta(tensors["キャラ"], kohya_name("unet", TO_Q, "sd15"))
    outs = {}
    for w in (0.8, 1.0):
        gen_images(spec(loras, f"<lora:キャラ:{w}> portrait", steps=1), cache)
        outs[w] = to_q_out(cache, x)
    torch.testing.assert_close(outs[1.0] - outs[0.8], 0.2 * x @ delta.T, rtol=1e-4, atol=1e-5)
    gen_images(spec(loras, "portrait", steps=1), cache)  # no LoRA: the plain layer again
    base_out = to_q_out(cache, x)
    torch.testing.assert_close(outs[0.8] - base_out, 0.8 * x @ delta.T, rtol=1e-4, atol=1e-5)


def test_two_loras_at_once_add_up_and_never_reload_the_base(loras, cache, loads):
    _, tensors = loras
    render(cache, loras, "<lora:キャラ:0.5> portrait")
    before = len(loads)
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    gen_images(spec(loras, "portrait", steps=1), cache)
    plain = to_q_out(cache, x)
    both = render(cache, loras, "<lora:キャラ:0.5> <lora:style:-0.7> portrait")
    key = kohya_name("unet", TO_Q, "sd15")
    expected = (
        x @ (effective_delta(tensors["キャラ"], key, 0.5) + effective_delta(tensors["style"], key, -0.7)).T
    )
    torch.testing.assert_close(to_q_out(cache, x) - plain, expected, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(both, render(cache, loras, "<lora:キャラ:0.5> portrait"))
    assert not np.array_equal(both, render(cache, loras, "<lora:style:-0.7> portrait"))
    assert loads[before:] == []  # new LoRAs and weights, the same warm base
    assert loads.count("tiny:sd15") == 1


def test_adapters_are_reused_and_the_least_recently_used_unloaded(loras):
    folder, _ = loras
    loads = []
    small = PipelineCache("cpu", max_loras=1, loader=lambda n: loads.append(n) or load_base(n))
    gen_images(spec(loras, "<lora:キャラ:1> a", steps=1), small)
    warm = small.pipeline("tiny:sd15")
    first = next(iter(warm.loras.values())).adapter
    gen_images(spec(loras, "<lora:キャラ:0.3> a", steps=1), small)
    assert [lora.adapter for lora in warm.loras.values()] == [first]  # a new weight, no reload
    gen_images(spec(loras, "<lora:style:1> a", steps=1), small)
    assert [lora.path.name for lora in warm.loras.values()] == ["style.safetensors"]
    assert first not in warm.sampler.pipe.get_list_adapters()["unet"]
    assert loads == ["tiny:sd15"]
    # A budget too small for two bases keeps only the most recent one.
    tight = PipelineCache("cpu", max_bytes=small.used_bytes() + 1, loader=load_base)
    tight.pipeline("tiny:sd15")
    tight.pipeline("tiny:sdxl")
    assert list(tight.pipelines) == ["tiny:sdxl"]


# ---- bad input ----


def test_bad_input_is_refused_with_a_reason_and_the_worker_keeps_serving(loras):
    folder, _ = loras
    worker = Worker("cpu")
    events = []

    def gen(prompt, **kw):
        job = {"type": "gen", "spec": spec(loras, prompt, **kw).model_dump(mode="json")}
        return worker.run(job, events.append)

    unknown = gen("<lora:キャ:1> a")
    assert unknown.kind == "bad_input"
    assert (
        "unknown LoRA 'キャ'" in unknown.reason and "キャラ" in unknown.reason and "style" in unknown.reason
    )
    wrong = gen("<lora:xl:1> a")
    assert wrong.kind == "bad_input" and "SDXL LoRA" in wrong.reason and "SD1.5" in wrong.reason
    corrupt = gen("<lora:broken:1> a")
    assert (
        corrupt.kind == "bad_input"
        and "broken.safetensors is not a readable .safetensors file" in corrupt.reason
    )
    too_big = gen("a", width=512)
    assert too_big.kind == "bad_input" and "width 512" in too_big.reason
    bad_spec = worker.run({"type": "gen", "spec": {"prompt": "a", "base": "tiny:sd15"}}, events.append)
    assert bad_spec.kind == "bad_input" and "output_dir" in bad_spec.reason
    with pytest.raises(SpecError, match="sampler must be one of"):
        spec(loras, sampler="Euler karras")

    done = gen("<lora:キャラ:0.8> a", steps=1)
    assert isinstance(done, ImagesEvent)
    assert [type(e) for e in events] == [FailedEvent] * 5 + [ImagesEvent]
    with Image.open(done.images[0]) as png:
        assert png.info["parameters"] == done.parameters[0]


# ---- grids and the CLI ----


def test_grid_size_and_labels():
    cells = [[Image.new("RGB", (600, 400), c) for c in ("red", "green", "blue", "gray")] for _ in range(3)]
    grid = image_grid(cells, ["epoch 1", "epoch 2", "epoch 3"], ["w 0.4", "w 0.6", "w 0.8", "w 1"])
    assert grid.image.width <= 2048
    label_w = grid.row_labels[0][2]
    cw, ch = grid.cells[0][0][2] - grid.cells[0][0][0], grid.cells[0][0][3] - grid.cells[0][0][1]
    assert grid.image.size == (label_w + 4 * cw, grid.col_labels[0][3] + 3 * ch)
    assert cw / ch == pytest.approx(1.5, abs=0.01) and cw < 600  # scaled down to fit, aspect kept
    assert grid.image.getpixel((grid.cells[2][1][0] + 5, grid.cells[2][1][1] + 5)) == (0, 128, 0)
    for box in grid.row_labels + grid.col_labels:
        ink = np.asarray(grid.image.crop(box).convert("L")) < 128
        assert ink.any(), box  # every label is drawn
        assert ink.sum() > 0.01 * ink.size


def test_lora_grid_and_cli_on_a_training_run(loras, cache, tmp_path):
    folder, _ = loras
    run = tmp_path / "run"
    run.mkdir()
    for epoch, seed in ((1, 3), (2, 4)):
        make_lora(run / f"me-{epoch:06d}.safetensors", seed=seed)
    make_lora(run / "me.safetensors", seed=4)
    assert list(epoch_files(run, "me")) == ["epoch 1", "epoch 2"]
    template = spec(loras, lora_dir=str(run), steps=1)
    grid = lora_grid(template, "me", [0.0, 1.0], ["a", "b"], cache)
    assert len(grid.cells) == 4 and len(grid.cells[0]) == 2
    cell = grid.cells[0][0]
    plain = Image.fromarray(render(cache, loras, "a", steps=1).astype(np.uint8))
    assert np.array_equal(pixels(grid.image.crop(cell)), pixels(plain))  # weight 0 = the base image
    with pytest.raises(SpecError, match="no saved epoch 5 .*epoch 1, epoch 2"):
        lora_grid(template, "me", [1.0], ["a"], cache, epochs=[5])

    out = tmp_path / "gen"
    code = cli_main(
        ["gen", "<lora:me-000002:0.8> portrait", "--base", "tiny:sd15", "--lora-dir", str(run), "--seed", "1"]
        + ["--steps", "1", "--size", "64x64", "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    (png,) = out.glob("*.png")
    assert png.name == "00000-1.png"
    with Image.open(png) as image:
        assert parse_parameters(image.info["parameters"]).prompt == "<lora:me-000002:0.8> portrait"
    grid_png = tmp_path / "grid.png"
    code = cli_main(
        [
            "grid",
            "portrait",
            "--base",
            "tiny:sd15",
            "--lora-dir",
            str(run),
            "--name",
            "me",
            "--weights",
            "0.5,1",
        ]
        + ["--epochs", "2", "--steps", "1", "--size", "64x64", "--out", str(grid_png), "--device", "cpu"]
    )
    assert code == 0
    with Image.open(grid_png) as image:
        assert "Seed: " in image.info["parameters"]
    assert cli_main(["gen", "x", "--base", "tiny:sd15", "--lora", "nope:1", "--out", str(out)]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cuda_generation_with_a_lora(tmp_path, family):
    make_lora(tmp_path / "l.safetensors", family=family)
    cache = PipelineCache("cuda")
    assert cache.dtype in (torch.bfloat16, torch.float16)
    with_lora = GenSpec.parse(
        {"prompt": "<lora:l:0.8> a", "base": f"tiny:{family}", "lora_dir": str(tmp_path)}
        | {"output_dir": str(tmp_path / "out"), "seed": 1, "steps": 4, "width": 64, "height": 64}
    )
    first, again = (pixels(gen_images(with_lora, cache)[0].image) for _ in range(2))
    assert np.array_equal(first, again) and first.std() > 1
    plain = pixels(gen_images(with_lora.model_copy(update={"prompt": "a"}), cache)[0].image)
    assert not np.array_equal(plain, first)
    assert cache.pipeline(f"tiny:{family}").base.unet.device.type == "cuda"
