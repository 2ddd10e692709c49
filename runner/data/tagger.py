"""WD14-style auto-tagging (SmilingWolf's wd-v1-4 / wd-v3 taggers) on onnxruntime, and captions from it.

A tagger is a folder with ``model.onnx`` (NHWC float32 input, its side read from the model) and
``selected_tags.csv`` (``tag_id,name,category,count``; category 9 = rating, 0 = general,
4 = character). Preprocessing is the reference app's: alpha on white, padded to a white square,
bicubic resize, BGR, 0–255 floats. Named taggers are downloaded once through huggingface_hub.

``tag_dataset`` is what a worker runs for a ``TagSpec``: it writes the caption files, and returns
a ``TaggedEvent`` with the tag frequencies and the tags it suggests baking into the trigger word.
"""

from __future__ import annotations

import csv
import functools
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..spec import FailedEvent, StageEvent, TagCount, TaggedEvent, TagSpec
from .images import decode_caption, image_files, to_rgb, unreadable_reason

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
CAPTION_FALLBACKS = (".caption", ".txt")
# Danbooru emoticons whose underscores are part of the face (the reference app's list).
KAOMOJIS = frozenset(
    ["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
     "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"]
)  # fmt: skip
# Words of tags that describe who the subject is (body, hair, eyes, usual outfit), as opposed to the
# scene, pose or framing: for a character LoRA these are what the trigger word should learn.
_SUBJECT_WORDS = frozenset(
    [
        "hair",
        "eyes",
        "ears",
        "tail",
        "horns",
        "wings",
        "skin",
        "pupils",
        "eyebrows",
        "eyelashes",
        "bangs",
        "ahoge",
        "twintails",
        "ponytail",
        "braid",
        "braids",
        "sidelocks",
        "freckles",
        "mole",
        "fang",
        "fangs",
        "halo",
        "heterochromia",
        "breasts",
        "hairband",
        "hairclip",
        "beard",
        "mustache",
        "shirt",
        "shorts",
        "skirt",
        "dress",
        "sleeves",
        "collar",
        "footwear",
        "shoes",
        "boots",
        "gloves",
        "hat",
        "jacket",
        "ribbon",
        "bow",
        "suspenders",
        "uniform",
        "thighhighs",
        "socks",
        "pantyhose",
        "necktie",
        "headwear",
        "kimono",
        "hoodie",
        "sweater",
        "cape",
        "armor",
        "glasses",
        "earrings",
        "choker",
        "scarf",
        "vest",
        "coat",
    ]
)
_SCENE_WORDS = frozenset(["background", "sky", "wall", "floor", "room", "outdoors", "indoors"])


class TaggerError(ValueError):
    """A tagger that cannot be used; the message says what to do."""


# ---- tags as text ----


def format_tag(name: str) -> str:
    """A CSV tag name as kohya/A1111 captions want it: spaces for underscores, parentheses escaped."""
    text = name if name in KAOMOJIS else name.replace("_", " ")
    return text.replace("(", "\\(").replace(")", "\\)")


