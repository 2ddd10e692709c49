"""The Discord bot: one ``commands.Bot`` with a cog per feature, fed by the scheduler's events.

``serve`` is what ``loracord run`` calls: the bot, the scheduler and the web server in one
process. Components carry their job (or draft) id in the ``custom_id`` and are ``DynamicItem``s,
so buttons on old messages keep working after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import discord
import yarl
from discord.ext import commands
from sqlite_utils import Database

from ..config import TOKEN_ENV, Config, ConfigError
from ..scheduler import Scheduler
from ..web import WebServer
from . import admin, epochs, gen, loras, train
from .acks import AckFirst
from .common import DEFAULT_UPLOAD_LIMIT, ServedTree
from .delivery import Courier
from .progress import Coalescer

log = logging.getLogger(__name__)
COGS = (train, gen, loras, admin)


def point_discord_py(cfg: Config) -> None:
    """Send REST calls and the gateway connection where ``[discord]`` says (a Discord-compatible
    server in tests; Discord itself by default)."""
    discord.http.Route.BASE = cfg.discord.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(cfg.discord.gateway)


class LoracordBot(commands.Bot):
    def __init__(self, cfg: Config, db: Database, scheduler: Scheduler, web: WebServer, **options: Any):
        cfg.discord.check_served()
        intents = discord.Intents.default()
        intents.message_content = True  # images and zips members post in their training thread
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            # Names, captions and file names are members' text: nothing the bot posts pings anyone
            # unless that one send names whom it mentions.
            allowed_mentions=discord.AllowedMentions.none(),
            tree_cls=ServedTree,
            **options,
        )
        self.cfg, self.db, self.scheduler, self.web = cfg, db, scheduler, web
        self.upload_limit = DEFAULT_UPLOAD_LIMIT  # updated from each interaction's attachment_size_limit
        self.edits = Coalescer(self, cfg.discord.progress_seconds, cfg.discord.retry_max_seconds)
        self.courier = Courier(self)
        self.acks = AckFirst()
        # Members' names as they last used the bot: the owner's web page shows names, not ids,
        # without the privileged members intent or a write per interaction.
        self.names: dict[str, str] = {}

    async def setup_hook(self) -> None:
        for module in COGS:
            await self.add_cog(module.Cog(self))
            self.add_dynamic_items(*module.ITEMS)
        self.scheduler.subscribe(self.courier.on_job_event)
        self.web.on_epoch_picked = lambda job, epoch, name: epochs.say_picked_on_web(self, job, epoch, name)
        self.web.member_name = self._member_name
        self.courier.start()
        if self.cfg.discord.public:
            await self.tree.sync()
            return
        for guild in (discord.Object(g) for g in self.cfg.discord.guilds):
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    def _member_name(self, member: str) -> str:
        """A member's name for the owner's page, from discord.py's cache (ids stay where it has none)."""
        user = self.get_user(int(member)) if member.isdigit() else None
        name = self.names.get(member) or (user.display_name if user else None)
        return f"{name} ({member})" if name else member

    async def _leave_unless_served(self, guild: discord.Guild) -> None:
        if not self.cfg.discord.serves(guild.id):
            log.warning("leaving server %s (%s): it is not in [discord] guilds", guild.id, guild.name)
            await guild.leave()

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self._leave_unless_served(guild)

    async def on_ready(self) -> None:
        self.web.discord_connected = True
        self.courier.retry_now()
        for guild in list(self.guilds):  # added while the bot was not running
            await self._leave_unless_served(guild)
        log.info("Discord: logged in as %s", self.user)

    async def on_resumed(self) -> None:
        self.web.discord_connected = True
        self.courier.retry_now()

    async def on_disconnect(self) -> None:
        self.web.discord_connected = False

    async def on_app_command_error(self, ix: discord.Interaction, error: Exception) -> None:
        log.exception("command %s failed", ix.command and ix.command.name, exc_info=error)

    async def close(self) -> None:
        if self.courier.on_job_event in self.scheduler.listeners:
            self.scheduler.listeners.remove(self.courier.on_job_event)
        await self.courier.close()  # what it has not delivered stays in the outbox for the next start
        with contextlib.suppress(TimeoutError):  # Discord down: a progress edit may wait for ever
            async with asyncio.timeout(5):
                await self.edits.drain()
        self.edits.close()
        self.web.discord_connected = False
        await super().close()


async def serve(cfg: Config, db: Database, scheduler: Scheduler, web: WebServer, stop: asyncio.Event) -> None:
    """Run the bot with the scheduler until ``stop`` is set (the token is checked first)."""
    token = cfg.discord_token()
    point_discord_py(cfg)
    bot = LoracordBot(cfg, db, scheduler, web)
    web.discord_connected = False
    tasks = [
        asyncio.create_task(scheduler.run(stop), name="scheduler"),
        asyncio.create_task(bot.start(token), name="discord"),
    ]
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter:
                task.result()  # a crash: raise it here
    except discord.LoginFailure:
        raise ConfigError(f"Discord refused the bot token: check {TOKEN_ENV} (or the token file)") from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            "Discord refused the Message Content intent: switch it on under Bot → Privileged Gateway "
            "Intents in the developer portal (members post their images in threads)"
        ) from None
    finally:
        stop.set()
        await bot.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()
