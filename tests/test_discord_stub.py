"""The Discord stub against a real discord.py client: connection, command sync, interactions,
components across a restart, Discord's rules (3 s, 15 min, files, form limits) and 429s."""

import asyncio
import functools
import io
import json

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from discord_rules import MiB
from discord_stub import DiscordStub, Upload

MESSAGES_ROUTE = "POST /channels/{channel_id}/messages"


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


class StartButton(discord.ui.DynamicItem[discord.ui.Button], template=r"job:(?P<job>[0-9]+):start"):
    def __init__(self, job: int) -> None:
        super().__init__(discord.ui.Button(label="Start", custom_id=f"job:{job}:start"))
        self.job = job

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(
            content=f"job {self.job} started by {interaction.user.name}", view=None
        )


def new_bot(intents: discord.Intents | None = None) -> commands.Bot:
    bot = commands.Bot(
        command_prefix=commands.when_mentioned,
        intents=intents or discord.Intents.default(),
        guild_ready_timeout=0.05,
    )
    bot.add_dynamic_items(StartButton)
    return bot


def file_of(data: bytes, name: str) -> discord.File:
    return discord.File(io.BytesIO(data), name)


@async_test
async def test_connects_with_ready_and_guild_create():
    stub = DiscordStub()
    training = stub.add_channel("training")
    stub.add_channel("lewd", nsfw=True)
    admin = stub.add_role("Admin", discord.Permissions(administrator=True))
    bot = new_bot()
    async with stub, stub.running(bot):
        guild = bot.get_guild(stub.guild_id)
        assert bot.user.id == stub.bot.id and bot.application_id == stub.application_id
        assert guild is not None and guild.owner_id == stub.owner.id
        assert {c.name for c in guild.text_channels} == {"general", "training", "lewd"}
        assert guild.get_channel(training).nsfw is False and guild.get_channel(stub.channel_id("lewd")).nsfw
        assert guild.get_role(admin).permissions.administrator
        assert guild.me is not None
        await stub.wait_until(lambda: bot.latency < float("inf"), what="heartbeat ACK")
        assert stub.identifies == 1
    assert stub.violations == []


@async_test
async def test_privileged_intent_not_enabled_closes_with_4014():
    stub = DiscordStub(enabled_intents=())
    async with stub:
        with pytest.raises(discord.PrivilegedIntentsRequired):
            async with stub.running(
                new_bot(discord.Intents.default() | discord.Intents(message_content=True))
            ):
                pass


@async_test
async def test_command_sync_refuses_more_than_25_choices():
    stub = DiscordStub()
    bot = new_bot()

    guild = discord.Object(stub.guild_id)

    def preset_command(name: str, choices: int) -> None:
        @bot.tree.command(name=name, description="pick a preset", guild=guild)
        @app_commands.choices(
            preset=[app_commands.Choice(name=f"p{i}", value=str(i)) for i in range(choices)]
        )
        async def train(interaction: discord.Interaction, preset: app_commands.Choice[str]) -> None:
            await interaction.response.send_message(preset.value)

    preset_command("train", 25)

    async with stub, stub.running(bot):
        synced = await bot.tree.sync(guild=guild)
        assert [c.name for c in synced] == ["train"]
        assert len(stub.commands[stub.guild_id]["train"]["options"][0]["choices"]) == 25
        assert stub.violations == []

        preset_command("train-more", 26)
        with pytest.raises(discord.HTTPException) as refused:
            await bot.tree.sync(guild=guild)
        assert refused.value.status == 400 and refused.value.code == 50035
        assert "25 or fewer" in refused.value.text
        assert list(stub.commands[stub.guild_id]) == ["train"]  # the refused sync changed nothing

        with pytest.raises(ValueError, match="takes one of"):
            await stub.command(stub.owner, "train", {"preset": "99"})
    assert [v.rule for v in stub.violations] == ["invalid_form"]


