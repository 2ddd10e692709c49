"""The training loop on the tiny models: files, events, each setting's effect, resume, cancel."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from runner.families.noise_prediction import NoisePrediction
from runner.families.registry import load_base, text_encoding
from runner.selftest import make_demo_dataset
from runner.spec import (
    DoneEvent,
    EpochEvent,
    FailedEvent,
    ProgressEvent,
    StageEvent,
    TextEncoding,
    TrainSpec,
)
from runner.train.loop import Trainer, concrete_spec, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), count=4, repeats=1)


def settings_for(out: Path, data: Path, **settings) -> TrainSpec:
    return TrainSpec.parse(
        {
            "base": "tiny:sd15",
            "train_data_dir": str(data),
            "output_dir": str(out),
            "output_name": "t",
            "trigger_word": "sks",
            "max_train_epochs": 1,
            "network_dim": 4,
            "network_alpha": 2,
            "learning_rate": 1e-3,
            "sample_every_n_epochs": 0,
            "lr_scheduler": "constant",
            **settings,
        }
    )


def run(out: Path, data: Path, cancel: threading.Event | None = None, on_event=None, **settings):
    spec = settings_for(out, data, **settings)
    events: list = []

    def emit(e):
        events.append(e)
        if on_event:
            on_event(e)

    result = train(spec, emit, cancel, device="cpu")
    tensors = load_file(result.lora_file) if isinstance(result, DoneEvent) else {}
    return result, events, tensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data):
    return run(tmp_path_factory.mktemp("base"), data)


def test_files_events_and_samples_per_epoch(tmp_path, data):
    result, events, tensors = run(
        tmp_path, data, max_train_epochs=2, sample_every_n_epochs=None, sample_steps=2, output_name="キャラ✨"
    )
    assert isinstance(result, DoneEvent), result
    epochs = [e for e in events if isinstance(e, EpochEvent)]
    assert [Path(e.lora_file).name for e in epochs] == [
        "キャラ✨-000001.safetensors",
        "キャラ✨-000002.safetensors",
    ]
    assert Path(result.lora_file).name == "キャラ✨.safetensors"
    # The final name is a hard link to the last epoch: one file on disk, counted once in storage.
    assert os.path.samefile(result.lora_file, epochs[-1].lora_file)
    for e in epochs:
        assert e.sample_images and all(Path(p).exists() for p in e.sample_images)
        assert "sks" in e.sample_prompts[0]
        with safe_open(e.lora_file, "pt") as f:
            lora_hash = f.metadata()["sshs_model_hash"][:12]
        name = Path(e.lora_file).stem
        text = Image.open(e.sample_images[0]).info["parameters"]
        assert (
            f"<lora:{name}:1>" in text.splitlines()[0]
        )  # reproducible from the PNG alone, as A1111 reads it
        assert f'Lora hashes: "{name}: {lora_hash}"' in text
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(p.total_steps == 8 and p.eta_s >= 0 and math.isfinite(p.loss) for p in progress)
    assert events[-1] is result
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "キャラ✨" and meta["ss_epoch"] == "2" and meta["ss_steps"] == "8"


def test_same_seed_same_tensors_and_other_seed_differs(tmp_path, data, baseline):
    _, _, again = run(tmp_path / "a", data)
    _, _, other = run(tmp_path / "b", data, seed=7)
    assert same(baseline[2], again)
    assert not same(baseline[2], other)


@pytest.mark.parametrize("noise", [{}, {"multires_noise_iterations": 6, "noise_offset": 0.05}])
def test_resume_matches_uninterrupted_run(tmp_path, data, noise):
    _, _, full = run(tmp_path / "full", data, max_train_epochs=3, lr_scheduler="cosine", **noise)
    cancel = threading.Event()

    def stop_after_first_epoch(e):
        if isinstance(e, EpochEvent) and e.epoch == 1:
            cancel.set()

    out = tmp_path / "resumed"
    first, _, _ = run(
        out,
        data,
        cancel=cancel,
        on_event=stop_after_first_epoch,
        max_train_epochs=3,
        lr_scheduler="cosine",
        **noise,
    )
    assert isinstance(first, FailedEvent) and first.kind == "cancelled"
    assert (out / "t-000001.safetensors").exists() and not (out / "t-000002.safetensors").exists()
    result, events, resumed = run(out, data, max_train_epochs=3, lr_scheduler="cosine", resume=True, **noise)
    assert isinstance(result, DoneEvent)
    assert [e.step for e in events if isinstance(e, ProgressEvent)][0] == 5
    assert same(full, resumed)
    assert len(result.epoch_files) == 3


def test_resume_refuses_changed_settings(tmp_path, data):
    run(tmp_path, data)
    result, _, _ = run(tmp_path, data, network_dim=8, resume=True)
    assert isinstance(result, FailedEvent) and result.kind == "bad_input" and "network_dim" in result.reason


def test_cancel_stops_at_next_step(tmp_path, data):
    cancel = threading.Event()
    seen = []

    def on_event(e):
        if isinstance(e, ProgressEvent):
            seen.append(e.step)
            cancel.set()

    result, _, _ = run(tmp_path, data, cancel=cancel, on_event=on_event, max_train_epochs=3)
    assert isinstance(result, FailedEvent) and result.kind == "cancelled"
    assert seen == [1]


def test_bad_input_is_a_failed_event_not_a_traceback(tmp_path, data):
    result, _, _ = run(tmp_path, tmp_path / "missing")
    assert isinstance(result, FailedEvent) and result.kind == "bad_input"
    result, _, _ = run(tmp_path, data, base="tiny:sd3")
    assert isinstance(result, FailedEvent) and "tiny:sd15" in result.reason


# ---- each setting has an effect ----


@pytest.mark.parametrize(
    "settings",
    [
        {"learning_rate": 5e-4},
        {"network_alpha": 4},
        {"unet_lr": 2e-3},
        {"text_encoder_lr": 2e-3},
        {"noise_offset": 0.1},
        {"multires_noise_iterations": 6, "multires_noise_discount": 0.3},
        {"clip_skip": 2},
        {"max_grad_norm": 0.0001},
        {"shuffle_caption": True},
        {"caption_dropout_rate": 0.9},
        {"flip_aug": True},
        {"weighted_captions": True, "trigger_word": "(sks:1.5)"},
        {"max_token_length": 150},
        {"optimizer_type": "Lion"},
        {"optimizer_type": "Adafactor"},
        {"optimizer_type": "Prodigy", "learning_rate": 1.0},
        {"optimizer_type": "DAdaptAdam", "learning_rate": 1.0},
        {"optimizer_args": {"weight_decay": 0.5, "betas": [0.8, 0.9]}},
        {"mixed_precision": "bf16"},
    ],
)
def test_setting_changes_the_result(tmp_path, data, baseline, settings):
    result, _, tensors = run(tmp_path, data, **settings)
    assert isinstance(result, DoneEvent), result
    assert tensors.keys() == baseline[2].keys()
    assert not same(tensors, baseline[2]), f"{settings} had no effect"


def test_min_snr_gamma_reweights_timesteps_within_a_batch(tmp_path, data):
    # With one sample a step, Adam undoes any per-step loss scale; within a batch it cannot.
    # Saved once, at the end: the files of earlier epochs would say nothing here.
    once = {"train_batch_size": 4, "max_train_epochs": 3, "save_every_n_epochs": 3}
    _, _, plain = run(tmp_path / "a", data, **once)
    _, _, snr = run(tmp_path / "b", data, **once, min_snr_gamma=1.0)
    assert not same(plain, snr)


@pytest.mark.parametrize(
    "settings",
    [
        {"gradient_checkpointing": True},
        {"cache_text_encoder_outputs": False, "network_train_unet_only": True},
    ],
)
def test_speed_settings_do_not_change_the_result(tmp_path, data, settings):
    base_settings = {"network_train_unet_only": True} if "network_train_unet_only" in settings else {}
    _, _, plain = run(tmp_path / "a", data, **base_settings)
    result, _, tensors = run(tmp_path / "b", data, **settings)
    assert isinstance(result, DoneEvent)
    assert same(plain, tensors)


def test_network_shape_settings(tmp_path, data):
    _, _, t = run(tmp_path / "dim", data, network_dim=8, conv_dim=2, conv_alpha=1)
    downs = {k: v for k, v in t.items() if k.endswith("lora_down.weight")}
    conv3 = [k for k, v in downs.items() if v.ndim == 4 and v.shape[-1] == 3]
    assert conv3, "LoCon adds 3x3 conv modules"
    assert all(
        downs[k].shape[0] == 2 and float(t[k.replace("lora_down.weight", "alpha")]) == 1 for k in conv3
    )
    linear = [k for k, v in downs.items() if v.ndim == 2]
    assert all(downs[k].shape[0] == 8 for k in linear)
    _, _, unet_only = run(tmp_path / "u", data, network_train_unet_only=True)
    assert unet_only and all(k.startswith("lora_unet_") for k in unet_only)
    _, _, te_only = run(tmp_path / "te", data, network_train_text_encoder_only=True)
    assert te_only and all(k.startswith("lora_te_") for k in te_only)


def test_zero_block_weights_leave_those_blocks_out(tmp_path, data):
    # The tiny SD1.5 UNet has attentions in IN01 (down_blocks.0.attentions.0), IN02 (….attentions.1),
    # MID and OUT03..OUT05 (up_blocks.1); kohya drops the modules of blocks weighted 0.
    spec = settings_for(
        tmp_path,
        data,
        down_lr_weight=[1.0, 0.0, 2.0] + [1.0] * 9,
        mid_lr_weight=0.5,
        up_lr_weight=[0.0] * 12,
        network_train_unet_only=True,
    )
    trainer = Trainer(spec, lambda e: None, device="cpu")
    result = trainer.run()
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == {
        "unet_IN02": pytest.approx(2e-3),
        "unet_MID": pytest.approx(5e-4),
    }
    t = load_file(result.lora_file)
    ups = {k.removesuffix(".lora_up.weight") for k in t if k.endswith(".lora_up.weight")}
    assert not any(
        k.startswith(("lora_unet_down_blocks_0_attentions_0_", "lora_unet_up_blocks_")) for k in ups
    )
    in02 = {k for k in ups if k.startswith("lora_unet_down_blocks_0_attentions_1_")}
    mid = {k for k in ups if k.startswith("lora_unet_mid_block_")}
    assert in02 and mid and ups == in02 | mid
    assert all(t[f"{k}.lora_up.weight"].abs().sum() > 0 for k in ups)


def test_uncached_latents_are_a_fresh_sample_every_step(tmp_path, monkeypatch):
    # kohya's uncached path: latent_dist.sample() each step, not one sample kept for the run.
    data = tmp_path / "one"
    data.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "img.png")
    (data / "img.txt").write_text("a cat")
    seen = []
    loss = NoisePrediction.loss

    def recording_loss(self, batch, gen):
        seen.append(batch.latents.detach().clone())
        return loss(self, batch, gen)

    monkeypatch.setattr(NoisePrediction, "loss", recording_loss)
    result, _, _ = run(
        tmp_path / "out", data, cache_latents=False, max_train_epochs=3, network_train_unet_only=True
    )
    assert isinstance(result, DoneEvent) and len(seen) == 3
    vae = load_base("tiny:sd15").vae
    with torch.no_grad():
        x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        dist = vae.encode(x).latent_dist
    # Each step's latents, standardised by the image's latent distribution: a draw from N(0, 1)...
    zs = [((latents[0] / vae.config.scaling_factor) - dist.mean[0]) / dist.std[0] for latents in seen]
    for z in zs:
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    # ...and a new one every step (independent draws are uncorrelated).
    for a, b in combinations(zs, 2):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.1


@pytest.fixture
def transformers_4_45_checkpointing(monkeypatch):
    """gradient_checkpointing_enable as in transformers 4.45, the oldest version the project allows:
    reentrant checkpointing unless told otherwise, and no input gradients for a model without
    transformers' own peft integration (the trainer injects LoRA with peft directly)."""

    def enable(self, gradient_checkpointing_kwargs=None):
        kwargs = (
            {"use_reentrant": True}
            if gradient_checkpointing_kwargs is None
            else gradient_checkpointing_kwargs
        )
        self._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, **kwargs)
        )

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", enable)


