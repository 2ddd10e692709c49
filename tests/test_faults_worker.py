"""Fault injection on the worker path: every job ends in a final state whatever goes wrong.

A tag job that raises (alone, or between training steps), junk on a worker's stdout, a hung
worker, a cancel it ignores, a cancel that arrives before its job starts, and what each job is
charged. Real schedulers, real stores and real `LocalDispatcher` readers throughout; where a test
needs a worker that misbehaves on cue it runs `FAKE_WORKER`, a small program whose output the
test controls.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from botutil import TRAIN, write_config
from test_dispatch import drive, finished

from bot import jobs, store
from bot.cli import main
from bot.dispatch import make_dispatcher
from bot.dispatch.local import LocalDispatcher
from bot.files import member_path
from bot.scheduler import Scheduler
from runner.selftest import make_demo_dataset
from runner.spec import FailedEvent, TaggedEvent
from runner.worker import Worker, serve

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

# What a misbehaving worker does with each job line, chosen by its first argument:
#   junk    before each job's final event, lines that are not events, one over the reader's limit;
#   hang    a stage event, then silence (no event, no exit) unless the job is resumed;
#   deaf    progress events every 0.05 s, whatever cancel arrives, until killed.
FAKE_WORKER = textwrap.dedent(
    """
    import json, sys, time
    mode = sys.argv[1]

    def send(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    def final(job):
        if job["type"] == "train":
            lora = job["spec"]["output_dir"] + "/fake.safetensors"
            open(lora, "wb").close()
            return {"type": "done", "lora_file": lora, "epoch_files": [], "steps": 1, "seconds": 0.5}
        return {"type": "tagged", "images": 0, "captions_written": 0, "tag_summary": [],
                "tag_frequency": {}, "seconds": 0.5}

    for line in sys.stdin:
        job = json.loads(line)
        if job["type"] == "cancel":
            continue
        if job["type"] == "train":
            import os
            os.makedirs(job["spec"]["output_dir"], exist_ok=True)
        if mode == "junk":
            for junk in ["a library says hello", "5", "null", "[1, 2]", '"text"', "{}",
                         '{"job": "not a number", "type": "stage", "stage": "s", "message": "m"}',
                         '{"job": %d, "type": "no such event"}' % job["id"], "x" * (2**24 + 10)]:
                send(junk)
        elif mode == "hang" and not job["spec"].get("resume"):
            send(json.dumps({"job": job["id"], "type": "stage", "stage": "load_model", "message": "..."}))
            time.sleep(3600)
        elif mode == "deaf":
            for step in range(1, 10**6):
                send(json.dumps({"job": job["id"], "type": "progress", "step": step, "total_steps": 10**6,
                                 "epoch": 1, "loss": 0.1, "lr": 1e-4, "eta_s": 1.0, "samples_per_s": 1.0}))
                time.sleep(0.05)
        send(json.dumps({"job": job["id"], **final(job)}))
    """
)


def server(tmp_path: Path, workers: str = ""):
    cfg = write_config(
        tmp_path,
        "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\n[scheduling]\npoll_seconds = 0.05\n",
        workers=workers,
    )
    db = store.open_store(cfg.store)
    for member in ("alice", "bob", "carol"):
        make_demo_dataset(member_path(cfg.data_dir, member, "datasets", "ds"), count=2, repeats=1)
    return cfg, db


def fake_dispatcher(cfg, tmp_path: Path, mode: str) -> LocalDispatcher:
    program = tmp_path / "fake_worker.py"
    program.write_text(FAKE_WORKER, encoding="utf-8")
    return LocalDispatcher(cfg.workers.devices, cfg.data_dir / "logs", [sys.executable, str(program), mode])


def broken_tagger(folder: Path) -> Path:
    """A tagger that loads (WD14's signature, a tag list of the right length) but whose graph
    cannot run: it reshapes 12 values into rows of 5, so onnxruntime raises at the first batch."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input_1", "shape"], ["predictions_sigmoid"])],
        "broken_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", 2, 2, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count", *(f"{i},tag_{i},0,1" for i in range(5))]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def failing_tag(cfg, db, tmp_path: Path, fault: str) -> store.Job:
    """A tag job of carol's that raises inside the tagger: onnxruntime fails, or a caption cannot
    be written (a folder where the caption file goes gives the same OSError path as a full disk)."""
    if fault == "onnxruntime":
        settings = {"tagger": str(broken_tagger(tmp_path / "broken")), "mode": "replace"}
    else:
        (member_path(cfg.data_dir, "carol", "datasets", "ds") / "1_demo" / "img0.caption").mkdir()
        settings = {"mode": "keep", "caption_extension": ".caption"}
    return jobs.submit_tag(db, cfg, "carol", "ds", settings)


