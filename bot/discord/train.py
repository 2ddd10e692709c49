"""``/train``: a thread per LoRA with a dataset card (images, flags, contact sheet, Auto-tag,
Settings, Start, Cancel), images posted in the thread taken in, one progress message, a preview
grid per saved epoch with **Use epoch N** / **Download**, and the epoch × prompt grid at the end.

This module is the cog: the slash commands, Start and Cancel. Each feature lives in its own
module: :mod:`.card`, :mod:`.intake`, :mod:`.settings`, :mod:`.tagging`, :mod:`.epochs`, over
the draft's folder and settings in :mod:`.draft`."""

from __future__ import annotations

import asyncio
import shutil

import discord
from discord import app_commands
from discord.ext import commands

from runner.spec import SpecError, TrainSpec

from .. import jobs, store
from . import state
from .browser import BrowserButton
from .captions import CaptionButton, caption_page
from .card import DraftButton, card, refresh_card
from .common import clip, defer, member_id, role_ids, say, sentence
from .draft import FROZEN, RESERVED, SUBSET, dataset_dir, repeats, subset_dir
from .epochs import EpochSelect, EpochsMixin, JobButton, queued_text
from .intake import IntakeMixin
from .settings import SettingsMixin, literal_values
from .tagging import TaggingMixin, TagSelect

PRESETS = ("character", "style", "concept")

ITEMS = (DraftButton, TagSelect, JobButton, EpochSelect, CaptionButton, BrowserButton)


