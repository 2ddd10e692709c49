"""Several members on one running bot (the Discord stub, the tiny model, one CPU worker):
Auto-tag with the paged tag select, a zip and a corrupt image posted in a thread, two members
training at once (fair turns, own progress only, non-owners refused), a LoRA over the upload
limit sent as a signed link, spoilers in a channel not marked NSFW, and sharing a LoRA for /gen.

The bot, the web server and the worker start once for the module (``asyncio.Runner`` keeps one
event loop across the tests); three trainings of one epoch are shared through ``trained``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from discord_rules import Limits
from discord_stub import DiscordStub, StubMessage, StubUser, Upload
from sqlite_utils import Database
from test_bot_journey import message_with, new_bot, png, server

from bot import store
from bot.discord import state
from bot.web import WebServer

UPLOAD_LIMIT = 128 * 1024  # under a dim-8 LoRA of the tiny model, over its previews and contact sheets
FAST = {"mixed_precision": "no", "train_batch_size": "1"}


@dataclass
class Harness:
    runner: asyncio.Runner
    stub: DiscordStub
    db: Database
    web: WebServer
    data: Path
    tagger: Path
    alice: StubUser
    bob: StubUser

    def run(self, coro, timeout: float = 240):
        return self.runner.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    tagger = root / "tagger"
    stub = DiscordStub(limits=Limits(upload_bytes=UPLOAD_LIMIT))
    stack = contextlib.AsyncExitStack()

    async def up():
        await stack.enter_async_context(stub)
        cfg, db, scheduler, web = await stack.enter_async_context(
            server(root, stub, f'nsfw = "spoiler"\ntagger = "{tagger}"\n')
        )
        await stack.enter_async_context(stub.running(new_bot(cfg, db, scheduler, web)))
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        # One server for the whole module: alice's drafts from every test stay open, past the
        # default cap of 3 (the cap itself: test_faults_limits), as an admin's override allows.
        store.set_quota_override(db, "member", str(alice.id), "open_drafts", 10)
        return cfg, db, web, alice, bob

    with asyncio.Runner() as runner:
        try:
            cfg, db, web, alice, bob = runner.run(up())
            yield Harness(runner, stub, db, web, cfg.data_dir, tagger, alice, bob)
        finally:
            runner.run(stack.aclose())
    assert stub.violations == []  # what only shows once the stub closes (a member left "thinking…")


# ---- a member's draft, as the member sees it ----


@dataclass
class Draft:
    id: int
    thread: int
    card: StubMessage
    owner: StubUser

    def button(self, action: str) -> str:
        return f"lc:d:{self.id}:{action}"

    def images(self) -> int:
        found = re.search(r"\*\*(\d+)\*\* images", self.card.embeds[0]["description"])
        return int(found[1])


async def answer(ix) -> StubMessage:
    return await ix.original_message(timeout=10)


async def open_draft(h: Harness, member: StubUser, name: str) -> Draft:
    ix = await h.stub.command(
        member, "train", {"name": name, "trigger": "sks", "preset": "character", "base": "tiny"}
    )
    thread = int(re.search(r"<#(\d+)>", (await answer(ix)).content)[1])
    card = (await h.stub.wait_until(lambda: h.stub.channel_messages(thread), what="the dataset card"))[0]
    return Draft(int(card.custom_ids()[0].split(":")[2]), thread, card, member)


async def post(h: Harness, draft: Draft, files: list[Upload], images: int) -> None:
    await h.stub.post_message(draft.owner, draft.thread, files=files)
    await h.stub.wait_until(lambda: draft.images() == images, 30, f"{images} images on the card")


async def configure(h: Harness, draft: Draft, **settings: str) -> None:
    opened = await h.stub.click(draft.owner, draft.card, draft.button("set"))
    values = {"Epochs": "1", "Repeats per image": "1", "Dim / alpha": "8/4", "Resolution": "64"}
    await answer(await h.stub.submit_modal(draft.owner, opened, values))
    for key, value in {**FAST, **settings}.items():
        ix = await h.stub.command(
            draft.owner, "train-set", {"key": key, "value": value}, channel_id=draft.thread
        )
        assert "saved" in (await answer(ix)).content


def dataset(h: Harness, draft: Draft, pattern: str = "*") -> list[Path]:
    """The files of the draft's kohya folder, on the bot's disk."""
    folder = h.data / "members" / str(draft.owner.id) / "datasets" / str(draft.id)
    return sorted(folder.glob(f"*_img/{pattern}"))


def contents(h: Harness, draft: Draft) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in dataset(h, draft)}


def captions(h: Harness, draft: Draft) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8").strip() for p in dataset(h, draft, "*.txt")}


def texts(stub: DiscordStub, channel_id: int) -> str:
    """Everything a channel ever showed: messages, embeds, and every edit of them."""
    out = []
    for m in stub.channel_messages(channel_id, include_deleted=True):
        out += [m.content, *(e.get("description", "") for e in m.embeds)]
        out += [str(edit.get("content") or "") for edit in m.edits]
    return "\n".join(out)


# ---- Auto-tag ----

# The tiny tagger scores tag i with channel i % 3 (BGR) of its 4×4 input: a plain colour picks tags
# by channel. Red (i % 3 == 2): a character and a subject tag (the suggested removals) and 14 more;
# green: 16 tags; blue: 16 that never fire.
TAGS = [(f"{('blue', 'green', 'crimson')[i % 3]}_{i}", 0) for i in range(48)]
TAGS[2], TAGS[5] = ("ayaka", 4), ("long_hair", 0)


def test_auto_tag_pages_suggestions_and_removal(h):
    test_tagger = pytest.importorskip("test_tagger")  # builds the tiny ONNX tagger (needs onnx)
    test_tagger.build_tagger(h.tagger, side=4, tags=TAGS)
    stub, alice, bob = h.stub, h.alice, h.bob

    async def scenario():
        draft = await open_draft(h, alice, "タグ")
        colours = [(255, 0, 0), (255, 80, 0), (255, 255, 0)]  # green fires on the last one only
        await post(h, draft, [Upload(f"{i}.png", png(c)) for i, c in enumerate(colours)], 3)
        refused = await stub.click(bob, draft.card, draft.button("tag:0"))
        assert (await answer(refused)).ephemeral and "Only" in (await answer(refused)).content
        queued = await stub.click(alice, draft.card, draft.button("tag:0"))
        assert "Tagging queued" in (await answer(queued)).content
        summary = await stub.wait_until(lambda: message_with(stub, draft.thread, "Tagged"), 60, "the tags")
        assert "Tagged 3/3 images" in summary.content and "ayaka ×3" in summary.content

        page0 = summary.component(f"lc:t:{draft.id}:0")
        labels = [o["label"] for o in page0["options"]]
        assert len(labels) == 25 and labels[:2] == ["ayaka", "long hair"]  # most frequent first
        assert {o["label"] for o in page0["options"] if o.get("default")} == {"ayaka", "long hair"}
        assert summary.custom_ids()[1:] == [draft.button("page:1"), draft.button("apply")]

        other = await stub.select(bob, summary, f"lc:t:{draft.id}:0", [])
        assert "Only the dataset's owner" in (await answer(other)).content

        await (await stub.click(alice, summary, draft.button("page:1"))).ack()
        page1 = await stub.wait_until(lambda: summary.component(f"lc:t:{draft.id}:1"), what="page 2")
        rest = [o["value"] for o in page1["options"]]
        assert len(rest) == 32 - 25 and set(rest).isdisjoint(labels)
        await (await stub.select(alice, summary, f"lc:t:{draft.id}:1", [rest[-1]])).ack()
        await stub.wait_until(
            lambda: rest[-1] in state.get_draft(h.db, draft.id).settings_dict["remove"], what="the pick"
        )

        before = captions(h, draft)
        assert all("ayaka" in c and "long hair" in c for c in before.values())
        applied = await stub.click(alice, summary, draft.button("apply"))
        assert "Removed 3 tag(s) from 3 caption(s)" in (await answer(applied)).content
        after = captions(h, draft)
        assert after.keys() == before.keys()
        for name, text in after.items():
            tags = text.split(", ")
            assert tags[0] == "sks" and not {"ayaka", "long hair", rest[-1]} & set(tags)
            assert set(tags) == set(before[name].split(", ")) - {"ayaka", "long hair", rest[-1]} | {"sks"}

    h.run(scenario())
    assert stub.violations == []


# ---- a zip and a corrupt image in the thread ----


def zipped(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


def test_zip_with_captions_then_a_corrupt_image(h):
    stub, alice = h.stub, h.alice

    async def scenario():
        draft = await open_draft(h, alice, "zip キャラ")
        pics = zipped(
            {
                "pics/a.png": png((220, 40, 40)),
                "pics/a.txt": b"sks, red dress",
                "pics/b.png": png((40, 40, 220)),
                "pics/b.txt": "sks, blue dress, 笑顔".encode(),
            }
        )
        await post(h, draft, [Upload("pics.zip", pics)], 2)
        assert sorted(captions(h, draft).values()) == ["sks, blue dress, 笑顔", "sks, red dress"]
        kept = contents(h, draft)

        await stub.post_message(
            alice, draft.thread, "one more", files=[Upload("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(64))]
        )
        said = await stub.wait_until(lambda: message_with(stub, draft.thread, "broken.png"), 30, "the answer")
        assert said.content.startswith("Some files need a look") and "Traceback" not in said.content
        assert "✗ broken.png: not an image that can be read (damaged" in said.content
        await stub.wait_until(lambda: len(draft.card.edits) >= 2, what="the card after the second post")
        assert draft.images() == 2 and contents(h, draft) == kept  # nothing lost

    h.run(scenario())
    assert stub.violations == []


# ---- two members training at once ----


@dataclass
class Trained:
    a1: Draft  # alice's first LoRA, started first
    a2: Draft  # alice's second, started before bob's
    b1: Draft  # bob's, with previews
    jobs: dict[str, int]
    refusals: dict[str, StubMessage]
    queued_text: dict[str, str]


@pytest.fixture(scope="module")
def trained(h) -> Trained:
    stub, alice, bob = h.stub, h.alice, h.bob

    async def start(draft: Draft) -> int:
        ix = await stub.click(draft.owner, draft.card, draft.button("start"))
        return int(re.search(r"job #(\d+)", (await answer(ix)).content)[1])

    async def scenario() -> Trained:
        a1, a2 = await open_draft(h, alice, "アリス"), await open_draft(h, alice, "alice-two")
        b1 = await open_draft(h, bob, "ボブ")
        for i, d in enumerate((a1, a2, b1)):
            await post(
                h, d, [Upload("x.png", png((200, 40 * i, 40))), Upload("y.png", png((40, 40 * i, 200)))], 2
            )
        # a1 runs long enough (4 epochs) for a2 and b1 to queue behind it; b1 makes previews
        await configure(h, a1, sample_every_n_epochs="0", max_train_epochs="4")
        await configure(h, a2, sample_every_n_epochs="0")
        await configure(h, b1, sample_steps="2")
        refusals = {
            "post": await stub.post_message(bob, a1.thread, files=[Upload("z.png", png((0, 200, 0)))])
        }
        refusals["start"] = await answer(await stub.click(bob, a1.card, a1.button("start")))
        jobs = {"a1": await start(a1)}
        await stub.wait_until(lambda: store.get_job(h.db, jobs["a1"]).state == "running", 60, "a1 running")
        jobs["a2"] = await start(a2)
        jobs["b1"] = await start(b1)
        queued = {k: message_with(stub, d.thread, "in line").content for k, d in (("a2", a2), ("b1", b1))}
        queued["bob's /queue"] = (await answer(await stub.command(bob, "queue"))).content
        refusals["cancel"] = await answer(await stub.click(bob, a2.card, a2.button("drop")))
        for d in (a1, b1, a2):
            await stub.wait_until(lambda d=d: message_with(stub, d.thread, "is ready"), 180, "training's end")
            await stub.wait_until(lambda d=d: message_with(stub, d.thread, "finished"), what="the last edit")
        epoch = message_with(stub, a1.thread, "epoch 1 saved")
        refusals["use"] = await answer(await stub.click(bob, epoch, f"lc:j:{jobs['a1']}:use:1"))
        return Trained(a1, a2, b1, jobs, refusals, queued)

    return h.run(scenario(), 420)


def test_two_members_train_in_fair_turns_and_see_only_their_own(h, trained):
    stub, t = h.stub, trained
    runs = {k: store.get_job(h.db, j) for k, j in t.jobs.items()}
    assert all(j.state == "done" for j in runs.values())
    # alice's second job waited although it was queued before bob's: bob had used no GPU time yet
    assert "#1 in line" in t.queued_text["b1"]
    mine = t.queued_text["bob's /queue"]  # what runs now, and only his own place in line
    assert (
        "Waiting**: 2 job(s)" in mine and "ボブ" in mine and "#1 in line" in mine and "alice-two" not in mine
    )
    assert runs["a1"].started_at < runs["b1"].started_at < runs["a2"].started_at
    ready = {k: message_with(stub, getattr(t, k).thread, "is ready") for k in ("b1", "a2")}
    assert ready["b1"].id < ready["a2"].id

    for key, refusal in t.refusals.items():
        if key == "post":
            assert message_with(stub, t.a1.thread, "Only this LoRA's owner can add images").reference
            continue
        assert refusal.ephemeral and f"Only <@{h.alice.id}>" in refusal.content, key
    assert t.a1.images() == 2  # bob's picture was not taken in

    alice_text = texts(stub, t.a1.thread) + texts(stub, t.a2.thread)
    bob_text = texts(stub, t.b1.thread)
    assert "ボブ" not in alice_text and "アリス" not in bob_text and "alice-two" not in bob_text
    for draft in (t.a1, t.a2, t.b1):
        progress = state.get_draft(h.db, draft.id).progress_id
        message = stub.messages[progress]
        assert message.channel_id == draft.thread and "finished" in message.content
        assert any("🏋️" in str(e.get("content")) for e in message.edits)  # steps shown on the way
    assert stub.violations == []


def test_previews_are_spoilers_outside_nsfw_channels(h, trained):
    stub, t = h.stub, trained
    shown = [
        m
        for m in stub.channel_messages(t.b1.thread)
        if m.author is stub.bot and m.files and m is not t.b1.card
    ]
    assert "epoch 1 saved" in shown[0].content and "is ready" in shown[1].content and len(shown) == 2
    assert all(f.filename.startswith("SPOILER_") for m in shown for f in m.files)
    assert not [
        m
        for m in stub.channel_messages(t.a1.thread)
        if m.author is stub.bot and m.files and m is not t.a1.card
    ]
    assert stub.violations == []


def test_a_lora_over_the_upload_limit_comes_as_a_working_link(h, trained):
    stub, t = h.stub, trained
    art = next(a for a in store.artifacts(h.db, t.jobs["a1"]) if a["kind"] == "lora" and a["epoch"] == 1)
    assert art["size"] > UPLOAD_LIMIT

    async def scenario():
        epoch = message_with(stub, t.a1.thread, "epoch 1 saved")
        got = await answer(await stub.click(h.alice, epoch, f"lc:j:{t.jobs['a1']}:dl:1"))
        assert got.ephemeral and not got.files
        url = re.search(r"https?://\S+", got.content)[0]
        assert url.startswith(h.web.links.base_url + "/files/")
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200 and await r.read() == Path(art["path"]).read_bytes()
            async with http.get(url.replace("exp=", "exp=1")) as r:
                assert r.status == 403

    h.run(scenario())
    assert stub.violations == []


def test_gen_on_a_shared_lora_only_while_it_is_shared(h, trained):
    stub, alice, bob = h.stub, h.alice, h.bob

    async def bob_gen() -> str:
        ix = await stub.command(
            bob, "gen", {"prompt": "sks", "lora": "アリス", "weight": 0.8, "steps": 2, "seed": 3}
        )
        return (await answer(ix)).content

    async def manage(action: str) -> str:
        listing = await answer(await stub.command(alice, "loras"))
        select = f"lc:ls:{alice.id}"
        row = next(o["value"] for o in listing.component(select)["options"] if o["label"] == "アリス")
        card = await answer(await stub.select(alice, listing, select, [row]))
        return (await answer(await stub.click(alice, card, f"lc:l:{row}:{action}"))).content

    async def scenario():
        assert "no LoRA named 'アリス'" in await bob_gen()
        assert "shared with everyone" in await manage("share")
        listed = await answer(await stub.command(bob, "loras"))
        assert f"アリス · by <@{alice.id}>" in listed.embeds[0]["description"]
        assert "Queued" in await bob_gen()
        images = await stub.wait_until(
            lambda: next((m for m in stub.channel_messages(stub.general) if m.files), None),
            120,
            "bob's images",
        )
        assert images.content.startswith(f"<@{bob.id}>")
        assert images.files and all(f.filename.startswith("SPOILER_") for f in images.files)
        info = await answer(
            await stub.click(bob, images, next(c for c in images.custom_ids() if c.endswith(":info")))
        )
        assert "<lora:アリス:0.8>" in info.content
        assert "private again" in await manage("unshare")
        assert "no LoRA named 'アリス'" in await bob_gen()

    h.run(scenario())
    assert stub.violations == []


def test_previews_over_a_lowered_upload_limit_come_as_spoilered_links(h):
    """The server lost its boost: Discord's limit drops, and the bot learns it from the next interaction."""
    stub, bob = h.stub, h.bob
    small = 16 * 1024  # under the tiny model's preview grids and contact sheets

    async def scenario():
        draft = await open_draft(h, bob, "ボブ small")
        await post(h, draft, [Upload("x.png", png((200, 90, 40))), Upload("y.png", png((40, 90, 200)))], 2)
        assert draft.card.files == [] and "image" not in draft.card.embeds[0]  # the sheet is left out
        await configure(h, draft, sample_steps="2")
        await (await stub.click(bob, draft.card, draft.button("start"))).ack()
        ready = await stub.wait_until(lambda: message_with(stub, draft.thread, "is ready"), 60, "the end")
        epoch = message_with(stub, draft.thread, "epoch 1 saved")
        async with aiohttp.ClientSession() as http:
            for message in (epoch, ready):
                assert not message.files
                url = re.search(r"\|\|(https?://\S+)\|\|", message.content)[1]
                async with http.get(url) as r:
                    picture = await r.read()
                    assert r.status == 200 and picture.startswith(b"\x89PNG") and len(picture) > small

    original = stub.limits
    stub.limits = replace(original, upload_bytes=small)
    try:
        h.run(scenario())
    finally:
        stub.limits = original
    assert stub.violations == []