@async_test
async def test_slash_command_defer_then_followup_with_a_file():
    stub = DiscordStub()
    bot = new_bot()

    @bot.tree.command(description="reverse a file")
    async def reverse(interaction: discord.Interaction, image: discord.Attachment, note: str = "") -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read()
        await interaction.followup.send(
            f"{note} {image.filename} {len(data)}", file=file_of(data[::-1], "out.bin")
        )

    async with stub, stub.running(bot):
        await bot.tree.sync()
        alice = stub.add_member("alice")
        with pytest.raises(ValueError, match="needs option"):
            await stub.command(alice, "reverse", {"note": "x"})
        ix = await stub.command(alice, "reverse", {"image": Upload("in.png", b"\x89PNGdata"), "note": "hi"})
        assert (await ix.ack()).type == 5
        message = await ix.original_message()
        assert message.content == "hi in.png 8"
        assert [(f.filename, f.data) for f in message.files] == [("out.bin", b"atadGNP\x89")]
        assert not message.ephemeral and message.interaction is ix
    assert stub.violations == []


@async_test
async def test_button_with_dynamic_item_survives_a_restart():
    stub = DiscordStub()
    first = new_bot()

    @first.tree.command(description="job card")
    async def card(interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None).add_item(StartButton(42))
        await interaction.response.send_message("job 42 ready", view=view)

    async with stub:
        alice = stub.add_member("alice")
        async with stub.running(first):
            await first.tree.sync()
            message = await (await stub.command(alice, "card")).original_message()
        assert message.custom_ids() == ["job:42:start"]

        async with stub.running(new_bot()):
            click = await stub.click(alice, message, "job:42:start")
            assert (await click.ack()).type == 7
        assert message.content == "job 42 started by alice" and message.components == []
        assert stub.identifies == 2
        with pytest.raises(LookupError):
            await stub.click(alice, message, "job:42:start")
    assert stub.violations == []


@async_test
async def test_modal_select_and_autocomplete_round_trips():
    stub = DiscordStub()
    bot = new_bot()
    submitted: list[str] = []

    class Settings(discord.ui.Modal, title="Settings"):
        epochs = discord.ui.TextInput(label="Epochs", max_length=3)

        async def on_submit(self, interaction: discord.Interaction) -> None:
            submitted.append(self.epochs.value)
            view = discord.ui.View().add_item(
                discord.ui.Select(
                    custom_id="tags", options=[discord.SelectOption(label=t) for t in "abc"], max_values=2
                )
            )
            await interaction.response.send_message(f"epochs={self.epochs.value}", view=view, ephemeral=True)

    @bot.tree.command(description="settings")
    async def settings(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(Settings())

    @bot.tree.command(description="generate")
    async def gen(interaction: discord.Interaction, lora: str) -> None:
        await interaction.response.send_message(lora)

    @gen.autocomplete("lora")
    async def lora_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        if not current:  # a bug: more than Discord's 25 choices
            return [app_commands.Choice(name=f"lora{i}", value=f"lora{i}") for i in range(30)]
        return [
            app_commands.Choice(name=n, value=n)
            for n in ("キャラ", "style", "stone")
            if n.startswith(current)
        ]

    @bot.listen()
    async def on_interaction(interaction: discord.Interaction) -> None:
        if interaction.data.get("custom_id") == "tags":
            await interaction.response.defer()  # on a component: deferred update (type 6)
            await interaction.edit_original_response(content=",".join(interaction.data["values"]))

    async with stub, stub.running(bot):
        await bot.tree.sync()
        alice, bob = stub.add_member("alice"), stub.add_member("bob")
        opened = await stub.command(alice, "settings")
        assert (await opened.modal())["title"] == "Settings"
        with pytest.raises(ValueError, match="characters"):
            await stub.submit_modal(alice, opened, {"Epochs": "1000"})
        with pytest.raises(ValueError, match="characters"):
            await stub.submit_modal(alice, opened, {})
        with pytest.raises(PermissionError):
            await stub.submit_modal(bob, opened, {"Epochs": "10"})
        answer = await (await stub.submit_modal(alice, opened, {"Epochs": "10"})).original_message()
        assert submitted == ["10"] and answer.content == "epochs=10" and answer.ephemeral
        with pytest.raises(PermissionError, match="ephemeral"):
            await stub.select(bob, answer, "tags", ["a"])
        picked = await stub.select(alice, answer, "tags", ["a", "c"])
        assert (await picked.ack()).type == 6
        await stub.wait_until(lambda: answer.edits, what="the edit after a deferred update")
        assert answer.content == "a,c" and answer.ephemeral
        choices = await (await stub.autocomplete(alice, "gen", {"lora": "st"}, focused="lora")).choices()
        assert [c["value"] for c in choices] == ["style", "stone"]
        assert stub.violations == []
        await stub.autocomplete(alice, "gen", {"lora": ""}, focused="lora")
        await stub.wait_until(lambda: stub.violations, what="the refused 30 choices")
    assert [v.rule for v in stub.violations] == ["invalid_form", "late_ack"]  # the member saw no choices


@async_test
async def test_late_and_double_acknowledgements_are_violations():
    stub = DiscordStub()
    bot = new_bot()
    errors: list[discord.HTTPException] = []

    @bot.tree.command(description="slow")
    async def slow(interaction: discord.Interaction) -> None:
        stub.advance(3.5)  # the handler's work took longer than Discord waits
        try:
            await interaction.response.send_message("too late")
        except discord.HTTPException as exc:
            errors.append(exc)

    @bot.tree.command(description="defers")
    async def defers(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.followup.send("done")

    async with stub, stub.running(bot):
        await bot.tree.sync()
        alice = stub.add_member("alice")
        late = await stub.command(alice, "slow")
        await stub.wait_until(lambda: errors, what="the bot's error")
        assert isinstance(errors[0], discord.NotFound) and errors[0].code == 10062
        assert late.callbacks == [] and [v.rule for v in stub.violations] == ["late_ack"]

        twice = await stub.command(alice, "defers")
        await twice.original_message()
        url = f"{stub.api_base}/interactions/{twice.id}/{twice.token}/callback"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json={"type": 4, "data": {"content": "again"}}) as r,
        ):
            assert r.status == 400 and r.headers["Content-Type"] == "application/json"
            assert (await r.json())["code"] == 40060
    assert [v.rule for v in stub.violations] == ["late_ack", "double_ack"]