def good_tag(cfg, db) -> store.Job:
    """Alice's tag job that keeps her captions: it needs no tagger model and ends in seconds."""
    return jobs.submit_tag(db, cfg, "alice", "ds", {"mode": "keep"})


def ledger(db) -> dict[int, float]:
    return dict(db.execute("SELECT job_id, sum(gpu_seconds) FROM ledger GROUP BY job_id").fetchall())


@pytest.mark.parametrize("fault", ["onnxruntime", "caption_write"])
def test_a_tag_job_that_raises_fails_alone_and_the_worker_takes_new_work(tmp_path, fault):
    cfg, db = server(tmp_path)
    bad = failing_tag(cfg, db, tmp_path, fault)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    later: list[int] = []

    def on_event(job, event):
        if job.id == bad.id and event.type == "failed":
            later.append(good_tag(cfg, db).id)

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db) and bool(later), timeout=60))
    bad, after = store.get_job(db, bad.id), store.get_job(db, later[0])
    assert bad.state == "failed" and bad.attempts == 1
    expected = "ONNXRuntimeError" if fault == "onnxruntime" else "IsADirectoryError"
    assert expected in bad.failure, bad.failure
    assert after.state == "done" and after.worker == bad.worker and sched.restarts == 0


def test_a_tag_job_failing_between_training_steps_fails_alone(tmp_path):
    cfg, db = server(tmp_path)
    train = jobs.submit_train(db, cfg, "bob", "ds", "tiny", "t", TRAIN)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    seen: list[tuple[int, str, int | None]] = []
    submitted: dict[str, int] = {}

    def on_event(job, event):
        seen.append((job.id, event.type, getattr(event, "step", None)))
        if "bad" not in submitted and event.type == "progress" and event.step == 1:
            submitted["bad"] = failing_tag(cfg, db, tmp_path, "onnxruntime").id
        if job.id == submitted.get("bad") and event.type == "failed":
            submitted["good"] = good_tag(cfg, db).id

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db) and "good" in submitted))
    t, bad, good = (store.get_job(db, i) for i in (train.id, submitted["bad"], submitted["good"]))
    assert (t.state, bad.state, good.state) == ("done", "failed", "done"), (t.failure, bad.failure)
    assert t.attempts == 1 and sched.restarts == 0 and bad.worker == t.worker == good.worker
    failed_at = seen.index((bad.id, "failed", None))
    steps = [s[2] for s in seen if s[0] == t.id and s[1] == "progress"]
    after = [s[2] for s in seen[failed_at:] if s[0] == t.id and s[1] == "progress"]
    assert after and steps == list(range(1, len(steps) + 1))  # the same run went on, step by step


def test_junk_on_a_workers_stdout_is_skipped(tmp_path):
    cfg, db = server(tmp_path)
    first, second = good_tag(cfg, db), jobs.submit_tag(db, cfg, "bob", "ds", {"mode": "keep"})
    sched = Scheduler(db, cfg, fake_dispatcher(cfg, tmp_path, "junk"))
    asyncio.run(drive(sched, lambda: finished(db), timeout=60))
    assert [store.get_job(db, j.id).state for j in (first, second)] == ["done", "done"]
    assert sched.restarts == 0  # the reader never died, so neither did the worker


def test_junk_on_a_workers_stdin_is_refused_and_the_worker_goes_on(tmp_path):
    make_demo_dataset(tmp_path / "ds", count=1, repeats=1)
    job = {"type": "tag", "id": 7, "spec": {"train_data_dir": str(tmp_path / "ds"), "mode": "keep"}}
    lines = ["5", "null", "[1, 2]", "not json", json.dumps(job)]
    out = io.StringIO()
    serve(io.StringIO("\n".join(lines) + "\n"), out)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["type"] for e in events[:4]] == ["failed"] * 4
    assert events[-1]["job"] == 7 and events[-1]["type"] == "tagged"


