"""Jobs: the state machine, submitting with quotas and cost estimates, and the fair queue order.

A job is ``queued → running → done | failed | cancelled``; a running job whose worker died goes
back to ``queued`` to resume from its last saved epoch. Every move is a compare-and-set in the
store, so a move the machine does not allow (or a race with another process) is refused.

Fair share: the next training job goes to the member with the least GPU time in the sliding
window (charged time plus what their running jobs are estimated to use), ties by submit time;
resumed jobs go first, and generation jobs go ahead of all training.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlite_utils import Database

from runner.families.protocol import ModelError
from runner.families.registry import base_family as detect_family
from runner.families.registry import family as family_named
from runner.families.registry import with_preset
from runner.gen.sample_prompts import DEFAULT_NEGATIVE, default_sample_prompts, read_sample_prompt
from runner.spec import (
    GRID_EPOCHS,
    GRID_PROMPTS,
    CaptionSpec,
    GridSpec,
    RunLength,
    SpecError,
    TagSpec,
    TrainSpec,
)

from . import store
from .config import Config, ConfigError, Quota, QuotaOverride
from .files import DiskFull, PathError, check_free_disk, dataset_images, member_path, storage_bytes

TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("running", "cancelled", "failed"),  # failed: a job whose row cannot start
    "running": ("done", "failed", "cancelled", "queued"),
}
log = logging.getLogger(__name__)


class JobError(ValueError):
    """A request about a job that cannot be done; the message says why."""


class QuotaError(JobError):
    """A submit over the member's quota; the message lists each limit that is over and by how much."""


def move(db: Database, job_id: int, to: str, **values: Any) -> None:
    """Move a job to state ``to``; refused when the job's state does not allow it."""
    allowed = tuple(s for s, targets in TRANSITIONS.items() if to in targets)
    if not store.transition(db, job_id, allowed, to, **values):
        job = store.get_job(db, job_id)
        now = job.state if job else "missing"
        raise JobError(f"job {job_id} is {now}; it cannot become {to}")


# ---- quotas ----


def effective_quota(db: Database, cfg: Config, member: str) -> Quota:
    """Defaults, then the most generous of the member's roles, then the member's own override."""
    roles = store.member_roles(db, member)
    role_values: dict[str, dict[str, float]] = {
        r: cfg.quota.roles[r].model_dump(exclude_none=True) for r in roles if r in cfg.quota.roles
    }
    for role, values in store.quota_overrides(db, "role", roles).items():
        role_values.setdefault(role, {}).update(_valid(values, f"role {role}"))
    own = _valid(store.quota_overrides(db, "member", [member]).get(member, {}), f"member {member}")
    merged = {}
    for key in Quota.names():
        granted = [v[key] for v in role_values.values() if key in v]
        if key in own:
            merged[key] = own[key]
        elif granted:
            merged[key] = max(granted)
    return cfg.quota.model_copy(update={k: type(getattr(cfg.quota, k))(v) for k, v in merged.items()})


def _valid(values: dict[str, Any], whose: str) -> dict[str, Any]:
    """The override rows that are limits; a row no admin command could write (another tool,
    an older version: nan, inf, text) is skipped with a warning, so the default applies."""
    out = {}
    for key, value in values.items():
        try:
            out[key] = getattr(QuotaOverride.model_validate({key: value}), key)
        except ValidationError:
            out[key] = None
        if out[key] is None:  # also SQLite's NULL, which is what a nan written there reads back as
            del out[key]
            log.warning("quota override of %s: %s = %r is not a limit; ignored", whose, key, value)
    return out


@dataclass
class Usage:
    quota: Quota
    running: int
    queued: int
    gpu_seconds_used: float  # charged in the last 24 hours
    gpu_seconds_reserved: float  # estimates of the member's queued and running jobs
    storage_bytes: int

    @property
    def gpu_seconds_left(self) -> float:
        return self.quota.daily_gpu_seconds - self.gpu_seconds_used - self.gpu_seconds_reserved


