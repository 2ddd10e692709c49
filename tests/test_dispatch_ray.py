"""The same scheduler on Ray actors, on a local CPU Ray instance: files come back, a killed actor's
job resumes, generation is served."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'loracord[ray]'")

from botutil import TRAIN, write_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_dispatch import drive, finished  # noqa: E402

from bot import jobs, store  # noqa: E402
from bot.dispatch import make_dispatcher  # noqa: E402
from bot.files import member_path  # noqa: E402
from bot.scheduler import Scheduler  # noqa: E402
from runner.selftest import make_demo_dataset  # noqa: E402


def test_ray_actors_run_jobs_resume_after_a_killed_actor_and_send_files_back(tmp_path):
    cfg = write_config(
        tmp_path,
        "[ray]\nnum_cpus = 2\n[quota]\nconcurrent_jobs = 2\n[scheduling]\npoll_seconds = 0.05\n",
        devices='["cpu", "cpu"]',
        dispatch="ray",
    )
    db = store.open_store(cfg.store)
    make_demo_dataset(member_path(cfg.data_dir, "alice", "datasets", "ds"), count=2, repeats=1)
    killed = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "k", {**TRAIN, "max_train_epochs": 3})
    reference = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "r", {**TRAIN, "max_train_epochs": 3})
    gen = jobs.submit_gen(db, cfg, "bob", "a red circle", "tiny", {"steps": 2, "seed": 3})
    dispatcher = make_dispatcher(cfg)
    sched = Scheduler(db, cfg, dispatcher)
    kills: list[str] = []

    def on_event(job, event):
        if job.id == killed.id and event.type == "progress" and event.epoch == 2 and not kills:
            kills.append(job.worker)
            dispatcher.kill(job.worker)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db), timeout=300))
    assert not ray.is_initialized()  # the dispatcher shuts down the Ray it started
    states = {j.id: j.state for j in store.list_jobs(db)}
    assert states == {killed.id: "done", reference.id: "done", gen.id: "done"}, states
    job = store.get_job(db, killed.id)
    assert kills and job.attempts == 2 and sched.restarts == 1
    assert any(
        e["type"] == "stage" and e["message"] == "resuming after epoch 1"
        for e in store.job_events(db, killed.id)
    )
    files = {j.id: json.loads(store.get_job(db, j.id).result) for j in (killed, reference, gen)}
    out = member_path(cfg.data_dir, "alice", "loras", str(killed.id))
    assert Path(files[killed.id]["lora_file"]) == out / "k.safetensors"
    a, b = load_file(files[killed.id]["lora_file"]), load_file(files[reference.id]["lora_file"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    images = [Path(p) for p in files[gen.id]["images"]]
    assert images and all(p.is_file() and p.is_relative_to(cfg.data_dir) for p in images)
    assert {a["path"] for a in store.artifacts(db, gen.id)} == {str(p) for p in images}
