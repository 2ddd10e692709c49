"""A run in its thread: progress message, a preview grid per epoch, Use epoch / Download, final grid."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands
from PIL import Image

from runner.gen.grid import image_grid
from runner.spec import DoneEvent, EpochEvent, FailedEvent, ProgressEvent, SamplesEvent, StageEvent

from .. import jobs, library, store
from . import state
from .browser import BrowserButton
from .common import (
    Served,
    bar,
    bot_of,
    clip,
    duration,
    files_or_links,
    image_file,
    nsfw_mode_of,
    owned_job,
    say,
    sentence,
    size_text,
)
from .delivery import outbox_nonce

log = logging.getLogger(__name__)


class JobButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:j:(?P<job>\d+):(?P<action>use|dl):(?P<epoch>\d+)",
):
    def __init__(self, job: int, action: str, epoch: int) -> None:
        label = f"Use epoch {epoch}" if action == "use" else "Download"
        style = discord.ButtonStyle.success if action == "use" else discord.ButtonStyle.secondary
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"lc:j:{job}:{action}:{epoch}")
        )
        self.job_id, self.action, self.epoch = job, action, epoch

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["job"]), match["action"], int(match["epoch"]))

    async def callback(self, ix: discord.Interaction) -> None:
        await pick_or_download(ix, self.job_id, self.action, self.epoch)


class EpochSelect(Served, discord.ui.DynamicItem[discord.ui.Select], template=r"lc:e:(?P<job>\d+)"):
    def __init__(self, job: int, epochs: list[int] | None = None) -> None:
        options = [discord.SelectOption(label=f"Epoch {e}", value=str(e)) for e in (epochs or [1])[-25:]]
        super().__init__(
            discord.ui.Select(custom_id=f"lc:e:{job}", placeholder="Keep another epoch…", options=options)
        )
        self.job_id = job

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["job"]))

    async def callback(self, ix: discord.Interaction) -> None:
        await pick_or_download(ix, self.job_id, "use", int(ix.data["values"][0]))


async def pick_or_download(ix: discord.Interaction, job_id: int, action: str, epoch: int) -> None:
    bot = bot_of(ix)
    job = await owned_job(ix, job_id, "pick an epoch of" if action == "use" else "download")
    if job is None:
        return
    if action == "use":
        try:
            lo = library.keep_epoch(bot.db, bot.cfg, job, epoch)
        except LookupError as e:
            await say(ix, sentence(str(e)))
            return
        await say(
            ix,
            f"✓ **{lo.name}** in your library is now epoch {epoch}. Try it: `/gen lora:{lo.name} weight:0.8`",
        )
        return
    arts = [a for a in store.artifacts(bot.db, job.id) if a["kind"] == "lora" and a["epoch"] == epoch]
    if not arts:
        await say(ix, f"Epoch {epoch} of job #{job.id} was not saved.")
        return
    path = arts[-1]["path"]
    name = f"{job.name}-{epoch:06d}.safetensors"
    if arts[-1]["size"] <= ix.filesize_limit:
        await say(ix, f"Epoch {epoch} ({size_text(arts[-1]['size'])}):", file=image_file(path, False, name))
    else:
        await say(ix, f"Epoch {epoch} ({size_text(arts[-1]['size'])}): {bot.web.links.sign(path)}")


def queued_text(bot: commands.Bot, job: store.Job) -> str:
    where = jobs.place(bot.db, bot.cfg, job)
    if where is None:
        return f"⏳ **{job.name}** is starting…"
    return f"⏳ **{job.name}** queued · #{where.position} in line · starts in ~{duration(where.eta_s)}"


def _grid(rows: list[list[str]], row_labels: list[str], prompts: list[str], out: Path) -> None:
    """One image for many previews (one message, readable on a phone)."""
    width = max(len(r) for r in rows)
    images = []
    for row in rows:
        cells = [Image.open(p).convert("RGB") for p in row]
        cells += [Image.new("RGB", cells[0].size, "white")] * (width - len(cells))
        images.append(cells)
    labels = [clip(p, 24) for p in (prompts + [""] * width)[:width]]
    image_grid(images, row_labels, labels, max_width=1536).image.save(out)


class EpochsMixin:
    """The cog's reports of what the worker does (mixed into :class:`.train.Cog`, which holds ``bot``;
    the tagger's reports go to ``_tag_event`` of :class:`.tagging.TaggingMixin`)."""

    bot: commands.Bot

    def edit_progress(self, draft: state.Draft, text: str) -> None:
        if draft.progress_id:
            self.bot.edits.edit(draft.thread_id, draft.progress_id, content=clip(text))

    async def on_job_event(self, job: store.Job, event: Any) -> None:
        if job.kind not in ("train", "tag", "caption"):
            return
        draft = state.draft_of_job(self.bot.db, job.id)
        if draft is None:
            return
        thread = self.bot.get_partial_messageable(draft.thread_id)
        if job.kind in ("tag", "caption"):
            await self._tag_event(draft, thread, event)
            return
        if isinstance(event, StageEvent):
            self.edit_progress(draft, f"⚙️ **{draft.name}** · {event.message}")
        elif isinstance(event, ProgressEvent):
            frac = event.step / max(event.total_steps, 1)
            epochs = f"/{event.total_epochs}" if event.total_epochs else ""
            self.edit_progress(
                draft,
                f"🏋️ **{draft.name}** · epoch {event.epoch}{epochs} · step {event.step}/{event.total_steps} · "
                f"loss {event.loss:.4f} · ETA {duration(event.eta_s)}\n{bar(frac)} {frac:.0%}",
            )
        elif isinstance(event, EpochEvent):
            await self._post_epoch(job, draft, thread, event)
        elif isinstance(event, SamplesEvent):
            await self._post_samples(draft, thread, event)
        elif isinstance(event, DoneEvent):
            await self._post_done(job, draft, thread, event)
        elif isinstance(event, FailedEvent):
            if event.kind == "cancelled":
                self.edit_progress(draft, f"⏹️ **{draft.name}** was cancelled.")
            else:
                log.error("job %s failed: %s", job.id, event.reason)
                self.edit_progress(draft, clip(f"❌ **{draft.name}** failed: {event.reason}"))

    async def _spoiler(self, thread_id: int) -> bool | None:
        """True/False: post images as spoilers or not; None: images refused in this channel."""
        mode = await nsfw_mode_of(self.bot, thread_id)
        return None if mode == "refuse" else mode == "spoiler"

    async def _post_epoch(
        self, job: store.Job, draft: state.Draft, thread: discord.PartialMessageable, event: EpochEvent
    ) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(JobButton(job.id, "use", event.epoch))
        view.add_item(JobButton(job.id, "dl", event.epoch))
        view.add_item(BrowserButton(job.id))
        spoiler = await self._spoiler(draft.thread_id)
        files, links, note = [], [], ""
        if event.sample_images and spoiler is not None:
            out = Path(event.lora_file).parent / f"preview-{event.epoch:06d}.png"
            await asyncio.to_thread(
                _grid, [event.sample_images], [f"epoch {event.epoch}"], event.sample_prompts, out
            )
            files, links = files_or_links(self.bot, [str(out)], spoiler)
        elif event.sample_images:
            note = " (previews are not shown in channels that are not marked NSFW)"
        text = f"📦 **{draft.name}** · epoch {event.epoch} saved{note}" + "".join(f"\n{u}" for u in links)
        await thread.send(text, files=files, view=view, nonce=outbox_nonce())

    async def _post_samples(
        self, draft: state.Draft, thread: discord.PartialMessageable, event: SamplesEvent
    ) -> None:
        """Previews of a moment that was not saved: the images alone, nothing to pick or download."""
        spoiler = await self._spoiler(draft.thread_id)
        if spoiler is None or not event.sample_images:
            return  # the saved epochs' messages already say why previews are not shown here
        when = f"epoch {event.epoch}" if event.end_of_epoch else f"step {event.step}"
        out = Path(event.sample_images[0]).parent / f"preview-step{event.step:06d}.png"
        await asyncio.to_thread(_grid, [event.sample_images], [when], event.sample_prompts, out)
        files, links = files_or_links(self.bot, [str(out)], spoiler)
        text = f"🖼️ **{draft.name}** · preview at {when} (not saved)" + "".join(f"\n{u}" for u in links)
        await thread.send(text, files=files, nonce=outbox_nonce())

    async def _post_done(
        self, job: store.Job, draft: state.Draft, thread: discord.PartialMessageable, event: DoneEvent
    ) -> None:
        epochs = [e for e in store.job_events(self.bot.db, job.id) if e["type"] == "epoch"]
        numbers = sorted({e["epoch"] for e in epochs})
        last = numbers[-1] if numbers else None
        kept = library.get_lora(self.bot.db, job.owner, job.name)
        if kept is None or kept.job_id != job.id:  # the member picked nothing yet: the last one is kept
            kept = library.keep_epoch(self.bot.db, self.bot.cfg, job, last, event.lora_file)
        self.edit_progress(
            draft, f"✅ **{draft.name}** finished: {event.steps} steps in {duration(event.seconds)}."
        )
        files, links = [], []
        spoiler = await self._spoiler(draft.thread_id)
        with_images = [e for e in epochs if e.get("sample_images")]
        if with_images and spoiler is not None:
            out = Path(event.lora_file).parent / "epochs-grid.png"
            rows = [e["sample_images"] for e in with_images[-8:]]
            await asyncio.to_thread(
                _grid,
                rows,
                [f"epoch {e['epoch']}" for e in with_images[-8:]],
                with_images[-1]["sample_prompts"],
                out,
            )
            files, links = files_or_links(self.bot, [str(out)], spoiler)
        view = discord.ui.View(timeout=None)
        if numbers:
            view.add_item(EpochSelect(job.id, numbers))
            view.add_item(JobButton(job.id, "dl", kept.epoch or last))
        view.add_item(BrowserButton(job.id))
        text = (
            f"<@{job.owner}> **{draft.name}** is ready: epoch {kept.epoch} is in your library. "
            f"Pick another below, or try it: `/gen lora:{draft.name} weight:0.8`"
        ) + "".join(f"\n{u}" for u in links)
        mention = discord.AllowedMentions(users=[discord.Object(int(job.owner))])
        await thread.send(clip(text), files=files, view=view, allowed_mentions=mention, nonce=outbox_nonce())


async def say_picked_on_web(bot: commands.Bot, job: store.Job, epoch: int, name: str) -> None:
    """A pick made in the browser is said in the training's thread, as a tap there would be."""
    draft = state.draft_of_job(bot.db, job.id)
    if draft is None:
        return
    thread = bot.get_partial_messageable(draft.thread_id)
    await thread.send(
        f"🌐 **{name}** in <@{job.owner}>'s library is now epoch {epoch} (picked in the browser). "
        f"Try it: `/gen lora:{name} weight:0.8`",
        nonce=outbox_nonce(),
    )
