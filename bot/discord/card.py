"""The draft card: images, flags, settings, run length and cost, and its buttons (DraftButton)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from runner.families.registry import family as family_named
from runner.families.registry import text_encoding
from runner.spec import SpecError

from .. import jobs
from ..config import ConfigError
from ..files import dataset_images
from . import state
from .common import Served, bot_of, clip, duration, image_file, member_id, say
from .draft import RESERVED, dataset_dir, effective, parse_train, repeats, subset_dir

if TYPE_CHECKING:
    from .train import Cog


STYLES = ("tags", "sentences")  # Auto-caption's styles, as Family.caption_style names them


def run_length_text(eff: dict[str, Any], est: jobs.Estimate | None) -> str:
    """The run length as the member set it, and what it comes to once the images are counted."""
    epochs, steps = (eff["max_train_epochs"], None) if est is None else (est.epochs, est.steps)
    if est is None and not epochs:
        steps = eff["max_train_steps"]
    parts = [f"{epochs} epoch{'s' * (epochs != 1)}"] if epochs else []
    parts += [f"{steps} step{'s' * (steps != 1)}"] if steps else []
    return " · ".join(parts)


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
    res = eff.get("resolution") or (jobs.native_resolution(family),) * 2
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
        # Auto-caption in the family's style first; the other style on the second row.
        default = STYLES.index(family_named(family).caption_style)
        view.add_item(DraftButton(draft.id, "tag", default))
        for action in ("caps", "set", "start", "drop"):
            view.add_item(DraftButton(draft.id, action))
        view.add_item(DraftButton(draft.id, "tag", 1 - default))
    else:
        for action in ("caps", "drop"):  # captions stay readable, not editable
            view.add_item(DraftButton(draft.id, action))
    return embed, files, view


async def refresh_card(bot: commands.Bot, draft: state.Draft) -> None:
    if draft.card_id is None:
        return
    embed, files, view = card(bot, draft)
    message = bot.get_partial_messageable(draft.thread_id).get_partial_message(draft.card_id)
    await message.edit(embed=embed, attachments=files, view=view)


class DraftButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:d:(?P<draft>\d+):(?P<action>tag|caps|set|start|drop|apply|page)(?::(?P<arg>\d+))?",
):
    LABELS = {
        "tag": "Auto-caption",
        "caps": "Captions",
        "set": "Settings",
        "start": "Start",
        "drop": "Cancel",
        "apply": "Remove selected",
        "page": "More tags",
    }

    # Auto-caption's arg: the style, an index into STYLES (none: the family's).
    STYLE_LABELS = ("Auto-caption: tags", "Auto-caption: sentences")

    def __init__(self, draft: int, action: str, arg: int | None = None) -> None:
        style = {
            "start": discord.ButtonStyle.success,
            "drop": discord.ButtonStyle.danger,
        }.get(action, discord.ButtonStyle.secondary)
        custom_id = f"lc:d:{draft}:{action}" + (f":{arg}" if arg is not None else "")
        label = self.STYLE_LABELS[arg] if action == "tag" and arg in (0, 1) else self.LABELS[action]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=custom_id))
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
