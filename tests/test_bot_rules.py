"""The bot's refusals on the Discord stub: LoRAs only by library name, never by
path; NSFW policy; quota refusal; a click on a job that no longer exists; admin-only commands; and a
store from an older bot brought up to date."""

from __future__ import annotations

import sqlite3

import discord
import pytest
from discord_stub import DiscordStub
from sqlite_utils import Database
from test_bot_journey import async_test, new_bot, server

from bot import store
from bot.discord import state


@async_test
async def test_refusals_are_ephemeral_and_in_plain_words(tmp_path):
    stub = DiscordStub()
    lewd = stub.add_channel("lewd", nsfw=True)
    async with stub, server(tmp_path, stub, 'nsfw = "refuse"\n') as (cfg, db, sched, web):
        alice = stub.add_member("alice")
        async with stub.running(new_bot(cfg, db, sched, web)):
            refused = await stub.command(alice, "gen", {"prompt": "a cat"})
            answer = await refused.original_message()
            assert answer.ephemeral and "marked NSFW" in answer.content

            for prompt, lora in (
                ("a cat <lora:/etc/passwd:1>", None),
                ("a cat", "../../members/x/library/y"),
            ):
                ix = await stub.command(
                    alice, "gen", {"prompt": prompt, **({"lora": lora} if lora else {})}, channel_id=lewd
                )
                text = (await ix.original_message()).content
                assert "no LoRA named" in text and "Queued" not in text
            assert db["jobs"].count == 0

            # The scheduler runs: hold the queue so job #1 is still waiting when alice cancels it.
            store.set_setting(db, "paused", True)
            queued = await stub.command(alice, "gen", {"prompt": "a cat", "steps": 2}, channel_id=lewd)
            assert "Queued (job #1" in (await queued.original_message()).content
            db.execute(
                "INSERT INTO quota_overrides VALUES ('member', ?, 'daily_gpu_seconds', 0)", [str(alice.id)]
            )
            over = await stub.command(alice, "gen", {"prompt": "a dog"}, channel_id=lewd)
            assert "over your quota" in (await over.original_message()).content

            cancel = await stub.command(alice, "cancel")
            assert "#1 cancelled" in (await cancel.original_message()).content
            db.execute("DELETE FROM jobs")
            store.set_setting(db, "paused", False)
            message = await bot_message_with_button(stub, lewd)
            stale = await stub.click(alice, message, "lc:j:99:use:1")
            assert "no longer exists" in (await stale.original_message()).content

            with pytest.raises(PermissionError):  # Discord does not even show /admin to alice
                await stub.command(alice, "admin pause")
            with_perm = stub.add_role("mods", discord.Permissions(manage_guild=True))
            assert "admin" in stub.commands[stub.guild_id]
            mod = stub.add_member("mod", roles=[with_perm])
            paused = await stub.command(mod, "admin pause")
            assert "Paused" in (await paused.original_message()).content
            # recorded with who and from where, as the web page's actions are
            (action,) = store.admin_actions(db)
            assert (action["who"], action["via"], action["action"]) == (str(mod.id), "discord", "pause")
            queue = await stub.command(alice, "queue")
            assert "paused" in (await queue.original_message()).content
    assert stub.violations == []


async def bot_message_with_button(stub: DiscordStub, channel_id: int):
    """A message from the bot with a button of a job that is gone (as after a purge)."""
    payload = {
        "content": "old",
        "components": [
            {"type": 1, "components": [{"type": 2, "style": 1, "label": "Use", "custom_id": "lc:j:99:use:1"}]}
        ],
    }
    return stub._new_message(channel_id, payload, [])


def test_a_store_whose_discord_tables_the_bot_made_at_start_up_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path, isolation_level=None))
    store.MIGRATIONS[0](old)
    store.MIGRATIONS[1](old)  # as bots before migration 2 made the tables, with user_version left at 1
    old.execute("PRAGMA user_version = 1")
    draft = state.new_draft(old, "42", "キャラ", "tiny", 7, {"trigger": "sks"})
    old.conn.close()
    db = store.open_store(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS)
    assert state.draft_in_thread(db, 7) == draft
