"""Jobs without workers: fair order, quotas with their messages, estimates, positions and ETAs, cancel."""

from __future__ import annotations

import threading
import time

import pytest
from botutil import TRAIN, write_config

from bot import jobs, store
from bot.files import member_path
from runner.selftest import make_demo_dataset


@pytest.fixture
def server(tmp_path):
    cfg = write_config(
        tmp_path,
        "[quota]\nqueued_jobs = 3\ndaily_gpu_seconds = 1000\ntotal_steps = 100\nimages_per_dataset = 10\n"
        "storage_mb = 1\n"
        '[quota.roles."patron"]\ndaily_gpu_seconds = 5000\nqueued_jobs = 5\n'
        '[quota.roles."helper"]\ndaily_gpu_seconds = 2000\n'
        "[scheduling]\nseconds_per_step = 2.0\n",
    )
    db = store.open_store(cfg.store)
    for member in ("alice", "bob", "carol"):
        make_demo_dataset(member_path(cfg.data_dir, member, "datasets", "ds"), count=2, repeats=3)
    return cfg, db


def train(cfg, db, member, name="x", **settings):
    return jobs.submit_train(db, cfg, member, "ds", "tiny", name, {**TRAIN, **settings})


def test_fair_order_three_members_least_gpu_time_first(server):
    cfg, db = server
    submitted = [train(cfg, db, m, f"{m}{i}") for m, i in [("alice", 1), ("alice", 2), ("alice", 3)]]
    submitted += [train(cfg, db, "bob", "bob1"), train(cfg, db, "carol", "carol1")]
    order = [p.job.name for p in jobs.plan(db, cfg).queued]
    # Equal use: turns alternate between members, oldest first; alice's burst waits its turns.
    assert order == ["alice1", "bob1", "carol1", "alice2", "alice3"]
    # Alice has used more GPU time recently than bob, bob more than carol: carol goes first.
    store.charge(db, "alice", submitted[0].id, 500)
    store.charge(db, "bob", submitted[3].id, 100)
    order = [p.job.name for p in jobs.plan(db, cfg).queued]
    assert order[:3] == ["carol1", "bob1", "alice1"]
    # Time outside the sliding window does not count.
    db.execute("UPDATE ledger SET at = at - ?", [cfg.scheduling.fair_window_hours * 3600 + 1])
    assert [p.job.name for p in jobs.plan(db, cfg).queued][:3] == ["alice1", "bob1", "carol1"]


def test_generation_goes_ahead_and_resumed_training_before_fresh(server):
    cfg, db = server
    a = train(cfg, db, "alice", "a")
    b = train(cfg, db, "bob", "b")
    g = jobs.submit_gen(db, cfg, "carol", "a cat", "tiny", {"steps": 4})
    store.update_job(db, b.id, attempts=1)  # bob's job ran before and waits to resume
    assert [p.job.id for p in jobs.plan(db, cfg).queued] == [g.id, b.id, a.id]


def test_positions_and_etas_from_the_estimates_ahead(server):
    cfg, db = server
    a = train(cfg, db, "alice", "a")
    b = train(cfg, db, "bob", "b")
    c = train(cfg, db, "carol", "c")
    # 2 images × 3 repeats, 2 epochs, batch 1 = 12 steps at the default 2 s a step.
    assert (a.steps, a.estimate_s) == (12, 24.0)
    plan = jobs.plan(db, cfg, now=time.time())
    assert [(p.position, p.job.id) for p in plan.queued] == [(1, a.id), (2, b.id), (3, c.id)]
    assert [round(p.eta_s) for p in plan.queued] == [0, 24, 48]  # one worker
    # a runs and reports 10 s left: everything behind it moves up.
    now = time.time()
    jobs.move(db, a.id, "running", started_at=now - 5, progress='{"eta_s": 10.0}')
    plan = jobs.plan(db, cfg, now=now)
    assert [(p.position, round(p.eta_s)) for p in plan.queued] == [(1, 10), (2, 34)]


def test_place_of_one_job_is_its_place_in_the_plan(server):
    cfg, db = server
    a = train(cfg, db, "alice", "a")
    g1 = jobs.submit_gen(db, cfg, "carol", "a cat", "tiny", {"steps": 4})
    b = train(cfg, db, "bob", "b")
    g2 = jobs.submit_gen(db, cfg, "bob", "a dog", "tiny", {"steps": 8, "count": 2})
    g3 = jobs.submit_gen(db, cfg, "alice", "a fox", "tiny", {"steps": 2})
    store.update_job(db, g2.id, submitted_at=g1.submitted_at)  # same instant: the id breaks the tie
    jobs.move(db, a.id, "running", started_at=time.time())
    planned = {p.job.id: (p.position, p.eta_s) for p in jobs.plan(db, cfg).queued}
    assert len(planned) == 4
    for job in (g1, g2, g3, b):
        where = jobs.place(db, cfg, job)
        # The training job's ETA counts from "now", which moves on between the two calls.
        assert (where.position, where.eta_s) == (
            planned[job.id][0],
            pytest.approx(planned[job.id][1], abs=0.5),
        )
    assert jobs.place(db, cfg, store.get_job(db, a.id)) is None  # running: no place in line
    jobs.request_cancel(db, g1.id)
    assert jobs.place(db, cfg, g1) is None
    assert jobs.place(db, cfg, g3).position == 2


def test_estimate_learned_from_measured_jobs(server):
    cfg, db = server
    first = train(cfg, db, "alice")
    assert first.estimate_s == 24.0
    jobs.move(db, first.id, "running", started_at=time.time())
    jobs.move(db, first.id, "done", run_seconds=6.0, finished_at=time.time())  # 0.5 s a step measured
    assert train(cfg, db, "bob").estimate_s == 6.0
    # Another resolution is another rate: the default again.
    assert train(cfg, db, "carol", resolution=256).estimate_s == 24.0 * 256**2 / 512**2