def tag_key(tag: str) -> str:
    """One form for comparing tags however they were written (``Long_Hair``, ``long hair``, ``\\(x\\)``)."""
    return " ".join(tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ").lower().split())


def split_caption(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]


def describes_subject(tag: str, category: int | None) -> bool:
    words = set(tag_key(tag).split())
    if category == CHARACTER:
        return True
    return not words & _SCENE_WORDS and bool(words & _SUBJECT_WORDS)


# ---- the model ----


@dataclass(frozen=True)
class Labels:
    names: list[str]  # as in the CSV, with underscores
    categories: np.ndarray

    def category_of(self) -> dict[str, int]:
        return {tag_key(format_tag(n)): int(c) for n, c in zip(self.names, self.categories, strict=True)}


def read_labels(path: Path) -> Labels:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        names = [row["name"] for row in rows]
        categories = np.array([int(row["category"]) for row in rows])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaggerError(f"cannot read the tagger's tag list '{path}': {e}") from None
    except (KeyError, TypeError, ValueError):
        raise TaggerError(
            f"'{path}' is not a WD14 tag list: it needs the columns tag_id,name,category,count"
        ) from None
    if not names:
        raise TaggerError(f"the tagger's tag list '{path}' is empty")
    return Labels(names, categories)


def prepare(img: Image.Image, size: int) -> np.ndarray:
    """One image as the WD14 models expect it: [size, size, 3] BGR float32 in 0–255."""
    rgb, _ = to_rgb(img)
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def _providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Tagger:
    def __init__(self, folder: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise TaggerError("tagging needs onnxruntime: pip install 'loracord[tag]'") from None
        self.labels = read_labels(folder / TAGS_FILE)
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), providers=_providers(ort))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/… types
            raise TaggerError(f"cannot load the tagger model '{folder / MODEL_FILE}': {e}") from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise TaggerError(
                f"'{folder / MODEL_FILE}' is not a WD14 tagger: its input is {shape}, not [N, S, S, 3]"
            )
        if isinstance(out.shape[-1], int) and out.shape[-1] != len(self.labels.names):
            raise TaggerError(
                f"the tagger model has {out.shape[-1]} outputs but {TAGS_FILE} lists {len(self.labels.names)} tags"
            )
        self.size: int = shape[1]
        self.max_batch: int | None = shape[0] if isinstance(shape[0], int) else None
        self._input, self._output = inp.name, out.name

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Tag probabilities, [len(images), n_tags]."""
        batch = np.stack([prepare(img, self.size) for img in images])
        step = self.max_batch or len(batch)
        parts = [
            self.session.run([self._output], {self._input: batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        return np.concatenate(parts)

    def tags(
        self, probs: np.ndarray, general: float, character: float, keep_rating: bool = False
    ) -> list[str]:
        """Caption tags for one image: rating (if kept), characters, then general tags, each most likely first."""
        cats = self.labels.categories
        chosen = []
        if keep_rating and (cats == RATING).any():
            ratings = np.flatnonzero(cats == RATING)
            chosen.append(ratings[np.argmax(probs[ratings])])
        for category, threshold in ((CHARACTER, character), (GENERAL, general)):
            idx = np.flatnonzero((cats == category) & (probs > threshold))
            chosen.extend(idx[np.argsort(-probs[idx], kind="stable")])
        return [format_tag(self.labels.names[i]) for i in chosen]


def resolve_tagger(name: str, cache_dir: str | None = None) -> Path:
    """A folder holding the tagger's two files: ``name`` itself, or a download of a named tagger."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        missing = [f for f in (MODEL_FILE, TAGS_FILE) if not (folder / f).is_file()]
        if missing:
            raise TaggerError(f"tagger folder '{folder}' lacks {' and '.join(missing)}")
        return folder
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", name) or name.startswith("."):
        raise TaggerError(f"tagger folder '{name}' does not exist")
    repo = name if "/" in name else f"SmilingWolf/{name}"
    from huggingface_hub import hf_hub_download

    try:
        paths = [Path(hf_hub_download(repo, f, cache_dir=cache_dir)) for f in (MODEL_FILE, TAGS_FILE)]
    except Exception as e:  # huggingface_hub raises network, HTTP and offline errors of many types
        raise TaggerError(
            f"cannot get the tagger '{repo}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Check its name (e.g. wd-swinv2-tagger-v3) and the network, or give a folder with "
            f"{MODEL_FILE} and {TAGS_FILE}"
        ) from None
    return paths[0].parent


@functools.lru_cache(maxsize=1)
def load_tagger(folder: str) -> Tagger:
    """One tagger per worker process, kept between jobs."""
    return Tagger(Path(folder))


# ---- captions for a dataset ----


def compose(existing: list[str], predicted: list[str] | None, spec: TagSpec) -> list[str]:
    """The caption's tags: existing and predicted per ``spec.mode``, removals out, trigger and additions first."""
    if predicted is None or (existing and spec.mode == "keep"):
        body = existing
    elif spec.mode == "merge":
        body = existing + predicted
    else:
        body = predicted
    removed = {tag_key(t) for t in spec.remove}
    front = [t.strip() for t in [spec.trigger_word or "", *spec.add] if t.strip()]
    seen: set[str] = set()
    tags = []
    for tag in front + body:
        key = tag_key(tag)
        if key in seen or (key in removed and tag not in front):
            continue
        seen.add(key)
        tags.append(tag)
    return tags


def _caption_file(image: Path, spec: TagSpec) -> Path | None:
    for ext in dict.fromkeys([spec.caption_extension, *CAPTION_FALLBACKS]):
        path = image.with_suffix(ext)
        if path.is_file():
            return path
    return None


def suggest_removals(captions: list[list[str]], spec: TagSpec, categories: dict[str, int]) -> list[str]:
    """For a character: subject tags on at least ``suggest_min_share`` of the images, most frequent first."""
    if spec.preset not in (None, "character") or not captions:
        return []
    forms: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for tags in captions:
        for tag in tags:
            forms.setdefault(tag_key(tag), tag)
        counts.update(list(dict.fromkeys(tag_key(t) for t in tags)))  # ties keep caption order
    trigger = tag_key(spec.trigger_word or "")
    return [
        forms[key]
        for key, n in counts.most_common()
        if key != trigger
        and n >= max(2, spec.suggest_min_share * len(captions))
        and describes_subject(key, categories.get(key))
    ]


