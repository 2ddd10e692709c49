"""Faults at the edges a stranger or a careless admin can reach: commands from servers the bot does
not serve, servers it was added to without the owner, inf/nan/negative limits, a bad row in the
queue, pings hidden in member text, a double tap on Start, edits after Start, images posted before
the card, names too long in bytes, and NSFW previews after a restart. Each test fails on the code
before these guards."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from botutil import write_config
from discord_stub import DiscordStub, StubMessage, Upload
from PIL import Image
from test_bot_journey import async_test, png

from bot import jobs, store
from bot.cli import main
from bot.config import QUOTA_CEILINGS, ConfigError
from bot.discord import app, state
from bot.discord.app import LoracordBot
from bot.discord.common import Served
from bot.dispatch import make_dispatcher
from bot.scheduler import Scheduler
from bot.web import WebServer
from runner.selftest import make_demo_dataset
from runner.spec import (
    OUTPUT_NAME_BYTES,
    EpochEvent,
    ImagesEvent,
    SpecError,
    TagCount,
    TaggedEvent,
    TrainSpec,
)
from runner.train.loop import train

NAME_LIMIT = 255  # bytes in one file name on ext4, btrfs, XFS, APFS


@contextlib.asynccontextmanager
async def bot_on(stub: DiscordStub, root: Path, extra: str = "", guilds: str | None = None, data: str = ""):
    """The bot on the stub with its store and web server; the scheduler is built but not run, so
    jobs stay where the bot put them."""
    guilds = f"[{stub.guild_id}]" if guilds is None else guilds
    cfg = write_config(
        root,
        "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\n[web]\nport = 0\n"
        f'[discord]\napi_base = "{stub.api_base}"\ngateway = "{stub.gateway_url}"\n'
        f"guilds = {guilds}\nprogress_seconds = 0.2\n{extra}",
        data=data,
    )
    db = store.open_store(cfg.store)
    scheduler = Scheduler(db, cfg, make_dispatcher(cfg))
    async with WebServer(cfg, db, scheduler) as web:
        bot = LoracordBot(cfg, db, scheduler, web, guild_ready_timeout=0.05)
        async with stub.running(bot):
            yield bot


async def open_draft(stub: DiscordStub, member, name: str = "キャラ", channel_id: int | None = None):
    """/train as ``member``: (draft id, thread id, the card message)."""
    ix = await stub.command(
        member,
        "train",
        {"name": name, "trigger": "sks", "preset": "character", "base": "tiny"},
        channel_id=channel_id,
    )
    answer = await ix.original_message(timeout=10)
    thread = int(re.search(r"<#(\d+)>", answer.content)[1])
    card = await stub.wait_until(
        lambda: next((m for m in stub.channel_messages(thread) if m.embeds), None), what="the card"
    )
    return int(card.custom_ids()[0].split(":")[2]), thread, card


def images_on(card: StubMessage) -> int:
    return int(re.search(r"\*\*(\d+)\*\* images", card.embeds[0]["description"])[1])


async def deliver(bot: LoracordBot, job_id: int, event) -> None:
    """What the scheduler does with a worker's event: an outbox row for the bot, then its listeners."""
    store.add_post(bot.db, job_id, event.model_dump(mode="json"))
    for listener in bot.scheduler.listeners:
        await listener(store.get_job(bot.db, job_id), event)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


# ---- only the owner's servers ----


@async_test
async def test_unlisted_servers_are_left_at_start_and_when_added(tmp_path):
    stub = DiscordStub()
    async with stub:
        before = stub.add_guild("added while the bot was down")
        async with bot_on(stub, tmp_path):
            await stub.wait_until(lambda: before in stub.left_guilds, what="leaving the unlisted server")
            later = stub.add_guild("added while it runs")
            await stub.wait_until(lambda: later in stub.left_guilds, what="leaving the new server")
            assert stub.guild_id not in stub.left_guilds
    assert stub.violations == []