# One cog made of the features' mixins, not a cog per feature: every draft button's custom_id
# ("lc:d:…") is answered by Cog_train's do_<action>, and the intake lock that keeps Start from
# freezing a dataset mid-upload is shared by /train, intake and Start. discord.py's CogMeta
# collects the commands and listeners of every class in the MRO.
class Cog(SettingsMixin, TaggingMixin, IntakeMixin, EpochsMixin, commands.Cog, name="Cog_train"):
    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self._intake_locks: dict[int, asyncio.Lock] = {}
        self._early: dict[int, set[int]] = {}  # draft → message ids taken in while its card was made

    @app_commands.command(name="train", description="Train a LoRA: opens a thread for your images")
    @app_commands.describe(
        name="the LoRA's name (how you will use it: <lora:name:0.8>)",
        trigger="the word that calls it up in prompts",
        preset="what it learns",
        base="the model to train on",
        images="an image or a .zip of images with captions (more can be posted in the thread)",
    )
    @app_commands.choices(preset=[app_commands.Choice(name=p, value=p) for p in PRESETS])
    async def train(
        self,
        ix: discord.Interaction,
        name: app_commands.Range[str, 1, 80],
        trigger: app_commands.Range[str, 1, 60],
        preset: str,
        base: str,
        images: discord.Attachment | None = None,
    ) -> None:
        await defer(ix)
        bot = self.bot
        if base not in bot.cfg.bases:
            await say(ix, f"Unknown model '{base}'. This server offers: {', '.join(bot.cfg.bases)}")
            return
        try:
            TrainSpec.parse({"output_name": name, "base": "x", "train_data_dir": ".", "output_dir": "."})
        except SpecError as e:
            await say(ix, f"That name cannot be used: {e}")
            return
        me = member_id(ix.user)
        store.ensure_member(bot.db, me, role_ids(ix.user))
        drafts = state.open_drafts(bot.db, me)
        allowed = jobs.effective_quota(bot.db, bot.cfg, me).open_drafts
        if len(drafts) >= allowed:
            threads = " ".join(f"<#{d.thread_id}>" for d in drafts[-5:])
            await say(
                ix,
                f"You have {len(drafts)} LoRA(s) not started yet, the most allowed is {allowed}: "
                f"press Start or Cancel on one first ({threads}).",
            )
            return
        channel = (
            bot.get_channel(bot.cfg.discord.train_channel) if bot.cfg.discord.train_channel else ix.channel
        )
        if isinstance(channel, discord.Thread):
            channel = channel.parent
        if not isinstance(channel, discord.TextChannel):
            await say(ix, "/train works in a server's text channel.")
            return
        thread = await channel.create_thread(
            name=clip(f"LoRA · {name}", 100),
            type=discord.ChannelType.public_thread,
            auto_archive_duration=bot.cfg.discord.archive_minutes,
        )
        # No await between the thread and its draft: from here on, on_message takes images in.
        draft = state.new_draft(
            bot.db, member_id(ix.user), name, base, thread.id, {"trigger": trigger, "preset": preset}
        )
        self._early[draft.id] = set()
        await thread.add_user(ix.user)
        embed, files, view = card(bot, draft)
        message = await thread.send(
            f"<@{ix.user.id}>",
            embed=embed,
            files=files,
            view=view,
            allowed_mentions=discord.AllowedMentions(users=[ix.user]),
        )
        draft = state.update_draft(bot.db, draft.id, card_id=message.id)
        early = await self._posted_earlier(draft, thread)
        await say(ix, f"Your LoRA's thread: {thread.mention} — post your images there.")
        attachments = [a for m in early for a in m.attachments] + ([images] if images else [])
        if attachments:
            await self.take_in(draft, attachments, thread)
        elif self._early[draft.id]:  # on_message took some in while the card was made: it may be stale
            await refresh_card(bot, state.get_draft(bot.db, draft.id))

    @train.autocomplete("base")
    async def _bases(self, ix: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [n for n in self.bot.cfg.bases if current.casefold() in n.casefold()]
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names[:25]]

    @app_commands.command(
        name="train-set", description="Change any training setting of the dataset in this thread"
    )
    @app_commands.describe(key="a setting (kohya's name)", value="its value; 'default' removes your change")
    async def train_set(
        self, ix: discord.Interaction, key: str, value: app_commands.Range[str, 1, 200]
    ) -> None:
        await defer(ix)
        draft = state.draft_in_thread(self.bot.db, ix.channel_id) or state.latest_draft(
            self.bot.db, member_id(ix.user)
        )
        if draft is None or draft.owner != member_id(ix.user):
            await say(ix, "Use /train-set in your LoRA's thread (start one with /train).")
            return
        await self.apply_settings(ix, draft.id, {key: value})

    @train_set.autocomplete("key")
    async def _keys(self, ix: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [n for n in TrainSpec.setting_names() if n not in RESERVED and current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    @train_set.autocomplete("value")
    async def _values(self, ix: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        key = next((o.get("value") for o in ix.data.get("options", []) if o.get("name") == "key"), None)
        field = TrainSpec.model_fields.get(str(key))
        if field is None:
            return []
        allowed = [
            str(a).lower() if isinstance(a, bool) else str(a) for a in literal_values(field.annotation)
        ]
        if not allowed:
            return [
                app_commands.Choice(
                    name=f"{current or field.default} (default {field.default})"[:100],
                    value=(current or str(field.default))[:100],
                )
            ]
        return [app_commands.Choice(name=a, value=a) for a in allowed if current.lower() in a.lower()][:25]

    # ---- draft actions (buttons; the owner is checked already) ----

    def _busy(self, draft_id: int) -> str | None:
        """Why the draft cannot start work now (read in the caller's transaction), or None."""
        draft = state.get_draft(self.bot.db, draft_id)
        if draft is None:
            return "That dataset no longer exists."
        if draft.job_id is not None:
            return FROZEN
        tagging = store.get_job(self.bot.db, draft.tag_job_id) if draft.tag_job_id else None
        if tagging is not None and tagging.state in store.ACTIVE:
            return f"Auto-tag (job #{tagging.id}) is still at work; its tags appear in the thread."
        return None

    async def do_start(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        await defer(ix)
        # Not while images are being taken in; and from here on nothing changes the dataset.
        async with self._intake_locks.setdefault(draft.id, asyncio.Lock()):
            try:
                job = self._start(draft.id, role_ids(ix.user))
            except jobs.JobError as e:
                await say(ix, f"Not started: {e}")
                return
        draft = state.get_draft(self.bot.db, draft.id)
        thread = self.bot.get_partial_messageable(draft.thread_id)
        view = discord.ui.View(timeout=None)
        view.add_item(BrowserButton(job.id))
        progress = await thread.send(queued_text(self.bot, job), view=view)
        state.update_draft(self.bot.db, draft.id, progress_id=progress.id)
        await refresh_card(self.bot, draft)
        await say(ix, f"▶️ Queued as job #{job.id}. Progress is posted in the thread.")

    def _start(self, draft_id: int, roles: list[str] | None) -> store.Job:
        """Queue the draft's training once: the check and the job are one transaction, so a double
        tap (or another process) finds the first job and is refused."""
        with store.immediate(self.bot.db):
            if busy := self._busy(draft_id):
                raise jobs.JobError(busy)
            draft = state.get_draft(self.bot.db, draft_id)
            folder = dataset_dir(self.bot, draft)
            sub = subset_dir(folder) if folder.is_dir() else None
            if sub is None:
                raise jobs.JobError("post some images in the thread first.")
            wanted = folder / f"{repeats(draft)}_{SUBSET}"
            if sub != wanted:
                sub.rename(wanted)
            s = draft.settings_dict
            settings = {**s.get("train", {}), "trigger_word": s.get("trigger"), "preset": s.get("preset")}
            job = jobs.submit_train(
                self.bot.db, self.bot.cfg, draft.owner, draft.dataset, draft.base, draft.name, settings, roles
            )
            state.update_draft(self.bot.db, draft.id, job_id=job.id)
        return job

    async def do_caps(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        await defer(ix)
        embed, files, view = await caption_page(self.bot, draft, 0)
        await ix.followup.send(embed=embed, files=files, view=view, ephemeral=True)

    async def do_drop(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        await defer(ix)
        if draft.job_id is not None:
            try:
                what = jobs.request_cancel(self.bot.db, draft.job_id, draft.owner)
            except jobs.JobError as e:
                await say(ix, sentence(str(e)))
                return
            await say(ix, "Cancelled." if what == "cancelled" else "Stopping within a step…")
            if what == "cancelled":
                self.edit_progress(draft, "⏹️ Cancelled before it started.")
            return
        shutil.rmtree(dataset_dir(self.bot, draft), ignore_errors=True)
        state.delete_draft(self.bot.db, draft.id)
        message = self.bot.get_partial_messageable(draft.thread_id).get_partial_message(draft.card_id)
        await message.edit(content="Discarded.", embed=None, attachments=[], view=None)
        await say(ix, "The dataset was discarded.")
