"""Generated images with captions, laid out for each trainer from one set of files.

Each image is smooth random colour fields with a few shapes (seeded, all different, so intake's
near-duplicate check keeps them and JPEG/PNG sizes are like photos'), captioned with tags.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square"]


def make_image(seed: int, size: tuple[int, int]) -> tuple[Image.Image, str]:
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.random((6, 6, 3)) * 255
    img = Image.fromarray(low.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    r = random.Random(seed)
    colour, shape = r.choice(COLOURS), r.choice(SHAPES)
    x0, y0 = r.randrange(w // 2), r.randrange(h // 2)
    box = [x0, y0, x0 + w // 3, y0 + h // 3]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return img, f"sks, {colour} {shape}, simple background"


def kohya_dataset(root: Path, count: int, repeats: int, size: tuple[int, int], ext: str = ".png") -> Path:
    """``root/{repeats}_sks/NNNN{ext}`` with ``NNNN.txt`` captions; returns ``root``."""
    folder = root / f"{repeats}_sks"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, caption = make_image(i, size)
        img.save(folder / f"{i:04d}{ext}")
        (folder / f"{i:04d}.txt").write_text(caption, encoding="utf-8")
    return root


def hf_imagefolder(kohya_root: Path, dest: Path) -> Path:
    """The same files as a 🤗 ``imagefolder`` with ``metadata.jsonl`` (diffusers' examples read that);
    kohya's repeats become copies, so an epoch holds the same samples for every trainer."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for sub in sorted(p for p in kohya_root.iterdir() if p.is_dir()):
        repeats = int(sub.name.split("_", 1)[0])
        for img in sorted(p for p in sub.iterdir() if p.suffix != ".txt"):
            caption = img.with_suffix(".txt").read_text(encoding="utf-8")
            for r in range(repeats):
                name = f"{sub.name}-{img.stem}-{r}{img.suffix}"
                target = dest / name
                if not target.exists():
                    target.hardlink_to(img)
                rows.append({"file_name": name, "text": caption})
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dest