def test_a_hung_worker_is_killed_and_its_job_resumes(tmp_path):
    cfg, db = server(tmp_path, "stall_seconds = 1.5\n")
    train = jobs.submit_train(db, cfg, "bob", "ds", "tiny", "t", TRAIN)
    sched = Scheduler(db, cfg, fake_dispatcher(cfg, tmp_path, "hang"))
    started = time.monotonic()
    asyncio.run(drive(sched, lambda: finished(db), timeout=60))
    job = store.get_job(db, train.id)
    assert job.state == "done" and job.attempts == 2 and job.spec_dict["resume"] is True
    requeued = [e for e in store.job_events(db, job.id) if e["type"] == "requeued"]
    assert [e["reason"] for e in requeued] == ["its worker was restarted: it stalled: no event for 1.5 s"]
    assert sched.restarts == 1 and time.monotonic() - started < 30


@pytest.mark.parametrize("mode", ["deaf", "hang"])
def test_a_cancel_the_worker_ignores_kills_it_and_the_job_ends_cancelled(tmp_path, mode):
    # deaf: it goes on sending progress; hang: it sends nothing. The stall limit is far off.
    cfg, db = server(tmp_path, "cancel_grace_seconds = 1\nstall_seconds = 600\n")
    train = jobs.submit_train(db, cfg, "bob", "ds", "tiny", "t", TRAIN)
    sched = Scheduler(db, cfg, fake_dispatcher(cfg, tmp_path, mode))
    cancelled_at: list[float] = []

    def on_event(job, event):
        if not cancelled_at:
            cancelled_at.append(time.monotonic())
            assert main(["jobs", "cancel", "--config", str(cfg.path), str(job.id)]) == 0

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db), timeout=60))
    job = store.get_job(db, train.id)
    assert job.state == "cancelled" and job.attempts == 1
    assert job.failure == "cancelled (its worker was restarted: it did not stop within 1 s of a cancel)"
    assert sched.restarts == 1 and time.monotonic() - cancelled_at[0] < 10


def test_a_cancel_that_reaches_the_worker_before_its_job_starts_is_kept(tmp_path):
    make_demo_dataset(tmp_path / "ds", count=1, repeats=1)
    caption = next((tmp_path / "ds").rglob("*.txt"))
    worker = Worker()

    def tag_job(job_id: str) -> dict:
        spec = {"train_data_dir": str(tmp_path / "ds"), "mode": "keep", "add": [job_id]}
        return {"type": "tag", "id": job_id, "spec": spec}

    worker.cancel("late")  # the cancel line was read before the job's thread ran it
    emitted: list = []
    result = worker.run(tag_job("late"), emitted.append)
    assert isinstance(result, FailedEvent) and result.kind == "cancelled"
    assert emitted == [result] and not caption.read_text().startswith("late")
    # Only that job: the next one on the same worker runs.
    assert isinstance(worker.run(tag_job("next"), lambda e: None), TaggedEvent)
    assert caption.read_text().startswith("next")


def test_a_job_cancelled_while_it_went_back_to_the_queue_never_starts_again(tmp_path):
    cfg, db = server(tmp_path)
    job = good_tag(cfg, db)
    # What a cancel leaves when it lands while the job's worker dies: flagged, and queued again.
    store.update_job(db, job.id, cancel_requested=1)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    asyncio.run(drive(sched, lambda: finished(db), timeout=60))
    job = store.get_job(db, job.id)
    assert job.state == "cancelled" and job.attempts == 0


def test_a_cancel_racing_a_requeue_cancels_the_job(tmp_path, monkeypatch):
    cfg, db = server(tmp_path)
    job = good_tag(cfg, db)
    jobs.move(db, job.id, "running", worker="0:cpu", started_at=time.time(), attempts=1)
    original = store.transition
    calls: list[str] = []

    def worker_dies_meanwhile(db_, job_id, allowed_from, to, **values):
        moved = original(db_, job_id, allowed_from, to, **values)
        calls.append(to)
        if len(calls) == 1:  # the scheduler sends it back to the queue right after the first try
            assert original(db_, job_id, ("running",), "queued", worker=None, started_at=None)
        return moved

    monkeypatch.setattr(store, "transition", worker_dies_meanwhile)
    assert jobs.request_cancel(db, job.id, "alice") == "cancelled"
    assert store.get_job(db, job.id).state == "cancelled"


