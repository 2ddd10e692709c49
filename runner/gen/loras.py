"""LoRA files by name: found in a LoRA folder (or by path), and their A1111 short hash."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..formats.kohya import addnet_hash_safetensors
from ..spec import SpecError


def find_lora(name: str, lora_dir: str | Path | None) -> Path:
    """A LoRA by name (its file name without ``.safetensors``, anywhere under ``lora_dir``) or by path."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return path
    if lora_dir is None:
        raise SpecError(f"LoRA '{name}' not found: give a LoRA folder, or the path to its .safetensors file")
    folder = Path(lora_dir).expanduser()
    if not folder.is_dir():
        raise SpecError(f"LoRA folder {folder} does not exist")
    files = {p.stem: p for p in sorted(folder.rglob("*.safetensors"))}
    if name in files:
        return files[name]
    folded = {stem.casefold(): p for stem, p in files.items()}
    if name.casefold() in folded:
        return folded[name.casefold()]
    if not files:
        raise SpecError(f"unknown LoRA '{name}': {folder} holds no .safetensors files")
    close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listed = ", ".join(list(files)[:30]) + (", …" if len(files) > 30 else "")
    raise SpecError(f"unknown LoRA '{name}'.{hint} LoRAs in {folder.name}: {listed}")


def lora_short_hash(path: Path, metadata: dict[str, str]) -> str:
    """A1111's "Lora hashes" value: kohya's ``sshs_model_hash`` if stored, else the SHA-256 of the
    tensor data (A1111's addnet hash, Civitai's AutoV3), first 12 hex digits."""
    full = metadata.get("sshs_model_hash")
    if not full:
        with open(path, "rb") as f:
            full = addnet_hash_safetensors(f)  # type: ignore[arg-type]  # any seekable binary file
    return full[:12]
