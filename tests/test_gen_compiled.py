"""/gen on a compiled UNet: LoRAs swap into one slot in place, the graph is never rebuilt, and every
image is the one an uncompiled pipeline renders. Compiled with the ``eager`` backend: dynamo's
tracing and guards (what decides a recompile) without inductor's C++ build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gen import make_lora
from torch._dynamo.utils import counters

from runner.gen.generate import gen_images
from runner.gen.pipelines import (
    COMPILE_ENV,
    HOT,
    HOTSWAP_RANK_ENV,
    PipelineCache,
    join_loras,
    worker_settings,
)
from runner.spec import GenSpec, SpecError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    make_lora(folder / "a.safetensors", seed=1)
    make_lora(folder / "b.safetensors", seed=2)
    return folder


def render(cache: PipelineCache, folder, prompt: str) -> np.ndarray:
    spec = GenSpec.parse(
        {"prompt": prompt, "base": "tiny:sd15", "lora_dir": str(folder), "output_dir": str(folder / "out")}
        | {"seed": 1, "steps": 2, "width": 64, "height": 64}
    )
    (img,) = gen_images(spec, cache)
    return np.asarray(img.image, dtype=np.int16)


REQUESTS = [
    "<lora:a:1> portrait",
    "<lora:b:1> portrait",  # a hotswap
    "<lora:a:0.5> portrait",  # a new weight
    "portrait",  # no LoRA: the slot at weight 0
    "<lora:a:1> <lora:b:-0.7> portrait",  # two at once, joined
]


def test_lora_swaps_on_a_compiled_unet_never_recompile_and_match_a_fresh_load(folder):
    torch._dynamo.reset()
    counters.clear()
    compiled = PipelineCache("cpu", compile_unet=True, compile_backend="eager", hotswap_rank=8)
    images = [render(compiled, folder, REQUESTS[0])]
    first = counters["stats"]["unique_graphs"]
    assert first >= 1, "the UNet was compiled"
    images += [render(compiled, folder, prompt) for prompt in REQUESTS[1:]]
    assert counters["stats"]["unique_graphs"] == first, "a LoRA swap recompiled the UNet"
    unet = compiled.pipeline("tiny:sd15").base.unet
    assert unet.peft_config.keys() == {HOT}
    for prompt, image in zip(REQUESTS, images, strict=True):
        fresh = PipelineCache("cpu")  # each LoRA loaded the ordinary way, on a new pipeline
        expected = render(fresh, folder, prompt)
        # The weight sits in the up matrix instead of the adapter's scale: fp32 rounding, in 8-bit pixels.
        assert np.abs(image - expected).max() <= 1, prompt
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[3])


def test_loras_beyond_the_slot_rank_are_refused(folder):
    small = PipelineCache("cpu", compile_unet=True, compile_backend="eager", hotswap_rank=4)
    render(small, folder, "<lora:a:1> x")
    with pytest.raises(SpecError, match="rank 8.*at most 4"):
        render(small, folder, "<lora:a:1> <lora:b:1> x")


def test_joined_loras_are_the_sum_of_their_weighted_deltas():
    g = torch.Generator().manual_seed(0)

    def lora(rank, alpha):
        return {
            "m.lora_down.weight": torch.randn(rank, 6, generator=g),
            "m.lora_up.weight": torch.randn(5, rank, generator=g),
            "m.alpha": torch.tensor(alpha),
        }

    a, b = lora(2, 1.0), lora(3, 3.0)
    joined = join_loras([(a, 0.8), (b, -1.5)])

    def delta(t):
        rank = t["m.lora_down.weight"].shape[0]
        return t["m.lora_up.weight"] @ t["m.lora_down.weight"] * (float(t["m.alpha"]) / rank)

    assert joined["m.lora_down.weight"].shape == (5, 6) and float(joined["m.alpha"]) == 5
    assert torch.allclose(delta(joined), 0.8 * delta(a) - 1.5 * delta(b), atol=1e-5)


def test_the_worker_takes_its_gen_compile_setting_from_the_environment():
    assert worker_settings({}) == {} and worker_settings({COMPILE_ENV: "0"}) == {}
    assert worker_settings({COMPILE_ENV: "1"}) == {
        "compile_unet": True,
        "compile_backend": "inductor",
        "hotswap_rank": 128,
    }
    assert worker_settings({COMPILE_ENV: "aot_eager", HOTSWAP_RANK_ENV: "64"})["hotswap_rank"] == 64
    with pytest.raises(SpecError, match=HOTSWAP_RANK_ENV):
        worker_settings({COMPILE_ENV: "1", HOTSWAP_RANK_ENV: "lots"})
