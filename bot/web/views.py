"""What the pages show, read from the store and the data folder: plain functions and dataclasses,
no HTTP, so the numbers on a page are the ones the thread shows."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from safetensors import safe_open
from sqlite_utils import Database

from runner.data.images import image_files

from .. import jobs, library, store
from ..config import Config, Quota

# Settings a member chose or the preset filled in; paths on the server are not theirs to see.
_HIDDEN_SETTINGS = {"train_data_dir", "output_dir", "base", "training_adapter", "output_name"}
_WORD = re.compile(r"[^\W\d_][\w'-]*", re.UNICODE)
_STOP = set(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "in",
        "on",
        "at",
        "with",
        "to",
        "is",
        "are",
        "his",
        "her",
        "its",
        "their",
        "this",
        "that",
        "for",
        "by",
        "from",
        "as",
    ]
)
CONTACT_CELL = 128
CONTACT_MAX = 120


@dataclass
class Picture:
    artifact: int
    prompt: str
    parameters: str  # A1111's infotext, from the PNG


@dataclass
class Epoch:
    epoch: int
    step: int
    lora: dict[str, Any] | None  # its artifact row (path, size, sha256), None once deleted
    pictures: list[Picture]


@dataclass
class Run:
    """One training job as its owner's page shows it."""

    job: store.Job
    base: str
    trigger: str | None
    kept: library.Lora | None  # the library entry this training fills, when it is this job's
    epochs: list[Epoch]
    prompts: list[str]
    settings: dict[str, Any]
    progress: dict[str, Any] | None
    grids: list[dict[str, Any]] = field(default_factory=list)  # epoch × weight grids made so far

    @property
    def active(self) -> bool:
        return self.job.state in store.ACTIVE


def _parameters(path: str) -> str:
    try:
        with Image.open(path) as im:
            return str(im.info.get("parameters", ""))
    except OSError:
        return ""


def base_name(cfg: Config, spec: dict[str, Any]) -> str:
    names = {v: k for k, v in cfg.bases.items()}
    return names.get(spec.get("base", ""), Path(str(spec.get("base", "?"))).name)


def run(db: Database, cfg: Config, job: store.Job) -> Run:
    spec = job.spec_dict
    arts = store.artifacts(db, job.id)
    by_path = {a["path"]: a for a in arts}
    loras = {a["epoch"]: a for a in arts if a["kind"] == "lora" and a["epoch"] is not None}
    epochs, prompts = [], []
    for e in store.job_events(db, job.id):
        if e["type"] != "epoch":
            continue
        prompts = e.get("sample_prompts") or prompts
        pictures = [
            Picture(by_path[p]["id"], prompt, _parameters(p))
            for p, prompt in zip(e.get("sample_images", []), e.get("sample_prompts", []), strict=False)
            if p in by_path
        ]
        epochs.append(Epoch(e["epoch"], e["step"], loras.get(e["epoch"]), pictures))
    settings = {k: v for k, v in spec.items() if k not in _HIDDEN_SETTINGS}
    return Run(
        job=job,
        base=base_name(cfg, spec),
        trigger=spec.get("trigger_word"),
        kept=kept_of(db, job),
        epochs=epochs,
        prompts=prompts,
        settings=settings,
        progress=job.progress_dict,
    )


def kept_of(db: Database, job: store.Job) -> library.Lora | None:
    """The library entry this training fills (a later training of the same name replaces it)."""
    kept = library.get_lora(db, job.owner, job.name) if job.name else None
    return kept if kept is not None and kept.job_id == job.id else None


def member_runs(db: Database, member: str) -> list[store.Job]:
    """The member's trainings, newest first: the ones behind their LoRAs and any still running."""
    return [j for j in reversed(store.list_jobs(db, owner=member)) if j.kind == "train"]