def usage(db: Database, cfg: Config, member: str, now: float | None = None, storage: bool = True) -> Usage:
    """``storage=False``: ``storage_bytes`` is left 0 instead of walking the member's folders (only
    training checks it, and a /gen under a crowd should not read the disk)."""
    now = time.time() if now is None else now
    active = store.list_jobs(db, store.ACTIVE, owner=member)
    return Usage(
        quota=effective_quota(db, cfg, member),
        running=sum(j.state == "running" for j in active),
        queued=sum(j.state == "queued" for j in active),
        gpu_seconds_used=store.gpu_seconds_since(db, now - 86400, member).get(member, 0.0),
        gpu_seconds_reserved=sum(_expected(j, now) for j in active),
        storage_bytes=storage_bytes(cfg.data_dir, member) if storage else 0,
    )


def overrun(db: Database, cfg: Config, job: store.Job, now: float | None = None) -> str | None:
    """Why ``job`` must stop now, when its owner's GPU time in the last 24 hours (charged, plus what
    their running jobs have used so far) is past the daily quota by more than the grace margin."""
    now = time.time() if now is None else now
    daily = effective_quota(db, cfg, job.owner).daily_gpu_seconds
    used = store.gpu_seconds_since(db, now - 86400, job.owner).get(job.owner, 0.0)
    running = store.list_jobs(db, ("running",), owner=job.owner)
    used += sum(now - j.started_at for j in running if j.started_at)
    if used <= daily + cfg.scheduling.overrun_grace_seconds:
        return None
    return (
        f"stopped after epoch {job.last_epoch}: you used {used:.0f} s of GPU time in the last 24 hours, "
        f"past your {daily:g} s a day; the epochs saved so far are kept (pick one, or train again "
        "with fewer epochs or steps once your GPU time has come back)"
    )


def _over(what: str, have: float, limit: float, unit: str = "", advice: str = "") -> str:
    return f"{what}: {have:g}{unit} of {limit:g}{unit} allowed (over by {have - limit:g}{unit}){advice}"


def check_quota(u: Usage, estimate: Estimate, images: int | None = None) -> None:
    q, problems = u.quota, []
    if u.queued + 1 > q.queued_jobs:
        problems.append(
            _over("queued jobs", u.queued + 1, q.queued_jobs, advice=" — wait for one to start or cancel one")
        )
    if estimate.seconds > u.gpu_seconds_left:
        left = max(u.gpu_seconds_left, 0)
        problems.append(
            f"GPU time: this job needs about {estimate.seconds:.0f} s and you have {left:.0f} s left of "
            f"{q.daily_gpu_seconds:g} s a day (over by {estimate.seconds - left:.0f} s)"
        )
    if estimate.kind == "train" and estimate.steps > q.total_steps:
        problems.append(
            _over(
                "training steps",
                estimate.steps,
                q.total_steps,
                advice=" — lower max_train_epochs (or max_train_steps), the repeats or raise train_batch_size",
            )
        )
    if images is not None and images > q.images_per_dataset:
        problems.append(_over("images in the dataset", images, q.images_per_dataset))
    storage_mb = u.storage_bytes / 2**20
    if estimate.kind == "train" and storage_mb >= q.storage_mb:
        problems.append(
            f"storage: your LoRAs use {storage_mb:.1f} MB of {q.storage_mb:g} MB "
            f"(over by {storage_mb - q.storage_mb:.1f} MB) — delete some first"
        )
    if problems:
        raise QuotaError("over your quota: " + "; ".join(problems))


# ---- cost estimates ----


@dataclass
class Estimate:
    kind: str
    steps: int
    seconds: float
    rate_key: str
    measured: bool  # from finished jobs, not the default
    preview_seconds: float = 0.0  # of ``seconds``: rendering the preview rounds
    epochs: int | None = None  # training: the epochs those steps make


