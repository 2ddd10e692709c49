"""Fault injection for the limits on disk, memory and GPU time: too many drafts, drafts nobody
started, attachments streamed to disk, a zip of 100,000 files, a crashing image decoder, a full
disk (files and SQLite), storage quota after deletes, preview rounds in the cost estimate, and a
job stopped when its owner runs past the day's GPU time."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
import time
import zipfile
from pathlib import Path

import crashing_decoder
import discord
import pytest
from aiohttp import web
from botutil import TRAIN, write_config
from discord_stub import DiscordStub, Upload
from test_bot_journey import async_test, message_with, new_bot, png, server

from bot import jobs, library, store
from bot.cli import main as loracord
from bot.discord import draft, intake, state
from bot.dispatch import WorkerEvent
from bot.files import member_path
from bot.scheduler import Scheduler
from bot.web import WebServer
from runner.data.intake import build_dataset
from runner.selftest import make_demo_dataset
from runner.spec import EpochEvent, FailedEvent, ImagesEvent, IntakeSpec

MB = 2**20


async def _open_draft(stub: DiscordStub, user, name: str = "lo") -> int:
    ix = await stub.command(
        user, "train", {"name": name, "trigger": "sks", "preset": "character", "base": "tiny"}
    )
    await ix.original_message()
    return int(stub.threads()[-1]["id"])


# ---- drafts ----


@async_test
async def test_open_drafts_are_capped_per_member(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web_):
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        async with stub.running(new_bot(cfg, db, scheduler, web_)):
            for i in range(3):  # the default: [quota] open_drafts = 3
                await _open_draft(stub, alice, f"a{i}")
            ix = await stub.command(
                alice, "train", {"name": "a3", "trigger": "sks", "preset": "character", "base": "tiny"}
            )
            refused = (await ix.original_message()).content
            assert "3 LoRA(s) not started yet, the most allowed is 3" in refused
            assert len(stub.threads()) == 3 and len(state.open_drafts(db, str(alice.id))) == 3
            await _open_draft(stub, bob, "b")  # the cap is per member
            assert len(stub.threads()) == 4
            store.set_quota_override(db, "member", str(alice.id), "open_drafts", 4)  # an admin's override
            await _open_draft(stub, alice, "a4")
            assert len(stub.threads()) == 5


@async_test
async def test_stale_drafts_and_uploads_are_swept_files_and_rows(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub, data="draft_days = 2\n") as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        bot = new_bot(cfg, db, scheduler, web_)
        async with stub.running(bot):
            old_tid = await _open_draft(stub, alice, "old")
            await stub.post_message(alice, old_tid, "", files=[Upload("a.png", png((200, 30, 30)))])
            old = state.draft_in_thread(db, old_tid)
            folder = draft.dataset_dir(bot, old)
            await stub.wait_until(lambda: draft.subset_dir(folder) is not None, what="intake")
            fresh = state.draft_in_thread(db, await _open_draft(stub, alice, "fresh"))
            three_days = time.time() - 3 * 86400
            db.execute("UPDATE discord_drafts SET created_at = ? WHERE id = ?", [three_days, old.id])
            leftover = member_path(cfg.data_dir, str(alice.id), "uploads", "99")  # from a crash mid-upload
            leftover.mkdir(parents=True)
            (leftover / "x.png").write_bytes(b"x")
            os.utime(leftover, (three_days, three_days))

            cog = bot.get_cog("Cog_train")
            assert cog._sweeper.is_running()  # the periodic sweep runs while the bot does
            assert await cog.sweep() == 1
            assert not folder.exists() and not leftover.exists()
            assert state.get_draft(db, old.id) is None and state.get_draft(db, fresh.id) is not None
            card = stub.channel_messages(old_tid)[0]
            await stub.wait_until(lambda: "Discarded" in card.content, what="the card says so")


# ---- attachments ----


@async_test
async def test_attachments_are_streamed_to_disk_not_read_whole(tmp_path, monkeypatch):
    """The stub sends the file in pieces and, halfway, waits to see part of it on disk: a bot that
    reads the whole attachment into memory first writes nothing until the end, and is caught."""
    size, piece = 4 * MB, MB
    seen_on_disk: list[int] = []

    async def slow_download(self, request: web.Request) -> web.StreamResponse:
        stored = self.files.get(int(request.match_info["file_id"]))
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(stored.data), piece):
            await response.write(stored.data[start : start + piece])
            if start == size // 2:
                for _ in range(100):  # bounded: 5 s
                    on_disk = [p.stat().st_size for p in tmp_path.glob("data/**/uploads/**/big.bin")]
                    if on_disk and on_disk[0] > 0:
                        seen_on_disk.append(on_disk[0])
                        break
                    await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    monkeypatch.setattr(DiscordStub, "_download", slow_download)
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web_)):
            tid = await _open_draft(stub, alice)
            await stub.post_message(alice, tid, "", files=[Upload("big.bin", os.urandom(size))])
            note = await stub.wait_until(lambda: message_with(stub, tid, "need a look"), what="intake")
            assert "big.bin" in note.content  # not an image, refused by intake after the download
    assert seen_on_disk and 0 < seen_on_disk[0] < size


def _zip_of(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"{i}.png", b"")
    return out.getvalue()


def test_a_zip_with_100000_members_is_refused_before_anything_is_unpacked(tmp_path):
    bomb = tmp_path / "many.zip"
    bomb.write_bytes(_zip_of(100_000))
    spec = IntakeSpec(sources=[str(bomb)], output_dir=str(tmp_path / "ds"), name="img")
    started = time.perf_counter()
    report = build_dataset(spec)
    took = time.perf_counter() - started
    assert [(e.status, e.source) for e in report.entries] == [("rejected", "many.zip")]
    assert "holds 100000 files, more than the 2000 a zip may hold" in report.entries[0].reason
    assert report.images_in_dataset == 0 and not list((tmp_path / "ds" / "10_img").iterdir())
    assert took < 1.0, took


@async_test
async def test_the_zip_cap_comes_from_the_config(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub, data="max_zip_members = 50\n") as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web_)):
            tid = await _open_draft(stub, alice)
            await stub.post_message(alice, tid, "", files=[Upload("pics.zip", _zip_of(51))])
            note = await stub.wait_until(lambda: message_with(stub, tid, "need a look"), what="intake")
            assert "pics.zip: holds 51 files, more than the 50 a zip may hold" in note.content


@async_test
async def test_a_crashing_decoder_cannot_take_the_bot_down(tmp_path, monkeypatch):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        bot = new_bot(cfg, db, scheduler, web_)
        async with stub.running(bot):
            tid = await _open_draft(stub, alice)
            with monkeypatch.context() as m:
                m.setattr(intake, "build_dataset", crashing_decoder.build_dataset)
                await stub.post_message(alice, tid, "", files=[Upload("evil.png", png((1, 2, 3)))])
                note = await stub.wait_until(
                    lambda: message_with(stub, tid, "need a look"), 60, "the crash reported"
                )
            assert "image reader crashed" in note.content
            # The bot goes on: the same member's next upload is taken in.
            await stub.post_message(alice, tid, "", files=[Upload("ok.png", png((9, 200, 9)))])
            card = stub.channel_messages(tid)[0]
            await stub.wait_until(
                lambda: card.embeds and "**1** images" in card.embeds[0]["description"], 60, "intake"
            )


# ---- a full disk ----


@async_test
async def test_uploads_refused_below_min_free_disk_with_nothing_written(tmp_path):
    stub = DiscordStub()
    # More free space than any disk has: the check must refuse.
    async with stub, server(tmp_path, stub, data="min_free_gb = 1000000\n") as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        bot = new_bot(cfg, db, scheduler, web_)
        async with stub.running(bot):
            tid = await _open_draft(stub, alice)
            await stub.post_message(alice, tid, "", files=[Upload("a.png", png((200, 30, 30)))])
            note = await stub.wait_until(lambda: message_with(stub, tid, "Not taken in"), what="refusal")
            assert "disk is nearly full" in note.content and "nothing was saved" in note.content
            assert not (cfg.data_dir / "members" / str(alice.id)).exists()


class FakeDispatcher:
    """One worker that records what it is sent; a cancel ends the job the way a worker does."""

    def __init__(self) -> None:
        self.workers = ["0:cpu"]
        self.sent: list[tuple[int, str]] = []
        self.cancelled: list[int] = []

    async def start(self, inbox: asyncio.Queue) -> None:
        self.inbox = inbox

    def ready(self, worker: str) -> bool:
        return True

    async def send(self, worker: str, job_id: int, kind: str, spec: dict) -> None:
        self.sent.append((job_id, kind))

    async def cancel(self, worker: str, job_id: int) -> None:
        self.cancelled.append(job_id)
        stopped = FailedEvent(kind="cancelled", reason="cancelled; epochs saved so far are kept")
        self.inbox.put_nowait(WorkerEvent(worker, job_id, stopped))

    async def close(self) -> None:
        pass


async def until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def limits_server(tmp_path, extra: str = ""):
    cfg = write_config(
        tmp_path,
        "[quota]\ndaily_gpu_seconds = 1000\nstorage_mb = 1\n[scheduling]\npoll_seconds = 0.02\n"
        "seconds_per_step = 0.01\n" + extra,
    )
    db = store.open_store(cfg.store)
    make_demo_dataset(member_path(cfg.data_dir, "alice", "datasets", "ds"), count=2, repeats=1)
    return cfg, db


def test_jobs_refused_and_not_started_below_min_free_disk(tmp_path):
    cfg, db = limits_server(tmp_path)
    queued = jobs.submit_gen(db, cfg, "alice", "a cat", "tiny", {"steps": 2})
    low = cfg.model_copy(update={"data": cfg.data.model_copy(update={"min_free_gb": 1e6})})
    with pytest.raises(jobs.JobError, match="disk is nearly full .*nothing was saved"):
        jobs.submit_train(db, low, "alice", "ds", "tiny", "x", TRAIN)
    assert [j.id for j in store.list_jobs(db)] == [queued.id]
    low_toml = cfg.path.read_text(encoding="utf-8").replace(
        'dir = "data"\n', 'dir = "data"\nmin_free_gb = 1e6\n'
    )
    cfg.path.write_text(low_toml, encoding="utf-8")
    folder = make_demo_dataset(tmp_path / "operator", count=1, repeats=1)
    cli = ["jobs", "submit", "--config", str(cfg.path), "--user", "bob", "train", str(folder)]
    assert loracord([*cli, "--base", "tiny", "--name", "b"]) == 2  # the operator's copy is not made either
    assert not (cfg.data_dir / "members" / "bob").exists()

    async def main():
        dispatcher = FakeDispatcher()
        scheduler = Scheduler(db, low, dispatcher)
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        await until(lambda: "disk" in scheduler.problems, "the disk reported")
        assert dispatcher.sent == [] and store.get_job(db, queued.id).state == "queued"
        ok, report = WebServer(low, db, scheduler).health()  # what /healthz answers
        assert not ok and "disk is nearly full" in report["problems"]["disk"]
        scheduler.cfg = cfg  # the owner made room
        await until(lambda: dispatcher.sent, "the job started")
        assert "disk" not in scheduler.problems
        stop.set()
        await task

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_failing_sqlite_write_is_reported_and_the_scheduler_goes_on(tmp_path, monkeypatch, caplog):
    cfg, db = limits_server(tmp_path)
    job = jobs.submit_gen(db, cfg, "alice", "a cat", "tiny", {"steps": 2})
    real_add_event = store.add_event
    full = {"on": True}

    def add_event(*args, **kwargs):
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_add_event(*args, **kwargs)

    monkeypatch.setattr(store, "add_event", add_event)

    async def main():
        dispatcher = FakeDispatcher()
        scheduler = Scheduler(db, cfg, dispatcher)
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        await until(lambda: "store" in scheduler.problems, "the failure reported")
        await asyncio.sleep(0.2)  # several polls while the disk stays full
        assert not task.done()
        # Nothing half-started: the job is still queued and no worker got it.
        assert store.get_job(db, job.id).state == "queued" and dispatcher.sent == []
        full["on"] = False
        await until(lambda: dispatcher.sent, "the job started once the disk had room")
        full["on"] = True  # full again while the job's result comes back: it waits, not lost
        dispatcher.inbox.put_nowait(
            WorkerEvent("0:cpu", job.id, ImagesEvent(images=[], parameters=[], seeds=[], seconds=0.5))
        )
        await asyncio.sleep(0.2)
        assert not task.done() and store.get_job(db, job.id).state == "running"
        full["on"] = False
        await until(lambda: store.get_job(db, job.id).state == "done", "the result recorded")
        assert scheduler.problems == {}
        stop.set()
        await task

    with caplog.at_level(logging.ERROR, logger="bot.scheduler"):
        asyncio.run(asyncio.wait_for(main(), 30))
    reports = [r.getMessage() for r in caplog.records if "database or disk is full" in r.getMessage()]
    assert len(reports) == 2  # once per episode, not once per poll


# ---- storage quota ----


def _lora_files(cfg, member: str, job_id: int, size: int) -> Path:
    """An epoch file, the final file linked to it (as the trainer leaves them) and its previews."""
    out = member_path(cfg.data_dir, member, "loras", str(job_id))
    out.mkdir(parents=True)
    epoch = out / "x-000001.safetensors"
    epoch.write_bytes(os.urandom(size))
    os.link(epoch, out / "x.safetensors")
    (out / "sample").mkdir()
    (out / "sample" / "x-000001-00.png").write_bytes(os.urandom(1000))
    return epoch


def test_storage_counts_what_is_on_disk_and_the_final_file_once(tmp_path):
    cfg, db = limits_server(tmp_path)
    store.ensure_member(db, "alice")
    job = store.insert_job(db, "train", "alice", "x", {}, "k", 1, 1.0)
    epoch = _lora_files(cfg, "alice", job, 3 * MB)
    for path, number in (
        (epoch, 1),
        (epoch.with_name("x.safetensors"), None),
    ):  # as the scheduler records them
        store.add_artifact(db, job, "alice", "lora", str(path), "0" * 64, 3 * MB, number)
    library.keep_epoch(db, cfg, store.get_job(db, job), 1)  # the library entry is a third name for it
    assert jobs.usage(db, cfg, "alice").storage_bytes == 3 * MB + 1000
    with pytest.raises(jobs.QuotaError, match=r"storage: your LoRAs use 3.0 MB of 1 MB"):
        jobs.submit_train(db, cfg, "alice", "ds", "tiny", "y", TRAIN)


def test_deleting_a_lora_frees_its_files_and_quota(tmp_path):
    cfg, db = limits_server(tmp_path)
    store.ensure_member(db, "alice")
    kept = store.insert_job(db, "train", "alice", "x", {}, "k", 1, 1.0)
    other = store.insert_job(db, "train", "alice", "y", {}, "k", 1, 1.0)
    for job in (kept, other):
        jobs.move(db, job, "running", started_at=time.time())
        jobs.move(db, job, "done", finished_at=time.time())
        epoch = _lora_files(cfg, "alice", job, MB)
        store.add_artifact(db, job, "alice", "lora", str(epoch), "0" * 64, MB, 1)
    lo = library.keep_epoch(db, cfg, store.get_job(db, kept), 1)
    assert jobs.usage(db, cfg, "alice").storage_bytes == 2 * (MB + 1000)
    library.delete(db, cfg, lo)
    assert jobs.usage(db, cfg, "alice").storage_bytes == MB + 1000  # only the other job's files
    assert not Path(lo.path).exists() and not member_path(cfg.data_dir, "alice", "loras", str(kept)).exists()
    assert store.artifacts(db, kept) == [] and len(store.artifacts(db, other)) == 1


@async_test
async def test_purging_a_member_frees_their_files_and_quota(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web_):
        alice = stub.add_member("alice")
        mod = stub.add_member("mod", roles=[stub.add_role("mods", discord.Permissions(manage_guild=True))])
        me = str(alice.id)
        store.ensure_member(db, me)
        job = store.insert_job(db, "train", me, "x", {}, "k", 1, 1.0)
        store.add_artifact(db, job, me, "lora", str(_lora_files(cfg, me, job, MB)), "0" * 64, MB, 1)
        assert jobs.usage(db, cfg, me).storage_bytes == MB + 1000
        async with stub.running(new_bot(cfg, db, scheduler, web_)):
            ix = await stub.command(mod, "admin purge", {"member": alice})
            assert "Purged" in (await ix.original_message()).content
        assert jobs.usage(db, cfg, me).storage_bytes == 0
        assert store.artifacts(db, job) == [] and not (cfg.data_dir / "members" / me).exists()


# ---- GPU time ----


def test_the_estimate_prices_preview_rounds_and_is_checked_against_what_is_left(tmp_path):
    cfg, db = limits_server(tmp_path, "gen_seconds_per_step = 0.5\n")
    settings = {
        **TRAIN,
        "max_train_epochs": 5,
        "resolution": 512,
        "sample_every_n_epochs": 2,
        "sample_steps": 20,
        "sample_prompts": ["sks --w 1024 --h 512 --s 10", "sks, smiling"],
    }
    job = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "x", settings)
    # Reference: previews after epochs 2, 4 and 5 (the last); per round 10 steps at 1024×512 and
    # 20 steps at 512², at 0.5 s a step of a 512² image.
    rounds, per_round = 3, 10 * 0.5 * (1024 * 512) / 512**2 + 20 * 0.5
    training = 2 * 5 * 0.01  # 2 images × 1 repeat × 5 epochs at 0.01 s a step
    assert job.estimate_s == pytest.approx(training + rounds * per_round, abs=0.11)
    # Without prompts the trainer renders its two default ones, at the training size and steps.
    no_lines = {**settings, "sample_prompts": []}
    assert jobs.submit_train(db, cfg, "alice", "ds", "tiny", "y", no_lines).estimate_s == pytest.approx(
        training + rounds * 2 * 20 * 0.5, abs=0.11
    )
    # A measured job: its time less its previews' estimate is what training steps cost.
    jobs.move(db, job.id, "running", started_at=time.time())
    jobs.move(db, job.id, "done", run_seconds=job.estimate_s - training + 10 * 0.2, finished_at=time.time())
    again = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "w", settings)
    assert again.estimate_s == pytest.approx(10 * 0.2 + rounds * per_round, abs=0.11)
    # 5 rounds × 2 prompts × 100 s, and the 10 training steps at the measured 0.2 s.
    many = {**settings, "sample_every_n_epochs": 1, "sample_steps": 200}
    with pytest.raises(jobs.QuotaError, match=r"GPU time: this job needs about 1002 s"):
        jobs.submit_train(db, cfg, "alice", "ds", "tiny", "z", {**many, "sample_prompts": []})


def test_a_job_past_the_daily_gpu_time_stops_at_its_next_saved_epoch(tmp_path):
    cfg, db = limits_server(tmp_path, "overrun_grace_seconds = 50\n")
    job = jobs.submit_train(db, cfg, "alice", "ds", "tiny", "x", TRAIN)
    seen: list = []

    async def main():
        dispatcher = FakeDispatcher()
        scheduler = Scheduler(db, cfg, dispatcher)
        scheduler.subscribe(lambda j, e: seen.append(e))
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        await until(lambda: dispatcher.sent, "the start")
        out = Path(store.get_job(db, job.id).spec_dict["output_dir"])
        out.mkdir(parents=True)

        async def epoch(n: int) -> None:
            (out / f"x-{n:06d}.safetensors").write_bytes(b"lora")
            event = EpochEvent(epoch=n, step=2 * n, lora_file=str(out / f"x-{n:06d}.safetensors"))
            dispatcher.inbox.put_nowait(WorkerEvent("0:cpu", job.id, event))
            # The stop is decided in the same step as the epoch's file is recorded.
            await until(lambda: any(a["epoch"] == n for a in store.artifacts(db, job.id)), f"epoch {n}")

        store.charge(db, "alice", 0, 1040)  # other jobs today: over 1000 s, within the 50 s grace
        await epoch(1)
        assert dispatcher.cancelled == [] and store.get_job(db, job.id).state == "running"
        store.charge(db, "alice", 0, 20)  # now 1060 s: past the grace
        await epoch(2)
        await until(lambda: store.get_job(db, job.id).state != "running", "the stop")
        stop.set()
        await task
        return dispatcher

    dispatcher = asyncio.run(asyncio.wait_for(main(), 30))
    final = store.get_job(db, job.id)
    assert dispatcher.cancelled == [job.id] and final.state == "failed"
    assert final.failure.startswith("stopped after epoch 2: you used 10")
    assert "past your 1000 s a day; the epochs saved so far are kept" in final.failure
    assert [a["epoch"] for a in store.artifacts(db, job.id)] == [1, 2]
    assert all(Path(a["path"]).exists() for a in store.artifacts(db, job.id))
    assert isinstance(seen[-1], FailedEvent) and seen[-1].reason == final.failure
