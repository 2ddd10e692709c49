"""``/train``: a thread per LoRA with a dataset card (images, flags, contact sheet, Auto-tag,
Settings, Start, Cancel), images posted in the thread taken in, one progress message, a preview
grid per saved epoch with **Use epoch N** / **Download**, and the epoch × prompt grid at the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import re
import shutil
import time
import typing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands, tasks
from PIL import Image

from runner.cli import parse_value
from runner.data.intake import build_dataset
from runner.data.tagger import compose, split_caption
from runner.gen.grid import image_grid
from runner.spec import (
    DoneEvent,
    EpochEvent,
    FailedEvent,
    IntakeSpec,
    ProgressEvent,
    SamplesEvent,
    SpecError,
    StageEvent,
    TaggedEvent,
    TagSpec,
    TrainSpec,
    layer_settings,
    names_prompt_file,
    text_encoding,
)
from runner.train.presets import preset_settings

from .. import jobs, store
from ..config import ConfigError
from ..files import DiskFull, PathError, check_free_disk, dataset_images, member_path
from . import library, state
from .common import (
    Served,
    bar,
    bot_of,
    clip,
    defer,
    duration,
    edit_modal_or_message,
    files_or_links,
    image_file,
    member_id,
    nsfw_mode_of,
    owned_job,
    role_ids,
    say,
    send_modal,
    sentence,
    size_text,
)
from .delivery import outbox_nonce

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
PRESETS = ("character", "style", "concept")
SUBSET = "img"  # the dataset's one kohya folder is {repeats}_img
DEFAULT_REPEATS = 10
RESERVED = {"base", "output_name", "train_data_dir", "output_dir", "resume", "trigger_word", "preset"}
TAG_PAGE = 25  # Discord's limit of options in a select
_SUBSET_DIR = re.compile(rf"(\d+)_{SUBSET}")
_CHILDREN = multiprocessing.get_context("forkserver")
_CHILDREN.set_forkserver_preload(["runner.data.intake"])
_CHUNK = 1 << 16  # bytes an attachment is written to disk by, never held whole in memory
_SWEEP_MINUTES = 60
FROZEN = "Training has started: its images and captions are frozen. Start a new /train to change them."


# ---- the draft's dataset and settings ----


def dataset_dir(bot: commands.Bot, draft: state.Draft) -> Path:
    return member_path(bot.cfg.data_dir, draft.owner, "datasets", draft.dataset)


def subset_dir(folder: Path) -> Path | None:
    return next((p for p in sorted(folder.glob(f"*_{SUBSET}")) if _SUBSET_DIR.fullmatch(p.name)), None)


def repeats(draft: state.Draft) -> int:
    return int(draft.settings_dict.get("repeats", DEFAULT_REPEATS))


def effective(bot: commands.Bot, draft: state.Draft) -> tuple[dict[str, Any], str]:
    """(settings the job will train with, the base's family)."""
    s = draft.settings_dict
    family = jobs.base_family(bot.cfg.base(draft.base))
    preset = preset_settings(s.get("preset"), family) if s.get("preset") else {}
    defaults = {k: f.get_default(call_default_factory=True) for k, f in TrainSpec.model_fields.items()}
    return {**defaults, **layer_settings(preset, s.get("train", {}))}, family


def run_length_text(eff: dict[str, Any], est: jobs.Estimate | None) -> str:
    """The run length as the member set it, and what it comes to once the images are counted."""
    epochs, steps = (eff["max_train_epochs"], None) if est is None else (est.epochs, est.steps)
    if est is None and not epochs:
        steps = eff["max_train_steps"]
    parts = [f"{epochs} epoch{'s' * (epochs != 1)}"] if epochs else []
    parts += [f"{steps} step{'s' * (steps != 1)}"] if steps else []
    return " · ".join(parts)


def parse_train(bot: commands.Bot, draft: state.Draft, overrides: dict[str, Any]) -> TrainSpec:
    """Validate the overrides the way the worker will (SpecError names what is wrong)."""
    s = draft.settings_dict
    raw = {
        **overrides,
        "base": bot.cfg.base(draft.base),
        "output_name": draft.name,
        "train_data_dir": ".",
        "output_dir": ".",
        "trigger_word": s.get("trigger"),
        "preset": s.get("preset"),
    }
    return TrainSpec.parse(raw)


def card(bot: commands.Bot, draft: state.Draft) -> tuple[discord.Embed, list[discord.File], discord.ui.View]:
    folder = dataset_dir(bot, draft)
    sub = subset_dir(folder) if folder.is_dir() else None
    images, _ = dataset_images(folder) if folder.is_dir() else (0, 0)
    # The folder is renamed to the draft's repeats only at Start: count with the draft's, as the job will.
    weighted = images * repeats(draft)
    report = folder / ".intake" / "report.json"
    flags = 0
    if report.is_file():
        from runner.data.intake import IntakeReport

        flags = sum(1 for e in IntakeReport.model_validate_json(report.read_text()).entries if e.warnings)
    s = draft.settings_dict
    eff, family = effective(bot, draft)
    res = eff.get("resolution") or (jobs.NATIVE.get(family, 512),) * 2
    est, cost = None, ""
    if images:
        try:
            spec = parse_train(bot, draft, s.get("train", {}))
            est = jobs.estimate_train(bot.db, bot.cfg, spec, family, weighted)
            left = jobs.usage(bot.db, bot.cfg, draft.owner).gpu_seconds_left
            cost = f"Cost ~{duration(est.seconds)} GPU · you have {duration(left)} left today"
        except (SpecError, ConfigError) as e:
            cost = f"⚠ {e}"
    lines = [
        f"**{images}** images{f' · ⚠ {flags} flagged' if flags else ''} · ×{repeats(draft)} repeats",
        f"Base **{draft.base}** · {s.get('preset') or 'no preset'} · trigger `{s.get('trigger') or '-'}`",
        f"{run_length_text(eff, est)} · dim {eff['network_dim']}/{eff['network_alpha']:g} · "
        f"lr {eff['learning_rate']:g} · {res[0]}×{res[1]} · batch {eff['train_batch_size']}",
    ]
    if s.get("train"):
        lines.append("Set: " + ", ".join(f"`{k}={v}`" for k, v in s["train"].items()))
    try:
        encoding = text_encoding(
            parse_train(bot, draft, {k: v for k, v in eff.items() if k not in RESERVED}), family
        )
    except SpecError:
        encoding = None  # the setting at fault is named below, with the cost
    if encoding and encoding.message:
        lines.append(f"⏱ {encoding.message}")
    lines.append(cost or "Post your images here (up to 10 a message) or a .zip with captions.")
    embed = discord.Embed(title=clip(f"LoRA · {draft.name}", 256), description="\n".join(lines))
    files = []
    sheets = sorted((folder / ".intake").glob("contact_sheet*")) if folder.is_dir() else []
    # A sheet over the upload limit is left out: the card still counts the images.
    if sheets and sub is not None and sheets[0].stat().st_size <= bot.upload_limit:
        files.append(image_file(sheets[0], False, "contact" + sheets[0].suffix))
        embed.set_image(url=f"attachment://contact{sheets[0].suffix}")
    view = discord.ui.View(timeout=None)
    if draft.job_id is None:
        for action in ("tag", "set", "start", "drop"):
            view.add_item(DraftButton(draft.id, action))
    else:
        view.add_item(DraftButton(draft.id, "drop"))
    return embed, files, view


async def refresh_card(bot: commands.Bot, draft: state.Draft) -> None:
    if draft.card_id is None:
        return
    embed, files, view = card(bot, draft)
    message = bot.get_partial_messageable(draft.thread_id).get_partial_message(draft.card_id)
    await message.edit(embed=embed, attachments=files, view=view)


# ---- components ----


class DraftButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:d:(?P<draft>\d+):(?P<action>tag|set|start|drop|apply|page)(?::(?P<arg>\d+))?",
):
    LABELS = {
        "tag": "Auto-tag",
        "set": "Settings",
        "start": "Start",
        "drop": "Cancel",
        "apply": "Remove selected",
        "page": "More tags",
    }

    def __init__(self, draft: int, action: str, arg: int | None = None) -> None:
        style = {
            "start": discord.ButtonStyle.success,
            "drop": discord.ButtonStyle.danger,
        }.get(action, discord.ButtonStyle.secondary)
        custom_id = f"lc:d:{draft}:{action}" + (f":{arg}" if arg is not None else "")
        super().__init__(discord.ui.Button(label=self.LABELS[action], style=style, custom_id=custom_id))
        self.draft_id, self.action, self.arg = draft, action, arg

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["draft"]), match["action"], int(match["arg"]) if match["arg"] else None)

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        draft = state.get_draft(bot.db, self.draft_id)
        if draft is None:
            await say(ix, "That dataset no longer exists.")
            return
        if draft.owner != member_id(ix.user):
            await say(
                ix, f"Only <@{draft.owner}> can use this.", allowed_mentions=discord.AllowedMentions.none()
            )
            return
        cog: Cog = bot.get_cog("Cog_train")  # type: ignore[assignment]
        await getattr(cog, f"do_{self.action}")(ix, draft, self.arg)


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


