"""Settings that mean what kohya means: run length (steps vs epochs, presets), warmup schedules,
sample-prompt files, previews independent of saving, and the reported loss. tiny:sd15 on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bot.cli import main as cli_main
from runner.families.registry import family
from runner.selftest import make_demo_dataset
from runner.spec import (
    DoneEvent,
    EpochEvent,
    ProgressEvent,
    SamplesEvent,
    SpecError,
    StageEvent,
    TrainSpec,
    parse_event,
)
from runner.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 4 images × 1 repeat: 4 batches of 1 an epoch.
    return make_demo_dataset(tmp_path_factory.mktemp("data"), count=4, repeats=1)


def spec_of(out: Path, data: Path, **settings) -> TrainSpec:
    # No run length here: each test says the one it means (or leaves the default on purpose).
    return TrainSpec.parse(
        {
            "base": "tiny:sd15",
            "train_data_dir": str(data),
            "output_dir": str(out),
            "output_name": "t",
            "trigger_word": "sks",
            "network_dim": 4,
            "network_alpha": 2,
            "learning_rate": 1e-3,
            "sample_every_n_epochs": 0,
            "lr_scheduler": "constant",
            **settings,
        }
    )


def run(out: Path, data: Path, **settings):
    events: list = []
    result = train(spec_of(out, data, **settings), events.append, device="cpu")
    assert isinstance(result, DoneEvent), result
    return result, events


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


# ---- 1. run length: max_train_steps alone, presets under the member's settings ----


def test_max_train_steps_alone_trains_that_many_steps(tmp_path, data):
    result, events = run(tmp_path, data, max_train_steps=3)
    assert result.steps == 3
    assert [(p.step, p.total_steps, p.epoch, p.total_epochs) for p in of(events, ProgressEvent)] == [
        (1, 3, 1, 1),
        (2, 3, 1, 1),
        (3, 3, 1, 1),
    ]
    plan = next(e for e in of(events, StageEvent) if e.stage == "train")
    assert plan.total == 3 and "3 steps" in plan.message
    # constant without warmup stays constant, and says so
    assert [p.lr for p in of(events, ProgressEvent)] == [1e-3] * 3
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"], meta["ss_max_train_steps"]) == (
        "constant",
        "0",
        "3",
    )


def test_the_members_max_train_steps_beats_the_presets_epochs(tmp_path, data):
    # The character preset trains 10 epochs of 2 batches (batch size 2); the member asked for 3 steps.
    result, events = run(tmp_path, data, preset="character", mixed_precision="no", max_train_steps=3)
    assert result.steps == 3
    assert {p.total_epochs for p in of(events, ProgressEvent)} == {2}  # ceil(3 / 2)
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("3", "2")


def test_preset_epochs_apply_when_the_member_set_no_run_length():
    from runner.families.registry import with_preset

    base = {"base": "tiny:sd15", "train_data_dir": ".", "output_dir": ".", "output_name": "n"}
    preset = TrainSpec.parse(with_preset(TrainSpec.parse({**base, "preset": "concept"}), "sd15"))
    # concept: 8 epochs, batch 2; 12 images → 6 batches an epoch.
    assert preset.run_length(6) == (8, 48, 6)
    own = TrainSpec.parse(
        with_preset(TrainSpec.parse({**base, "preset": "concept", "max_train_steps": 10}), "sd15")
    )
    assert own.run_length(6) == (2, 10, 6)
    # Both given by the member: epochs win, as in kohya.
    both = TrainSpec.parse({**base, "max_train_epochs": 2, "max_train_steps": 5})
    assert both.run_length(6) == (2, 12, 6)
    # Nothing given, no preset: kohya's 1600 steps.
    assert TrainSpec.parse(base).run_length(6).steps == 1600


def test_cli_set_steps_replace_the_config_files_epochs_and_json_says_so(tmp_path, data, capsys):
    config = tmp_path / "settings.toml"
    config.write_text(
        "[training]\nmax_train_epochs = 10\nnetwork_dim = 4\nnetwork_alpha = 2\n"
        "[sample]\nsample_every_n_epochs = 0\n",
        encoding="utf-8",
    )
    # The CLI's main in this process (test_cli runs `loracord train` in its own).
    code = cli_main(
        ["train", str(data), "--base", "tiny:sd15", "--name", "c"]
        + ["--out", str(tmp_path / "out"), "--config", str(config), "--set", "max_train_steps=2", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    events = [parse_event(line) for line in out.splitlines()]
    plan = next(e for e in events if isinstance(e, StageEvent) and e.stage == "train")
    assert plan.total == 2
    assert [(p.step, p.total_steps, p.total_epochs) for p in events if isinstance(p, ProgressEvent)] == [
        (1, 2, 1),
        (2, 2, 1),
    ]
    assert events[-1].type == "done" and events[-1].steps == 2


# ---- 2. warmup: every schedule's lr per step against diffusers' formulas ----


def _expected_factor(
    name: str, s: int, warmup: int, total: int, cycles: int, power: float, lr: float
) -> float:
    """diffusers.optimization's lr_lambda of each schedule, written out (s = scheduler steps so far)."""
    if s < warmup:
        return s / max(1, warmup)
    progress = (s - warmup) / max(1, total - warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":  # num_cycles 0.5: half a cosine from 1 to 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":
        return (
            0.0 if progress >= 1 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
        )
    if name == "polynomial":  # lr_end 1e-7
        lr_end = 1e-7
        return ((lr - lr_end) * (1 - progress) ** power + lr_end) / lr
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("scheduler", "warmup", "used"),
    [
        ("constant", 2, "constant_with_warmup"),  # diffusers' constant would drop the warmup
        ("linear", 0.5, "linear"),  # a fraction: int(0.5 × 6) = 3 steps
        ("cosine", 2, "cosine"),
        ("cosine_with_restarts", 2, "cosine_with_restarts"),
        ("polynomial", 2, "polynomial"),
    ],
)
def test_warmup_schedules_follow_diffusers_formulas(tmp_path, data, scheduler, warmup, used):
    total, cycles, power, lr = 6, 2, 2.0, 1e-3
    seen: list[list[float]] = []

    def record(optimizer, args, kwargs):  # the lr each optimizer step actually used
        seen.append([g["lr"] / g["initial_lr"] for g in optimizer.param_groups])

    hook = register_optimizer_step_pre_hook(record)
    try:
        result, _ = run(
            tmp_path,
            data,
            max_train_steps=total,
            lr_scheduler=scheduler,
            lr_warmup_steps=warmup,
            lr_scheduler_num_cycles=cycles,
            lr_scheduler_power=power,
        )
    finally:
        hook.remove()
    steps = int(warmup * total) if warmup < 1 else warmup
    expected = [_expected_factor(used, s, steps, total, cycles, power, lr) for s in range(total)]
    assert len(seen) == total and 0 < expected[1] < 1
    for factors, want in zip(seen, expected, strict=True):
        assert factors == pytest.approx([want] * len(factors), abs=1e-9)
    with safe_open(result.lora_file, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"]) == (used, str(steps))


# ---- 4. sample prompts from kohya's prompt files ----


def _prompt_files(folder: Path) -> dict[str, Path]:
    txt = folder / "prompts.txt"
    txt.write_text(
        "# kohya: lines starting with # are comments\n\n"
        "sks, red --n lowres --w 72 --h 64 --d 5 --l 6 --s 3\n"
        "sks, blue --d 6\n",
        encoding="utf-8",
    )
    toml = folder / "prompts.toml"
    toml.write_text(
        '[prompt]\nnegative_prompt = "lowres"\nwidth = 64\nheight = 64\nscale = 6.0\nsample_steps = 3\n\n'
        '[[prompt.subset]]\nprompt = "sks, red"\nseed = 5\nwidth = 72\n\n'
        '[[prompt.subset]]\nprompt = "sks, blue"\nseed = 6\n',
        encoding="utf-8",
    )
    js = folder / "prompts.json"
    js.write_text(
        json.dumps(
            [
                {"prompt": "sks, red", "negative_prompt": "lowres", "width": 75, "height": 64, "seed": 5}
                | {"scale": 6, "sample_steps": 3},
                "sks, blue --d 6",
            ]
        ),
        encoding="utf-8",
    )
    return {"txt": txt, "toml": toml, "json": js}


@pytest.mark.parametrize("kind", ["txt", "toml", "json"])
def test_sample_prompt_files_are_read_with_kohyas_syntax(tmp_path, kind):
    from runner.gen.sampler import parse_sample_prompt

    path = _prompt_files(tmp_path)[kind]
    spec = TrainSpec.parse(
        {
            "base": "b",
            "train_data_dir": ".",
            "output_dir": ".",
            "output_name": "n",
            "sample_prompts": str(path),
        }
    )
    defaults = {"width": 64, "height": 64, "steps": 20, "sampler": "euler_a", "cfg_scale": 7.5}
    prompts = [parse_sample_prompt(e, seed=100, **defaults) for e in spec.sample_prompts]
    red, blue = prompts
    assert (red.prompt, red.negative, red.width, red.height, red.seed) == ("sks, red", "lowres", 72, 64, 5)
    assert (red.cfg_scale, red.steps) == (6, 3)
    assert (blue.prompt, blue.seed) == ("sks, blue", 6)


def test_a_missing_or_malformed_prompt_file_is_refused_when_the_spec_is_read(tmp_path):
    base = {"base": "b", "train_data_dir": ".", "output_dir": ".", "output_name": "n"}
    missing = tmp_path / "nope.txt"
    with pytest.raises(SpecError, match=r"sample_prompts: cannot read the prompt file .*nope\.txt"):
        TrainSpec.parse({**base, "sample_prompts": str(missing)})
    bad = tmp_path / "bad.toml"
    bad.write_text('[[prompt]]\nprompt = "x"\n', encoding="utf-8")
    with pytest.raises(SpecError, match=r"\[prompt\] table of defaults and \[\[prompt.subset\]\]"):
        TrainSpec.parse({**base, "sample_prompts": str(bad)})
    typo = tmp_path / "typo.json"
    typo.write_text('[{"prompt": "x", "negative": "y"}]', encoding="utf-8")
    with pytest.raises(SpecError, match="negative"):
        TrainSpec.parse({**base, "sample_prompts": str(typo)})
    # An inline prompt is still a prompt.
    assert TrainSpec.parse({**base, "sample_prompts": "sks --w 512"}).sample_prompts == ["sks --w 512"]


def test_previews_render_a_toml_prompt_file(tmp_path, data):
    path = _prompt_files(tmp_path)["toml"]
    _, events = run(
        tmp_path / "out", data, max_train_steps=1, sample_every_n_epochs=1, sample_prompts=str(path)
    )
    images = of(events, EpochEvent)[-1].sample_images
    texts = [Image.open(p).info["parameters"] for p in images]
    assert texts[0].startswith("sks, red <lora:t-000001:1>\nNegative prompt: lowres\n")
    assert "Steps: 3," in texts[0] and "CFG scale: 6," in texts[0] and "Seed: 5," in texts[0]
    assert "Size: 72x64" in texts[0] and "Seed: 6," in texts[1] and "Size: 64x64" in texts[1]


# ---- 5. previews independent of saving ----


def test_previews_at_epochs_that_are_not_saved_show_the_weights_of_that_moment(tmp_path, data):
    sampled = {"sample_steps": 2, "sample_prompts": ["sks --w 64 --h 64"], "max_train_epochs": 2}
    _, every = run(tmp_path / "every", data, save_every_n_epochs=1, sample_every_n_epochs=1, **sampled)
    _, sparse = run(tmp_path / "sparse", data, save_every_n_epochs=2, sample_every_n_epochs=1, **sampled)
    assert [e.epoch for e in of(sparse, EpochEvent)] == [2]
    (preview,) = of(sparse, SamplesEvent)
    assert (preview.epoch, preview.step, preview.end_of_epoch) == (1, 4, True)
    # Epoch 1's preview of the run that did not save it is the picture of the run that did.
    saved = of(every, EpochEvent)[0].sample_images[0]
    assert np.array_equal(np.asarray(Image.open(preview.sample_images[0])), np.asarray(Image.open(saved)))
    assert "<lora:" not in Image.open(preview.sample_images[0]).info["parameters"]  # no file holds them


def test_previews_every_n_steps_and_at_first(tmp_path, data):
    _, events = run(
        tmp_path,
        data,
        max_train_steps=6,
        sample_every_n_steps=3,
        sample_at_first=True,
        sample_every_n_epochs=None,  # unset: with steps given, no previews at epoch ends (kohya)
        sample_steps=2,
        sample_prompts=["sks --w 64 --h 64"],
    )
    previews = of(events, SamplesEvent)
    assert [(p.epoch, p.step, p.end_of_epoch) for p in previews] == [
        (0, 0, False),
        (1, 3, False),
        (2, 6, False),
    ]
    assert all(Path(p.sample_images[0]).is_file() for p in previews)
    assert [e.sample_images for e in of(events, EpochEvent)] == [[], []]
    # Previews come right after the step they show.
    order = [
        (type(e).__name__, getattr(e, "step", None))
        for e in events
        if isinstance(e, ProgressEvent | SamplesEvent)
    ]
    assert order.index(("SamplesEvent", 3)) == order.index(("ProgressEvent", 3)) + 1


def test_sample_every_n_epochs_and_steps_together_are_refused():
    base = {"base": "b", "train_data_dir": ".", "output_dir": ".", "output_name": "n"}
    with pytest.raises(SpecError, match="sample_every_n_epochs or sample_every_n_steps, not both"):
        TrainSpec.parse({**base, "sample_every_n_epochs": 1, "sample_every_n_steps": 10})


# ---- 11. the reported loss ----


def test_progress_loss_is_the_mean_of_the_steps_micro_batches(tmp_path, data, monkeypatch):
    losses: list[float] = []
    sd = type(family("sd15"))
    make = sd.objective

    def recording(self, *args, **kwargs):
        objective = make(self, *args, **kwargs)
        loss = objective.loss

        def spy(batch, gen):
            value = loss(batch, gen)
            losses.append(value.item())
            return value

        objective.loss = spy
        return objective

    monkeypatch.setattr(sd, "objective", recording)
    _, events = run(tmp_path, data, max_train_epochs=1, gradient_accumulation_steps=3)
    # 4 micro-batches an epoch in steps of 3: the second step has only the fourth.
    first, second = of(events, ProgressEvent)
    assert len(losses) == 4
    step1, step2 = sum(losses[:3]) / 3, losses[3]
    assert first.loss == pytest.approx(step1, rel=1e-6)
    assert second.loss == pytest.approx(0.9 * step1 + 0.1 * step2, rel=1e-6)