@async_test
async def test_unacknowledged_and_forever_thinking_interactions_are_violations():
    stub = DiscordStub()
    bot = new_bot()

    @bot.tree.command(description="ignores the member")
    async def ignore(interaction: discord.Interaction) -> None:
        pass

    @bot.tree.command(description="defers and forgets")
    async def forget(interaction: discord.Interaction) -> None:
        await interaction.response.defer()

    async with stub, stub.running(bot):
        await bot.tree.sync()
        ignored = await stub.command(stub.owner, "ignore")
        await (await stub.command(stub.owner, "forget")).ack()
        stub.advance(3.1)
        assert [v.rule for v in stub.violations] == ["late_ack"] and str(ignored.id) in stub.violations[
            0
        ].detail
    assert [v.rule for v in stub.violations] == ["late_ack", "left_thinking"]


@async_test
async def test_eleven_files_and_a_file_over_10_mib_are_refused():
    stub = DiscordStub()
    bot = new_bot()
    async with stub, stub.running(bot):
        channel = bot.get_channel(stub.general)
        await channel.send(files=[file_of(b"x", f"{i}.txt") for i in range(10)])
        with pytest.raises(discord.HTTPException) as eleven:
            await channel.send(files=[file_of(b"x", f"{i}.txt") for i in range(11)])
        assert eleven.value.status == 400 and eleven.value.code == 50035
        with pytest.raises(discord.HTTPException) as big:
            await channel.send(file=file_of(b"\0" * (10 * MiB + 1), "big.safetensors"))
        assert big.value.status == 413 and big.value.code == 40005
        with pytest.raises(discord.HTTPException) as request:  # each file fits, the request does not
            await channel.send(files=[file_of(b"\0" * (9 * MiB), f"{i}.bin") for i in range(3)])
        assert request.value.status == 413
        assert [len(m.files) for m in stub.channel_messages(stub.general)] == [10]
    assert [v.rule for v in stub.violations] == ["invalid_form", "too_large", "too_large"]