def base_family(base: str) -> str:
    """The base's family name, read without loading the model (for default sizes and presets)."""
    try:
        return detect_family(base).name
    except ModelError as e:
        raise ConfigError(f"base model {base} cannot be used: {e}") from None


def native_resolution(family: str) -> int:
    return family_named(family).native_resolution


def _cost(db: Database, kind: str, rate_key: str, steps: int, default_rate: float) -> Estimate:
    measured = store.seconds_per_step(db, rate_key)
    rate = measured if measured is not None else default_rate
    return Estimate(kind, steps, round(steps * rate, 1), rate_key, measured is not None)


def estimate_train(db: Database, cfg: Config, spec: TrainSpec, family: str, weighted_images: int) -> Estimate:
    """Steps as the trainer counts them (TrainSpec.run_length, preset laid under the member's settings);
    batches as if all images shared one bucket, so a dataset of several buckets may train a few more."""
    s = TrainSpec.parse(with_preset(spec, family))
    w, h = s.resolution or (native_resolution(family),) * 2
    length = s.run_length(math.ceil(weighted_images / s.train_batch_size))
    default = cfg.scheduling.seconds_per_step * (w * h / 512**2) * s.train_batch_size
    key = f"train|{spec.base}|{w}x{h}|b{s.train_batch_size}"
    estimate = _cost(db, "train", key, length.steps, default)
    estimate.epochs = length.epochs
    estimate.preview_seconds = _preview_seconds(db, cfg, s, length, (w, h))
    estimate.seconds = round(estimate.seconds + estimate.preview_seconds, 1)
    return estimate


def preview_rounds(s: TrainSpec, length: RunLength) -> int:
    """How many times the trainer renders the previews (runner.train.loop's rule, independent of saving):
    every sample_every_n_steps-th step, or every N-th epoch and the last, and once first if asked."""
    every = s.sample_epochs_every()
    rounds = int(s.sample_at_first)
    if s.sample_every_n_steps:
        rounds += length.steps // s.sample_every_n_steps
    if every:
        rounds += sum(1 for e in range(1, length.epochs + 1) if e % every == 0 or e == length.epochs)
    return rounds


def _preview_seconds(
    db: Database, cfg: Config, s: TrainSpec, length: RunLength, size: tuple[int, int]
) -> float:
    """GPU time of the preview rounds, each prompt priced as a generation of its own steps and size
    (``--s``, ``--w``, ``--h`` or a prompt file's keys) at the base's generation rate."""
    rounds = preview_rounds(s, length)
    if not rounds:
        return 0.0
    # The trainer's default lines are the trigger and common tags: their count is what matters here.
    entries = s.sample_prompts or default_sample_prompts(s.trigger_word, [])
    seconds = 0.0
    for entry in entries:
        try:
            sp = read_sample_prompt(
                entry, width=size[0], height=size[1], steps=s.sample_steps, sampler="", seed=0
            )
        except ValueError as e:
            raise SpecError(f"sample_prompts: {e}") from None
        rate_default = cfg.scheduling.gen_seconds_per_step * (sp.width * sp.height / 512**2)
        seconds += _cost(db, "gen", f"gen|{s.base}|{sp.width}x{sp.height}", sp.steps, rate_default).seconds
    return round(rounds * seconds, 1)


def estimate_gen(db: Database, cfg: Config, spec: dict[str, Any], family: str) -> Estimate:
    w = spec.get("width") or native_resolution(family)
    h = spec.get("height") or native_resolution(family)
    steps = int(spec.get("steps") or 20) * int(spec.get("count") or 1)
    default = cfg.scheduling.gen_seconds_per_step * (w * h / 512**2)
    return _cost(db, "gen", f"gen|{spec['base']}|{w}x{h}", steps, default)


# ---- submitting ----


