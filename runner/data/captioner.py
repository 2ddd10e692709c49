"""Sentence captions with Florence-2 (transformers' own ``Florence2ForConditionalGeneration``), beside
the WD14 tagger: what a worker runs for a ``CaptionSpec``.

A captioner is a folder in transformers' format (``config.json``, the weights, the processor's and
tokenizer's files), or one of the named models, downloaded once into ``cache_dir`` with progress
events. The job loads the model, captions the images in batches on the worker's GPU, cleans each
caption (``captions.py``: no "The image shows", at most ``max_words``), puts the trigger word and
prefix first, writes the caption files, and returns a ``CaptionedEvent`` with the words and phrases
the captions repeat. The model is freed when the job ends: the worker's GPU belongs to training,
and a caption job is short and rare, so keeping 0.8B parameters resident between jobs is not worth
the memory a training job then lacks.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..outcome import Cancelled, run_to_event
from ..spec import CaptionedEvent, CaptionSpec, FailedEvent, StageEvent
from .captions import caption_frequency, clean_caption, compose_caption
from .images import decode_caption, image_files, to_rgb, unreadable_reason
from .tagger import CAPTION_FALLBACKS

# The transformers-native conversions of microsoft/Florence-2-large and -base: model_type florence2
# with a DaViT vision config and a BART text config, loaded by Florence2ForConditionalGeneration
# without trust_remote_code. microsoft/Florence-2-* hold the original remote-code checkpoints,
# whose configs the native class does not read.
NAMED = {
    "florence2-large": "florence-community/Florence-2-large",
    "florence2-base": "florence-community/Florence-2-base",
}
EXAMPLES = 5  # captions the final event carries for the member to read
# Sentences give a long tail of phrases found once; the event (stored, posted) keeps the head.
SUMMARY_LIMIT = 300


class CaptionerError(ValueError):
    """A captioner that cannot be used; the message says what to do."""


# ---- the model ----


def download_progress(emit: Callable[[Any], None], repo: str, every_s: float = 2.0) -> type:
    """A tqdm class for ``snapshot_download`` that reports its byte counts as StageEvents (at most
    one every ``every_s`` seconds, and the last), so a member sees a first download move."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Progress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # huggingface_hub makes two byte bars, network transfer and bytes written; the
            # written bytes ("huggingface_hub.snapshot_download") are the ones every download moves.
            self.reports = kwargs.get("name") == "huggingface_hub.snapshot_download"
            self.done_bytes = float(kwargs.get("initial") or 0)
            self.last_report = 0.0
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            # Counted here: a bar that is off (no TTY, as in a worker) ignores update() entirely.
            self.done_bytes += n or 0
            now = time.monotonic()
            total = self.total or 0
            if self.reports and (now - self.last_report >= every_s or (total and self.done_bytes >= total)):
                self.last_report = now
                mb, total_mb = round(self.done_bytes / 2**20), round(total / 2**20)
                emit(
                    StageEvent(
                        stage="download",
                        message=f"downloading {repo}: {mb}/{total_mb} MB",
                        current=mb,
                        total=total_mb or None,
                    )
                )
            return super().update(n)

    return Progress


def resolve_captioner(
    name: str, cache_dir: str | None = None, emit: Callable[[Any], None] = lambda e: None
) -> Path:
    """A folder holding a Florence-2 model: ``name`` itself, or the download of a named one."""
    if name in NAMED:
        repo = NAMED[name]
        from huggingface_hub import snapshot_download

        emit(StageEvent(stage="captioner", message=f"getting {repo} (downloaded once, then cached)"))
        try:
            return Path(
                snapshot_download(repo, cache_dir=cache_dir, tqdm_class=download_progress(emit, repo))
            )
        except Exception as e:  # huggingface_hub raises network, HTTP and offline errors of many types
            first = str(e).splitlines()[0] if str(e) else ""
            raise CaptionerError(
                f"cannot get the captioner {repo} ({type(e).__name__}: {first}). Check the network, or "
                "give a folder holding a Florence-2 model"
            ) from None
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise CaptionerError(
            f"captioner folder '{name}' does not exist; give florence2-large, florence2-base or a folder "
            "holding a Florence-2 model"
        )
    if not (folder / "config.json").is_file():
        raise CaptionerError(f"captioner folder '{folder}' lacks config.json: it is not a transformers model")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise CaptionerError(f"cannot read the captioner's config '{folder / 'config.json'}': {e}") from None
    if model_type != "florence2":
        raise CaptionerError(
            f"'{folder}' is not a Florence-2 model: its config.json says model_type {model_type!r}"
        )
    return folder


