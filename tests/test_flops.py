"""bench/flops.py: FLOPs of one training step counted from shapes on the meta device."""

from __future__ import annotations

import pytest

from bench.flops import count_step, meta_unet, mfu, step_inputs
from runner.families.sdxl import SDXL


@pytest.fixture(scope="module")
def unet():
    return meta_unet(dict(SDXL.tiny_unet), "sdxl", rank=4).unet


def test_a_known_layer_counts_as_by_hand(unet):
    counts = count_step(unet, step_inputs(unet, batch=2, resolution=64))
    # conv_in: 4 → 32 channels, 3×3, on 8×8 latents, batch 2; 2 FLOPs a multiply-add. Its input needs
    # no gradient and its weight is frozen, so it has no backward.
    assert counts["by_module"]["UNet2DConditionModel.conv_in"] == 2 * 2 * 8 * 8 * 32 * 4 * 9
    # Frozen weights: the backward is the activations' gradients (at most twice the forward: both
    # operands of attention's matmuls need one) and the LoRA's small weight gradients.
    assert 0 < counts["backward_flops"] < 2 * counts["forward_flops"]


def test_flops_scale_with_the_batch_and_the_size(unet):
    one = count_step(unet, step_inputs(unet, batch=1, resolution=64))
    two = count_step(unet, step_inputs(unet, batch=2, resolution=64))
    assert two["flops_per_step"] == 2 * one["flops_per_step"]
    big = count_step(unet, step_inputs(unet, batch=1, resolution=128))
    # 4× the latent positions: convolutions and projections 4×, self-attention's scores 16×, the
    # timestep and size embeddings 1×; this tiny UNet's are large beside its convolutions.
    assert 3.5 * one["flops_per_step"] < big["flops_per_step"] < 16 * one["flops_per_step"]


def test_mfu_is_the_share_of_the_peak_the_measured_rate_uses():
    assert mfu(14e12, 10.0, peak=1000e12) == pytest.approx(0.14)