def tag_dataset(
    spec: TagSpec, emit: Callable[[Any], None], cancel: threading.Event | None = None
) -> TaggedEvent | FailedEvent:
    """Caption every image under ``spec.train_data_dir``; the final event is also emitted."""

    def fail(kind: str, reason: str) -> FailedEvent:
        event = FailedEvent(kind=kind, reason=reason)
        emit(event)
        return event

    root = Path(spec.train_data_dir).expanduser()
    if not root.is_dir():
        return fail("bad_input", f"dataset folder '{root}' does not exist")
    images, _ = image_files(root)
    if not images:
        return fail("bad_input", f"no images in '{root}'; run loracord dataset first")

    existing: dict[Path, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    for image in images:
        caption = _caption_file(image, spec)
        try:
            existing[image] = split_caption(decode_caption(caption.read_bytes())) if caption else []
        except (OSError, UnicodeDecodeError):
            skipped.append(
                (image.relative_to(root).as_posix(), f"caption '{caption.name}' is not UTF-8 text")
            )
    images = [i for i in images if i in existing]
    to_tag = [i for i in images if spec.mode != "keep" or not existing[i]]

    predicted: dict[Path, list[str]] = {}
    tagger = None
    if to_tag:
        emit(StageEvent(stage="tagger", message=f"loading tagger {spec.tagger}"))
        try:
            tagger = load_tagger(str(resolve_tagger(spec.tagger, spec.cache_dir)))
        except TaggerError as e:
            return fail("bad_input", str(e))
    for start in range(0, len(to_tag), spec.batch_size):
        if cancel is not None and cancel.is_set():
            return fail("cancelled", "tagging was cancelled; no caption was changed")
        batch, pictures = [], []
        for image in to_tag[start : start + spec.batch_size]:
            try:
                with Image.open(image) as img:
                    pictures.append(ImageOps.exif_transpose(img).copy())
                batch.append(image)
            except Exception as e:  # PIL's decoders raise many types
                skipped.append((image.relative_to(root).as_posix(), unreadable_reason(e)))
        if batch:
            for image, probs in zip(batch, tagger.predict(pictures), strict=True):
                predicted[image] = tagger.tags(
                    probs, spec.general_threshold, spec.character_threshold, spec.keep_rating_tags
                )
        done = min(start + spec.batch_size, len(to_tag))
        emit(
            StageEvent(
                stage="tagging", message=f"tagged {done}/{len(to_tag)}", current=done, total=len(to_tag)
            )
        )

    unreadable = {root / f for f, _ in skipped}
    captions: dict[Path, list[str]] = {}
    written = 0
    for image in images:
        if image in unreadable:
            continue
        tags = compose(existing[image], predicted.get(image), spec)
        captions[image] = tags
        target = image.with_suffix(spec.caption_extension)
        text = ", ".join(tags) + "\n"
        if not target.is_file() or target.read_text(encoding="utf-8", errors="replace") != text:
            target.write_text(text, encoding="utf-8")
            written += 1

    event = TaggedEvent(
        images=len(captions),
        captions_written=written,
        tag_summary=_summary(list(captions.values()), spec),
        suggested_removals=suggest_removals(
            list(captions.values()), spec, tagger.labels.category_of() if tagger else {}
        ),
        tag_frequency=_frequency(captions, root),
        skipped=skipped,
    )
    emit(event)
    return event


def _summary(captions: list[list[str]], spec: TagSpec) -> list[TagCount]:
    trigger = tag_key(spec.trigger_word or "")
    counts = Counter(t for tags in captions for t in dict.fromkeys(tags) if tag_key(t) != trigger)
    return [TagCount(tag=t, count=n, share=round(n / len(captions), 4)) for t, n in counts.most_common()]


def _frequency(captions: dict[Path, list[str]], root: Path) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency shape: per folder, how many images carry each (lower-cased) tag."""
    freq: dict[str, dict[str, int]] = {}
    for image, tags in captions.items():
        rel = image.relative_to(root).parts
        counts = freq.setdefault(rel[0] if len(rel) > 1 else root.name, {})
        for tag in dict.fromkeys(t.lower() for t in tags):
            counts[tag] = counts.get(tag, 0) + 1
    return freq