def test_quota_refusals_say_what_is_over_and_by_how_much(server):
    cfg, db = server
    with pytest.raises(jobs.QuotaError, match=r"training steps: 120 of 100 allowed \(over by 20\)"):
        train(cfg, db, "alice", max_train_epochs=20)
    for i in range(3):
        train(cfg, db, "alice", f"a{i}")
    with pytest.raises(jobs.QuotaError, match=r"queued jobs: 4 of 3 allowed \(over by 1\)"):
        train(cfg, db, "alice")
    # GPU time: 1000 s a day, 900 s of it charged today.
    store.charge(db, "bob", 1, 900)
    with pytest.raises(jobs.QuotaError) as e:
        train(cfg, db, "bob", max_train_epochs=16)  # 96 steps × 2 s = 192 s
    assert "needs about 192 s and you have 100 s left of 1000 s a day (over by 92 s)" in str(e.value)
    make_demo_dataset(member_path(cfg.data_dir, "carol", "datasets", "big"), count=11, repeats=1)
    with pytest.raises(jobs.QuotaError, match=r"images in the dataset: 11 of 10 allowed \(over by 1\)"):
        jobs.submit_train(db, cfg, "carol", "big", "tiny", "big", TRAIN)
    lora = member_path(cfg.data_dir, "carol", "loras", "1", "x.safetensors")  # storage is what is on disk
    lora.parent.mkdir(parents=True)
    lora.write_bytes(bytes(3 * 2**20))
    with pytest.raises(jobs.QuotaError, match=r"storage: your LoRAs use 3.0 MB of 1 MB \(over by 2.0 MB\)"):
        train(cfg, db, "carol")


def test_role_overrides_most_generous_role_then_member_override(server):
    cfg, db = server
    store.ensure_member(db, "alice", ["helper", "patron"])
    q = jobs.effective_quota(db, cfg, "alice")
    assert (q.daily_gpu_seconds, q.queued_jobs, q.total_steps) == (5000, 5, 100)
    store.set_quota_override(db, "role", "helper", "daily_gpu_seconds", 9000)
    assert jobs.effective_quota(db, cfg, "alice").daily_gpu_seconds == 9000
    store.set_quota_override(db, "member", "alice", "daily_gpu_seconds", 10)
    assert jobs.effective_quota(db, cfg, "alice").daily_gpu_seconds == 10
    assert jobs.effective_quota(db, cfg, "bob").daily_gpu_seconds == 1000


def test_state_machine_refuses_illegal_moves_and_cancel_rules(server):
    cfg, db = server
    job = train(cfg, db, "alice")
    with pytest.raises(jobs.JobError, match="is queued; it cannot become done"):
        jobs.move(db, job.id, "done")
    with pytest.raises(jobs.JobError, match="no job"):
        jobs.request_cancel(db, job.id, member="bob")
    assert jobs.request_cancel(db, job.id, member="alice") == "cancelled"
    with pytest.raises(jobs.JobError, match="cannot become running"):
        jobs.move(db, job.id, "running")
    other = train(cfg, db, "bob")
    jobs.move(db, other.id, "running", started_at=time.time())
    assert jobs.request_cancel(db, other.id) == "stopping"
    assert store.get_job(db, other.id).cancel_requested == 1


def test_bad_requests_get_messages(server):
    cfg, db = server
    with pytest.raises(jobs.JobError, match="unknown base 'nope'; this server offers: tiny, タイニー XL"):
        jobs.submit_train(db, cfg, "alice", "ds", "nope", "x", TRAIN)
    with pytest.raises(jobs.JobError, match="no dataset named 'other'"):
        jobs.submit_train(db, cfg, "alice", "other", "tiny", "x", TRAIN)
    with pytest.raises(jobs.JobError, match="outside|no slashes"):
        jobs.submit_train(db, cfg, "alice", "../bob", "tiny", "x", TRAIN)
    with pytest.raises(jobs.JobError, match="network_dim must be between 1 and 1024"):
        train(cfg, db, "alice", network_dim=0)
    with pytest.raises(jobs.JobError, match="member id"):
        jobs.submit_train(db, cfg, "../alice", "ds", "tiny", "x", TRAIN)


def test_two_submits_at_the_same_instant(server):
    cfg, db = server
    store.set_quota_override(db, "member", "alice", "queued_jobs", 2)
    train(cfg, db, "alice", "first")
    barrier = threading.Barrier(3)
    outcomes: list[str] = []

    def submit(name: str) -> None:
        own = store.open_store(cfg.store)  # one connection each, as two processes would have
        barrier.wait()
        try:
            outcomes.append(f"queued {train(cfg, own, 'alice', name).id}")
        except jobs.QuotaError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=submit, args=(n,)) for n in ("second", "third", "fourth")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.startswith("queued") for o in outcomes) == 1, outcomes
    assert sum("queued jobs: 3 of 2" in o for o in outcomes) == 2, outcomes
    assert len({j.id for j in store.list_jobs(db, owner="alice")}) == 2


def test_estimate_counts_the_steps_the_trainer_will_run(server):
    cfg, db = server
    # 2 images × 3 repeats; the character preset trains 10 epochs at batch 2: 3 steps an epoch.
    assert jobs.submit_train(db, cfg, "alice", "ds", "tiny", "p", {"preset": "character"}).steps == 30
    # The member's max_train_steps is not beaten by the preset's epochs.
    own = {"preset": "character", "max_train_steps": 7}
    assert jobs.submit_train(db, cfg, "bob", "ds", "tiny", "s", own).steps == 7