@async_test
async def test_message_form_limits():
    stub = DiscordStub()
    bot = new_bot()
    button = {"type": 2, "style": 1, "label": "b", "custom_id": "b"}
    too_many_buttons = [{"type": 1, "components": [{**button, "custom_id": f"b{i}"} for i in range(6)]}]
    long_id = [{"type": 1, "components": [{**button, "custom_id": "j" * 101}]}]
    six_rows = [{"type": 1, "components": [{**button, "custom_id": f"r{i}"}]} for i in range(6)]
    options = [{"label": str(i), "value": str(i)} for i in range(26)]
    big_select = [{"type": 1, "components": [{"type": 3, "custom_id": "s", "options": options}]}]
    duplicated = [{"type": 1, "components": [button, button]}]
    refused = [
        {"content": "x" * 2001},
        {"components": too_many_buttons},
        {"components": long_id},
        {"components": six_rows},
        {"components": big_select},
        {"components": duplicated},
        {"embeds": [{"description": "d" * 4097}]},
        {"embeds": [{"title": "t"}] * 11},
        {"embeds": [{"description": "d" * 4000}, {"description": "d" * 2001}]},
        {"content": "both", "flags": 1 << 15, "components": [{"type": 10, "content": "hi"}]},
    ]
    async with stub, stub.running(bot):
        await bot.http.request(
            discord.http.Route("POST", "/channels/{channel_id}/messages", channel_id=stub.general),
            json={"content": "x" * 2000},
        )
        for payload in refused:
            with pytest.raises(discord.HTTPException) as error:
                route = discord.http.Route("POST", "/channels/{channel_id}/messages", channel_id=stub.general)
                await bot.http.request(route, json=payload)
            assert (error.value.status, error.value.code) == (400, 50035), payload
        with pytest.raises(discord.HTTPException) as empty:
            await bot.get_channel(stub.general).send("")
        assert empty.value.code == 50006
    assert [v.rule for v in stub.violations] == ["invalid_form"] * len(refused) + ["empty_message"]
    assert len(stub.channel_messages(stub.general)) == 1