def _submit(
    db: Database,
    cfg: Config,
    member: str,
    kind: str,
    name: str | None,
    spec: dict[str, Any],
    estimate: Estimate,
    images: int | None = None,
) -> store.Job:
    try:
        check_free_disk(cfg.data_dir, cfg.data.min_free_gb)
    except DiskFull as e:
        raise JobError(f"not queued: {e}") from None
    with store.immediate(db):
        check_quota(usage(db, cfg, member, storage=kind == "train"), estimate, images)
        job_id = store.insert_job(
            db,
            kind,
            member,
            name,
            spec,
            estimate.rate_key,
            estimate.steps,
            estimate.seconds,
            estimate.preview_seconds,
        )
        if kind not in ("tag", "caption"):  # these write captions beside their dataset's images
            # Outputs go under the member's folder, named by job id so no member text becomes a path.
            spec["output_dir"] = str(
                member_path(cfg.data_dir, member, "loras" if kind == "train" else kind, str(job_id))
            )
            store.set_job_spec(db, job_id, spec)
    return store.get_job(db, job_id)


def submit_train(
    db: Database,
    cfg: Config,
    member: str,
    dataset: str,
    base: str,
    name: str,
    settings: dict[str, Any] | None = None,
    roles: list[str] | None = None,
) -> store.Job:
    """Queue a training job on the member's dataset ``dataset`` (a folder under their datasets)."""
    try:
        data = member_path(cfg.data_dir, member, "datasets", dataset)
        store.ensure_member(db, member, roles)
        if not data.is_dir():
            raise JobError(f"you have no dataset named '{dataset}'")
        images, weighted = dataset_images(data, int((settings or {}).get("num_repeats", 1)))
        if not images:
            raise JobError(f"dataset '{dataset}' has no images")
        store.add_dataset(db, member, dataset, str(data), images)
        if "training_adapter" in (settings or {}):
            raise JobError("training_adapter is the server's to set ([training_adapters] in its config)")
        adapter = {"training_adapter": cfg.training_adapters[base]} if base in cfg.training_adapters else {}
        raw = {
            **(settings or {}),
            **adapter,
            "base": cfg.base(base),
            "output_name": name,
            "train_data_dir": str(data),
            "output_dir": str(member_path(cfg.data_dir, member, "loras", "pending")),
        }
        spec = TrainSpec.parse(raw)
        if "sample_prompts" in raw:  # a prompt file is read now: the queued job keeps what it said
            raw["sample_prompts"] = spec.model_dump(mode="json", include={"sample_prompts"})["sample_prompts"]
        estimate = estimate_train(db, cfg, spec, base_family(spec.base), weighted)
    except (SpecError, ConfigError, PathError) as e:
        raise JobError(str(e)) from None
    return _submit(db, cfg, member, "train", name, raw, estimate, images)


def submit_gen(
    db: Database,
    cfg: Config,
    member: str,
    prompt: str,
    base: str,
    settings: dict[str, Any] | None = None,
    roles: list[str] | None = None,
) -> store.Job:
    try:
        store.ensure_member(db, member, roles)
        spec = {**(settings or {}), "prompt": prompt, "base": cfg.base(base)}
        estimate = estimate_gen(db, cfg, spec, base_family(spec["base"]))
    except (ConfigError, PathError) as e:
        raise JobError(str(e)) from None
    return _submit(db, cfg, member, "gen", None, spec, estimate)


# What a grid takes from its training job rather than from the member's settings.
_GRID_FROM_RUN = ("base", "lora_dir", "output_dir", "name", "weights", "prompts", "epochs")


def _spread(saved: list[int], n: int) -> list[int]:
    """``n`` of ``saved`` evenly spaced, the first and the last among them."""
    if len(saved) <= n:
        return saved
    return [saved[round(i * (len(saved) - 1) / (n - 1))] for i in range(n)]


