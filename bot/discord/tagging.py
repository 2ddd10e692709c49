"""Auto-caption: queueing the WD14 tagger or the sentence captioner (the family's style, or the one
the member picked), their report, the tag/phrase picker, removing the picked ones from captions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands

from runner.data.tagger import compose, split_caption
from runner.families.protocol import ModelError
from runner.families.registry import base_family
from runner.spec import CaptionedEvent, FailedEvent, TaggedEvent, TagSpec

from .. import jobs, store
from ..config import ConfigError
from . import state
from .captions import apply_to_all, images_of
from .card import STYLES, DraftButton, refresh_card
from .common import Served, bot_of, clip, defer, edit_modal_or_message, member_id, say
from .delivery import outbox_nonce
from .draft import FROZEN, dataset_dir

TAG_PAGE = 25  # Discord's limit of options in a select


class TagSelect(
    Served, discord.ui.DynamicItem[discord.ui.Select], template=r"lc:t:(?P<draft>\d+):(?P<page>\d+)"
):
    def __init__(self, draft: int, page: int, options: list[discord.SelectOption] | None = None) -> None:
        options = options or [discord.SelectOption(label="-", value="-")]
        super().__init__(
            discord.ui.Select(
                custom_id=f"lc:t:{draft}:{page}",
                placeholder="Tags to remove (bake into the trigger)",
                min_values=0,
                max_values=len(options),
                options=options,
            )
        )
        self.draft_id, self.page = draft, page

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["draft"]), int(match["page"]))

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        draft = state.get_draft(bot.db, self.draft_id)
        if draft is None or draft.owner != member_id(ix.user):
            await say(
                ix, "Only the dataset's owner can choose its tags." if draft else "That dataset is gone."
            )
            return
        if draft.job_id is not None:
            await say(ix, FROZEN)
            return
        shown = {o["value"] for o in _select_options(ix.message, f"lc:t:{self.draft_id}:{self.page}")}
        s = draft.settings_dict
        s["remove"] = sorted((set(s.get("remove", [])) - shown) | set(ix.data.get("values", [])))
        draft = state.update_draft(bot.db, draft.id, settings=s)
        await edit_modal_or_message(ix, view=tag_view(draft, _summary(bot, draft), self.page))


def _select_options(message: discord.Message | None, custom_id: str) -> list[dict]:
    for row in message.components if message else []:
        for child in getattr(row, "children", []):
            if getattr(child, "custom_id", None) == custom_id:
                return [{"value": o.value} for o in child.options]
    return []


Summary = TaggedEvent | CaptionedEvent


def _summary(bot: commands.Bot, draft: state.Draft) -> Summary | None:
    job = store.get_job(bot.db, draft.tag_job_id) if draft.tag_job_id else None
    if not (job and job.result):
        return None
    return (CaptionedEvent if job.kind == "caption" else TaggedEvent).model_validate_json(job.result)


def tag_view(draft: state.Draft, tagged: Summary | None, page: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    tags = tagged.tag_summary if tagged else []
    chosen = set(draft.settings_dict.get("remove", []))
    chunk = tags[page * TAG_PAGE : (page + 1) * TAG_PAGE]
    if chunk:
        options = [
            discord.SelectOption(
                label=clip(t.tag, 100),
                value=clip(t.tag, 100),
                description=f"on {t.count}",
                default=t.tag in chosen,
            )
            for t in chunk
        ]
        view.add_item(TagSelect(draft.id, page, options))
    pages = (len(tags) + TAG_PAGE - 1) // TAG_PAGE
    if pages > 1:
        view.add_item(DraftButton(draft.id, "page", (page + 1) % pages))
    view.add_item(DraftButton(draft.id, "apply"))
    return view


def remove_tags(folder: Path, remove: list[str], trigger: str | None) -> int:
    spec = TagSpec(train_data_dir=str(folder), remove=remove, trigger_word=trigger)
    changed = 0
    for caption in folder.rglob(f"*{spec.caption_extension}"):
        if any(part.startswith(".") for part in caption.relative_to(folder).parts):
            continue
        before = split_caption(caption.read_text(encoding="utf-8"))
        after = compose(before, None, spec)
        if after != before:
            caption.write_text(", ".join(after), encoding="utf-8")
            changed += 1
    return changed


class TaggingMixin:
    """The cog's Auto-tag actions and the tagger's report (mixed into :class:`.train.Cog`, which
    holds ``bot`` and ``_busy``)."""

    bot: commands.Bot

    async def do_tag(self, ix: discord.Interaction, draft: state.Draft, style: int | None) -> None:
        """Auto-caption in ``style`` (an index into STYLES; None, as on cards made before there was a
        choice: the family's own)."""
        await defer(ix)
        s, cfg = draft.settings_dict, self.bot.cfg
        native = base_family(cfg.base(draft.base)).caption_style
        sentences = (STYLES[style] if style in (0, 1) else native) == "sentences"
        # Checked and written in one transaction: a second tap (or a second process) finds the first job.
        try:
            with store.immediate(self.bot.db):
                if busy := self._busy(draft.id):
                    raise jobs.JobError(busy)
                if sentences:
                    settings = {
                        "captioner": cfg.discord.captioner,
                        "trigger_word": s.get("trigger"),
                        # Long captions for text encoders that read them (T5, Qwen3); CLIP reads 75 tokens.
                        "task": "more_detailed" if native == "sentences" else "detailed",
                    }
                    job = jobs.submit_caption(self.bot.db, cfg, draft.owner, draft.dataset, settings)
                else:
                    settings = {
                        "tagger": cfg.discord.tagger,
                        "trigger_word": s.get("trigger"),
                        "preset": s.get("preset"),
                    }
                    job = jobs.submit_tag(self.bot.db, cfg, draft.owner, draft.dataset, settings)
                state.update_draft(self.bot.db, draft.id, tag_job_id=job.id)
        except (jobs.JobError, ConfigError, ModelError) as e:
            await say(ix, f"Not queued: {e}")
            return
        what = "📝 Captioning" if sentences else "🏷️ Tagging"
        await say(ix, f"{what} queued (job #{job.id}); the captions' summary appears in the thread.")

    async def do_page(self, ix: discord.Interaction, draft: state.Draft, page: int | None) -> None:
        await edit_modal_or_message(ix, view=tag_view(draft, _summary(self.bot, draft), page or 0))

    async def do_apply(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        await defer(ix)
        if draft.job_id is not None:
            await say(ix, FROZEN)
            return
        remove = draft.settings_dict.get("remove", [])
        if not remove:
            await say(ix, "No tags selected.")
            return
        if isinstance(_summary(self.bot, draft), CaptionedEvent):  # phrases inside sentences
            images = images_of(self.bot, draft)
            changed = await asyncio.to_thread(apply_to_all, images, "", remove)
        else:
            changed = await asyncio.to_thread(
                remove_tags, dataset_dir(self.bot, draft), remove, draft.settings_dict.get("trigger")
            )
        await say(
            ix, f"Removed {len(remove)} tag(s) from {changed} caption(s); the trigger word now carries them."
        )

    async def _tag_event(self, draft: state.Draft, thread: discord.PartialMessageable, event: Any) -> None:
        if isinstance(event, FailedEvent):
            await thread.send(clip(f"Auto-caption failed: {event.reason}"), nonce=outbox_nonce())
        elif isinstance(event, CaptionedEvent):
            s = draft.settings_dict
            s["remove"] = []
            draft = state.update_draft(self.bot.db, draft.id, settings=s)
            top = ", ".join(f"{t.tag} ×{t.count}" for t in event.tag_summary[:12])
            examples = "".join(f"\n> {clip(caption, 300)}" for _, caption in event.examples[:2])
            text = (
                f"📝 Captioned {event.captions_written}/{event.images} images. Most used: {top or 'none'}."
                f"{examples}\nOpen **Captions** on the card to read and fix them, or pick phrases to remove "
                "and **Remove selected**."
            )
            await thread.send(clip(text), view=tag_view(draft, event, 0), nonce=outbox_nonce())
            await refresh_card(self.bot, draft)
        elif isinstance(event, TaggedEvent):
            s = draft.settings_dict
            s["remove"] = list(event.suggested_removals)
            draft = state.update_draft(self.bot.db, draft.id, settings=s)
            top = ", ".join(f"{t.tag} ×{t.count}" for t in event.tag_summary[:12])
            text = (
                f"🏷️ Tagged {event.captions_written}/{event.images} images. Most used: {top or 'none'}.\n"
                "Pick tags to remove (they become part of the trigger word), then **Remove selected**."
            )
            await thread.send(clip(text), view=tag_view(draft, event, 0), nonce=outbox_nonce())
            await refresh_card(self.bot, draft)
