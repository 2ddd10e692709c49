"""Captions from a phone: one image and its caption a page, ◀ ▶, Edit, and Apply to all (add or
remove a tag or phrase in every caption). Owner only; edits stop once training has started."""

from __future__ import annotations

import asyncio
import io
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import discord
from discord.ext import commands
from PIL import Image

from runner.data.images import image_files

from . import state
from .common import Served, bot_of, clip, edit_modal_or_message, member_id, say, send_modal
from .draft import FROZEN, dataset_dir

CAPTION = ".txt"  # what intake and the tagger write
THUMB = 768  # a page's image side: enough to judge a caption on a phone, far under the upload limit


def images_of(bot: commands.Bot, draft: state.Draft) -> list[Path]:
    folder = dataset_dir(bot, draft)
    return image_files(folder)[0] if folder.is_dir() else []


def read_caption(image: Path) -> str:
    path = image.with_suffix(CAPTION)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def write_caption(image: Path, text: str) -> None:
    """Written whole or not at all: the trainer never reads half a caption."""
    path = image.with_suffix(CAPTION)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(text.strip(), encoding="utf-8")
    os.replace(tmp, path)


def _parts(caption: str) -> list[str]:
    return [p.strip() for p in caption.split(",") if p.strip()]


def _tidy(text: str) -> str:
    """One space between words and none before punctuation, after a phrase was cut out."""
    return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(text.split()))


def apply_to_all(images: list[Path], add: str, remove: Sequence[str]) -> int:
    """Remove each of ``remove`` and add ``add`` in every caption; the number of captions changed.

    Captions are read as comma-separated parts (WD14 tags, or a sentence caption's clauses). A part
    equal to a removed phrase (any case) goes; otherwise the phrase is cut out of the parts that
    contain it as whole words, so "red hair" leaves "a woman with red hair" as "a woman with".
    ``add`` becomes the last part unless a part already says it: kohya's keep_tokens keeps the
    trigger word first, and shuffling moves the rest anyway.
    """
    add = add.strip()
    removed = [r.strip() for r in remove if r.strip()]
    changed = 0
    for image in images:
        before = read_caption(image)
        parts = _parts(before)
        for phrase in removed:
            pattern = re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)", re.IGNORECASE)
            kept = [p for p in parts if p.casefold() != phrase.casefold()]
            parts = [_tidy(pattern.sub(" ", p)) for p in kept]
            parts = [p for p in parts if p]
        if add and add.casefold() not in {p.casefold() for p in parts}:
            parts.append(add)
        after = ", ".join(parts)
        if after != before:
            write_caption(image, after)
            changed += 1
    return changed


def _thumbnail(path: Path) -> discord.File:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    out.seek(0)
    return discord.File(out, "page.jpg")


async def caption_page(
    bot: commands.Bot, draft: state.Draft, page: int
) -> tuple[discord.Embed, list[discord.File], discord.ui.View]:
    images = images_of(bot, draft)
    view = discord.ui.View(timeout=None)
    if not images:
        return discord.Embed(description="No images yet: post them in the thread."), [], view
    page %= len(images)
    image = images[page]
    caption = read_caption(image)
    embed = discord.Embed(
        title=clip(f"{page + 1}/{len(images)} · {image.name}", 256),
        description=clip(caption or "*(no caption)*", 4096),
    )
    embed.set_image(url="attachment://page.jpg")
    file = await asyncio.to_thread(_thumbnail, image)
    for action in ("prev", "next", "edit", "all"):
        view.add_item(CaptionButton(draft.id, action, page))
    return embed, [file], view


async def _editable(ix: discord.Interaction, draft_id: int) -> state.Draft | None:
    """The draft, when its captions may still change; otherwise say why and None."""
    draft = state.get_draft(bot_of(ix).db, draft_id)
    if draft is None or draft.job_id is not None:
        await say(ix, FROZEN if draft else "That dataset is gone.")
        return None
    return draft


async def _show(ix: discord.Interaction, draft: state.Draft, page: int, note: str | None = None) -> None:
    embed, files, view = await caption_page(bot_of(ix), draft, page)
    if note:
        embed.set_footer(text=note)
    await edit_modal_or_message(ix, embed=embed, attachments=files, view=view)


class CaptionModal(Served, discord.ui.Modal):
    def __init__(self, draft: state.Draft, page: int, image: Path):
        super().__init__(
            title=clip(f"Caption · {image.name}", 45), custom_id=f"lc:cm:{draft.id}", timeout=900
        )
        self.draft, self.page, self.image = draft, page, image
        self.text = discord.ui.TextInput(
            label="Caption",
            style=discord.TextStyle.paragraph,
            default=clip(read_caption(image), 4000),
            required=False,
            max_length=4000,
        )
        self.add_item(self.text)

    async def on_submit(self, ix: discord.Interaction) -> None:
        if draft := await _editable(ix, self.draft.id):
            await asyncio.to_thread(write_caption, self.image, self.text.value)
            await _show(ix, draft, self.page)


class ApplyAllModal(Served, discord.ui.Modal):
    def __init__(self, draft: state.Draft, page: int):
        super().__init__(title="Apply to all captions", custom_id=f"lc:ca:{draft.id}", timeout=900)
        self.draft, self.page = draft, page
        self.add = discord.ui.TextInput(label="Add (a tag or phrase)", required=False, max_length=200)
        self.remove = discord.ui.TextInput(label="Remove (a tag or phrase)", required=False, max_length=200)
        self.add_item(self.add)
        self.add_item(self.remove)

    async def on_submit(self, ix: discord.Interaction) -> None:
        draft = await _editable(ix, self.draft.id)
        if draft is None:
            return
        if not (self.add.value.strip() or self.remove.value.strip()):
            await say(ix, "Nothing to add or remove.")
            return
        images = images_of(bot_of(ix), draft)
        changed = await asyncio.to_thread(apply_to_all, images, self.add.value, [self.remove.value])
        await _show(ix, draft, self.page, f"{changed} caption(s) changed")


class CaptionButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:c:(?P<draft>\d+):(?P<action>prev|next|edit|all):(?P<page>\d+)",
):
    LABELS = {"prev": "◀", "next": "▶", "edit": "Edit", "all": "Apply to all"}

    def __init__(self, draft: int, action: str, page: int) -> None:
        button = discord.ui.Button(label=self.LABELS[action], custom_id=f"lc:c:{draft}:{action}:{page}")
        super().__init__(button)
        self.draft_id, self.action, self.page = draft, action, page

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["draft"]), match["action"], int(match["page"]))

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        draft = state.get_draft(bot.db, self.draft_id)
        if draft is None or draft.owner != member_id(ix.user):
            await say(
                ix, "Only the dataset's owner can see its captions." if draft else "That dataset is gone."
            )
            return
        if self.action in ("prev", "next"):
            await _show(ix, draft, self.page + (1 if self.action == "next" else -1))
            return
        if draft.job_id is not None:
            await say(ix, FROZEN)
            return
        if self.action == "all":
            await send_modal(ix, ApplyAllModal(draft, self.page))
            return
        images = images_of(bot, draft)
        if not images:
            await say(ix, "No images yet.")
            return
        await send_modal(ix, CaptionModal(draft, self.page % len(images), images[self.page % len(images)]))