def _run_prompts(run: TrainSpec) -> tuple[list[str], str]:
    """A grid's default prompts: the run's own sample prompts (the first 4, without their kohya
    options), else its trigger word; with the negative prompt its previews used."""
    if run.sample_prompts:
        try:
            parsed = [
                read_sample_prompt(entry, width=512, height=512, steps=20, sampler="", seed=0)
                for entry in run.sample_prompts
            ]
        except ValueError as e:
            raise JobError(
                f"this run's sample prompts cannot be read ({e}): give the grid's prompts"
            ) from None
        parsed = [sp for sp in parsed if sp.prompt][:GRID_PROMPTS]
        negatives = {sp.negative for sp in parsed}
        if parsed:  # one negative prompt for the whole grid: theirs when they share one
            return [sp.prompt for sp in parsed], negatives.pop() if len(negatives) == 1 else ""
    if run.trigger_word and run.trigger_word.strip():
        # The trainer's own default previews start with the trigger and use this negative prompt.
        return [run.trigger_word.strip()], DEFAULT_NEGATIVE
    raise JobError("this run has no sample prompts and no trigger word: give the grid's prompts")


def submit_grid(
    db: Database,
    cfg: Config,
    member: str,
    train_job_id: int,
    weights: list[float],
    prompts: list[str] | None = None,
    epochs: list[int] | None = None,
    settings: dict[str, Any] | None = None,
    roles: list[str] | None = None,
) -> store.Job:
    """Queue an epoch × weight grid of the member's own training job ``train_job_id`` (done or still
    running): a row per saved epoch and prompt, a column per weight, one seed. ``prompts`` default
    to the run's sample prompts, else its trigger word; ``epochs`` to every saved one (16 evenly
    spaced when it saved more); ``settings`` are generation settings (seed, steps, cfg_scale,
    sampler, width, height, negative_prompt, clip_skip, guidance_scale). The job ends in an
    ImagesEvent whose one image, the grid PNG, is the job's artifact."""
    train = store.get_job(db, train_job_id)
    if train is None or train.kind != "train":
        raise JobError(f"there is no training job {train_job_id}")
    if train.owner != member:
        raise JobError(
            f"training job {train_job_id} is not yours: only the member who trained a LoRA can make a grid of it"
        )
    given = dict(settings or {})
    fixed = sorted(k for k in _GRID_FROM_RUN if k in given)
    if fixed:
        raise JobError(
            f"{', '.join(fixed)}: a grid takes these from its training job and arguments, not settings"
        )
    try:
        store.ensure_member(db, member, roles)
        run = TrainSpec.parse(train.spec_dict)
        saved = sorted(
            {
                a["epoch"]
                for a in store.artifacts(db, train.id)
                if a["kind"] == "lora" and a["epoch"] is not None
            }
        )
        if not saved:
            raise JobError(f"{run.output_name} (job {train.id}) has saved no epoch yet")
        epochs = _spread(saved, GRID_EPOCHS) if epochs is None else list(dict.fromkeys(epochs))
        missing = sorted(set(epochs) - set(saved))
        if missing:
            raise JobError(
                f"{run.output_name} has no saved epoch {', '.join(map(str, missing))} "
                f"(saved: {', '.join(map(str, saved))})"
            )
        if prompts is None:
            prompts, negative = _run_prompts(run)
            given.setdefault("negative_prompt", negative)
        spec = {
            **given,
            "base": run.base,
            "lora_dir": run.output_dir,
            "name": run.output_name,
            "weights": weights,
            "prompts": prompts,
            "epochs": epochs,
        }
        checked = GridSpec.parse({**spec, "output_dir": run.output_dir})  # _submit sets the real one
        cells = len(checked.epochs or ()) * len(checked.prompts) * len(checked.weights)
        # A cell costs what a /gen image of the same size and steps costs (the same rate, learned from both).
        estimate = estimate_gen(db, cfg, {**spec, "count": cells}, base_family(checked.base))
    except (SpecError, ConfigError, PathError) as e:
        raise JobError(str(e)) from None
    return _submit(db, cfg, member, "grid", None, spec, estimate)


