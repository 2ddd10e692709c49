"""Open in browser: a link that signs the member in to the web pages (``bot.web``) for their own
LoRAs, with the admin pages for those who may use ``/admin`` (Manage Server). Links expire in
``[web] login_minutes``, so buttons that stay in a thread answer with a fresh one when tapped."""

from __future__ import annotations

import discord

from .common import Served, bot_of, member_id, owned_job, say


def may_admin(ix: discord.Interaction) -> bool:
    """What ``/admin`` asks (Manage Server here). With ``public = true`` the queue and files are the
    bot owner's, not a server admin's: they get the member pages only."""
    perms = ix.permissions
    return bool(perms and perms.manage_guild) and not bot_of(ix).cfg.discord.public


def login_link(ix: discord.Interaction, page: str = "/") -> str:
    return bot_of(ix).web.logins.link(member_id(ix.user), may_admin(ix), page)


def link_view(ix: discord.Interaction, page: str = "/") -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(label="Open in browser", style=discord.ButtonStyle.link, url=login_link(ix, page))
    )
    return view


class BrowserButton(Served, discord.ui.DynamicItem[discord.ui.Button], template=r"lc:w:(?P<job>\d+)"):
    """In a training's thread: answers its owner with a fresh sign-in link to that training's page."""

    def __init__(self, job: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Open in browser", style=discord.ButtonStyle.secondary, custom_id=f"lc:w:{job}"
            )
        )
        self.job_id = job

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001 (discord.py's signature)
        return cls(int(match["job"]))

    async def callback(self, ix: discord.Interaction) -> None:
        job = await owned_job(ix, self.job_id, "open")
        if job is None:
            return
        minutes = bot_of(ix).cfg.web.login_minutes
        await say(
            ix,
            f"Your page for **{job.name}**: every epoch at full size, grids and the loss curve. "
            f"The button works for {minutes:g} minutes and only for you.",
            view=link_view(ix, f"/loras/{job.id}"),
        )
