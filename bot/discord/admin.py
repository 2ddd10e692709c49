"""``/queue``, ``/cancel``, ``/quota`` for members and ``/admin …`` for those with Manage Server
(Discord hides it from others; server settings can hand it to any role)."""

from __future__ import annotations

import shutil

import discord
from discord import app_commands
from discord.ext import commands

from .. import admin_ops, jobs, library, store
from ..config import ConfigError, Quota
from ..files import member_dir
from . import state
from .common import defer, duration, member_id, say, sentence, size_text

_KINDS = {
    "train": "training",
    "gen": "images",
    "grid": "epoch grid",
    "tag": "tagging",
    "caption": "captioning",
}


def _job_line(job: store.Job) -> str:
    what = f"**{job.name}**" if job.name else _KINDS.get(job.kind, job.kind)
    progress = job.progress_dict
    step = f" · step {progress['step']}/{progress['total_steps']}" if progress and "step" in progress else ""
    return f"#{job.id} {what} by <@{job.owner}>{step}"


class Cog(commands.Cog, name="Cog_admin"):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    @app_commands.command(name="queue", description="What runs now and where your jobs are in line")
    async def queue(self, ix: discord.Interaction) -> None:
        await defer(ix)
        me = member_id(ix.user)
        db = self.bot.db
        # The member's own jobs and a count, not the whole queue: under a crowd it is long, and
        # /queue is what everyone taps while they wait.
        running = store.list_jobs(db, ("running",))
        mine = jobs.places(db, self.bot.cfg, store.list_jobs(db, ("queued",), owner=me))
        mine.sort(key=lambda q: q.position)
        lines = ["**Running**"] + ([_job_line(j) for j in running] or ["nothing"])
        lines.append(f"**Waiting**: {store.count_jobs(db, 'queued')} job(s)")
        lines += [
            f"{_job_line(q.job)} · #{q.position} in line · starts in ~{duration(q.eta_s)}" for q in mine
        ]
        if store.get_setting(self.bot.db, "paused", False):
            lines.append("⏸️ The queue is paused by an admin.")
        await say(ix, "\n".join(lines), allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(
        name="cancel", description="Cancel one of your jobs (your latest when no id is given)"
    )
    async def cancel(self, ix: discord.Interaction, job: int | None = None) -> None:
        await defer(ix)
        me = member_id(ix.user)
        if job is None:
            active = store.list_jobs(self.bot.db, store.ACTIVE, owner=me)
            if not active:
                await say(ix, "You have no queued or running job.")
                return
            job = active[-1].id
        try:
            what = jobs.request_cancel(self.bot.db, job, me)
        except jobs.JobError as e:
            await say(ix, sentence(str(e)))
            return
        await say(
            ix, f"Job #{job} " + ("cancelled." if what == "cancelled" else "is stopping within a step.")
        )

    @app_commands.command(name="quota", description="Your GPU time, jobs and storage")
    async def quota(self, ix: discord.Interaction) -> None:
        await defer(ix)
        u = jobs.usage(self.bot.db, self.bot.cfg, member_id(ix.user))
        q = u.quota
        await say(
            ix,
            f"GPU time left today: **{duration(max(u.gpu_seconds_left, 0))}** of {duration(q.daily_gpu_seconds)}\n"
            f"Jobs: {u.running} running (of {q.concurrent_jobs}), {u.queued} waiting (of {q.queued_jobs})\n"
            f"Storage: {size_text(u.storage_bytes)} of {q.storage_mb:g} MB · "
            f"{q.images_per_dataset} images a dataset · {q.total_steps} steps a job",
        )

    async def _owner_scope(self, ix: discord.Interaction) -> bool:
        """With ``public = true`` the queue and the members' files are shared by every server, so an
        admin of one server must not act on them: only ``/admin quota`` (its roles) is theirs."""
        if not self.bot.cfg.discord.public:
            return True
        await say(
            ix,
            "This bot serves many servers; the queue and members' files are the bot owner's to manage "
            "(`loracord jobs …`). Here you can set your roles' limits with /admin quota.",
        )
        return False

    admin = app_commands.Group(
        name="admin",
        description="Run the queue (Manage Server)",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )

    @admin.command(name="pause", description="Start no new jobs (running ones go on)")
    async def pause(self, ix: discord.Interaction) -> None:
        await defer(ix)
        if not await self._owner_scope(ix):
            return
        running = admin_ops.pause(self.bot.db, member_id(ix.user), "discord")
        await say(ix, f"⏸️ Paused. {running} job(s) still running; /admin resume starts the queue again.")

    @admin.command(name="resume", description="Start jobs again")
    async def resume(self, ix: discord.Interaction) -> None:
        await defer(ix)
        if not await self._owner_scope(ix):
            return
        admin_ops.resume(self.bot.db, member_id(ix.user), "discord")
        await say(ix, "▶️ The queue runs again.")

    @admin.command(name="drain", description="Pause, and cancel every job still waiting")
    async def drain(self, ix: discord.Interaction) -> None:
        await defer(ix)
        if not await self._owner_scope(ix):
            return
        waiting = admin_ops.drain(self.bot.db, member_id(ix.user), "discord")
        await say(ix, f"Paused and cancelled {waiting} waiting job(s); running ones finish.")

    @admin.command(name="cancel", description="Cancel any job")
    async def admin_cancel(self, ix: discord.Interaction, job: int) -> None:
        await defer(ix)
        if not await self._owner_scope(ix):
            return
        try:
            what = admin_ops.cancel(self.bot.db, job, member_id(ix.user), "discord")
        except jobs.JobError as e:
            await say(ix, sentence(str(e)))
            return
        if what == "stopping":
            grace = self.bot.cfg.workers.cancel_grace_seconds
            what += f"; a worker that has not stopped it within {grace:g} s is killed"
        await say(ix, f"Job #{job} {what}.")

    @admin.command(name="purge", description="Delete a member's datasets, LoRAs and images")
    async def purge(self, ix: discord.Interaction, member: discord.User) -> None:
        await defer(ix)
        if not await self._owner_scope(ix):
            return
        who = member_id(member)
        for job in store.list_jobs(self.bot.db, store.ACTIVE, owner=who):
            jobs.request_cancel(self.bot.db, job.id)
        library.delete_lora(self.bot.db, who)
        state.delete_drafts(self.bot.db, who)
        shutil.rmtree(member_dir(self.bot.cfg.data_dir, who), ignore_errors=True)
        store.delete_artifacts(self.bot.db, who)
        admin_ops.record(self.bot.db, member_id(ix.user), "discord", "purge", f"member {who}")
        await say(ix, f"Purged <@{who}>'s data.", allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="quota", description="Set a role's limit: a number, 'unlimited' or 'default'")
    @app_commands.choices(key=[app_commands.Choice(name=k, value=k) for k in Quota.names()])
    async def admin_quota(self, ix: discord.Interaction, role: discord.Role, key: str, value: str) -> None:
        await defer(ix)
        try:
            admin_ops.set_quota(self.bot.db, member_id(ix.user), "discord", "role", str(role.id), key, value)
        except ConfigError as e:
            await say(ix, f"Not changed: {e}.", allowed_mentions=discord.AllowedMentions.none())
            return
        await say(ix, f"{role.name}: {key} = {value}.", allowed_mentions=discord.AllowedMentions.none())


ITEMS: tuple = ()