def submit_tag(
    db: Database, cfg: Config, member: str, dataset: str, settings: dict[str, Any] | None = None
) -> store.Job:
    """Queue auto-tagging of the member's dataset ``dataset`` (captions are written beside its images)."""
    try:
        data = member_path(cfg.data_dir, member, "datasets", dataset)
        store.ensure_member(db, member)
        if not data.is_dir():
            raise JobError(f"you have no dataset named '{dataset}'")
        images, _ = dataset_images(data)
        spec = TagSpec.parse({**(settings or {}), "train_data_dir": str(data)}).model_dump(exclude_unset=True)
    except (SpecError, PathError) as e:
        raise JobError(str(e)) from None
    estimate = _cost(db, "tag", "tag", images, cfg.scheduling.gen_seconds_per_step)
    return _submit(db, cfg, member, "tag", None, spec, estimate)


def submit_caption(
    db: Database, cfg: Config, member: str, dataset: str, settings: dict[str, Any] | None = None
) -> store.Job:
    """Queue Florence-2 captioning of the member's dataset ``dataset`` (a CaptionSpec's settings;
    captions are written beside its images, and the job ends in a CaptionedEvent)."""
    try:
        data = member_path(cfg.data_dir, member, "datasets", dataset)
        store.ensure_member(db, member)
        if not data.is_dir():
            raise JobError(f"you have no dataset named '{dataset}'")
        images, _ = dataset_images(data)
        raw = {**(settings or {}), "train_data_dir": str(data)}
        # Downloaded captioners go under the bot's data folder, beside everything else it keeps.
        raw.setdefault("cache_dir", str(cfg.data_dir / "cache"))
        spec = CaptionSpec.parse(raw).model_dump(exclude_unset=True)
    except (SpecError, PathError) as e:
        raise JobError(str(e)) from None
    # A captioner generates a sentence per image: about what a gen step costs per image, ×8 until measured.
    estimate = _cost(db, "caption", "caption", images, 8 * cfg.scheduling.gen_seconds_per_step)
    return _submit(db, cfg, member, "caption", None, spec, estimate)


def request_cancel(db: Database, job_id: int, member: str | None = None) -> str:
    """Cancel a queued job now, or ask the scheduler to stop a running one within a step.

    ``member`` set: only that member's own job; None: an operator, any job.
    """
    job = store.get_job(db, job_id)
    if job is None or (member is not None and job.owner != member):
        raise JobError(f"no job {job_id}" + (" of yours" if member is not None and job else ""))
    # The flag goes first, on a queued or running job alike: whatever the scheduler does with the
    # job meanwhile (starts it, or sends it back to the queue when its worker dies), it then
    # finds the flag and stops the job, so the cancel cannot fall between two states.
    db.execute(
        "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state IN (?, ?)", [job_id, *store.ACTIVE]
    )
    for _ in range(2):  # again if it went from running back to the queue in between
        if store.transition(
            db, job_id, ("queued",), "cancelled", finished_at=time.time(), failure="cancelled"
        ):
            return "cancelled"
        now = store.get_job(db, job_id).state
        if now == "running":
            return "stopping"
    raise JobError(f"job {job_id} is already {now}")


# ---- queue order, positions, ETAs ----


def _remaining(job: store.Job, now: float) -> float:
    """Seconds a job still needs: the trainer's own ETA while it runs, else the estimate."""
    if job.state == "running":
        progress = job.progress_dict
        if progress and "eta_s" in progress:
            return float(progress["eta_s"])
        return max((job.estimate_s or 0) - (now - (job.started_at or now)), 0.0)
    return job.estimate_s or 0.0


def _expected(job: store.Job, now: float) -> float:
    """GPU seconds a job will have used when it ends, of which none is charged yet."""
    ran = now - job.started_at if job.state == "running" and job.started_at else 0.0
    return ran + _remaining(job, now)