class Captioner:
    """One Florence-2 model and its processor on one device."""

    def __init__(self, folder: Path, device: str | None = None):
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Half precision on a GPU, as the model card runs it; the CPU has no fast fp16 matmuls.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = Florence2ForConditionalGeneration.from_pretrained(
                folder, dtype=self.dtype, local_files_only=True
            )
        except Exception as e:  # transformers raises OSError, ValueError, KeyError… for a broken folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CaptionerError(
                f"cannot load the captioner '{folder}': {type(e).__name__}: {first}"
            ) from None
        self.model = model.to(self.device).eval()

    def caption(self, images: list[Image.Image], spec: CaptionSpec) -> list[str]:
        """The model's raw text for each image, in order (one batch)."""
        import torch

        inputs = self.processor(text=[spec.task] * len(images), images=images, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)  # casts only the floating tensors (the pixels)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=spec.max_new_tokens, num_beams=spec.num_beams, do_sample=False
            )
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        import torch

        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- captions for a dataset ----


def _existing(image: Path, extension: str) -> Path | None:
    for ext in dict.fromkeys([extension, *CAPTION_FALLBACKS]):
        if image.with_suffix(ext).is_file():
            return image.with_suffix(ext)
    return None


def caption_dataset(
    spec: CaptionSpec,
    emit: Callable[[Any], None],
    cancel: threading.Event | None = None,
    device: str | None = None,
) -> CaptionedEvent | FailedEvent:
    """Caption every image under ``spec.train_data_dir``; the final event is also emitted. Nothing
    is written before every image is captioned, so a failed or cancelled job changes no caption."""
    return run_to_event(
        lambda: _caption(spec, emit, cancel, device),
        emit,
        bad_input=(CaptionerError,),
        cancelled="captioning was cancelled; no caption was changed",
        out_of_memory=lambda: f"try a smaller batch_size than {spec.batch_size} or florence2-base",
    )


def _caption(
    spec: CaptionSpec, emit: Callable[[Any], None], cancel: threading.Event | None, device: str | None
) -> CaptionedEvent:
    root = Path(spec.train_data_dir).expanduser()
    if not root.is_dir():
        raise CaptionerError(f"dataset folder '{root}' does not exist")
    images, _ = image_files(root)
    if not images:
        raise CaptionerError(f"no images in '{root}'; run loracord dataset first")

    existing: dict[Path, str] = {}
    skipped: list[tuple[str, str]] = []
    for image in images:
        caption = _existing(image, spec.caption_extension)
        try:
            existing[image] = decode_caption(caption.read_bytes()).strip() if caption else ""
        except (OSError, UnicodeDecodeError):
            skipped.append(
                (image.relative_to(root).as_posix(), f"caption '{caption.name}' is not UTF-8 text")
            )
    images = [i for i in images if i in existing]
    to_caption = [i for i in images if spec.mode != "keep" or not existing[i]]

    generated: dict[Path, str] = {}
    if to_caption:
        folder = resolve_captioner(spec.captioner, spec.cache_dir, emit)
        emit(StageEvent(stage="captioner", message=f"loading captioner {spec.captioner}"))
        captioner = Captioner(folder, device)
        try:
            for start in range(0, len(to_caption), spec.batch_size):
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                batch, pictures = [], []
                for image in to_caption[start : start + spec.batch_size]:
                    try:
                        with Image.open(image) as img:
                            pictures.append(to_rgb(ImageOps.exif_transpose(img))[0])
                        batch.append(image)
                    except Exception as e:  # PIL's decoders raise many types
                        skipped.append((image.relative_to(root).as_posix(), unreadable_reason(e)))
                if batch:
                    for image, raw in zip(batch, captioner.caption(pictures, spec), strict=True):
                        generated[image] = clean_caption(raw, spec.max_words)
                done = min(start + spec.batch_size, len(to_caption))
                emit(
                    StageEvent(
                        stage="captioning",
                        message=f"captioned {done}/{len(to_caption)}",
                        current=done,
                        total=len(to_caption),
                    )
                )
        finally:
            captioner.close()

    unreadable = {root / f for f, _ in skipped}
    captions: dict[Path, str] = {}
    written = 0
    for image in images:
        if image in unreadable:
            continue
        new = generated.get(image)
        # A kept caption (mode keep) still gets the trigger and prefix first, as the tagger's does.
        text = compose_caption(
            new or "",
            existing[image],
            mode=spec.mode if new is not None else "append",
            trigger=spec.trigger_word,
            style=spec.trigger_style,
            prefix=spec.prefix,
        )
        captions[image] = text
        target = image.with_suffix(spec.caption_extension)
        if not target.is_file() or target.read_text(encoding="utf-8", errors="replace") != text + "\n":
            target.write_text(text + "\n", encoding="utf-8")
            written += 1

    return CaptionedEvent(
        images=len(captions),
        captions_written=written,
        captioner=NAMED.get(spec.captioner, spec.captioner),
        tag_summary=caption_frequency(
            captions.values(), exclude=[spec.trigger_word or "", spec.prefix or ""]
        ),
        examples=[(i.relative_to(root).as_posix(), c) for i, c in list(captions.items())[:EXAMPLES]],
        skipped=skipped,
    )
