"""Training images and captions in kohya's DreamBooth folder layout, buckets, caption rules, batches.

Layout: ``train_data_dir/10_name/*.png`` trains each image in ``10_name`` 10 times per epoch.
Images directly in ``train_data_dir`` or in a folder without a number prefix use
``spec.num_repeats``. Deeper folders are walked: an image belongs to the nearest folder above it
whose name has the ``N_`` prefix, else to its top-level folder (or ``train_data_dir`` itself), so
``10_name/closeups/a.png`` is in ``10_name`` and an extra wrapper folder from a zip
(``dataset/10_name/a.png``) still reads as ``10_name``. Hidden files and folders (``.x``,
``__MACOSX``) are ignored.

A caption is the text file with the image's stem and ``spec.caption_extension`` (then
``.caption``, then ``.txt``); no file means an empty caption. Unreadable images are skipped and
listed in ``Dataset.skipped``; loading fails only when nothing is left.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from ..spec import TrainSpec, varying_caption_settings
from .images import IMAGE_EXTENSIONS, decode_caption, image_files, to_rgb, unreadable_reason

CAPTION_FALLBACKS = (".caption", ".txt")
_REPEATS_FOLDER = re.compile(r"(\d+)_(.*)", re.S)
_MAX_REPEATS = 1000
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90°, swapping width and height


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the file or folder and what to do."""


class _Skip(Exception):
    """One image that cannot be used; the message is the reason listed in Dataset.skipped."""


@dataclass
class ImageItem:
    path: Path
    caption: str  # raw caption text; the trigger word is added by CaptionRules
    repeats: int
    subset: str  # folder name as given, e.g. "10_name" (kohya's key for tag frequency)
    size: tuple[int, int]  # original (w, h), after EXIF orientation
    bucket: tuple[int, int]  # (w, h) the image is trained at


@dataclass
class Dataset:
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    separator: str = ","  # between caption tags

    def num_train_images(self) -> int:
        return sum(item.repeats for item in self.items)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: per subset, how many images carry each (lower-cased) tag."""
        freq: dict[str, dict[str, int]] = {}
        for item in self.items:
            counts = freq.setdefault(item.subset, {})
            for tag in split_tags(item.caption.lower(), self.separator):
                counts[tag] = counts.get(tag, 0) + 1
        return freq

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        dirs: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = dirs.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def bucket_info(self) -> dict:
        """kohya's ss_bucket_info: used buckets with their image count (repeats included)."""
        counts: Counter[tuple[int, int]] = Counter()
        for item in self.items:
            counts[item.bucket] += item.repeats
        buckets = {i: {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))}
        errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in self.items]
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}

    def common_tags(self, n: int) -> list[str]:
        """The ``n`` tags found on the most images across all subsets, most frequent first."""
        total: Counter[str] = Counter()
        for counts in self.tag_frequency().values():
            total.update(counts)
        return [tag for tag, _ in total.most_common(n)]


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def _join_tags(tags: list[str], separator: str) -> str:
    return (separator if separator.isspace() else separator + " ").join(tags)


# ---- buckets ----


def make_buckets(
    resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int
) -> list[tuple[int, int]]:
    """kohya's bucket set: for each width, the tallest height within the resolution's area.

    diffusers' ``generate_aspect_ratio_buckets`` uses a fixed list of aspect ratios rounded to the
    nearest step, which can exceed the area and ignores the min/max sides, so kohya's rule is restated.
    """
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, int(area // width // steps) * steps)
        if height >= min_reso:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    # kohya picks the smallest aspect-ratio difference; diffusers' find_nearest_bucket weighs it by the
    # bucket's height, which favours short buckets, so it is not used.
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def _no_upscale_bucket(size: tuple[int, int], area: int, steps: int) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, math.sqrt(area / (w * h)))
    return int(w * scale) // steps * steps, int(h * scale) // steps * steps


# ---- reading the folder ----


def _subset_of(rel_dirs: tuple[str, ...], root_name: str, default_repeats: int) -> tuple[str, int]:
    for name in reversed(rel_dirs):
        m = _REPEATS_FOLDER.fullmatch(name)
        if m:
            repeats = int(m.group(1))
            if not 1 <= repeats <= _MAX_REPEATS:
                raise DatasetError(
                    f"folder '{name}' asks for {repeats} repeats; the number before '_' must be "
                    f"between 1 and {_MAX_REPEATS}"
                )
            return name, repeats
    return (rel_dirs[0] if rel_dirs else root_name), default_repeats


def _read_caption(image: Path, extensions: list[str], folder_files: dict[str, Path]) -> str:
    for ext in extensions:
        path = folder_files.get((image.stem + ext).lower())
        if path is None:
            continue
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise _Skip(f"caption '{path.name}' cannot be read ({e.strerror})") from None
        try:
            return decode_caption(raw)
        except UnicodeDecodeError:
            raise _Skip(f"caption '{path.name}' is not UTF-8 text; save it as UTF-8") from None
    return ""


def _caption_text(text: str, separator: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _join_tags(lines, separator)


def _image_size(path: Path) -> tuple[int, int]:
    """Decode the whole image once (to catch truncated files) and return its upright (w, h)."""
    try:
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, …)
        raise _Skip(unreadable_reason(e)) from None
    return (h, w) if orientation in _SWAPPED_ORIENTATIONS else (w, h)


def _bucket_for(
    size: tuple[int, int], spec: TrainSpec, res: tuple[int, int], buckets: list[tuple[int, int]]
) -> tuple[int, int]:
    if not spec.enable_bucket:
        return res
    if not spec.bucket_no_upscale:
        return nearest_bucket(size, buckets)
    bucket = _no_upscale_bucket(size, res[0] * res[1], spec.bucket_reso_steps)
    if min(bucket) == 0:
        raise _Skip(
            f"{size[0]}x{size[1]} is smaller than one bucket step ({spec.bucket_reso_steps} px) "
            "and bucket_no_upscale is on"
        )
    return bucket


