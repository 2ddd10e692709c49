"""The contract: validated specs with readable refusals, JSON both ways."""

from __future__ import annotations

import pytest

from runner.families.registry import text_encoding
from runner.spec import (
    EpochEvent,
    FailedEvent,
    ProgressEvent,
    SpecError,
    TextEncoding,
    TrainSpec,
    parse_event,
)

BASE = {"base": "tiny:sd15", "train_data_dir": "d", "output_dir": "o", "output_name": "n"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"network_dim": 2048}, "network_dim must be between 1 and 1024 (got 2048)"),
        ({"learning_rate": 0}, "learning_rate must be between 0.0 and 10.0 (got 0)"),
        ({"caption_dropout_rate": 1.5}, "caption_dropout_rate must be between 0.0 and 1.0"),
        ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler must be one of"),
        ({"optimizer_type": "SGD"}, "optimizer_type must be one of"),
        ({"max_token_length": 100}, "max_token_length must be one of"),
        ({"network_dimm": 8}, "unknown setting 'network_dimm' (did you mean network_dim"),
        ({"resolution": "500,512"}, "multiple of 8"),
        ({"output_name": "a/b"}, "output_name"),
        ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "cannot both be set"),
        ({"conv_alpha": 4}, "conv_alpha needs conv_dim"),
        ({"max_train_steps": None}, "set max_train_epochs or max_train_steps"),
    ],
)
def test_refusals_name_the_setting_and_range(settings, message):
    with pytest.raises(SpecError) as e:
        TrainSpec.parse({**BASE, **settings})
    assert message in str(e.value)
    assert "Traceback" not in str(e.value) and "pydantic" not in str(e.value)


def test_kohya_resolution_forms_and_unicode_names():
    assert TrainSpec.parse({**BASE, "resolution": "512,768"}).resolution == (512, 768)
    assert TrainSpec.parse({**BASE, "resolution": 1024}).resolution == (1024, 1024)
    assert TrainSpec.parse({**BASE, "output_name": "ずんだもん🫛"}).output_name == "ずんだもん🫛"


def test_json_round_trip_keeps_only_what_was_set():
    spec = TrainSpec.parse({**BASE, "network_dim": 8, "preset": "style"})
    again = TrainSpec.model_validate_json(spec.to_json())
    assert again == spec
    assert again.model_fields_set == spec.model_fields_set  # a preset still knows what the member chose


def test_learning_rate_fallbacks_and_warmup_fraction():
    spec = TrainSpec.parse({**BASE, "learning_rate": 2e-4, "text_encoder_lr": 0, "lr_warmup_steps": 0.1})
    assert spec.effective_unet_lr == 2e-4 and not spec.train_text_encoder and spec.train_unet
    assert spec.warmup_steps(1000) == 100
    assert TrainSpec.parse({**BASE, "lr_warmup_steps": 50}).warmup_steps(1000) == 50


@pytest.mark.parametrize(
    ("family", "settings", "every_step", "cached", "reasons"),
    [
        ("sd15", {"network_train_unet_only": True}, (), ("CLIP-L",), ()),
        ("sd15", {}, ("CLIP-L",), (), ("CLIP-L trained",)),  # text_encoder_lr falls back to learning_rate
        ("sd15", {"text_encoder_lr": 0}, (), ("CLIP-L",), ()),
        ("sdxl", {"network_train_unet_only": True, "weighted_captions": True}, (), ("CLIP-L", "CLIP-G"), ()),
        (
            "sdxl",
            {"network_train_unet_only": True, "shuffle_caption": True, "caption_tag_dropout_rate": 0.1},
            ("CLIP-L", "CLIP-G"),
            (),
            ("shuffle_caption=True", "caption_tag_dropout_rate=0.1"),
        ),
        (
            "sd15",
            {"caption_dropout_rate": 0.05, "caption_dropout_every_n_epochs": 3, "text_encoder_lr": 0},
            ("CLIP-L",),
            (),
            ("caption_dropout_rate=0.05", "caption_dropout_every_n_epochs=3"),
        ),
        (
            "sdxl",
            {"cache_text_encoder_outputs": False, "network_train_unet_only": True},
            ("CLIP-L", "CLIP-G"),
            (),
            ("cache_text_encoder_outputs=False",),
        ),
        ("flux", {}, ("CLIP-L",), ("T5-XXL",), ("CLIP-L trained",)),  # kohya's partial caching
        ("flux", {"network_train_unet_only": True}, (), ("CLIP-L", "T5-XXL"), ()),
        (
            "flux",
            {"shuffle_caption": True},
            ("CLIP-L", "T5-XXL"),
            (),
            ("shuffle_caption=True", "CLIP-L trained"),
        ),
    ],
)
def test_text_encoding_says_which_encoders_run_every_step_and_why(
    family, settings, every_step, cached, reasons
):
    got = text_encoding(TrainSpec.parse({**BASE, **settings}), family)
    assert got == TextEncoding(every_step=every_step, cached=cached, reasons=reasons)
    if every_step:
        who = " and ".join(every_step)
        assert got.message.startswith(f"{who} run") and all(r in got.message for r in reasons)
        assert ("encodes each caption once" in got.message) == bool(cached)
    else:
        assert got.message is None


def test_events_parse_by_type():
    assert isinstance(
        parse_event(
            ProgressEvent(
                step=1, total_steps=2, epoch=1, loss=0.1, lr=1e-4, eta_s=3, samples_per_s=1
            ).model_dump_json()
        ),
        ProgressEvent,
    )
    assert isinstance(parse_event({"type": "epoch", "epoch": 1, "step": 4, "lora_file": "x"}), EpochEvent)
    failed = parse_event('{"type": "failed", "kind": "out_of_memory", "reason": "lower train_batch_size"}')
    assert isinstance(failed, FailedEvent) and failed.kind == "out_of_memory"


def test_kohya_style_strings_from_the_command_line():
    spec = TrainSpec.parse(
        {
            **BASE,
            "optimizer_args": "weight_decay=0.01 betas=0.9,0.99 decouple=True",
            "sample_prompts": "sks --w 512",
        }
    )
    assert spec.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True}
    assert spec.sample_prompts == ["sks --w 512"]
    with pytest.raises(SpecError, match=r"^resolution: write one size or width,height"):
        TrainSpec.parse({**BASE, "resolution": "abc"})
    with pytest.raises(
        SpecError, match=r"^network_train_unet_only and network_train_text_encoder_only cannot"
    ):
        TrainSpec.parse({**BASE, "network_train_unet_only": True, "network_train_text_encoder_only": True})