def _summary(bot: commands.Bot, draft: state.Draft) -> TaggedEvent | None:
    job = store.get_job(bot.db, draft.tag_job_id) if draft.tag_job_id else None
    return TaggedEvent.model_validate_json(job.result) if job and job.result else None


def tag_view(draft: state.Draft, tagged: TaggedEvent | None, page: int) -> discord.ui.View:
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
            lo = library.keep_epoch(bot, job, epoch)
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


ITEMS = (DraftButton, TagSelect, JobButton, EpochSelect)


class SettingsModal(Served, discord.ui.Modal):
    def __init__(self, cog: Cog, draft: state.Draft):
        super().__init__(title="Training settings", custom_id=f"lc:m:{draft.id}", timeout=600)
        self.cog, self.draft = cog, draft
        eff, family = effective(cog.bot, draft)
        res = eff.get("resolution") or (jobs.NATIVE.get(family, 512),) * 2
        self.shown_epochs = str(eff["max_train_epochs"] or "")
        self.epochs = discord.ui.TextInput(
            label="Epochs", default=self.shown_epochs, required=False, max_length=5
        )
        self.repeats = discord.ui.TextInput(
            label="Repeats per image", default=str(repeats(draft)), max_length=4
        )
        self.dim = discord.ui.TextInput(
            label="Dim / alpha", default=f"{eff['network_dim']}/{eff['network_alpha']:g}", max_length=11
        )
        self.lr = discord.ui.TextInput(
            label="Learning rate", default=f"{eff['learning_rate']:g}", max_length=12
        )
        self.resolution = discord.ui.TextInput(label="Resolution", default=f"{res[0]}", max_length=9)
        for item in (self.epochs, self.repeats, self.dim, self.lr, self.resolution):
            self.add_item(item)

    async def on_submit(self, ix: discord.Interaction) -> None:
        dim, _, alpha = self.dim.value.partition("/")
        changes = {
            "network_dim": dim,
            "network_alpha": alpha or dim,
            "learning_rate": self.lr.value,
            "resolution": self.resolution.value,
        }
        # Epochs untouched are not set again: that would replace a max_train_steps set with /train-set.
        if self.epochs.value.strip() and self.epochs.value.strip() != self.shown_epochs:
            changes["max_train_epochs"] = self.epochs.value
        await self.cog.apply_settings(ix, self.draft.id, changes, self.repeats.value)


