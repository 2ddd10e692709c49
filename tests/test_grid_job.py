"""Grid jobs: an epoch × weight comparison of one training run, from submit_grid through the
scheduler and a worker, each cell checked against a plain generation of that epoch file."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from botutil import TRAIN, write_config
from PIL import Image
from test_dispatch import drive

from bot import jobs, store
from bot.dispatch import make_dispatcher
from bot.files import member_path
from bot.scheduler import Scheduler
from runner.formats.infotext import parse_parameters
from runner.gen.generate import generate
from runner.gen.pipelines import PipelineCache
from runner.gen.sample_prompts import DEFAULT_NEGATIVE
from runner.selftest import make_demo_dataset
from runner.spec import GenSpec, ImagesEvent, LoraWeight, StageEvent, epoch_file
from runner.worker import Worker

SIDE = 64  # tiny:sd15 renders 64 px cells, which the grid pastes unscaled


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Alice trains 3 epochs through the scheduler on one CPU worker and asks for a grid of the run
    as soon as epoch 1 is saved, so the grid is served between two of its training steps."""
    root = tmp_path_factory.mktemp("grid")
    cfg = write_config(
        root,
        "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\n[scheduling]\npoll_seconds = 0.05\n",
    )
    db = store.open_store(cfg.store)
    for member in ("alice", "bob"):
        make_demo_dataset(member_path(cfg.data_dir, member, "datasets", "ds"), count=2, repeats=1)
    # A high learning rate so that the epochs differ enough to tell their cells apart.
    settings = {**TRAIN, "max_train_epochs": 3, "learning_rate": 1e-2, "trigger_word": "zzk"}
    train = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "me", settings)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    seen: list[tuple[int, str]] = []
    grid: list[store.Job] = []

    def on_event(job, event):
        seen.append((job.id, event.type))
        if job.id == train.id and event.type == "epoch" and not grid:
            settings = {"steps": 1, "width": SIDE, "height": SIDE, "seed": 3}
            grid.append(jobs.submit_grid(db, cfg, "alice", train.id, [0.0, 1.0], settings=settings))

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: bool(grid) and not store.list_jobs(db, store.ACTIVE), timeout=600))
    return cfg, db, store.get_job(db, train.id), grid[0], seen


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_grid_of_a_running_run_goes_through_the_scheduler(trained):
    cfg, db, train, submitted, seen = trained
    grid = store.get_job(db, submitted.id)
    assert (train.state, grid.state) == ("done", "done"), grid.failure
    # Served between two training steps: the run went on training after the grid was done.
    done_at = seen.index((grid.id, "images"))
    assert (train.id, "progress") in seen[done_at:] and grid.worker == train.worker
    spec = grid.spec_dict
    # Asked at epoch 1, the one saved then; the run's trigger word as the prompt, with the negative
    # prompt its default previews use.
    assert spec["epochs"] == [1] and spec["prompts"] == ["zzk"]
    assert spec["negative_prompt"] == DEFAULT_NEGATIVE and spec["name"] == "me"
    assert spec["lora_dir"] == train.spec_dict["output_dir"]
    # Priced as /gen images: one sampling step per cell at the rate of 64x64 images.
    assert (grid.steps, grid.rate_key) == (2, f"gen|tiny:sd15|{SIDE}x{SIDE}")

    (artifact,) = store.artifacts(db, grid.id)
    out = member_path(cfg.data_dir, "alice", "grid", str(grid.id))
    assert artifact["kind"] == "image" and artifact["path"] == str(out / "grid-00000-3.png")
    result = ImagesEvent.model_validate_json(grid.result)
    assert result.images == [artifact["path"]] and result.seeds == [3]
    with Image.open(artifact["path"]) as image:
        assert image.info["parameters"] == result.parameters[0]
        width, height = image.size
    assert 0 < width - 2 * SIDE < 2 * SIDE and 0 < height - SIDE < SIDE  # 1 row × 2 columns + labels
    stages = [e for e in store.job_events(db, grid.id) if e["type"] == "stage"]
    assert [(e["current"], e["total"]) for e in stages] == [(1, 2), (2, 2)]


@pytest.fixture(scope="module")
def worker():
    return Worker("cpu")


def grid_job(run_dir, out_dir, **spec):
    return {
        "type": "grid",
        "id": "g",
        "spec": {
            "base": "tiny:sd15",
            "output_dir": str(out_dir),
            "lora_dir": str(run_dir),
            "name": "me",
            "prompts": ["a red circle"],
            "steps": 2,
            "width": SIDE,
            "height": SIDE,
            "seed": 7,
            **spec,
        },
    }


