"""The run length and previews as a member meets them on the Discord stub (real bot, tiny model, CPU
worker): the card counts epochs and steps, the setting set last wins, a prompt file name is refused,
and previews of epochs that are not saved still reach the thread."""

from __future__ import annotations

from discord_stub import DiscordStub, Upload
from test_bot_journey import async_test, message_with, new_bot, png, server

from bot import store


@async_test
async def test_card_steps_last_setting_wins_and_unsaved_previews_reach_the_thread(tmp_path):
    stub = DiscordStub()
    async with stub, server(tmp_path, stub) as (cfg, db, scheduler, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, scheduler, web)):
            ix = await stub.command(
                alice, "train", {"name": "まえ", "trigger": "sks", "preset": "character", "base": "tiny"}
            )
            await ix.original_message()
            tid = int(stub.threads()[-1]["id"])
            card = (await stub.wait_until(lambda: stub.channel_messages(tid), what="the dataset card"))[0]

            def described() -> str:
                return card.embeds[0]["description"] if card.embeds else ""

            await stub.post_message(
                alice, tid, files=[Upload("a.png", png((200, 30, 30))), Upload("b.png", png((30, 30, 200)))]
            )
            await stub.wait_until(lambda: "**2** images" in described(), what="the images on the card")
            # The character preset: 10 epochs; 2 images × 10 repeats at batch 2 = 10 steps an epoch.
            assert "10 epochs · 100 steps" in described()

            async def set_(key: str, value: str) -> str:
                done = await stub.command(alice, "train-set", {"key": key, "value": value}, channel_id=tid)
                return (await done.original_message()).content

            opened = await stub.click(alice, card, "lc:d:1:set")
            values = {"Epochs": "3", "Repeats per image": "1", "Dim / alpha": "4/2", "Resolution": "64"}
            await (await stub.submit_modal(alice, opened, values)).original_message()
            for key, value in (("train_batch_size", "1"), ("mixed_precision", "no"), ("sample_steps", "2")):
                assert "saved" in await set_(key, value)
            assert "3 epochs · 6 steps" in described()
            # Steps set after epochs win (kohya would let the epochs win over both).
            assert "saved" in await set_("max_train_steps", "4")
            assert "2 epochs · 4 steps" in described()
            # The modal again, its Epochs left as shown: the steps stay.
            opened = await stub.click(alice, card, "lc:d:1:set")
            await (await stub.submit_modal(alice, opened, {"Learning rate": "1e-3"})).original_message()
            assert "2 epochs · 4 steps" in described()

            refused = await set_("sample_prompts", "/etc/prompts.txt")
            assert "not a file name" in refused
            assert "saved" in await set_("save_every_n_epochs", "2")
            assert "saved" in await set_("sample_every_n_epochs", "1")

            start = await stub.click(alice, card, "lc:d:1:start")
            assert "Queued as job" in (await start.original_message()).content
            assert store.get_job(db, 1).steps == 4
            await stub.wait_until(lambda: message_with(stub, tid, "is ready"), 180, "the end of training")
            preview = message_with(stub, tid, "preview at epoch 1 (not saved)")
            assert preview is not None and preview.files and preview.custom_ids() == []
            assert message_with(stub, tid, "epoch 1 saved") is None
            assert message_with(stub, tid, "epoch 2 saved").files
    assert stub.violations == []
