"""The member's journey on the Discord stub with the real bot, the tiny model and CPU workers:
/train → images in the thread → Settings → Start → previews per epoch → Use epoch N → /gen weight:0.8,
with a non-owner clicking, a corrupt image, a bot restart with old buttons clicked afterwards, and
no Discord rule broken."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io

import pytest
from botutil import write_config
from discord_stub import DiscordStub, Upload
from PIL import Image

from bot import store
from bot.discord.app import LoracordBot
from bot.dispatch import make_dispatcher
from bot.scheduler import Scheduler
from bot.web import WebServer
from runner.formats.infotext import parse_parameters


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 240))

    return run


def png(color: tuple[int, int, int], side: int = 128) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), color).save(out, "PNG")
    return out.getvalue()


@contextlib.asynccontextmanager
async def server(tmp_path, stub: DiscordStub, extra: str = "", data: str = "", bases: str = ""):
    cfg = write_config(
        tmp_path,
        "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\n[scheduling]\npoll_seconds = 0.05\n"
        f'[web]\nport = 0\n[discord]\napi_base = "{stub.api_base}"\ngateway = "{stub.gateway_url}"\n'
        f"guilds = [{stub.guild_id}]\nprogress_seconds = 0.2\n{extra}",
        data=data,
        bases=bases,
    )
    db = store.open_store(cfg.store)
    scheduler = Scheduler(db, cfg, make_dispatcher(cfg))
    stop = asyncio.Event()
    # The CPU worker shares the cores with this process (stub, bot) and whatever else runs: with
    # torch's thread per core, a step of the tiny model stalls for seconds while one core is busy.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        async with WebServer(cfg, db, scheduler) as web:
            task = asyncio.create_task(scheduler.run(stop))
            try:
                yield cfg, db, scheduler, web
            finally:
                stop.set()
                await task


def new_bot(cfg, db, scheduler, web) -> LoracordBot:
    return LoracordBot(cfg, db, scheduler, web, guild_ready_timeout=0.05)


def message_with(stub: DiscordStub, channel_id: int, text: str):
    return next((m for m in stub.channel_messages(channel_id) if text in m.content), None)


@async_test
async def test_train_pick_an_epoch_and_gen_with_weight(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web):
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            ix = await stub.command(
                alice, "train", {"name": "キャラ", "trigger": "sks", "preset": "character", "base": "tiny"}
            )
            assert (await ix.original_message()).ephemeral
            thread = stub.threads()[-1]
            tid = int(thread["id"])
            card = await stub.wait_until(lambda: stub.channel_messages(tid), what="the dataset card")
            card = card[0]
            # Auto-caption in SD1.5's style (WD14 tags) first, sentences on the second row.
            actions = ("tag:0", "caps", "set", "start", "drop", "tag:1")
            assert card.custom_ids() == [f"lc:d:1:{a}" for a in actions]

            files = [
                Upload("a.png", png((200, 30, 30))),
                Upload("b.png", png((30, 30, 200))),
                Upload("bad.png", b"not a png"),
            ]
            await stub.post_message(alice, tid, "my pics", files=files)
            await stub.wait_until(
                lambda: card.embeds and "**2** images" in card.embeds[0]["description"], what="card update"
            )
            problems = await stub.wait_until(
                lambda: message_with(stub, tid, "need a look"), what="intake problems"
            )
            assert "bad.png" in problems.content

            refused = await stub.click(bob, card, "lc:d:1:start")
            assert "Only" in (await refused.original_message()).content

            opened = await stub.click(alice, card, "lc:d:1:set")
            values = {
                "Epochs": "2",
                "Repeats per image": "1",
                "Dim / alpha": "4/2",
                "Learning rate": "1e-3",
                "Resolution": "64",
            }
            await (await stub.submit_modal(alice, opened, values)).original_message()
            for key, value in (("mixed_precision", "no"), ("sample_steps", "2"), ("train_batch_size", "1")):
                done = await stub.command(alice, "train-set", {"key": key, "value": value}, channel_id=tid)
                assert "saved" in (await done.original_message()).content
            assert "2 epochs · 4 steps · dim 4/2" in card.embeds[0]["description"]
            # The character preset shuffles captions and trains the text encoder: said on the card.
            assert (
                "CLIP-L runs on every step (shuffle_caption=True, CLIP-L trained)"
                in card.embeds[0]["description"]
            )

            start = await stub.click(alice, card, "lc:d:1:start")
            assert "Queued as job" in (await start.original_message()).content
            ready = await stub.wait_until(
                lambda: message_with(stub, tid, "is ready"), 180, "the end of training"
            )
            assert ready.files and "epoch 2 is in your library" in ready.content
            first = message_with(stub, tid, "epoch 1 saved")
            assert first.files and first.custom_ids() == ["lc:j:1:use:1", "lc:j:1:dl:1", "lc:w:1"]
            # Open in browser: a sign-in link to that training's page, for its owner alone.
            opened = await (await stub.click(alice, first, "lc:w:1")).original_message()
            url = next(c["url"] for c in opened.walk_components() if c.get("style") == 5)
            assert opened.ephemeral and f"m={alice.id}&a=0&next=%2Floras%2F1&" in url
            assert "Only" in (await (await stub.click(bob, first, "lc:w:1")).original_message()).content
            # the progress message's last edit is coalesced, so it may come after the post above
            await stub.wait_until(lambda: message_with(stub, tid, "キャラ** finished"), what="the last edit")

        async with stub.running(new_bot(cfg, db, scheduler, web)):  # a restart: old buttons still work
            bob_pick = await stub.click(bob, first, "lc:j:1:use:1")
            assert "Only" in (await bob_pick.original_message()).content
            pick = await stub.click(alice, first, "lc:j:1:use:1")
            assert "now epoch 1" in (await pick.original_message()).content

            gen = await stub.command(
                alice, "gen", {"prompt": "sks, red", "lora": "キャラ", "weight": 0.8, "steps": 2, "seed": 7}
            )
            assert "Queued" in (await gen.original_message()).content
            images = await stub.wait_until(
                lambda: next((m for m in stub.channel_messages(stub.general) if m.files), None),
                120,
                "the images",
            )
            info = await stub.click(alice, images, "lc:g:2:info")
            text = (await info.original_message()).content
            assert "<lora:キャラ:0.8>" in text and "Seed: 7" in text
            assert parse_parameters(text.strip("`\n")).fields["Steps"] == "2"

            stronger = await stub.click(alice, images, "lc:g:2:up")
            assert "Queued" in (await stronger.original_message()).content
            again = await stub.wait_until(
                lambda: [m for m in stub.channel_messages(stub.general) if m.files][1:], 120, "the re-roll"
            )
            info = await stub.click(alice, again[0], "lc:g:3:info")
            assert "<lora:キャラ:0.9>" in (await info.original_message()).content

            up = await stub.click(bob, images, "lc:g:2:up")  # alice has not shared キャラ
            assert "no LoRA named" in (await up.original_message()).content
            delete = await stub.click(bob, images, "lc:g:2:del")
            assert "Only" in (await delete.original_message()).content
    assert stub.violations == []
