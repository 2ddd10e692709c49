"""A draft's dataset folder, repeats and effective settings (read by the card, intake, settings, Start)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from discord.ext import commands

from runner.families.registry import preset_settings
from runner.spec import TrainSpec, layer_settings

from .. import jobs
from ..files import member_path
from . import state

SUBSET = "img"  # the dataset's one kohya folder is {repeats}_img
DEFAULT_REPEATS = 10
# Set by the bot, not by members (training_adapter: the owner's [training_adapters], a file on the server).
RESERVED = {
    "base",
    "output_name",
    "train_data_dir",
    "output_dir",
    "resume",
    "trigger_word",
    "preset",
    "training_adapter",
}
_SUBSET_DIR = re.compile(rf"(\d+)_{SUBSET}")
FROZEN = "Training has started: its images and captions are frozen. Start a new /train to change them."


def dataset_dir(bot: commands.Bot, draft: state.Draft) -> Path:
    return member_path(bot.cfg.data_dir, draft.owner, "datasets", draft.dataset)


def subset_dir(folder: Path) -> Path | None:
    return next((p for p in sorted(folder.glob(f"*_{SUBSET}")) if _SUBSET_DIR.fullmatch(p.name)), None)


def repeats(draft: state.Draft) -> int:
    return int(draft.settings_dict.get("repeats", DEFAULT_REPEATS))


def effective(bot: commands.Bot, draft: state.Draft) -> tuple[dict[str, Any], str]:
    """(settings the job will train with, the base's family)."""
    s = draft.settings_dict
    family = jobs.base_family(bot.cfg.base(draft.base))
    preset = preset_settings(s.get("preset"), family) if s.get("preset") else {}
    defaults = {k: f.get_default(call_default_factory=True) for k, f in TrainSpec.model_fields.items()}
    return {**defaults, **layer_settings(preset, s.get("train", {}))}, family


def parse_train(bot: commands.Bot, draft: state.Draft, overrides: dict[str, Any]) -> TrainSpec:
    """Validate the overrides the way the worker will (SpecError names what is wrong)."""
    s = draft.settings_dict
    raw = {
        **overrides,
        "base": bot.cfg.base(draft.base),
        "output_name": draft.name,
        "train_data_dir": ".",
        "output_dir": ".",
        "trigger_word": s.get("trigger"),
        "preset": s.get("preset"),
    }
    return TrainSpec.parse(raw)
