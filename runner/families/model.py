"""Helpers the families share to build and load a :class:`~runner.families.protocol.Base`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .protocol import Base, ModelError

CONFIGS = Path(__file__).parent.parent / "configs"


def finish(base: Base) -> Base:
    """Frozen and in eval mode, as every loader hands a base over."""
    for m in (base.unet, base.vae, *base.text_encoders):
        m.eval()
        m.requires_grad_(False)
    return base


def config(family: str, part: str) -> dict[str, Any]:
    """A shipped full-size config (``runner/configs/<family>/<part>/config.json``)."""
    return json.loads((CONFIGS / family / part / "config.json").read_text())


def scheduler_config(family: str) -> dict[str, Any]:
    return json.loads((CONFIGS / family / "scheduler" / "scheduler_config.json").read_text())


def file_hashes(path: Path) -> tuple[str, str]:
    """The file's SHA-256 and A1111's legacy hash (SHA-256 of the 64 KiB at 1 MiB, first 8 hex), as
    kohya's train_util.calculate_sha256 and model_hash compute them."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return sha.hexdigest(), legacy


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Modules built from a config take torch's default dtype; a full-size DiT built in fp32 and cast
    # afterwards would hold its whole fp32 transformer on the host first.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def biased_layer_norms(encoders: list) -> None:
    # Trained CLIP encoders have non-zero LayerNorm biases, so their outputs have a non-zero mean;
    # fresh ones output exactly zero-mean tokens, and A1111's emphasis, which restores the mean
    # after weighting, would divide by ~0. Random models should behave like real ones.
    for encoder in encoders:
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)


# Three blocks: 4x down, so a 64² image is 16² latents. With 2x (32², 1024 tokens) the tiny UNet's
# attention made a CPU training step ~6x slower, and every test that trains or generates paid it.
TINY_VAE = dict(
    block_out_channels=[32, 64, 64],
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    sample_size=64,
)


# ---- DiTs shipped as a transformer alone (ComfyUI's diffusion_models/) ----


def components_folder(env: str, unset: str, check: Callable[[Path, str], None]) -> Path:
    """The diffusers folder named by ``$env`` that a single-file transformer takes its VAE, text
    encoders and tokenizers from; ``unset`` is the message when the variable is not set."""
    components = os.environ.get(env)
    if not components:
        raise ModelError(unset)
    folder = Path(components).expanduser()
    check(folder, f"{env} ({folder})")
    return folder


def transformer_from_file(path: Path, cls: Any, config: Path, dtype: torch.dtype, family: str) -> Any:
    """A DiT transformer from a single file, built against the diffusers config folder ``config``."""
    try:
        return cls.from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True, torch_dtype=dtype
        )
    except Exception as e:  # diffusers raises many error types for damaged or odd checkpoints
        raise ModelError(f"{path.name} could not be loaded as a {family} transformer ({e})") from e


def named_after_file(base: Base, path: Path) -> Base:
    """``base`` named and hashed as the single file it was loaded from."""
    base.name = path.stem
    base.sha256, base.legacy_hash = file_hashes(path)
    return base
