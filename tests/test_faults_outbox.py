"""Faults on Discord's side: the scheduler never waits on Discord, and once Discord answers again
every result is posted exactly once (the outbox, with the real bot on the stub and CPU workers)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from botutil import TRAIN
from discord_stub import DiscordStub
from test_bot_journey import async_test, new_bot, server

from bot import jobs, store
from bot.files import member_path
from runner.selftest import make_demo_dataset


def image_posts(stub: DiscordStub) -> list:
    return [m for m in stub.channel_messages(stub.general) if m.files]


def pending_posts(db) -> int:
    return db.execute("SELECT COUNT(*) FROM discord_outbox WHERE sent_at IS NULL AND dropped = 0").fetchone()[
        0
    ]


async def state_of(db, job_id: int, states: tuple[str, ...], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (state := store.get_job(db, job_id).state) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}: {store.get_job(db, job_id).failure}"
        await asyncio.sleep(0.05)
    return state


async def gen_from_discord(stub: DiscordStub, member, prompt: str) -> None:
    ix = await stub.command(member, "gen", {"prompt": prompt, "steps": 2, "seed": 3})
    assert "Queued" in (await ix.original_message()).content


async def queued_then_outage(stub: DiscordStub, db, member, status: int | None, gateway: bool = True) -> None:
    """A member's /gen is queued; Discord goes down before the job runs."""
    store.set_setting(db, "paused", True)
    await gen_from_discord(stub, member, "a red cat")
    stub.begin_outage(status, gateway=gateway)
    store.set_setting(db, "paused", False)


async def keeps_working_while_discord_is_down(db, cfg, member: str) -> None:
    """Jobs submitted elsewhere (the CLI) start and finish, and a cancel stops a running job."""
    other = jobs.submit_gen(db, cfg, member, "a blue cat", "tiny", {"steps": 2, "seed": 4})
    assert await state_of(db, other.id, ("done", "failed")) == "done"
    make_demo_dataset(member_path(cfg.data_dir, member, "datasets", "ds"), count=2, repeats=1)
    long = jobs.submit_train(db, cfg, member, "ds", "tiny", "long", {**TRAIN, "max_train_epochs": 50})
    deadline = time.monotonic() + 120
    while store.get_job(db, long.id).progress is None:
        assert time.monotonic() < deadline, "the training job never reported a step"
        await asyncio.sleep(0.05)
    assert jobs.request_cancel(db, long.id) == "stopping"
    assert await state_of(db, long.id, ("cancelled", "done", "failed")) == "cancelled"


@pytest.mark.parametrize("status", [503, None], ids=["5xx", "hanging"])
@async_test
async def test_an_outage_holds_up_no_job_and_each_result_is_posted_once(tmp_path, status):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub, "retry_max_seconds = 0.5\n") as (cfg, db, scheduler, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            await queued_then_outage(stub, db, alice, status)
            assert await state_of(db, 1, ("done", "failed")) == "done"
            await keeps_working_while_discord_is_down(db, cfg, str(alice.id))
            assert image_posts(stub) == []
            assert pending_posts(db) >= 1
            stub.end_outage()
            posted = await stub.wait_until(lambda: image_posts(stub), 60, "the images after the outage")
            await stub.wait_until(lambda: pending_posts(db) == 0, 30, "an empty outbox")
            # discord.py cannot stop while it waits out its reconnect back-off: let it reconnect.
            await stub.wait_until(lambda: web.discord_connected, 120, "the gateway back")
    assert len(image_posts(stub)) == 1 and f"<@{alice.id}>" in posted[0].content
    assert stub.violations == []


@async_test
async def test_posts_waiting_when_the_bot_stops_are_posted_by_the_next_start(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub, "retry_max_seconds = 0.5\n") as (cfg, db, scheduler, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            # REST down, the gateway up (discord.py cannot stop while it waits to reconnect)
            await queued_then_outage(stub, db, alice, 503, gateway=False)
            assert await state_of(db, 1, ("done", "failed")) == "done"
        assert image_posts(stub) == [] and pending_posts(db) == 1
        stub.end_outage()
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            await stub.wait_until(lambda: pending_posts(db) == 0, 60, "the outbox delivered")
            await stub.wait_until(lambda: image_posts(stub), 10, "the images")
    assert len(image_posts(stub)) == 1
    assert stub.violations == []


@async_test
async def test_a_post_discord_took_but_the_store_did_not_mark_is_not_posted_twice(tmp_path, monkeypatch):
    """The crash window between Discord creating the message and the row being marked sent: the
    retry carries the same nonce, and Discord (enforce_nonce) gives back the message it has."""
    real = store.post_sent
    failures = []

    def disk_full_once(db, post_id):
        if not failures:
            failures.append(post_id)
            raise sqlite3.OperationalError("database or disk is full")
        real(db, post_id)

    monkeypatch.setattr(store, "post_sent", disk_full_once)
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            await gen_from_discord(stub, alice, "a red cat")
            await stub.wait_until(lambda: failures and pending_posts(db) == 0, 120, "the retried post")
    assert failures, "the fault was never injected"
    assert stub.nonce_replays == 1
    assert len(image_posts(stub)) == 1
    assert stub.violations == []