@async_test
async def test_commands_from_another_server_are_refused_and_change_nothing(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path) as bot:
        stranger = stub.add_guild("stranger")
        # Global commands an earlier run registered reach every server that has the app.
        stub.commands[None] = dict(stub.commands[stub.guild_id])
        mallory = stub.add_member("mallory")
        for name, options in [
            ("gen", {"prompt": "a cat", "base": "tiny"}),
            ("train", {"name": "x", "trigger": "sks", "preset": "style", "base": "tiny"}),
            ("quota", {}),
        ]:
            ix = await stub.command(mallory, name, options, guild_id=stranger)
            answer = await ix.original_message()
            assert answer.ephemeral and "only its owner's servers" in answer.content, (name, answer.content)
        assert store.list_jobs(bot.db) == [] and stub.threads() == []
        assert list(bot.db.query("SELECT * FROM members")) == []
    assert stub.violations == []
    # Every button, select and modal goes through the same check as the commands.
    items = [item for module in app.COGS for item in module.ITEMS]
    assert items and all(issubclass(item, Served) for item in items)


def test_an_empty_server_list_is_refused_unless_public(tmp_path):
    def bot(extra: str) -> LoracordBot:
        (tmp_path / extra.strip()[:6]).mkdir()
        cfg = write_config(tmp_path / extra.strip()[:6], f"[discord]\n{extra}")
        db = store.open_store(cfg.store)
        return LoracordBot(cfg, db, Scheduler(db, cfg, make_dispatcher(cfg)), None)

    with pytest.raises(ConfigError, match="guilds"):
        bot("guilds = []\n")
    assert bot("public = true\n").cfg.discord.public


@async_test
async def test_public_bot_admins_manage_only_their_own_server(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path, "public = true\n", guilds="[]") as bot:
        role = stub.add_role("regulars")
        ix = await stub.command(stub.owner, "admin pause")
        assert "owner" in (await ix.original_message()).content
        assert not store.get_setting(bot.db, "paused", False)  # the queue every server shares runs on
        ix = await stub.command(stub.owner, "admin quota", {"role": role, "key": "queued_jobs", "value": "7"})
        await ix.original_message()
        assert store.quota_overrides(bot.db, "role", [str(role)]) == {str(role): {"queued_jobs": 7}}
    assert stub.violations == []


# ---- only sane values ----


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[quota]\ndaily_gpu_seconds = inf", "daily_gpu_seconds"),
        ("[quota]\nstorage_mb = nan", "storage_mb"),
        ("[quota]\nqueued_jobs = -1", "queued_jobs"),
        ("[quota]\ntotal_steps = 1e30", "total_steps"),
        ("[quota]\nconcurrent_jobs = 1.5", "concurrent_jobs"),
        ('[quota.roles."1"]\nconcurrent_jobs = inf', "concurrent_jobs"),
        ("[scheduling]\nseconds_per_step = nan", "seconds_per_step"),
        ("[scheduling]\nfair_window_hours = inf", "fair_window_hours"),
        ("[web]\nlink_hours = 1e300", "link_hours"),
    ],
)
def test_config_refuses_inf_nan_negative_and_absurd_numbers(tmp_path, toml, key):
    with pytest.raises(ConfigError, match=key):
        write_config(tmp_path, toml + "\n")


def test_unlimited_is_the_ceiling_in_config_cli_and_nothing_bad_is_written(tmp_path, capsys):
    cfg = write_config(tmp_path, '[quota]\ndaily_gpu_seconds = "unlimited"\n')
    assert cfg.quota.daily_gpu_seconds == QUOTA_CEILINGS["daily_gpu_seconds"]
    c = ["quota", "set", "--config", str(cfg.path), "--role", "42"]
    for bad in (
        "daily_gpu_seconds=inf",
        "storage_mb=nan",
        "queued_jobs=-1",
        "total_steps=1e30",
        "concurrent_jobs=2.5",
    ):
        assert main([*c, "queued_jobs=4", bad]) == 2, bad  # nothing of a line with a bad value is written
        assert bad.split("=")[0] in capsys.readouterr().err
    db = store.open_store(cfg.store)
    assert store.quota_overrides(db, "role", ["42"]) == {}
    assert main([*c, "concurrent_jobs=unlimited", "storage_mb=10.5"]) == 0
    assert store.quota_overrides(db, "role", ["42"]) == {
        "42": {"concurrent_jobs": QUOTA_CEILINGS["concurrent_jobs"], "storage_mb": 10.5}
    }