@async_test
async def test_429_is_honoured_and_ignoring_it_is_a_violation():
    stub = DiscordStub()
    bot = new_bot()
    async with stub, stub.running(bot):
        stub.rate_limit(MESSAGES_ROUTE, limit=1, per=0.3, announce=False)
        channel = bot.get_channel(stub.general)
        await channel.send("one")
        await channel.send("two")  # 429 first; discord.py sleeps retry_after and sends again
        assert [m.content for m in stub.channel_messages(stub.general)] == ["one", "two"]
        assert stub.rate_limited == [MESSAGES_ROUTE]
        assert [status for _, route, status in stub.log if route == MESSAGES_ROUTE] == [200, 429, 200]
        assert stub.violations == []

        stub.rate_limit(MESSAGES_ROUTE, limit=1, per=0.3)  # announced: discord.py waits before sending
        await channel.send("three")
        await channel.send("four")
        assert stub.rate_limited == [MESSAGES_ROUTE] and stub.violations == []

        url = f"{stub.api_base}/channels/{stub.general}/messages"
        headers = {"Authorization": f"Bot {stub.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            statuses = []
            for _ in range(3):  # a client that retries at once, ignoring retry_after
                async with http.post(url, json={"content": "spam"}) as response:
                    statuses.append(response.status)
                    if response.status == 429:
                        assert (
                            response.headers["Via"] and response.headers["Content-Type"] == "application/json"
                        )
                        assert 0 < (await response.json())["retry_after"] <= 0.3
        assert statuses == [200, 429, 429]
    assert [v.rule for v in stub.violations] == ["ignored_rate_limit"]


@async_test
async def test_interaction_token_expires_after_15_minutes():
    stub = DiscordStub()
    bot = new_bot()
    later = asyncio.Event()
    errors: list[discord.HTTPException] = []

    @bot.tree.command(description="long job")
    async def long(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="queued")
        await later.wait()
        try:
            await interaction.followup.send("finished")
        except discord.HTTPException as exc:
            errors.append(exc)

    async with stub, stub.running(bot):
        await bot.tree.sync()
        ix = await stub.command(stub.owner, "long")
        assert (await ix.original_message()).content == "queued"
        stub.advance(16 * 60)
        later.set()
        await stub.wait_until(lambda: errors, what="the bot's error")
        assert errors[0].status == 401 and errors[0].code == 50027
        assert ix.followups == []
    assert [v.rule for v in stub.violations] == ["expired_token"]


@async_test
async def test_member_messages_threads_and_attachment_downloads():
    stub = DiscordStub()
    bot = new_bot(discord.Intents.default() | discord.Intents(message_content=True))
    seen: list[tuple[str, list[bytes]]] = []

    @bot.listen()
    async def on_message(message: discord.Message) -> None:
        if message.author.bot:
            return
        seen.append((message.content, [await a.read() for a in message.attachments]))
        await message.channel.send(f"got {len(message.attachments)}")

    @bot.tree.command(description="ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with stub, stub.running(bot):
        await bot.tree.sync()
        alice = stub.add_member("alice")
        card = await bot.get_channel(stub.general).send("dataset card")
        thread = await card.create_thread(name="lora: キャラ", auto_archive_duration=1440)
        assert thread.id == card.id and stub.channels[thread.id]["parent_id"] == str(stub.general)
        await thread.join()
        await thread.add_user(discord.Object(alice.id))
        assert stub.thread_members[thread.id] == {stub.bot.id, alice.id}
        await thread.edit(archived=True)
        assert stub.channels[thread.id]["thread_metadata"]["archived"]
        with pytest.raises(PermissionError, match="archived"):
            await stub.command(alice, "ping", channel_id=thread.id)

        await stub.post_message(
            alice, thread.id, "images", files=[Upload("a.png", b"A"), Upload("b.png", b"B")]
        )
        reply = await stub.wait_until(lambda: stub.channel_messages(thread.id)[1:], what="a reply")
        assert seen == [("images", [b"A", b"B"])] and reply[0].content == "got 2"
        assert not stub.channels[thread.id]["thread_metadata"]["archived"]  # posting reopened it
        assert bot.get_channel(thread.id) is not None  # THREAD_CREATE reached the cache
        dm = await (await bot.fetch_user(alice.id)).send("your LoRA is ready")
        assert (
            stub.channels[dm.channel.id]["type"] == 1 and stub.messages[dm.id].content == "your LoRA is ready"
        )
    assert stub.violations == []


@async_test
async def test_message_content_is_empty_without_the_intent():
    stub = DiscordStub()
    bot = new_bot()
    seen: list[discord.Message] = []

    @bot.listen()
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    async with stub, stub.running(bot):
        await stub.post_message(stub.owner, stub.general, "secret", files=[Upload("a.png", b"A")])
        await stub.wait_until(lambda: seen, what="MESSAGE_CREATE")
        assert seen[0].content == "" and seen[0].attachments == []


@async_test
async def test_dropped_connection_resumes_and_replays_events():
    stub = DiscordStub()
    bot = new_bot()

    @bot.tree.command(description="ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with stub, stub.running(bot):
        await bot.tree.sync()
        stub.drop_connection()
        await stub.wait_until(lambda: stub.resumes, what="RESUME")
        ix = await stub.command(stub.owner, "ping")
        assert (await ix.original_message()).content == "pong"
        assert stub.identifies == 1
    assert stub.violations == []


@async_test
async def test_json_responses_have_the_exact_content_type():
    async with DiscordStub() as stub, aiohttp.ClientSession() as http:
        async with http.get(
            f"{stub.api_base}/users/@me", headers={"Authorization": f"Bot {stub.token}"}
        ) as ok:
            assert ok.headers["Content-Type"] == "application/json" and (await ok.json())["bot"]
        async with http.get(f"{stub.api_base}/users/@me", headers={"Authorization": "Bot wrong"}) as denied:
            assert denied.status == 401 and json.loads(await denied.text())["code"] == 0
        async with http.get(f"{stub.api_base}/no/such/route") as missing:
            assert missing.status == 404
    assert [v.rule for v in stub.violations] == ["stub_missing_route"]