def load_dataset(spec: TrainSpec, resolution: tuple[int, int] | None = None) -> Dataset:
    """Read ``spec.train_data_dir``; ``resolution`` (w, h) overrides ``spec.resolution``."""
    root = Path(spec.train_data_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"training folder '{root}' {what}")
    res = resolution or spec.resolution
    images, others = image_files(root)
    if not images:
        exts = " ".join(IMAGE_EXTENSIONS)
        hint = ""
        if others:
            found = ", ".join(f"{n} {ext}" for ext, n in others.most_common())
            hint = f" Found {found} file(s) of other types: convert them to PNG or JPEG."
        raise DatasetError(
            f"no training images found in '{root}'. Put {exts} images in it, or in subfolders named "
            f"like '10_name' (10 = repeats per epoch; folders without a number repeat {spec.num_repeats}×).{hint}"
        )

    buckets = make_buckets(res, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
    caption_exts = list(dict.fromkeys([spec.caption_extension, *CAPTION_FALLBACKS]))
    listings: dict[Path, dict[str, Path]] = {}
    items, skipped = [], []
    for path in images:
        rel = path.relative_to(root)
        subset, repeats = _subset_of(rel.parts[:-1], root.name, spec.num_repeats)
        if path.parent not in listings:
            listings[path.parent] = {p.name.lower(): p for p in path.parent.iterdir() if p.is_file()}
        try:
            size = _image_size(path)
            bucket = _bucket_for(size, spec, res, buckets)
            text = _read_caption(path, caption_exts, listings[path.parent])
        except _Skip as e:
            skipped.append((rel.as_posix(), str(e)))
            continue
        items.append(
            ImageItem(path, _caption_text(text, spec.caption_separator), repeats, subset, size, bucket)
        )

    if not items:
        listed = "; ".join(f"{f} ({why})" for f, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise DatasetError(f"none of the {len(skipped)} images in '{root}' can be used: {listed}{more}")
    return Dataset(items, skipped, spec.caption_separator)


# ---- epochs ----


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, flip_aug: bool = False
) -> list[list[tuple[ImageItem, bool]]]:
    """One epoch's batches: each item ``repeats`` times, one bucket per batch, shuffled from (seed, epoch).

    The bool asks for a horizontal flip (random per occurrence with ``flip_aug``, always False without).
    The last batch of a bucket may be smaller than ``batch_size``, as in kohya.
    """
    rng = random.Random(f"{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[ImageItem]] = {}
    for item in dataset.items:
        by_bucket.setdefault(item.bucket, []).extend([item] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        occurrences = by_bucket[bucket]
        rng.shuffle(occurrences)
        for i in range(0, len(occurrences), batch_size):
            batches.append(
                [(item, flip_aug and rng.random() < 0.5) for item in occurrences[i : i + batch_size]]
            )
    rng.shuffle(batches)
    return batches


# ---- images ----


def load_image(item: ImageItem) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The image at its bucket size as [3, H, W] in [-1, 1], its original (h, w) and the crop's (top, left).

    EXIF orientation is applied, transparency is composited on white, the image is resized to cover
    the bucket and centre-cropped. SDXL's time ids need the original size and the crop corner.
    """
    try:
        with Image.open(item.path) as opened:
            img = ImageOps.exif_transpose(opened)
            img, _ = to_rgb(img)
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, …)
        raise DatasetError(f"cannot read image '{item.path.name}': {unreadable_reason(e)}") from None
    w, h = img.size
    bw, bh = item.bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    img = img.crop((left, top, left + bw, top + bh))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (h, w), (top, left)


# ---- caption rules ----


class CaptionRules:
    """kohya's caption processing, plus a trigger word that always comes first.

    The trigger word is never shuffled or dropped by tag dropout and is not repeated when the caption
    already has it as a tag (it moves to the front instead). It counts as the first of ``keep_tokens``,
    as when kohya users write it first in every caption with ``keep_tokens = 1``. Caption dropout (``caption_dropout_rate`` and every Nth epoch) empties the whole
    caption, trigger included, as kohya does: those steps train the unconditional embedding.
    ``epoch`` is 1-based, as in kohya and the saved file names.
    """

    def __init__(self, spec: TrainSpec):
        self.trigger = (spec.trigger_word or "").strip()
        self.separator = spec.caption_separator
        self.shuffle = spec.shuffle_caption
        self.keep_tokens = spec.keep_tokens
        self.dropout_rate = spec.caption_dropout_rate
        self.dropout_every_n_epochs = spec.caption_dropout_every_n_epochs
        self.tag_dropout_rate = spec.caption_tag_dropout_rate
        self.varying = varying_caption_settings(spec)

    def varies(self) -> bool:
        return bool(self.varying)

    def apply(self, caption: str, epoch: int, rng: random.Random) -> str:
        if self.dropout_every_n_epochs and epoch % self.dropout_every_n_epochs == 0:
            return ""
        if self.dropout_rate and rng.random() < self.dropout_rate:
            return ""
        tags = split_tags(caption, self.separator)
        keep = self.keep_tokens
        if self.trigger:
            tags = [self.trigger] + [t for t in tags if t.lower() != self.trigger.lower()]
            keep = max(keep, 1)
        fixed, flex = tags[:keep], tags[keep:]
        if self.shuffle:
            rng.shuffle(flex)
        if self.tag_dropout_rate:
            flex = [t for t in flex if rng.random() >= self.tag_dropout_rate]
        return _join_tags(fixed + flex, self.separator)