@async_test
async def test_admin_quota_refuses_what_is_not_a_limit(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path) as bot:
        role = stub.add_role("regulars")

        async def admin_quota(key: str, value: str) -> str:
            ix = await stub.command(stub.owner, "admin quota", {"role": role, "key": key, "value": value})
            return (await ix.original_message()).content

        for key, value in [
            ("daily_gpu_seconds", "inf"),
            ("daily_gpu_seconds", "nan"),
            ("storage_mb", "-5"),
            ("total_steps", "1e30"),
            ("concurrent_jobs", "1.5"),
        ]:
            answer = await admin_quota(key, value)
            assert answer.startswith("Not changed") and key in answer, answer
        assert store.quota_overrides(bot.db, "role", [str(role)]) == {}
        await admin_quota("queued_jobs", "unlimited")
        assert store.quota_overrides(bot.db, "role", [str(role)]) == {
            str(role): {"queued_jobs": QUOTA_CEILINGS["queued_jobs"]}
        }
    assert stub.violations == []


class Recorder:
    """A dispatcher that only records what it is sent (the scheduler is what is tested)."""

    def __init__(self, workers: int) -> None:
        self.workers = [f"w{i}" for i in range(workers)]
        self.sent: list[int] = []

    async def start(self, inbox) -> None:
        pass

    def ready(self, worker: str) -> bool:
        return True

    async def send(self, worker: str, job_id: int, kind: str, spec: dict) -> None:
        self.sent.append(job_id)

    async def cancel(self, worker: str, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


def test_one_bad_row_fails_its_own_job_and_the_queue_goes_on(tmp_path):
    cfg = write_config(tmp_path)
    db = store.open_store(cfg.store)
    ids = {}
    for member in ("nanny", "infy", "texty", "broken", "fine"):
        store.ensure_member(db, member)
        ids[member] = store.insert_job(db, "train", member, member, {"output_name": member}, "k", 10, 10.0)
    # Rows no admin command writes any more, as another tool or an older version could have:
    # a nan (SQLite keeps it as NULL), an infinity, text; and a spec that is not JSON.
    store.set_quota_override(db, "member", "nanny", "concurrent_jobs", float("nan"))
    store.set_quota_override(db, "member", "infy", "concurrent_jobs", float("inf"))
    db.execute("INSERT INTO quota_overrides VALUES ('member', 'texty', 'concurrent_jobs', 'lots')")
    db.execute("UPDATE jobs SET spec = '{\"output_name\": ' WHERE id = ?", [ids["broken"]])
    assert jobs.effective_quota(db, cfg, "infy").concurrent_jobs == cfg.quota.concurrent_jobs

    dispatcher = Recorder(workers=5)
    scheduler = Scheduler(db, cfg, dispatcher)
    seen = []
    scheduler.subscribe(lambda job, event: seen.append((job.id, event)))
    asyncio.run(scheduler.tick())

    assert sorted(dispatcher.sent) == sorted(ids[m] for m in ("nanny", "infy", "texty", "fine"))
    broken = store.get_job(db, ids["broken"])
    assert (
        broken.state == "failed" and "cannot start" in broken.failure and "JSONDecodeError" in broken.failure
    )
    assert [(i, e.type) for i, e in seen] == [(ids["broken"], "failed")]  # the member hears of it
    assert [p.job_id for p in store.due_posts(db)] == [ids["broken"]]
    asyncio.run(scheduler.tick())  # and the next round runs as well
    assert len(dispatcher.sent) == 4


# ---- nobody is pinged by what members typed ----


@async_test
async def test_bot_posts_mention_nobody_but_whom_they_name(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path):
        alice = stub.add_member("alice")
        _, thread, _ = await open_draft(stub, alice, "@everyone")
        await stub.post_message(alice, thread, files=[Upload("@everyone <@&1>.png", b"not an image")])
        await stub.wait_until(
            lambda: any("need a look" in m.content for m in stub.channel_messages(thread)),
            30,
            what="the report",
        )
        sent = [(m, rule) for m in stub.messages.values() if m.author is stub.bot for rule in m.mention_rules]
        assert len(sent) >= 3
        for message, allowed in sent:
            assert allowed is not None and allowed.get("parse") == [], (message.content, allowed)
            assert {str(u) for u in allowed.get("users", [])} <= {str(alice.id)} and not allowed.get("roles")
    assert stub.violations == []


# ---- idempotent buttons, a frozen dataset ----


@async_test
async def test_double_taps_start_one_job_and_start_freezes_the_captions(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path) as bot:
        alice = stub.add_member("alice")
        draft_id, thread, card = await open_draft(stub, alice)
        await stub.post_message(
            alice, thread, files=[Upload(f"{i}.png", png(c)) for i, c in enumerate(COLOURS)]
        )
        await stub.wait_until(lambda: images_on(card) == 3, 30, what="3 images on the card")

        taps = [await stub.click(alice, card, f"lc:d:{draft_id}:tag:0") for _ in range(2)]
        answers = sorted([(await ix.original_message()).content for ix in taps])
        tag_jobs = [j for j in store.list_jobs(bot.db) if j.kind == "tag"]
        assert len(tag_jobs) == 1, answers
        assert "still at work" in answers[0] and "Tagging queued" in answers[1]

        # The tagger's result: captions beside the images and the tag picker in the thread.
        folder = next((tmp_path / "data").rglob(f"datasets/{draft_id}/*_img"))
        for image in folder.glob("*.png"):
            image.with_suffix(".txt").write_text("sks, red, smile", encoding="utf-8")
        jobs.request_cancel(bot.db, tag_jobs[0].id)  # done, as far as Start is concerned
        job = store.get_job(bot.db, tag_jobs[0].id)
        tagged = TaggedEvent(
            images=3,
            captions_written=3,
            tag_summary=[TagCount(tag="red", count=3, share=1.0), TagCount(tag="smile", count=3, share=1.0)],
            tag_frequency={"img": {"red": 3, "smile": 3}},
        )
        await deliver(bot, job.id, tagged)
        picker = await stub.wait_until(
            lambda: next((m for m in stub.channel_messages(thread) if "Tagged" in m.content), None)
        )

        starts = [await stub.click(alice, card, f"lc:d:{draft_id}:start") for _ in range(2)]
        answers = sorted([(await ix.original_message(timeout=10)).content for ix in starts])
        assert len([j for j in store.list_jobs(bot.db) if j.kind == "train"]) == 1, answers
        assert answers[0].startswith("Not started: Training has started") and "Queued as job" in answers[1]

        captions = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
        settings = state.get_draft(bot.db, draft_id).settings
        select = f"lc:t:{draft_id}:0"
        ix = await stub.select(alice, picker, select, ["red"])
        assert "frozen" in (await ix.original_message()).content
        ix = await stub.click(alice, picker, f"lc:d:{draft_id}:apply")
        assert "frozen" in (await ix.original_message()).content
        await stub.post_message(alice, thread, files=[Upload("late.png", png((90, 90, 90)))])
        await stub.wait_until(
            lambda: any("Training has started" in m.content for m in stub.channel_messages(thread))
        )
        assert {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")} == captions
        assert state.get_draft(bot.db, draft_id).settings == settings
        assert len(list(folder.glob("*.png"))) == 3
    assert stub.violations == []


@async_test
async def test_a_double_tap_on_reroll_queues_one_job_per_member(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path) as bot:
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        store.ensure_member(bot.db, str(alice.id))
        first = store.insert_job(bot.db, "gen", str(alice.id), None, {"base": "tiny:sd15"}, "k", 4, 1.0)
        state.set_post(bot.db, first, stub.general, None, False)
        done = ImagesEvent(
            images=[_png_file(tmp_path / "cat.png")],
            parameters=["a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64"],
            seeds=[5],
            seconds=1.0,
        )
        store.update_job(bot.db, first, state="done", result=done.model_dump_json())
        await deliver(bot, first, done)
        button = f"lc:g:{first}:again"
        post = await stub.wait_until(
            lambda: next((m for m in stub.channel_messages(stub.general) if button in m.custom_ids()), None)
        )
        taps = [await stub.click(alice, post, button) for _ in range(2)]
        answers = sorted([(await ix.original_message()).content for ix in taps])
        assert "double tap" in answers[0] and "Queued" in answers[1], answers
        ix = await stub.click(bob, post, button)  # another member's re-roll is theirs
        assert "Queued" in (await ix.original_message()).content
        rerolls = [j.owner for j in store.list_jobs(bot.db, ("queued",)) if j.kind == "gen"]
        assert sorted(rerolls) == sorted([str(alice.id), str(bob.id)])
    assert stub.violations == []


# ---- images posted before the card ----


@pytest.mark.parametrize("held", ["thread", "join"])
@async_test
async def test_images_posted_before_the_card_are_taken_in(tmp_path, held):
    """The member's app shows the thread as soon as Discord made it: images can come before the
    bot hears back that it made the thread (``thread``) or while it adds the member (``join``)."""
    stub = DiscordStub()
    posted = asyncio.Event()
    route = {"thread": "_thread_without_message", "join": "_join_thread"}[held]
    answer = getattr(stub, route)

    async def held_back(request):
        response = await answer(request)
        await posted.wait()
        return response

    setattr(stub, route, held_back)  # before the stub starts: its routes are bound then
    async with stub, bot_on(stub, tmp_path) as bot:
        alice = stub.add_member("alice")
        opening = asyncio.create_task(open_draft(stub, alice))
        thread = await stub.wait_until(lambda: stub.threads(), what="the thread")
        await stub.post_message(alice, int(thread[0]["id"]), files=[Upload("early.png", png(COLOURS[0]))])
        await asyncio.sleep(0.3)  # the bot sees the message while it waits on Discord
        posted.set()
        draft_id, _, card = await opening
        await stub.wait_until(lambda: images_on(card) == 1, 30, what="the early image on the card")
        await asyncio.sleep(0.5)  # a second intake of the same message would show now
        assert images_on(card) == 1
        folder = next((tmp_path / "data").rglob(f"datasets/{draft_id}/*_img"))
        assert len(list(folder.glob("*.png"))) == 1
        assert state.get_draft(bot.db, draft_id).card_id == card.id
    assert stub.violations == []


# ---- names in bytes ----


def test_a_long_japanese_name_trains_end_to_end_and_a_longer_one_is_refused(tmp_path):
    longest = "キャラ" * (OUTPUT_NAME_BYTES // 9)  # 3 bytes a character
    assert len(longest) >= 75 and len(longest.encode()) <= OUTPUT_NAME_BYTES
    data = make_demo_dataset(tmp_path / "data", count=2, repeats=1)
    spec = TrainSpec.parse(
        {
            "base": "tiny:sd15",
            "train_data_dir": str(data),
            "output_dir": str(tmp_path / "out"),
            "output_name": longest,
            "trigger_word": "sks",
            "max_train_epochs": 2,
            "network_dim": 4,
            "network_alpha": 2,
            "sample_every_n_epochs": 1,
            "sample_steps": 1,
            "sample_prompts": ["a", "b"],
        }
    )
    result = train(spec, lambda e: None, None, device="cpu")
    assert result.type == "done", result
    written = [p for p in (tmp_path / "out").rglob("*")]
    assert any(p.name.endswith("-000002.safetensors") for p in written)
    assert any(p.name.endswith("-state") for p in written) and any(p.suffix == ".png" for p in written)
    assert max(len(p.name.encode()) for p in written) <= NAME_LIMIT

    too_long = "キ" * (OUTPUT_NAME_BYTES // 3 + 1)
    with pytest.raises(SpecError, match=str(OUTPUT_NAME_BYTES)):
        TrainSpec.parse({"base": "x", "train_data_dir": ".", "output_dir": ".", "output_name": too_long})


@async_test
async def test_train_refuses_a_name_too_long_in_bytes_at_once(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path) as bot:
        alice = stub.add_member("alice")
        name = "🎨" * 60  # 60 characters, 240 bytes
        ix = await stub.command(
            alice, "train", {"name": name, "trigger": "sks", "preset": "style", "base": "tiny"}
        )
        answer = (await ix.original_message()).content
        assert "cannot be used" in answer and str(OUTPUT_NAME_BYTES) in answer
        assert stub.threads() == [] and state.latest_draft(bot.db, str(alice.id)) is None
    assert stub.violations == []


# ---- NSFW after a restart ----


def _png_file(path: Path) -> str:
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    return str(path)


@async_test
async def test_previews_in_an_nsfw_channel_after_a_restart(tmp_path):
    stub = DiscordStub()
    lewd = stub.add_channel("lewd", nsfw=True)
    async with stub:
        alice = stub.add_member("alice")
        async with bot_on(stub, tmp_path, 'nsfw = "refuse"\n'):
            draft_id, thread, _ = await open_draft(stub, alice, channel_id=lewd)
        stub.channels[thread]["thread_metadata"]["archived"] = True  # a day without messages
        async with bot_on(stub, tmp_path, 'nsfw = "refuse"\n') as bot:
            assert bot.get_channel(thread) is None  # archived threads are not in a fresh cache
            store.ensure_member(bot.db, str(alice.id))
            job_id = store.insert_job(bot.db, "train", str(alice.id), "キャラ", {}, "k", 1, 1.0)
            state.update_draft(bot.db, draft_id, job_id=job_id)
            out = tmp_path / "out"
            out.mkdir()
            lora = out / "キャラ-000001.safetensors"
            lora.write_bytes(b"0")
            event = EpochEvent(
                epoch=1,
                step=1,
                lora_file=str(lora),
                sample_images=[_png_file(out / "a.png")],
                sample_prompts=["sks"],
            )
            await deliver(bot, job_id, event)
            post = await stub.wait_until(
                lambda: next((m for m in stub.channel_messages(thread) if "epoch 1 saved" in m.content), None)
            )
            assert "not shown" not in post.content
            assert [f.filename for f in post.files] == ["preview-000001.png"]  # no SPOILER_: NSFW allows
            assert Image.open(io.BytesIO(post.files[0].data)).size[0] > 0
    assert stub.violations == []


# ---- one message's files, downloaded together ----


@async_test
async def test_a_message_of_files_is_taken_in_together_and_one_over_the_limit_is_refused_alone(tmp_path):
    stub = DiscordStub()
    async with stub, bot_on(stub, tmp_path, data="max_upload_mb = 0.1\n"):
        alice = stub.add_member("alice")
        draft_id, thread, card = await open_draft(stub, alice)
        noise = io.BytesIO()
        Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(noise, "PNG")  # ~190 KB
        files = [Upload(f"{i}.png", png(COLOURS[i % 3])) for i in range(6)] + [
            Upload("big.png", noise.getvalue())
        ]
        await stub.post_message(alice, thread, files=files)
        await stub.wait_until(lambda: images_on(card) == 6, 60, what="six images on the card")
        refused = await stub.wait_until(
            lambda: next((m for m in stub.channel_messages(thread) if "need a look" in m.content), None), 30
        )
        assert "✗ big.png: 0.2 MB is too large to take in (the limit is 102 KB)" in refused.content
        folder = next((tmp_path / "data").rglob(f"datasets/{draft_id}/*_img"))
        assert len(list(folder.glob("*.png"))) == 6
        assert not list((tmp_path / "data").rglob("uploads/*/*"))  # nothing left behind
    assert stub.violations == []