def fair_order(queued: list[store.Job], used: dict[str, float]) -> list[store.Job]:
    """Queued jobs in the order they would start: generation first (in submit order), resumed
    training next, then each next job to the member with the least GPU time so far (counting the
    jobs already ordered ahead of it), ties by submit time."""
    used = dict(used)
    gen = [j for j in queued if j.kind != "train"]
    train = sorted((j for j in queued if j.kind == "train"), key=lambda j: (j.submitted_at, j.id))
    order = sorted(gen, key=lambda j: (j.submitted_at, j.id))
    while train:
        pick = min(train, key=lambda j: (j.attempts == 0, used.get(j.owner, 0.0), j.submitted_at, j.id))
        train.remove(pick)
        used[pick.owner] = used.get(pick.owner, 0.0) + (pick.estimate_s or 0.0)
        order.append(pick)
    return order


def window_usage(db: Database, cfg: Config, running: list[store.Job], now: float) -> dict[str, float]:
    used = store.gpu_seconds_since(db, now - cfg.scheduling.fair_window_hours * 3600)
    for job in running:
        used[job.owner] = used.get(job.owner, 0.0) + _expected(job, now)
    return used


@dataclass
class Planned:
    job: store.Job
    position: int  # 1 = next to start
    eta_s: float  # seconds until it starts


@dataclass
class Plan:
    running: list[store.Job]
    queued: list[Planned] = field(default_factory=list)


def places(db: Database, cfg: Config, queued: list[store.Job]) -> list[Planned]:
    """Where each of ``queued`` stands (those no longer queued are left out), as ``plan`` says. A
    short (not training) job's place needs only the short jobs ahead of it, counted in the store;
    the queue is read whole only when one of them trains."""
    full = None
    if any(j.kind == "train" for j in queued):
        full = {p.job.id: p for p in plan(db, cfg).queued}
    short = store.short_jobs_ahead(db, [j.id for j in queued if j.kind != "train"])
    out = []
    for job in queued:
        if job.kind == "train":
            if full is not None and job.id in full:
                out.append(full[job.id])
        elif job.id in short:
            ahead, seconds = short[job.id]
            out.append(Planned(job, ahead + 1, seconds / max(len(cfg.workers.devices), 1)))
    return out


def place(db: Database, cfg: Config, job: store.Job) -> Planned | None:
    """``places`` of one job: None when it is not queued."""
    return next(iter(places(db, cfg, [job])), None)


def plan(db: Database, cfg: Config, now: float | None = None) -> Plan:
    """Where every active job stands: positions and start ETAs from the estimates of the jobs ahead."""
    now = time.time() if now is None else now
    running = store.list_jobs(db, ("running",))
    queued = store.list_jobs(db, ("queued",))
    slots = sorted([now] * len(cfg.workers.devices))
    busy: dict[str, list[float]] = {}
    for job in running:
        if job.kind == "train" and slots:
            end = now + _remaining(job, now)
            slots[slots.index(min(slots))] = end
            busy.setdefault(job.owner, []).append(end)
    result = Plan(running)
    gen_ahead = 0.0
    limits: dict[str, int] = {}
    for position, job in enumerate(fair_order(queued, window_usage(db, cfg, running, now)), start=1):
        if job.kind != "train":
            # Served between training steps: only the generation ahead of it delays it.
            result.queued.append(Planned(job, position, gen_ahead / max(len(slots), 1)))
            gen_ahead += job.estimate_s or 0.0
            continue
        i = slots.index(min(slots))
        start = slots[i]
        mine = busy.setdefault(job.owner, [])
        if job.owner not in limits:
            limits[job.owner] = max(effective_quota(db, cfg, job.owner).concurrent_jobs, 1)
        if len(mine) >= limits[job.owner]:
            start = max(start, mine.pop(mine.index(min(mine))))
        end = start + (job.estimate_s or 0.0)
        slots[i] = end
        mine.append(end)
        result.queued.append(Planned(job, position, start - now))
    return result
