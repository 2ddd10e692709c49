"""The scheduler with real worker processes on the CPU: fair turns, generation between training
steps, cancel, kill -9 of a worker, and a restart of the whole bot."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botutil import TRAIN, write_config
from safetensors.torch import load_file

from bot import jobs, store
from bot.cli import main
from bot.dispatch import make_dispatcher
from bot.dispatch.local import LocalDispatcher
from bot.files import member_path
from bot.scheduler import Scheduler
from runner.selftest import make_demo_dataset

MEMBERS = ("alice", "bob", "carol")


def server(tmp_path, workers: int = 2, dispatch: str = "local"):
    cfg = write_config(
        tmp_path,
        "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\nconcurrent_jobs = 1\n"
        "[scheduling]\npoll_seconds = 0.05\n[web]\nport = 0\n",
        devices=str(["cpu"] * workers).replace("'", '"'),
        dispatch=dispatch,
    )
    db = store.open_store(cfg.store)
    for member in MEMBERS:
        make_demo_dataset(member_path(cfg.data_dir, member, "datasets", "ds"), count=2, repeats=1)
    return cfg, db


def train(cfg, db, member, name, **settings):
    return jobs.submit_train(db, cfg, member, "ds", "tiny", name, {**TRAIN, **settings})


async def drive(sched: Scheduler, until: Callable[[], bool], timeout: float = 300) -> None:
    """Run the scheduler until ``until()`` holds; fail after ``timeout`` seconds."""
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not until():
                if task.done():
                    task.result()
                    raise AssertionError("the scheduler stopped by itself")
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


def states(db) -> dict[str, str]:
    return {j.name or f"gen{j.id}": j.state for j in store.list_jobs(db)}


def finished(db) -> bool:
    return not store.list_jobs(db, store.ACTIVE)


def started_order(db) -> list[str]:
    rows = db.execute(
        "SELECT j.name, j.kind FROM job_events e JOIN jobs j ON j.id = e.job_id "
        "WHERE e.type = 'started' ORDER BY e.id"
    ).fetchall()
    return [name or kind for name, kind in rows]


def test_fair_turns_on_two_workers_and_charges_from_measured_time(tmp_path):
    cfg, db = server(tmp_path)
    train(cfg, db, "alice", "a1")
    train(cfg, db, "alice", "a2")
    train(cfg, db, "bob", "b1")
    train(cfg, db, "carol", "c1")
    # The /gen is dave's, who trains nothing: whoever trains, the turns below then depend only on
    # who has used GPU time, never on how long a cold /gen took against a tiny training run.
    g = jobs.submit_gen(db, cfg, "dave", "a red circle", "tiny", {"steps": 2, "seed": 1})
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    asyncio.run(drive(sched, lambda: finished(db)))
    assert set(states(db).values()) == {"done"}, states(db)
    # Generation first; then turns by GPU time used (a running job counts what it is expected to
    # use): alice's second job waits for bob's and carol's, whichever of a1 and b1 ends first.
    assert started_order(db) == ["gen", "a1", "b1", "c1", "a2"]
    images = store.artifacts(db, g.id)
    assert images and {a["kind"] for a in images} == {"image"} and all(a["size"] > 0 for a in images)
    charged = dict(db.execute("SELECT job_id, sum(gpu_seconds) FROM ledger GROUP BY job_id").fetchall())
    for job in store.list_jobs(db):
        assert charged[job.id] == pytest.approx(job.run_seconds) and job.run_seconds > 0
        # Its own time as the worker measured it, which fits between being sent and its result.
        assert job.run_seconds == pytest.approx(json.loads(job.result)["seconds"])
        assert job.run_seconds <= job.finished_at - job.started_at
    # What the finished jobs measured is the estimate of the next such job.
    again = train(cfg, db, "carol", "c2")
    done = [j for j in store.list_jobs(db, ("done",)) if j.kind == "train" and j.rate_key == again.rate_key]
    rate = sum(j.run_seconds for j in done) / sum(j.steps for j in done)
    assert again.estimate_s == pytest.approx(again.steps * rate, abs=0.1)
    assert sched.timing.dispatch_s and sched.timing.end_to_start_s


def test_generation_is_served_between_training_steps(tmp_path):
    cfg, db = server(tmp_path, workers=1)
    t = train(cfg, db, "bob", "t", max_train_epochs=4)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    seen: list[tuple[int, str, int | None]] = []
    gen: list[int] = []

    def on_event(job, event):
        seen.append((job.id, event.type, getattr(event, "step", None)))
        if not gen and event.type == "progress" and event.step == 2:
            gen.append(jobs.submit_gen(db, cfg, "carol", "a red circle", "tiny", {"steps": 2}).id)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db) and bool(gen)))
    g, t = store.get_job(db, gen[0]), store.get_job(db, t.id)
    assert (g.state, t.state) == ("done", "done") and g.worker == t.worker
    i = seen.index((g.id, "images", None))
    before = [s[2] for s in seen[:i] if s[0] == t.id and s[1] == "progress"]
    after = [s[2] for s in seen[i:] if s[0] == t.id and s[1] == "progress"]
    assert before and after and after[0] == before[-1] + 1  # between two steps of the same run
    # The training job is not charged for the time the images took.
    assert t.run_seconds < t.finished_at - t.started_at
    charged = dict(db.execute("SELECT job_id, sum(gpu_seconds) FROM ledger GROUP BY job_id").fetchall())
    assert charged[g.id] == pytest.approx(json.loads(g.result)["seconds"])


def test_kill_9_mid_epoch_resumes_and_matches_an_uninterrupted_run(tmp_path):
    cfg, db = server(tmp_path)
    killed = train(cfg, db, "alice", "k", max_train_epochs=3)
    reference = train(cfg, db, "bob", "r", max_train_epochs=3)
    dispatcher = make_dispatcher(cfg)
    sched = Scheduler(db, cfg, dispatcher)
    kills: list[int] = []

    def on_event(job, event):
        if job.id == killed.id and event.type == "progress" and event.epoch == 2 and not kills:
            kills.append(dispatcher.pid(job.worker))
            os.kill(kills[0], signal.SIGKILL)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db)))
    job = store.get_job(db, killed.id)
    assert kills and job.state == "done" and job.attempts == 2, job
    events = store.job_events(db, killed.id)
    requeued = next(e for e in events if e["type"] == "requeued")
    assert "killed by SIGKILL" in requeued["reason"] and requeued["resume_from"] == "epoch 1"
    assert any(e["type"] == "stage" and e["message"] == "resuming after epoch 1" for e in events)
    assert sched.restarts == 1
    a, b = (load_file(jobs_result_file(db, j.id)) for j in (killed, reference))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def jobs_result_file(db, job_id: int) -> str:
    return json.loads(store.get_job(db, job_id).result)["lora_file"]


def test_cancel_one_members_job_leaves_the_others_running(tmp_path):
    cfg, db = server(tmp_path)
    a = train(cfg, db, "alice", "a", max_train_epochs=50)
    b = train(cfg, db, "bob", "b", max_train_epochs=8)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    after_cancel: list[int] = []
    bob_then: list[str] = []

    def on_event(job, event):
        if job.id == a.id and event.type == "failed":
            bob_then.append(store.get_job(db, b.id).state)
        if job.id == a.id and event.type == "progress":
            if job.cancel_requested:
                after_cancel.append(event.step)
            elif event.epoch == 2:
                assert jobs.request_cancel(db, a.id, member="alice") == "stopping"

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db)))
    assert states(db) == {"a": "cancelled", "b": "done"}
    assert bob_then == ["running"]
    assert len(after_cancel) <= 2  # it stops within a step
    assert store.get_job(db, a.id).last_epoch >= 1  # epochs saved before the cancel are kept


def test_a_paused_queue_starts_nothing_until_resumed(tmp_path):
    cfg, db = server(tmp_path, workers=1)
    job = train(cfg, db, "alice", "p")
    assert main(["jobs", "pause", "--config", str(cfg.path)]) == 0
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    later = time.monotonic() + 2
    asyncio.run(drive(sched, lambda: time.monotonic() > later))
    assert store.get_job(db, job.id).state == "queued" and not started_order(db)
    assert main(["jobs", "resume", "--config", str(cfg.path)]) == 0
    asyncio.run(drive(Scheduler(db, cfg, make_dispatcher(cfg)), lambda: finished(db)))
    assert store.get_job(db, job.id).state == "done"


def test_restart_of_the_whole_bot_loses_nothing(tmp_path):
    cfg, db = server(tmp_path, workers=1)
    first = train(cfg, db, "alice", "first", max_train_epochs=4)
    waiting = [train(cfg, db, m, m) for m in ("bob", "carol")]
    bot = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run", "--config", str(cfg.path), "--no-discord"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while store.get_job(db, first.id).last_epoch < 1:
            assert time.monotonic() < deadline and bot.poll() is None
            time.sleep(0.1)
    finally:
        bot.kill()  # kill -9: no chance to tidy up
        bot.wait()
    assert store.get_job(db, first.id).state == "running"
    assert [store.get_job(db, j.id).state for j in waiting] == ["queued", "queued"]
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    asyncio.run(drive(sched, lambda: finished(db)))
    assert states(db) == {"first": "done", "bob": "done", "carol": "done"}
    job = store.get_job(db, first.id)
    assert job.attempts == 2 and job.spec_dict["resume"] is True
    assert any(
        e["type"] == "requeued" and e["reason"] == "the bot restarted while it ran"
        for e in store.job_events(db, first.id)
    )
    assert started_order(db)[:2] == ["first", "first"]  # the recovered job goes before the waiting ones


@pytest.mark.skipif(sys.platform != "linux", reason="CPU workers fork from a template on Linux")
def test_cpu_workers_fork_from_one_warm_template_and_a_gpu_worker_starts_fresh(tmp_path):
    # A CUDA worker only fails at its first job on a machine without a GPU: starting it is enough.
    dispatcher = LocalDispatcher(["cpu", "cuda:0", "cpu"], tmp_path)

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    def loaded(pid: int) -> bool:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()

    async def go() -> tuple[list[int], list[int], list[Any], list[int]]:
        inbox: asyncio.Queue = asyncio.Queue()
        await dispatcher.start(inbox)
        try:
            pids = [dispatcher.pid(w) for w in dispatcher.workers]
            parents = [parent(p) for p in pids]
            assert [loaded(p) for p in pids] == [True, False, True]
            # The template dies (the OOM killer's pick, say): its workers go with it, each is
            # reported, and the next start forks from a new template.
            os.kill(parents[0], signal.SIGKILL)
            deaths = [await asyncio.wait_for(inbox.get(), 60) for _ in range(2)]
            async with asyncio.timeout(120):
                while not all(
                    dispatcher.ready(w) and dispatcher.pid(w) not in pids for w in dispatcher.workers[::2]
                ):
                    await asyncio.sleep(0.1)
            return pids, parents, deaths, [parent(dispatcher.pid(w)) for w in dispatcher.workers]
        finally:
            await dispatcher.close()

    pids, (cpu0, gpu, cpu1), deaths, (new0, _, new1) = asyncio.run(go())
    # The CPU workers are children of one process that is not the bot; the GPU worker is the
    # bot's own child and had imported nothing yet.
    assert cpu0 == cpu1 != os.getpid() and gpu == os.getpid()
    assert {d.worker for d in deaths} == {"0:cpu", "2:cpu"}
    assert new0 == new1 not in (cpu0, os.getpid())


def test_a_forked_worker_takes_its_thread_count_from_its_own_environment(monkeypatch):
    import torch

    from runner import template

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        template.threads_from_env()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
