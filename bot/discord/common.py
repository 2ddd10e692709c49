"""Helpers every cog uses: acknowledging in time (and timing it), plain-words replies, ownership
checks, the NSFW policy, upload limits and short texts that read well on a phone."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

import discord

from .. import store

if TYPE_CHECKING:
    from .app import LoracordBot

MiB = 1 << 20
DEFAULT_UPLOAD_LIMIT = 10 * MiB  # Discord's limit for a server without boosts


def member_id(user: discord.abc.User) -> str:
    return str(user.id)


def role_ids(user: discord.abc.User) -> list[str] | None:
    return [str(r.id) for r in user.roles if not r.is_default()] if isinstance(user, discord.Member) else None


def bot_of(ix: discord.Interaction) -> LoracordBot:
    return ix.client  # type: ignore[return-value]


async def served(ix: discord.Interaction) -> bool:
    """Whether the bot acts on ``ix``: only in the servers ``[discord] guilds`` lists (any server
    with ``public``, never a DM). Anything else is answered with a refusal and changes nothing."""
    bot = bot_of(ix)
    if bot.cfg.discord.serves(ix.guild_id):
        bot.names[str(ix.user.id)] = ix.user.display_name  # for the owner's web page; memory only
        if ix.type is not discord.InteractionType.autocomplete:  # answered by discord.py, at once
            bot.acks.arrived(ix.id)
        return True
    if ix.type is discord.InteractionType.autocomplete:
        await ix.response.autocomplete([])
    else:
        await ix.response.send_message("This bot serves only its owner's servers.", ephemeral=True)
    return False


class Served:
    """Mixed into every component and modal: what ``served`` refuses never reaches a callback."""

    async def interaction_check(self, ix: discord.Interaction, /) -> bool:
        return await served(ix)


class ServedTree(discord.app_commands.CommandTree):
    async def interaction_check(self, ix: discord.Interaction, /) -> bool:
        return await served(ix)


def _acked(ix: discord.Interaction) -> None:
    bot = bot_of(ix)
    bot.acks.acked(ix.id)
    bot.upload_limit = ix.filesize_limit
    bot.web.metrics.observe_ack(max(time.time() - ix.created_at.timestamp(), 0.0))


async def defer(ix: discord.Interaction, *, ephemeral: bool = True, update: bool = False) -> None:
    """Acknowledge now (the 3 s rule); the answer follows as an edit or a followup, once the
    interactions that came in meanwhile are acknowledged too (``acks.AckFirst``)."""
    if update:
        await ix.response.defer()
    else:
        await ix.response.defer(ephemeral=ephemeral, thinking=True)
    _acked(ix)
    await bot_of(ix).acks.settled()


async def say(ix: discord.Interaction, text: str, *, ephemeral: bool = True, **kwargs: object) -> None:
    """Answer in plain words: the acknowledgement itself when there was none yet, else a followup."""
    text = clip(text)
    if ix.response.is_done():
        await ix.followup.send(text, ephemeral=ephemeral, **kwargs)
    else:
        await ix.response.send_message(text, ephemeral=ephemeral, **kwargs)
        _acked(ix)


async def edit_modal_or_message(ix: discord.Interaction, **kwargs: object) -> None:
    await ix.response.edit_message(**kwargs)
    _acked(ix)


async def send_modal(ix: discord.Interaction, modal: discord.ui.Modal) -> None:
    await ix.response.send_modal(modal)
    _acked(ix)


def clip(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def owned_job(ix: discord.Interaction, job_id: int, what: str) -> store.Job | None:
    """The job when the clicker owns it; otherwise a polite ephemeral answer and None."""
    job = store.get_job(bot_of(ix).db, job_id)
    if job is None:
        await say(ix, f"That job (#{job_id}) no longer exists.")
        return None
    if job.owner != member_id(ix.user):
        await say(
            ix, f"Only <@{job.owner}> can {what} this job.", allowed_mentions=discord.AllowedMentions.none()
        )
        return None
    return job


def nsfw_mode(bot: LoracordBot, channel: object) -> str:
    """allow, spoiler or refuse: what images may look like in ``channel`` ([discord] nsfw)."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    if callable(is_nsfw) and is_nsfw():
        return "allow"
    return bot.cfg.discord.nsfw


async def nsfw_mode_of(bot: LoracordBot, channel_id: int) -> str:
    """``nsfw_mode`` of a channel known by id. A thread is often not in the cache (archived, or
    the bot restarted since it was made), and a thread is NSFW when its parent is: both are
    fetched from Discord when the cache lacks them."""
    try:
        channel = bot.get_channel(channel_id) or await bot.fetch_channel(channel_id)
        if isinstance(channel, discord.Thread) and channel.parent is None:
            channel = await bot.fetch_channel(channel.parent_id)
    except discord.HTTPException:
        channel = None  # gone or hidden: the configured policy, never "allow"
    return nsfw_mode(bot, channel)


def image_file(path: str | Path, spoiler: bool, name: str | None = None) -> discord.File:
    p = Path(path)
    return discord.File(io.BytesIO(p.read_bytes()), name or p.name, spoiler=spoiler)


def files_or_links(bot: LoracordBot, paths: list[str], spoiler: bool) -> tuple[list[discord.File], list[str]]:
    """Attachments for the files within the upload limit; signed links (spoilered like the
    files) for the rest, which Discord would refuse."""
    files, links = [], []
    for path in paths:
        if Path(path).stat().st_size <= bot.upload_limit:
            files.append(image_file(path, spoiler))
        else:
            link = bot.web.links.sign(path)
            links.append(f"||{link}||" if spoiler else link)
    return files, links


def bar(fraction: float, width: int = 10) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "▰" * filled + "▱" * (width - filled)


def duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def size_text(n: int) -> str:
    return f"{n / MiB:.1f} MB" if n >= MiB / 10 else f"{n / 1024:.0f} KB"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