# ---- the cog ----


class Cog(commands.Cog, name="Cog_train"):
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

    async def _posted_earlier(self, draft: state.Draft, thread: discord.Thread) -> list[discord.Message]:
        """The owner's messages with files that on_message could not take in: the thread shows up
        in their app before the bot hears back that it made it, so they are read from its history."""
        taken = self._early[draft.id]
        found = [m async for m in thread.history(limit=100, oldest_first=True)]
        # Checked and marked with no await in between: on_message skips what is marked, and this
        # skips what on_message took in while the history was read.
        early = [m for m in found if m.author.id == int(draft.owner) and m.attachments and m.id not in taken]
        taken.update(m.id for m in early)
        # A late gateway event for one of these may still come; the marks stay for a while.
        asyncio.get_running_loop().call_later(600, self._early.pop, draft.id, None)
        return early

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
            str(a).lower() if isinstance(a, bool) else str(a) for a in _literal_values(field.annotation)
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

    async def apply_settings(
        self, ix: discord.Interaction, draft_id: int, changes: dict[str, Any], new_repeats: str | None = None
    ) -> None:
        if not ix.response.is_done():
            await defer(ix)
        draft = state.get_draft(self.bot.db, draft_id)
        if draft is None or draft.job_id is not None:
            await say(ix, "Training has started; its settings cannot change now.")
            return
        s = draft.settings_dict
        given: dict[str, Any] = {}
        for key, raw in changes.items():
            if key in RESERVED:
                await say(ix, f"`{key}` is set by /train itself.")
                return
            given[key] = parse_value(str(raw).strip())
            if key == "sample_prompts" and names_prompt_file(given[key]):
                # A path would be read on the server's disk: members write their prompts here instead.
                await say(ix, "Not changed: sample_prompts takes prompts here, not a file name.")
                return
        # What the member sets last wins: a new max_train_steps replaces an older max_train_epochs.
        train = layer_settings(s.get("train", {}), given)
        for key, value in given.items():
            if isinstance(value, str) and value.lower() == "default":
                train.pop(key)
        if new_repeats is not None:
            try:
                n = int(new_repeats)
                if not 1 <= n <= 1000:
                    raise ValueError
            except ValueError:
                await say(ix, f"Repeats must be a whole number from 1 to 1000, not '{new_repeats}'.")
                return
            s["repeats"] = n
        try:
            spec = parse_train(self.bot, draft, train)
        except (SpecError, ConfigError) as e:
            await say(ix, f"Not changed: {e}")
            return
        s["train"] = spec.model_dump(mode="json", include=set(train))  # as the worker will read them
        draft = state.update_draft(self.bot.db, draft.id, settings=s)
        await refresh_card(self.bot, draft)
        await say(ix, "Settings saved; the card shows them and the cost.")

    async def do_set(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        if draft.job_id is not None:
            await say(ix, "Training has started; its settings cannot change now.")
            return
        await send_modal(ix, SettingsModal(self, draft))

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

    async def do_tag(self, ix: discord.Interaction, draft: state.Draft, _: int | None) -> None:
        await defer(ix)
        s = draft.settings_dict
        # Checked and written in one transaction: a second tap (or a second process) finds the first job.
        try:
            with store.immediate(self.bot.db):
                if busy := self._busy(draft.id):
                    raise jobs.JobError(busy)
                job = jobs.submit_tag(
                    self.bot.db,
                    self.bot.cfg,
                    draft.owner,
                    draft.dataset,
                    {
                        "tagger": self.bot.cfg.discord.tagger,
                        "trigger_word": s.get("trigger"),
                        "preset": s.get("preset"),
                    },
                )
                state.update_draft(self.bot.db, draft.id, tag_job_id=job.id)
        except jobs.JobError as e:
            await say(ix, f"Not queued: {e}")
            return
        await say(ix, f"🏷️ Tagging queued (job #{job.id}); the tags appear in the thread.")

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
        changed = await asyncio.to_thread(
            remove_tags, dataset_dir(self.bot, draft), remove, draft.settings_dict.get("trigger")
        )
        await say(
            ix, f"Removed {len(remove)} tag(s) from {changed} caption(s); the trigger word now carries them."
        )

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
        progress = await thread.send(queued_text(self.bot, job))
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

    # ---- images posted in the thread ----

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or not message.attachments or not isinstance(message.channel, discord.Thread):
            return
        draft = state.draft_in_thread(self.bot.db, message.channel.id)
        if draft is None:
            return
        if draft.owner != member_id(message.author):
            await message.reply("Only this LoRA's owner can add images here.", mention_author=False)
            return
        if draft.job_id is not None:
            await message.reply(
                "Training has started; start a new /train to use more images.", mention_author=False
            )
            return
        taken = self._early.get(draft.id)
        if taken is not None:
            if message.id in taken:
                return
            taken.add(message.id)
        await self.take_in(draft, message.attachments, message.channel)

    async def take_in(
        self, draft: state.Draft, attachments: list[discord.Attachment], thread: discord.abc.Messageable
    ) -> None:
        lock = self._intake_locks.setdefault(draft.id, asyncio.Lock())
        async with lock:
            if state.get_draft(self.bot.db, draft.id).job_id is not None:  # Start won the lock first
                await thread.send(FROZEN)
                return
            data = self.bot.cfg.data
            try:
                check_free_disk(self.bot.cfg.data_dir, data.min_free_gb, sum(a.size for a in attachments))
            except DiskFull as e:
                await thread.send(f"Not taken in: {e}.")
                return
            uploads = member_path(self.bot.cfg.data_dir, draft.owner, "uploads", draft.dataset)
            sources, problems = [], []
            report = None
            try:
                for i, a in enumerate(attachments):
                    try:
                        path = member_path(
                            self.bot.cfg.data_dir,
                            draft.owner,
                            "uploads",
                            draft.dataset,
                            f"{a.id}-{i}",
                            a.filename,
                        )
                    except PathError:
                        path = uploads / f"{a.id}-{i}" / f"file{Path(a.filename).suffix[:8]}"
                    problem = await download(a, path, int(data.max_upload_mb * 2**20))
                    if problem:
                        problems.append(f"✗ {a.filename}: {problem}")
                    else:
                        sources.append(str(path))
                if sources:
                    _, family = effective(self.bot, draft)
                    spec = IntakeSpec(
                        sources=sources,
                        output_dir=str(dataset_dir(self.bot, draft)),
                        name=SUBSET,
                        num_repeats=repeats(draft),
                        resolution=jobs.NATIVE.get(family, 512),
                        max_images=jobs.effective_quota(
                            self.bot.db, self.bot.cfg, draft.owner
                        ).images_per_dataset,
                        max_zip_members=data.max_zip_members,
                    )
                    existing = subset_dir(dataset_dir(self.bot, draft))
                    if existing is not None and existing.name != f"{spec.num_repeats}_{SUBSET}":
                        existing.rename(existing.with_name(f"{spec.num_repeats}_{SUBSET}"))
                    try:
                        report = await in_child_process(build_dataset, spec)
                    except BrokenProcessPool:
                        log.error("draft %s: the image decoder crashed", draft.id)
                        problems.append(
                            "✗ the image reader crashed on these files, so none of them was added; "
                            "send them again as PNG or JPEG (a few at a time shows which one it is)"
                        )
            finally:
                shutil.rmtree(uploads, ignore_errors=True)
            if report is not None:
                problems += [
                    f"✗ {e.source.split('/')[-1]}: {e.reason}"
                    for e in report.entries
                    if e.status == "rejected"
                ]
                problems += [f"⚠ #{e.number}: {'; '.join(e.warnings)}" for e in report.entries if e.warnings]
            if problems:
                await thread.send(clip("Some files need a look:\n" + "\n".join(problems)))
            await refresh_card(self.bot, state.get_draft(self.bot.db, draft.id))

    # ---- drafts nobody started ----

    async def cog_load(self) -> None:
        self._sweeper.start()

    async def cog_unload(self) -> None:
        self._sweeper.cancel()

    @tasks.loop(minutes=_SWEEP_MINUTES)
    async def _sweeper(self) -> None:
        try:
            await self.sweep()
        except Exception:  # the next round tries again; the bot goes on
            log.exception("sweeping old drafts failed")

    async def sweep(self, now: float | None = None) -> int:
        """Delete drafts (files and rows) and leftover uploads older than ``[data] draft_days`` that
        were never started; returns how many drafts went."""
        cfg = self.bot.cfg
        before = (time.time() if now is None else now) - cfg.data.draft_days * 86400
        stale = state.stale_drafts(self.bot.db, before)
        for draft in stale:
            tagging = store.get_job(self.bot.db, draft.tag_job_id) if draft.tag_job_id else None
            if tagging is not None and tagging.state in store.ACTIVE:
                jobs.request_cancel(self.bot.db, tagging.id)
            await asyncio.to_thread(shutil.rmtree, dataset_dir(self.bot, draft), True)
            state.delete_draft(self.bot.db, draft.id)
            if draft.card_id is not None:
                self.bot.edits.edit(
                    draft.thread_id,
                    draft.card_id,
                    content=f"Discarded: not started within {cfg.data.draft_days:g} days. Start a new /train.",
                    embed=None,
                    attachments=[],
                    view=None,
                )
        for upload in (cfg.data_dir / "members").glob("*/uploads/*"):
            with contextlib.suppress(FileNotFoundError):  # an intake that just finished removes its own
                if upload.stat().st_mtime < before:
                    await asyncio.to_thread(shutil.rmtree, upload, True)
        if stale:
            log.info("discarded %d draft(s) not started within %g days", len(stale), cfg.data.draft_days)
        return len(stale)

    # ---- what the worker reports ----

    def edit_progress(self, draft: state.Draft, text: str) -> None:
        if draft.progress_id:
            self.bot.edits.edit(draft.thread_id, draft.progress_id, content=clip(text))

    async def on_job_event(self, job: store.Job, event: Any) -> None:
        if job.kind not in ("train", "tag"):
            return
        draft = state.draft_of_job(self.bot.db, job.id)
        if draft is None:
            return
        thread = self.bot.get_partial_messageable(draft.thread_id)
        if job.kind == "tag":
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

    async def _tag_event(self, draft: state.Draft, thread: discord.PartialMessageable, event: Any) -> None:
        if isinstance(event, FailedEvent):
            await thread.send(clip(f"Auto-tag failed: {event.reason}"), nonce=outbox_nonce())
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
        spoiler = self._spoiler(draft.thread_id)
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
        kept = state.get_lora(self.bot.db, job.owner, job.name)
        if kept is None or kept.job_id != job.id:  # the member picked nothing yet: the last one is kept
            kept = library.keep_epoch(self.bot, job, last, event.lora_file)
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
        text = (
            f"<@{job.owner}> **{draft.name}** is ready: epoch {kept.epoch} is in your library. "
            f"Pick another below, or try it: `/gen lora:{draft.name} weight:0.8`"
        ) + "".join(f"\n{u}" for u in links)
        mention = discord.AllowedMentions(users=[discord.Object(int(job.owner))])
        await thread.send(clip(text), files=files, view=view, allowed_mentions=mention, nonce=outbox_nonce())


async def download(attachment: discord.Attachment, path: Path, limit: int) -> str | None:
    """Stream one attachment to ``path`` in chunks (a 500 MB zip never sits in memory); returns
    why it was not saved, or None. discord.py's ``Attachment.save`` reads the whole file first."""
    if attachment.size > limit:
        return (
            f"{attachment.size / 2**20:.0f} MB is too large to take in (the limit is {limit / 2**20:.0f} MB)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        # No limit on the whole download (500 MB on a slow link), only on a stalled one.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(attachment.url) as response,
        ):
            response.raise_for_status()
            with open(path, "wb") as f:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    written += len(chunk)
                    if written > limit:  # the size Discord announced can be wrong; the limit holds
                        raise ValueError
                    f.write(chunk)
    except ValueError:
        path.unlink(missing_ok=True)
        return f"more than {limit / 2**20:.0f} MB; not taken in"
    except (aiohttp.ClientError, TimeoutError) as e:
        path.unlink(missing_ok=True)
        return f"could not be downloaded from Discord ({e or type(e).__name__}); send it again"
    return None


async def in_child_process(fn: Callable[[T], R], arg: T) -> R:
    """``fn(arg)`` in a fresh process: image decoders are native code, and one that crashes on a
    member's file must not take the bot (and every member's session) down with it.
    ``BrokenProcessPool`` says the child died. Children are forked from a forkserver (a small
    single-threaded process with the intake code already imported): quick to start, and never a
    fork of this threaded process, which could deadlock, nor a copy of its memory."""
    pool = ProcessPoolExecutor(1, mp_context=_CHILDREN)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, arg)
    finally:
        await asyncio.to_thread(pool.shutdown)


def queued_text(bot: commands.Bot, job: store.Job) -> str:
    where = next((p for p in jobs.plan(bot.db, bot.cfg).queued if p.job.id == job.id), None)
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


def _literal_values(annotation: Any) -> list[Any]:
    if annotation is bool:
        return [True, False]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    out = []
    for arg in typing.get_args(annotation):
        out += _literal_values(arg)
    return out