def test_a_short_job_between_steps_pays_its_own_time_and_the_trainer_not_again(tmp_path):
    cfg, db = server(tmp_path)
    train = jobs.submit_train(db, cfg, "bob", "ds", "tiny", "t", TRAIN)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    finals: dict[int, object] = {}
    short: list[int] = []

    def on_event(job, event):
        if not short and event.type == "progress" and event.step == 1:
            short.append(jobs.submit_tag(db, cfg, "carol", "ds", {"mode": "keep", "add": ["x"]}).id)
        if event.type in ("done", "tagged"):
            finals[job.id] = event

    sched.subscribe(on_event)
    asyncio.run(drive(sched, lambda: finished(db) and bool(short)))
    t, tag = store.get_job(db, train.id), store.get_job(db, short[0])
    assert (t.state, tag.state) == ("done", "done") and tag.worker == t.worker
    charged = ledger(db)
    # Each pays what its worker measured for it: the tag job its own run, not its wait for a step…
    assert charged[tag.id] == pytest.approx(finals[tag.id].seconds) and finals[tag.id].seconds > 0
    assert charged[tag.id] < tag.finished_at - tag.started_at
    # …and the training job its own steps, without the tag job's time: the two together fit in
    # the training job's time on the worker.
    assert charged[t.id] == pytest.approx(finals[t.id].seconds)
    assert charged[t.id] + charged[tag.id] <= t.finished_at - t.started_at
    assert {o: s for o, s in db.execute("SELECT owner, count(*) FROM ledger GROUP BY owner")} == {
        "bob": 1,
        "carol": 1,
    }


def test_a_job_recovered_after_a_bot_restart_is_charged_up_to_its_last_event(tmp_path):
    cfg, db = server(tmp_path)
    job = jobs.submit_train(db, cfg, "bob", "ds", "tiny", "t", TRAIN)
    # What a bot killed with -9 leaves: a running job, started 100 s ago, its epoch saved at +60 s,
    # and a short job of carol's served between its steps that was charged 5 s.
    t0 = time.time() - 100
    jobs.move(db, job.id, "running", worker="0:cpu", started_at=t0, attempts=1)
    store.ensure_member(db, "carol")
    gen = store.insert_job(db, "gen", "carol", None, {}, "gen", 1, 1.0)
    db["job_events"].insert_all(
        [
            {"job_id": job.id, "at": t0, "type": "started", "data": json.dumps({"worker": "0:cpu"})},
            {"job_id": gen, "at": t0 + 10, "type": "started", "data": json.dumps({"worker": "0:cpu"})},
            {"job_id": job.id, "at": t0 + 60, "type": "epoch", "data": "{}"},
        ]
    )
    db["ledger"].insert({"owner": "carol", "job_id": gen, "at": t0 + 15, "gpu_seconds": 5.0})
    store.set_setting(db, "paused", True)
    sched = Scheduler(db, cfg, make_dispatcher(cfg))
    asyncio.run(drive(sched, lambda: store.get_job(db, job.id).state == "queued", timeout=60))
    assert ledger(db)[job.id] == pytest.approx(60 - 5)
    assert store.get_job(db, job.id).run_seconds == pytest.approx(55)


def test_a_failing_lazy_import_before_the_job_proper_ends_the_job(tmp_path, monkeypatch):
    make_demo_dataset(tmp_path / "ds", count=1, repeats=1)
    monkeypatch.setitem(sys.modules, "runner.data.tagger", None)  # its import now raises ModuleNotFoundError
    worker, emitted = Worker(), []
    job = {"type": "tag", "id": 1, "spec": {"train_data_dir": str(tmp_path / "ds"), "mode": "keep"}}
    result = worker.run(job, emitted.append)
    assert (
        emitted == [result]
        and result.kind == "error"
        and "import of runner.data.tagger halted" in result.reason
    )
    monkeypatch.delitem(sys.modules, "runner.data.tagger")
    assert isinstance(worker.run({**job, "id": 2}, emitted.append), TaggedEvent)
