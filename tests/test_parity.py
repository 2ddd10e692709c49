"""The trainer's first optimizer steps against a plain training loop written here.

The reference loop uses diffusers, peft and torch directly, with kohya sd-scripts' definitions of
the noise (``get_noise_noisy_latents_and_timesteps``, ``pyramid_noise_like``) and of min-SNR
weighting (``apply_snr_weight``) written out below. It shares only these conventions of the
trainer (documented in ``runner/train.py``, ``runner/network.py``):

- LoRA init: ``torch.manual_seed(seed)``, then one kaiming-uniform draw per LoRA module (UNet, then
  each text encoder, in module order) in fp32 on the host; up weights zero.
- a cached latent is ``mean + std * randn`` from a generator seeded ``seed ^ crc32(relative path)``.
- each epoch reseeds one torch generator and one host RNG (pyramid scale factors) with
  ``seed * 100_003 + epoch``; a batch draws noise, noise offset, pyramid octaves, then timesteps.
"""

from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from runner.families.registry import load_base
from runner.spec import DoneEvent, TrainSpec
from runner.train.loop import Trainer

SEED = 42  # TrainSpec's default seed
STEPS = 2
SIDE = 64  # pixels: the tiny bases' native size and the smallest resolution allowed
CAPTION = "a photo of a cat"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # One image at the training resolution: no resizing, one step per epoch, no batch order.
    root = tmp_path_factory.mktemp("parity")
    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "cat.png")
    (root / "cat.txt").write_text(CAPTION)
    return root


def kohya_pyramid(noise, iterations, discount, gen, scales):
    # kohya's pyramid_noise_like, with its global RNGs replaced by the run's generator and host RNG.
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = scales.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=gen)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def kohya_snr_weight(scheduler, timesteps, gamma, v_prediction):
    # kohya's prepare_scheduler_for_custom_training + apply_snr_weight.
    alphas_cumprod = scheduler.alphas_cumprod
    all_snr = (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2
    snr = torch.stack([all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    return torch.div(min_snr_gamma, snr + 1 if v_prediction else snr).float()


def kohya_targets(model: torch.nn.Module, parents: tuple, pointwise_convs: bool) -> list[str]:
    # kohya's networks.lora: every Linear (and, in the UNet, 1x1 conv) inside the target modules.
    names = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, parents):
            continue
        for child_name, child in parent.named_modules():
            conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, torch.nn.Linear) or (pointwise_convs and conv):
                names.append(f"{parent_name}.{child_name}")
    return names


def lora_layers(base) -> dict[str, LoraLayer]:
    models = [("unet", base.unet)] + [(f"te{i + 1}", te) for i, te in enumerate(base.text_encoders)]
    return {
        f"{component}.{name}": module
        for component, model in models
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def reference_loop(spec: TrainSpec, settings: dict) -> dict[str, torch.Tensor]:
    base = load_base(spec.base)
    sdxl = base.family == "sdxl"
    config = dict(r=16, lora_alpha=8.0, init_lora_weights=True)  # network_dim, network_alpha defaults
    unet_targets = kohya_targets(base.unet, (Transformer2DModel,), pointwise_convs=True)
    base.unet.add_adapter(LoraConfig(target_modules=unet_targets, **config))
    for te in base.text_encoders:
        targets = kohya_targets(te, (CLIPAttention, CLIPMLP), pointwise_convs=False)
        inject_adapter_in_model(LoraConfig(target_modules=targets, **config), te)
    layers = lora_layers(base)
    torch.manual_seed(SEED)
    params = []
    for layer in layers.values():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            down.copy_(torch.nn.init.kaiming_uniform_(torch.empty(down.shape), a=math.sqrt(5)))
            up.zero_()
        params += [down, up]

    vae, scheduler = base.vae, base.noise_scheduler()
    image = Path(spec.train_data_dir) / "cat.png"
    pixels = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32)).permute(2, 0, 1)
    with torch.no_grad():
        dist = vae.encode((pixels / 127.5 - 1.0)[None]).latent_dist
    seeded = torch.Generator().manual_seed(SEED ^ zlib.crc32(b"cat.png"))
    latents = (
        dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=seeded)
    ) * vae.config.scaling_factor

    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    for epoch in range(1, STEPS + 1):
        gen = torch.Generator().manual_seed(SEED * 100_003 + epoch)
        scales = random.Random(SEED * 100_003 + epoch)
        states, pooled = [], None
        for te, tok in zip(base.text_encoders, base.tokenizers, strict=True):
            ids = tok([CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = te(ids.input_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        hidden = torch.cat(states, dim=-1)
        added = None
        if sdxl:  # original size, crop corner, target size
            added = {
                "text_embeds": pooled,
                "time_ids": torch.tensor([[SIDE, SIDE, 0, 0, SIDE, SIDE]], dtype=torch.float32),
            }

        # kohya's get_noise_noisy_latents_and_timesteps
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=gen)
        if settings.get("noise_offset"):
            noise = noise + settings["noise_offset"] * torch.randn((b, c, 1, 1), generator=gen)
        if settings.get("multires_noise_iterations"):
            noise = kohya_pyramid(
                noise, settings["multires_noise_iterations"], settings["multires_noise_discount"], gen, scales
            )
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)

        v_prediction = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        pred = base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3])
        if settings.get("min_snr_gamma"):
            loss = loss * kohya_snr_weight(scheduler, timesteps, settings["min_snr_gamma"], v_prediction)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # max_grad_norm default
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        f"{name}.{part}": getattr(layer, part)["default"].weight.detach()
        for name, layer in layers.items()
        for part in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize(
    ("base", "settings"),
    [
        ("tiny:sd15", {}),
        ("tiny:sdxl", {}),
        ("tiny:sd15", {"min_snr_gamma": 5.0}),
        ("tiny:sd15-v", {"min_snr_gamma": 5.0}),
        ("tiny:sd15", {"noise_offset": 0.1}),
        ("tiny:sd15", {"multires_noise_iterations": 6, "multires_noise_discount": 0.3}),
        ("tiny:sdxl", {"noise_offset": 0.1, "multires_noise_iterations": 4, "multires_noise_discount": 0.8}),
    ],
)
def test_first_steps_match_a_plain_diffusers_peft_loop(tmp_path, data, base, settings):
    spec = TrainSpec.parse(
        {
            "base": base,
            "train_data_dir": str(data),
            "output_dir": str(tmp_path),
            "output_name": "p",
            "max_train_epochs": STEPS,
            "sample_every_n_epochs": 0,
            **settings,
        }
    )
    trainer = Trainer(spec, lambda e: None, device="cpu")
    assert isinstance(trainer.run(), DoneEvent)
    assert trainer.total_steps == STEPS
    got = {
        f"{name}.{part}": getattr(layer, part)["default"].weight.detach()
        for name, layer in lora_layers(trainer.base).items()
        for part in ("lora_A", "lora_B")
    }
    want = reference_loop(trainer.spec, settings)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.float32 for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    # The steps moved the weights well beyond the tolerance, so a different loop could not pass.
    assert max((want[k]).abs().max().item() for k in want if k.endswith("lora_B")) > 1e-5