def file_hashes(path: str) -> dict[str, str]:
    """What A1111 and Civitai show of a LoRA file: kohya's own hashes from its metadata."""
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError):
        return {}
    return {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash") if meta.get(k)}


@dataclass
class Dataset:
    images: list[Path]
    captions: dict[Path, str]
    words: list[tuple[str, int]]  # tag (or word, for sentence captions) → images it is in
    by: str  # "tag" or "word"


def dataset(spec: dict[str, Any]) -> Dataset:
    folder = Path(spec.get("train_data_dir", ""))
    images = image_files(folder)[0] if folder.is_dir() else []
    ext = spec.get("caption_extension", ".txt")
    captions = {}
    for p in images:
        cap = p.with_suffix(ext)
        captions[p] = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.is_file() else ""
    # Tags are comma-separated (WD14, kohya); Florence-2's sentences have few commas per word.
    texts = [t for t in captions.values() if t]
    parts = [len(t.split(",")) for t in texts]
    words = [len(t.split()) for t in texts]
    by = "tag" if texts and sum(parts) * 3 >= sum(words) else "word"
    counts: Counter[str] = Counter()
    for t in texts:
        if by == "tag":
            counts.update({x.strip() for x in t.split(",") if x.strip()})
        else:
            counts.update({w.lower() for w in _WORD.findall(t) if w.lower() not in _STOP})
    return Dataset(images, captions, sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40], by)


def contact_sheet(images: list[Path]) -> bytes:
    """A JPEG of the dataset's images as square thumbnails, 8 a row (the first CONTACT_MAX)."""
    shown = images[:CONTACT_MAX]
    cols = min(8, max(len(shown), 1))
    rows = max((len(shown) + cols - 1) // cols, 1)
    sheet = Image.new("RGB", (cols * CONTACT_CELL, rows * CONTACT_CELL), "white")
    for i, p in enumerate(shown):
        try:
            with Image.open(p) as im:
                im.draft("RGB", (CONTACT_CELL * 2, CONTACT_CELL * 2))  # JPEGs decode small: fast
                thumb = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (CONTACT_CELL, CONTACT_CELL))
        except OSError:
            continue
        sheet.paste(thumb, ((i % cols) * CONTACT_CELL, (i // cols) * CONTACT_CELL))
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=85)
    return out.getvalue()


def loss_series(db: Database, job_id: int) -> dict[str, list[float]]:
    rows = store.losses(db, job_id)
    return {"step": [r[0] for r in rows], "epoch": [r[1] for r in rows], "loss": [r[2] for r in rows]}


def live(db: Database, job: store.Job) -> dict[str, Any]:
    """What the page's live box shows; the same numbers as the thread's progress message."""
    epochs = [e["epoch"] for e in store.job_events(db, job.id) if e["type"] == "epoch"]
    return {
        "state": job.state,
        "progress": job.progress_dict,
        "epochs": epochs,
        "failure": job.failure,
        "cancel_requested": bool(job.cancel_requested),
    }


# ---- the owner's page ----


@dataclass
class Worker:
    name: str
    device: str
    up: bool
    job: int | None
    between: list[int]
    restarts: int
    last_error: str


@dataclass
class Overview:
    running: list[store.Job]
    queued: list[jobs.Planned]
    workers: list[Worker]
    usage: list[tuple[str, float]]  # member → GPU seconds in the fair window, most first
    window_h: float
    paused: bool
    quota: Quota
    config_roles: dict[str, dict[str, float]]
    overrides: list[dict[str, Any]]
    actions: list[dict[str, Any]]


def overview(db: Database, cfg: Config, scheduler: Any) -> Overview:
    workers = []
    if scheduler is not None:
        for name in scheduler.dispatcher.workers:
            slot = scheduler.slots.get(name)
            restarts, why = scheduler.deaths.get(name, (0, ""))
            workers.append(
                Worker(
                    name=name,
                    device=name.split(":", 1)[-1],
                    up=scheduler.dispatcher.ready(name),
                    job=slot.main if slot else None,
                    between=sorted(slot.between) if slot else [],
                    restarts=restarts,
                    last_error=why,
                )
            )
    now = time.time()
    window_h = cfg.scheduling.fair_window_hours
    used = store.gpu_seconds_since(db, now - window_h * 3600)
    return Overview(
        running=store.list_jobs(db, ("running",)),
        queued=jobs.plan(db, cfg, now).queued,
        workers=workers,
        usage=sorted(used.items(), key=lambda kv: -kv[1]),
        window_h=window_h,
        paused=bool(store.get_setting(db, "paused", False)),
        quota=cfg.quota,
        config_roles={r: o.model_dump(exclude_none=True) for r, o in cfg.quota.roles.items()},
        overrides=store.all_quota_overrides(db),
        actions=store.admin_actions(db),
    )
