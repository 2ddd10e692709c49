"""``/loras``: the member's library (``bot.library``) and what others shared, with download links,
share/unshare, delete and Open in browser."""

from __future__ import annotations

import re

import discord
from discord import app_commands
from discord.ext import commands

from .. import library, store
from . import browser
from .common import Served, bot_of, clip, defer, member_id, say, size_text

_MAX_LISTED = 20


async def lora_autocomplete(ix: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    me = member_id(ix.user)
    out = []
    for lo in library.loras_for(bot_of(ix).db, me):
        if current.casefold() in lo.name.casefold():
            label = lo.name if lo.owner == me else f"{lo.name} (shared)"
            out.append(app_commands.Choice(name=label[:100], value=lo.name[:100]))
    return out[:25]


def download_link(bot, path: str) -> str:
    return bot.web.links.sign(path)


class LoraButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:l:(?P<row>\d+):(?P<action>share|unshare|del|dl)",
):
    LABELS = {"share": "Share", "unshare": "Unshare", "del": "Delete", "dl": "Download"}

    def __init__(self, row: int, action: str) -> None:
        style = discord.ButtonStyle.danger if action == "del" else discord.ButtonStyle.secondary
        super().__init__(
            discord.ui.Button(label=self.LABELS[action], style=style, custom_id=f"lc:l:{row}:{action}")
        )
        self.row_id, self.action = row, action

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001 (discord.py's signature)
        return cls(int(match["row"]), match["action"])

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        lo = library.lora_by_rowid(bot.db, self.row_id)
        if lo is None:
            await say(ix, "That LoRA is no longer in the library.")
            return
        if lo.owner != member_id(ix.user) and not (self.action == "dl" and lo.shared):
            await say(ix, f"Only its owner can change **{lo.name}**.")
            return
        if self.action == "dl":
            await say(ix, f"**{lo.name}** ({size_text(lo.size)}): {download_link(bot, lo.path)}")
        elif self.action in ("share", "unshare"):
            library.set_shared(bot.db, lo.owner, lo.name, self.action == "share")
            what = "shared with everyone here" if self.action == "share" else "private again"
            await say(ix, f"**{lo.name}** is {what}.")
        else:
            job = store.get_job(bot.db, lo.job_id) if lo.job_id else None
            if job is not None and job.state in store.ACTIVE:
                await say(ix, f"**{lo.name}** is still training (job #{job.id}); cancel it first.")
                return
            library.delete(bot.db, bot.cfg, lo)
            await say(ix, f"**{lo.name}** was deleted from your library, with every epoch of its training.")


class LoraSelect(Served, discord.ui.DynamicItem[discord.ui.Select], template=r"lc:ls:(?P<owner>\d+)"):
    def __init__(self, owner: str, loras: list[tuple[int, library.Lora]] | None = None) -> None:
        options = [
            discord.SelectOption(label=lo.name[:100], value=str(row), description=size_text(lo.size))
            for row, lo in (loras or [])[:25]
        ] or [discord.SelectOption(label="-", value="0")]
        super().__init__(
            discord.ui.Select(custom_id=f"lc:ls:{owner}", placeholder="Manage one…", options=options)
        )
        self.owner = owner

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(match["owner"])

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        lo = library.lora_by_rowid(bot.db, int(ix.data["values"][0]))
        if lo is None or lo.owner != member_id(ix.user):
            await say(ix, "That LoRA is not yours or no longer exists.")
            return
        row = library.lora_rowid(bot.db, lo)
        view = discord.ui.View(timeout=None)
        for action in ("dl", "unshare" if lo.shared else "share", "del"):
            view.add_item(LoraButton(row, action))
        where = "shared" if lo.shared else "private"
        await say(ix, f"**{lo.name}** · epoch {lo.epoch or '-'} · {lo.base or '?'} · {where}", view=view)


ITEMS = (LoraButton, LoraSelect)


class Cog(commands.Cog, name="Cog_library"):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    @app_commands.command(name="loras", description="Your LoRAs and the ones shared with you")
    async def loras(self, ix: discord.Interaction) -> None:
        await defer(ix)
        me = member_id(ix.user)
        all_ = library.loras_for(self.bot.db, me)
        mine = [lo for lo in all_ if lo.owner == me]
        shared = [lo for lo in all_ if lo.owner != me]
        if not all_:
            await say(
                ix,
                "Your library is empty. Train a LoRA with `/train`; the epoch you pick lands here.",
                view=browser.link_view(ix),
            )
            return
        lines = [
            f"• **{_md(lo.name)}** · {size_text(lo.size)}{' · shared' if lo.shared else ''} · "
            f"[download]({download_link(self.bot, lo.path)})"
            for lo in mine[:_MAX_LISTED]
        ]
        lines += [f"• {_md(lo.name)} · by <@{lo.owner}>" for lo in shared[:_MAX_LISTED]]
        embed = discord.Embed(title="LoRAs", description=clip("\n".join(lines), 4000))
        embed.set_footer(text="Use one: /gen lora:NAME weight:0.8")
        view = browser.link_view(ix)
        if mine:
            view.add_item(LoraSelect(me, [(library.lora_rowid(self.bot.db, lo), lo) for lo in mine]))
        await ix.followup.send(embed=embed, view=view, ephemeral=True)


def _md(text: str) -> str:
    return re.sub(r"([*_`~|\\])", r"\\\1", text)