def test_grid_cells_on_the_worker_are_plain_gens_of_each_epoch(trained, worker, tmp_path):
    _, _, train, _, _ = trained
    run_dir = train.spec_dict["output_dir"]
    weights, epochs = [0.0, 1.5], [1, 3]
    events: list = []
    result = worker.run(grid_job(run_dir, tmp_path / "grid", weights=weights, epochs=epochs), events.append)
    assert isinstance(result, ImagesEvent), result
    stages = [e for e in events if isinstance(e, StageEvent)]
    assert [(s.current, s.total) for s in stages] == [(i, 4) for i in range(1, 5)]
    (path,) = result.images
    assert path == str(tmp_path / "grid" / "grid-00000-7.png")
    with Image.open(path) as image:
        grid = pixels(image)
        params = parse_parameters(image.info["parameters"])
    assert params.fields["Seed"] == "7" and "<lora:me-000001:0>" in params.prompt  # the first cell's
    height, width = grid.shape[:2]
    rows, cols = len(epochs), len(weights)
    label_w, head_h = width - cols * SIDE, height - rows * SIDE
    assert 0 < label_w < 2 * SIDE and 0 < head_h < SIDE

    cache = PipelineCache("cpu")  # the references come from a pipeline of their own

    def reference(epoch: int, weight: float) -> np.ndarray:
        lora = LoraWeight(name=f"{run_dir}/{epoch_file('me', epoch)}", weight=weight)
        spec = GenSpec(
            prompt="a red circle",
            base="tiny:sd15",
            output_dir=str(tmp_path / f"ref{epoch}-{weight}"),
            loras=[lora],
            seed=7,
            steps=2,
            width=SIDE,
            height=SIDE,
        )
        (png,) = generate(spec, cache).images
        with Image.open(png) as image:
            return pixels(image)

    def cell(row: int, col: int) -> np.ndarray:
        top, left = head_h + row * SIDE, label_w + col * SIDE
        return grid[top : top + SIDE, left : left + SIDE]

    # Epoch 3 at weight 1.5, the cell at the bottom right.
    late = reference(3, 1.5)
    assert np.abs(cell(1, 1) - late).max() <= 2
    early = reference(1, 1.5)
    assert np.abs(cell(0, 1) - early).max() <= 2
    # The two epochs differ visibly, so each match above says which epoch file the cell used.
    assert np.abs(early - late).mean() > 1
    # At weight 0 every epoch is the base model alone.
    assert np.abs(cell(0, 0) - reference(1, 0.0)).max() <= 2
    assert np.array_equal(cell(0, 0), cell(1, 0))


def test_the_worker_refuses_a_grid_it_cannot_make(trained, worker, tmp_path):
    _, _, train, _, _ = trained
    run_dir = train.spec_dict["output_dir"]
    unsaved = worker.run(grid_job(run_dir, tmp_path, weights=[1.0], epochs=[5]), lambda e: None)
    assert unsaved.type == "failed" and unsaved.kind == "bad_input"
    assert "me has no saved epoch 5 (saved: epoch 1, epoch 2, epoch 3)" in unsaved.reason
    strong = worker.run(grid_job(run_dir, tmp_path, weights=[1.0, 12.0]), lambda e: None)
    assert strong.type == "failed" and strong.kind == "bad_input"
    assert strong.reason == "weights.1 must be less than or equal to 10 (got 12.0)"
    assert not list(tmp_path.glob("*.png"))


def test_submit_grid_refusals_say_why(trained):
    cfg, db, train, grid, _ = trained

    def refused(member="alice", job_id=train.id, weights=(1.0,), **kw) -> str:
        with pytest.raises(jobs.JobError) as e:
            jobs.submit_grid(db, cfg, member, job_id, list(weights), **kw)
        return str(e.value)

    assert refused("bob") == (
        f"training job {train.id} is not yours: only the member who trained a LoRA can make a grid of it"
    )
    assert refused(job_id=grid.id) == f"there is no training job {grid.id}"
    assert refused(weights=[0.5, -11]) == "weights.1 must be greater than or equal to -10 (got -11)"
    assert refused(weights=[]).startswith("weights: List should have at least 1 item")
    assert refused(epochs=[2, 4]) == "me has no saved epoch 4 (saved: 1, 2, 3)"
    assert refused(prompts=["a"] * 5).startswith("prompts: List should have at most 4 items")
    assert refused(settings={"base": "tiny:sdxl"}).startswith(
        "base: a grid takes these from its training job"
    )
    assert refused(settings={"count": 4}).startswith("unknown setting 'count'")
    # Quota-checked as /gen is: more cells than the GPU time left.
    store.set_quota_override(db, "member", "alice", "daily_gpu_seconds", 1)
    try:
        assert refused(epochs=[1, 2, 3]).startswith("over your quota: GPU time: this job needs about")
    finally:
        store.set_quota_override(db, "member", "alice", "daily_gpu_seconds", None)
    # The defaults: every saved epoch, the run's sample prompts when it has them.
    spec = {**train.spec_dict, "sample_prompts": ["a zzk cat --n ugly --w 96", "zzk dog --n ugly"]}
    store.set_job_spec(db, train.id, spec)
    try:
        small = {"steps": 1, "width": SIDE, "height": SIDE}
        queued = jobs.submit_grid(db, cfg, "alice", train.id, [1.0], settings=small)
    finally:
        store.set_job_spec(db, train.id, json.loads(train.spec))
    asked = queued.spec_dict
    # 6 cells, each priced as a /gen image of its size and steps (the rate measured on the first grid).
    one = jobs.estimate_gen(db, cfg, {"base": "tiny:sd15", **small}, "sd15")
    assert one.measured and queued.estimate_s == pytest.approx(6 * one.seconds, abs=0.5)
    assert asked["epochs"] == [1, 2, 3] and asked["prompts"] == ["a zzk cat", "zzk dog"]
    assert asked["negative_prompt"] == "ugly"
    assert jobs.request_cancel(db, queued.id, member="alice") == "cancelled"
