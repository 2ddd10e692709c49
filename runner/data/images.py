"""Reading members' images and caption files, shared by intake, tagger and trainer; no torch here.

The bot side may run intake and tagging without loading torch, so these helpers live apart from
``dataset.py``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files that sit beside training images without being images; never reported as unreadable.
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json", ".toml", ".npz", ".yaml", ".yml", "")


def is_hidden(name: str) -> bool:
    """Dot files and macOS zip litter, which are never a member's images."""
    return name.startswith((".", "__MACOSX"))


def image_files(root: Path) -> tuple[list[Path], Counter[str]]:
    """Training images under ``root`` (sorted, hidden ones skipped) and a count of other file types."""
    images, others = [], Counter()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if is_hidden(name):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(Path(folder) / name)
            elif ext not in SIDECAR_EXTENSIONS:
                others[ext] += 1
    return images, others


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The image as 8-bit RGB with transparency composited on white, and what had to change, in words."""
    changes = []
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # Pillow's convert() clips 16-bit values to 255 (a white image), so they are scaled first.
        img = img.point(lambda v: v * (1 / 256)).convert("L")
        changes.append("16-bit → 8-bit")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB"), [*changes, "transparency put on white"]
    if img.mode != "RGB":
        names = {"CMYK": "CMYK", "P": "palette", "L": "greyscale", "1": "black-and-white", "YCbCr": "YCbCr"}
        if not changes:
            changes.append(f"{names.get(img.mode, img.mode)} → RGB")
        img = img.convert("RGB")
    return img, changes


def unreadable_reason(e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return "image is too large (too many pixels)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image file that can be read (corrupt or wrong extension)"
    return f"corrupt or truncated image ({e})"


def decode_caption(raw: bytes) -> str:
    """Caption text from UTF-8 (with or without BOM) or Shift-JIS; UnicodeDecodeError when neither."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Japanese Windows editors long saved Shift-JIS (cp932) by default.
        return raw.decode("cp932")
