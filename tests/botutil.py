"""A server config in a temporary folder, for the bot's store, jobs and dispatch tests."""

from __future__ import annotations

from pathlib import Path

from bot.config import Config, load_config

TRAIN = {"max_train_epochs": 2, "sample_every_n_epochs": 0, "network_dim": 4, "network_alpha": 2}


def write_config(
    root: Path,
    extra: str = "",
    devices: str = '["cpu"]',
    dispatch: str = "local",
    data: str = "",
    workers: str = "",
    bases: str = "",
) -> Config:
    """``data``, ``workers``, ``bases``: more lines of those tables (``extra`` comes after every table)."""
    path = root / "server.toml"
    path.write_text(
        f'[store]\npath = "db/loracord.db"\n[data]\ndir = "data"\n{data}'
        f'[workers]\ndevices = {devices}\ndispatch = "{dispatch}"\n{workers}'
        f'[bases]\ntiny = "tiny:sd15"\n"タイニー XL" = "tiny:sdxl"\n{bases}{extra}',
        encoding="utf-8",
    )
    return load_config(path)
