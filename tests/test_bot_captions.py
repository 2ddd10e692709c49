"""Captions from a phone on the Discord stub: the paged view, Edit, Apply to all, frozen after Start,
and the buttons still working after a restart."""

from __future__ import annotations

from discord_stub import DiscordStub, Upload
from test_bot_journey import async_test, message_with, new_bot, png, server

from bot.discord.captions import apply_to_all, read_caption, write_caption


def test_apply_to_all_adds_and_removes_tags_and_phrases(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(3)]
    write_caption(images[0], "sks, 1girl, red hair, smile")
    write_caption(images[1], "sks, a woman with red hair, standing in a field")
    write_caption(images[2], "")
    assert apply_to_all(images, add="looking at viewer", remove=["Red Hair"]) == 3
    assert [read_caption(i) for i in images] == [
        "sks, 1girl, smile, looking at viewer",
        "sks, a woman with, standing in a field, looking at viewer",
        "looking at viewer",
    ]
    # Whole words only, several phrases at once, and nothing changes twice: the new caption and
    # the one that still smiled change, the second not.
    write_caption(images[2], "sks, reddish hair")
    assert apply_to_all(images, add="looking at viewer", remove=["red", "smile "]) == 2
    assert read_caption(images[2]) == "sks, reddish hair, looking at viewer"
    assert read_caption(images[0]) == "sks, 1girl, looking at viewer"


@async_test
async def test_captions_are_paged_edited_applied_and_frozen_after_start(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web):
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            ix = await stub.command(
                alice, "train", {"name": "cap", "trigger": "sks", "preset": "style", "base": "tiny"}
            )
            await ix.original_message()
            tid = int(stub.threads()[-1]["id"])
            card = (await stub.wait_until(lambda: stub.channel_messages(tid), what="the dataset card"))[0]
            files = [Upload("a.png", png((200, 30, 30))), Upload("b.png", png((30, 30, 200)))]
            await stub.post_message(alice, tid, "pics", files=files)
            await stub.wait_until(
                lambda: card.embeds and "**2** images" in card.embeds[0]["description"], what="card update"
            )
            refused = await stub.click(bob, card, "lc:d:1:caps")
            assert "Only" in (await refused.original_message()).content

            opened = await stub.click(alice, card, "lc:d:1:caps")
            page = await opened.original_message()
            assert page.ephemeral and page.files and page.embeds[0]["title"].startswith("1/2")
            assert page.custom_ids() == [f"lc:c:1:{a}:0" for a in ("prev", "next", "edit", "all")]

            edit = await stub.click(alice, page, "lc:c:1:edit:0")
            await (await stub.submit_modal(alice, edit, {"Caption": "sks, a red circle"})).ack()
            assert page.embeds[0]["description"] == "sks, a red circle"

            turn = await stub.click(alice, page, "lc:c:1:next:0")
            await turn.ack()
            assert page.embeds[0]["title"].startswith("2/2") and page.files
            everywhere = await stub.click(alice, page, "lc:c:1:all:1")
            submitted = await stub.submit_modal(
                alice, everywhere, {"Add (a tag or phrase)": "simple background"}
            )
            await submitted.ack()
            assert page.embeds[0]["footer"]["text"] == "2 caption(s) changed"
            wrap = await stub.click(alice, page, "lc:c:1:next:1")  # past the last page: back to the first
            await wrap.ack()
            assert page.embeds[0]["description"] == "sks, a red circle, simple background"

        async with stub.running(new_bot(cfg, db, scheduler, web)):  # a restart: the page still turns
            back = await stub.click(alice, page, "lc:c:1:prev:0")
            await back.ack()
            assert page.embeds[0]["title"].startswith("2/2")
            for key, value in (
                ("mixed_precision", "no"),
                ("max_train_epochs", "1"),
                ("sample_every_n_epochs", "0"),
            ):
                done = await stub.command(alice, "train-set", {"key": key, "value": value}, channel_id=tid)
                assert "saved" in (await done.original_message()).content
            start = await stub.click(alice, card, "lc:d:1:start")
            assert "Queued as job" in (await start.original_message()).content
            frozen = await stub.click(alice, page, "lc:c:1:edit:1")
            assert "frozen" in (await frozen.original_message()).content
            assert card.custom_ids() == ["lc:d:1:caps", "lc:d:1:drop"]
            await stub.wait_until(lambda: message_with(stub, tid, "is ready"), 180, "the end of training")
    assert stub.violations == []


@async_test
async def test_auto_caption_writes_sentences_for_zimage_and_picked_phrases_come_out(tmp_path):
    from test_captioner import build_captioner

    captioner = build_captioner(tmp_path / "florence")
    stub = DiscordStub()
    async with (
        stub,
        server(tmp_path, stub, f'captioner = "{captioner}"\n', bases='zi = "tiny:zimage"\n') as (
            cfg,
            db,
            scheduler,
            web,
        ),
    ):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            ix = await stub.command(
                alice, "train", {"name": "z", "trigger": "zzk", "preset": "character", "base": "zi"}
            )
            await ix.original_message()
            tid = int(stub.threads()[-1]["id"])
            card = (await stub.wait_until(lambda: stub.channel_messages(tid), what="the dataset card"))[0]
            await stub.post_message(alice, tid, "pics", files=[Upload("a.png", png((200, 30, 30)))])
            await stub.wait_until(lambda: "**1** images" in card.embeds[0]["description"], what="card update")
            # Z-Image captions in sentences by default; WD14 tags are the other choice.
            ids = card.custom_ids()
            assert (ids[0], ids[-1]) == ("lc:d:1:tag:1", "lc:d:1:tag:0")

            queued = await stub.click(alice, card, "lc:d:1:tag:1")
            assert "Captioning queued" in (await queued.original_message()).content
            report = await stub.wait_until(
                lambda: message_with(stub, tid, "Captioned 1/1"), 120, "the captions"
            )
            assert "long hair ×1" in report.content and "> zzk, a woman with long hair" in report.content

            opened = await stub.click(alice, card, "lc:d:1:caps")
            page = await opened.original_message()
            assert (
                page.embeds[0]["description"] == "zzk, a woman with long hair. She is smiling at the camera."
            )

            picked = await stub.select(alice, report, "lc:t:1:0", ["long hair"])
            await picked.ack()
            removed = await stub.click(alice, report, "lc:d:1:apply")
            assert "from 1 caption(s)" in (await removed.original_message()).content
            turn = await stub.click(alice, page, "lc:c:1:next:0")
            await turn.ack()
            assert page.embeds[0]["description"] == "zzk, a woman with. She is smiling at the camera."
    assert stub.violations == []