def test_text_encoder_lora_trains_with_gradient_checkpointing(
    tmp_path, data, hooked_base, transformers_4_45_checkpointing
):
    _, loaded = hooked_base
    result, _, t = run(tmp_path, data, gradient_checkpointing=True)
    assert isinstance(result, DoneEvent), result
    te = loaded[0].text_encoders[0]
    assert any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
    ups = [k for k in t if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert ups and all(t[k].abs().sum() > 0 for k in ups)


def test_run_length_settings(tmp_path, data):
    result, events, _ = run(
        tmp_path / "bs", data, train_batch_size=2, max_train_epochs=2, save_every_n_epochs=2
    )
    assert result.steps == 4 and [Path(e.lora_file).name for e in events if isinstance(e, EpochEvent)] == [
        "t-000002.safetensors"
    ]
    result, _, _ = run(tmp_path / "acc", data, gradient_accumulation_steps=2)
    assert result.steps == 2
    result, events, _ = run(tmp_path / "steps", data, max_train_epochs=None, max_train_steps=6)
    assert result.steps == 6 and [e.epoch for e in events if isinstance(e, EpochEvent)] == [1, 2]


def _lrs(events) -> list[float]:
    return [e.lr for e in events if isinstance(e, ProgressEvent)]


def test_lr_schedulers_shape_the_learning_rate(tmp_path, data):
    def lrs(**s):
        # Only the last epoch is saved: the files of the others say nothing about the schedule.
        out = tmp_path / json.dumps(s, sort_keys=True).replace('"', "")
        return _lrs(run(out, data, max_train_epochs=4, save_every_n_epochs=4, **s)[1])

    const = lrs(lr_scheduler="constant")
    assert const == [1e-3] * 16
    warm = lrs(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.25)
    assert warm[0] < warm[2] < 1e-3 and warm[4:] == [1e-3] * 12
    linear = lrs(lr_scheduler="linear")
    assert all(a > b for a, b in zip(linear, linear[1:], strict=False)) and linear[-1] == pytest.approx(
        0, abs=1e-12
    )
    cosine = lrs(lr_scheduler="cosine")
    assert cosine[7] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    restarts = lrs(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert restarts[8] > restarts[6], "the second cycle starts high again"
    poly = lrs(lr_scheduler="polynomial", lr_scheduler_power=2.0)
    assert poly[7] < linear[7]


def test_save_precision(tmp_path, data):
    for precision, dtype in [("float", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        _, _, t = run(tmp_path / precision, data, save_precision=precision)
        assert {v.dtype for k, v in t.items() if k.endswith(".weight")} == {dtype}


def test_sdxl_trains_with_both_text_encoders(tmp_path, data):
    result, _, t = run(tmp_path, data, base="tiny:sdxl", sample_every_n_epochs=1, sample_steps=2)
    assert isinstance(result, DoneEvent), result
    assert {k.split("_text_model")[0] for k in t if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_") for k in t)


def stages(events: list, stage: str) -> list[str]:
    return [e.message for e in events if isinstance(e, StageEvent) and e.stage == stage]


def test_text_encoders_running_every_step_is_said_once(tmp_path, data, baseline):
    # The default trains the text encoder (text_encoder_lr falls back to learning_rate).
    assert stages(baseline[1], "text_encoders") == ["CLIP-L runs on every step (CLIP-L trained)"]
    assert stages(baseline[1], "cache_text") == []
    _, events, _ = run(tmp_path, data, network_train_unet_only=True)
    assert stages(events, "text_encoders") == [] and len(stages(events, "cache_text")) == 1


def test_sdxl_presets_follow_kohyas_fast_recipe_unless_the_member_asks():
    base = load_base("tiny:sdxl")
    common = {"base": "tiny:sdxl", "train_data_dir": "d", "output_dir": "o", "output_name": "n"}
    for preset in ("character", "style", "concept"):
        spec = concrete_spec(TrainSpec.parse({**common, "preset": preset}), base)
        assert spec.network_train_unet_only and spec.cache_text_encoder_outputs
        assert not spec.shuffle_caption and spec.caption_dropout_rate == 0
        assert text_encoding(spec, "sdxl") == TextEncoding(
            every_step=(), cached=("CLIP-L", "CLIP-G"), reasons=()
        )
    asked = concrete_spec(TrainSpec.parse({**common, "preset": "style", "shuffle_caption": True}), base)
    assert asked.shuffle_caption and asked.caption_dropout_rate == 0
    assert text_encoding(asked, "sdxl").every_step == ("CLIP-L", "CLIP-G")


def test_preset_fills_unset_settings_only(tmp_path, data):
    result, _, t = run(tmp_path, data, preset="style", network_dim=4, mixed_precision="no")
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4"  # the member's own setting wins
    assert json.loads(meta["ss_network_args"])["conv_dim"] in (8, "8")  # the preset's LoCon
    assert meta["ss_min_snr_gamma"] == "5.0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "settings", [{"mixed_precision": "bf16"}, {"mixed_precision": "fp16"}, {"optimizer_type": "AdamW8bit"}]
)
def test_cuda_paths(tmp_path, data, settings):
    spec = TrainSpec.parse(
        {
            "base": "tiny:sdxl",
            "train_data_dir": str(data),
            "output_dir": str(tmp_path),
            "output_name": "g",
            "max_train_epochs": 1,
            "sample_every_n_epochs": 0,
            **settings,
        }
    )
    result = train(spec, lambda e: None, device="cuda")
    assert isinstance(result, DoneEvent), result


# ---- failures and work done once ----


@pytest.fixture
def hooked_base(monkeypatch):
    """Load the real base as the trainer does, then let a test hook into its modules."""
    import runner.train.loop as train_module

    loaded, hooks = [], []
    original = train_module.load_base

    def load(name, **kwargs):
        base = original(name, **kwargs)
        loaded.append(base)
        for hook in hooks:
            hook(base)
        return base

    monkeypatch.setattr(train_module, "load_base", load)
    return hooks, loaded


def test_out_of_memory_says_what_to_lower(tmp_path, data, hooked_base):
    hooks, _ = hooked_base

    def oom(module, args, output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hooks.append(lambda base: base.unet.down_blocks[0].register_forward_hook(oom))
    result, _, _ = run(tmp_path, data, train_batch_size=2, network_dim=32)
    assert isinstance(result, FailedEvent) and result.kind == "out_of_memory"
    for hint in ("train_batch_size (now 2)", "network_dim (now 32)", "gradient_checkpointing=true"):
        assert hint in result.reason


def test_nan_loss_fails_with_advice(tmp_path, data, hooked_base):
    hooks, _ = hooked_base
    hooks.append(lambda base: base.unet.conv_out.register_forward_hook(lambda m, a, out: out * float("nan")))
    result, _, _ = run(tmp_path, data)
    assert isinstance(result, FailedEvent) and "NaN" in result.reason and "learning rate" in result.reason


def test_vae_and_frozen_text_encoder_run_once_per_image_and_caption(tmp_path, data, hooked_base):
    hooks, loaded = hooked_base
    calls = {"vae": 0, "te": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    hooks.append(lambda base: base.vae.encoder.register_forward_hook(count("vae")))
    hooks.append(lambda base: base.text_encoders[0].register_forward_hook(count("te")))
    # Saved once, at the end: saving runs neither model, and the calls are counted per step.
    once = {"max_train_epochs": 3, "save_every_n_epochs": 3, "network_train_unet_only": True}
    result, _, _ = run(tmp_path, data, **once)
    assert isinstance(result, DoneEvent)
    assert calls == {"vae": 4, "te": 4}  # 4 images, 4 distinct captions, 12 steps
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert {type(p) for p in loaded[0].unet.attn_processors.values()} == {AttnProcessor2_0}  # SDPA

    calls.update(vae=0, te=0)
    run(tmp_path / "shuffled", data, **once, shuffle_caption=True)
    assert calls == {"vae": 4, "te": 12}  # captions change every step: encoded per step, images still once


def test_block_weights_of_the_wrong_length_are_bad_input(tmp_path, data):
    result, _, _ = run(tmp_path, data, down_lr_weight=[1.0, 2.0])
    assert isinstance(result, FailedEvent) and result.kind == "bad_input"
    assert result.reason == "down_lr_weight needs 12 values for sd15 (got 2)"
