"""The SD noise-prediction objective against kohya sd-scripts' formulas, written out here."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from runner.families.clip_text import Conditioning
from runner.families.noise_prediction import NoisePrediction, pyramid_noise
from runner.families.protocol import Batch
from runner.families.registry import load_base
from runner.spec import TrainSpec


def kohya_pyramid_noise_like(noise, device, iterations=6, discount=0.4):
    # library/custom_train_functions.py, as kohya wrote it (global RNGs: `random` and torch's).
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn).to(device)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def kohya_apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    # prepare_scheduler_for_custom_training + apply_snr_weight.
    alphas_cumprod = noise_scheduler.alphas_cumprod
    all_snr = (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2
    snr = torch.stack([all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float()
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float()
    return loss * snr_weight


@pytest.mark.parametrize(
    ("shape", "iterations", "discount"),
    [((2, 4, 64, 48), 6, 0.3), ((1, 4, 40, 72), 3, 0.8), ((2, 4, 8, 8), 10, 0.5)],
)
def test_pyramid_noise_is_kohyas(shape, iterations, discount):
    # Same RNG streams in (torch's seed 5 and Python's seed 9), same tensor out; the 8x8 case stops
    # once an octave is 1 pixel wide, as kohya's does.
    base_noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    random.seed(9)
    want = kohya_pyramid_noise_like(base_noise.clone(), "cpu", iterations, discount)
    got = pyramid_noise(
        base_noise.clone(), iterations, discount, torch.Generator().manual_seed(5), random.Random(9)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def bases():
    return {name: load_base(name) for name in ("tiny:sd15", "tiny:sd15-v")}


def objective(base, **settings) -> NoisePrediction:
    spec = TrainSpec(output_name="o", base=base.name, train_data_dir=".", output_dir=".", **settings)
    return NoisePrediction(base, spec, torch.device("cpu"), torch.float32)


def test_noise_offset_comes_before_the_pyramid(bases):
    # kohya's get_noise_noisy_latents_and_timesteps: randn, + offset * randn(b, c, 1, 1), then pyramid.
    obj = objective(
        bases["tiny:sd15"], noise_offset=0.1, multires_noise_iterations=4, multires_noise_discount=0.5
    )
    latents = torch.zeros(2, 4, 16, 16)
    got = obj._noise(latents, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    random.seed(3)  # the objective's host RNG follows the generator's seed
    noise = torch.randn(latents.shape)
    noise = noise + 0.1 * torch.randn((2, 4, 1, 1))
    want = kohya_pyramid_noise_like(noise, "cpu", 4, 0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "gamma"), [("tiny:sd15", 0.5), ("tiny:sd15-v", 5.0), ("tiny:sd15-v", 0.5)])
def test_min_snr_weighted_loss_is_kohyas(bases, name, gamma):
    base = bases[name]
    obj = objective(base, min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    hidden = torch.randn(4, 77, 32, generator=g)
    batch = Batch(latents, Conditioning(hidden, None), None)
    with torch.no_grad():
        got = obj.loss(batch, torch.Generator().manual_seed(7))

        gen = torch.Generator().manual_seed(7)
        scheduler = base.noise_scheduler()
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (4,), generator=gen)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        assert v_prediction == (name == "tiny:sd15-v")
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        pred = base.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3])
        want = kohya_apply_snr_weight(loss, timesteps, scheduler, gamma, v_prediction).mean()
        unweighted = loss.mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert not torch.isclose(want, unweighted, rtol=1e-3)  # the weights are not all 1 here
