"""``/gen``: text to image with the member's (or a shared) LoRA, and the buttons under the result:
Re-roll, Weight −/+, Info (the A1111 parameters) and Delete (owner only)."""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from runner.formats.infotext import lora_tag, parse_parameters, split_lora_tags
from runner.spec import FailedEvent, GenSampler, ImagesEvent, StageEvent

from .. import jobs, library, store
from . import loras, state
from .common import (
    Served,
    bot_of,
    clip,
    defer,
    duration,
    files_or_links,
    member_id,
    nsfw_mode,
    owned_job,
    role_ids,
    say,
    sentence,
)
from .delivery import outbox_nonce

log = logging.getLogger(__name__)
SIZES = ["512x512", "512x768", "768x512", "768x768", "1024x1024", "832x1216", "1216x832"]
WEIGHT_STEP = 0.1


def _base_name(bot: commands.Bot, base: str) -> str:
    return next((k for k, v in bot.cfg.bases.items() if v == base), base)


async def submit(
    ix: discord.Interaction,
    prompt: str,
    loras: dict[str, float],
    base: str | None,
    settings: dict[str, Any],
    button: str | None = None,
) -> None:
    """Resolve LoRA names in the library, queue the job, tell the member where it stands. ``ix`` is
    deferred. ``button``: the custom_id that asked, which queues one job per member however often
    it is tapped."""
    bot = bot_of(ix)
    me = member_id(ix.user)
    mode = nsfw_mode(bot, ix.channel)
    if mode == "refuse":
        await say(
            ix, "Images are only made in channels marked NSFW on this server. Try /gen in one of those."
        )
        return
    try:
        bare, tags = split_lora_tags(prompt)
    except ValueError as e:
        await say(ix, f"Your prompt: {e}")
        return
    wanted = {**{t.name: t.weight for t in tags}, **loras}
    resolved = []
    for name, weight in wanted.items():
        try:
            lo = library.resolve(bot.db, me, name)
        except LookupError as e:
            await say(ix, sentence(str(e)))
            return
        # The worker gets the library file's own path: names never reach its file lookup.
        resolved.append({"name": lo.path, "weight": weight})
        base = base or lo.base
    base = base or next(iter(bot.cfg.bases), "")
    try:
        with store.immediate(bot.db):  # the tap is claimed with its job, or not at all
            if button and not state.claim_tap(bot.db, button, me):
                raise jobs.JobError("this button already queued your images (a double tap?)")
            job = jobs.submit_gen(
                bot.db,
                bot.cfg,
                me,
                " ".join(bare.split()),
                base,
                {**settings, "loras": resolved},
                role_ids(ix.user),
            )
    except jobs.JobError as e:
        await say(ix, f"Not queued: {e}")
        return
    state.set_post(bot.db, job.id, ix.channel_id, None, mode == "spoiler")
    where = jobs.place(bot.db, bot.cfg, job)
    eta = f" · starts in ~{duration(where.eta_s)}" if where and where.eta_s >= 1 else ""
    await say(
        ix,
        f"🎨 Queued (job #{job.id}{f', #{where.position} in line' if where else ''}{eta}); the images come here.",
    )


class GenButton(
    Served,
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"lc:g:(?P<job>\d+):(?P<action>again|down|up|info|del)",
):
    LABELS = {"again": "🎲 Re-roll", "down": "Weight −", "up": "Weight +", "info": "Info", "del": "Delete"}

    def __init__(self, job: int, action: str) -> None:
        style = discord.ButtonStyle.danger if action == "del" else discord.ButtonStyle.secondary
        super().__init__(
            discord.ui.Button(label=self.LABELS[action], style=style, custom_id=f"lc:g:{job}:{action}")
        )
        self.job_id, self.action = job, action

    @classmethod
    async def from_custom_id(cls, ix, item, match):  # noqa: ANN001
        return cls(int(match["job"]), match["action"])

    async def callback(self, ix: discord.Interaction) -> None:
        bot = bot_of(ix)
        job = store.get_job(bot.db, self.job_id)
        if job is None or not job.result:
            await say(ix, f"Those images (job #{self.job_id}) are gone; run /gen again.")
            return
        result = ImagesEvent.model_validate_json(job.result)
        info = parse_parameters(result.parameters[0])
        if self.action == "info":
            await say(ix, f"```\n{clip(result.parameters[0], 1900)}\n```")
            return
        if self.action == "del":
            if await owned_job(ix, self.job_id, "delete") is None:
                return
            await defer(ix, update=True)
            await ix.message.delete()
            return
        await defer(ix)
        settings = info.gen_settings()
        prompt = settings.pop("prompt")
        if self.action == "again":
            settings.pop("seed", None)
        else:
            bare, tags = split_lora_tags(prompt)
            step = WEIGHT_STEP if self.action == "up" else -WEIGHT_STEP
            prompt = bare.rstrip() + "".join(f" {lora_tag(t.name, round(t.weight + step, 2))}" for t in tags)
        settings["count"] = len(result.images)
        await submit(ix, prompt, {}, _base_name(bot, job.spec_dict["base"]), settings, ix.data["custom_id"])


ITEMS = (GenButton,)


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in GenButton.LABELS:
        view.add_item(GenButton(job_id, action))
    return view


class Cog(commands.Cog, name="Cog_gen"):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    @app_commands.command(name="gen", description="Make images, with a LoRA from your library")
    @app_commands.describe(
        prompt="what to draw; <lora:name:0.8> works too",
        lora="a LoRA from your library or one shared with you",
        weight="how strongly the LoRA applies (0.8 is a good start)",
        negative="what to keep out",
        size="width x height",
        count="how many images",
        sampler="the sampler",
        base="the model (defaults to the LoRA's)",
    )
    @app_commands.choices(
        size=[app_commands.Choice(name=s, value=s) for s in SIZES],
        sampler=[app_commands.Choice(name=s, value=s) for s in GenSampler.__args__[:25]],
    )
    async def gen(
        self,
        ix: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1500],
        lora: str | None = None,
        weight: app_commands.Range[float, -2.0, 2.0] = 0.8,
        negative: app_commands.Range[str, 0, 1000] = "",
        seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        cfg: app_commands.Range[float, 1.0, 30.0] | None = None,
        size: str | None = None,
        count: app_commands.Range[int, 1, 4] = 1,
        sampler: str | None = None,
        base: str | None = None,
    ) -> None:
        await defer(ix)
        if base is not None and base not in self.bot.cfg.bases:
            await say(ix, f"Unknown model '{base}'. This server offers: {', '.join(self.bot.cfg.bases)}")
            return
        settings: dict[str, Any] = {"negative_prompt": negative, "count": count}
        for key, value in (("seed", seed), ("steps", steps), ("cfg_scale", cfg), ("sampler", sampler)):
            if value is not None:
                settings[key] = value
        if size:
            w, h = size.split("x")
            settings.update(width=int(w), height=int(h))
        await submit(ix, prompt, {lora: weight} if lora else {}, base, settings)

    gen.autocomplete("lora")(loras.lora_autocomplete)

    @gen.autocomplete("base")
    async def _bases(self, ix: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [n for n in self.bot.cfg.bases if current.casefold() in n.casefold()]
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names[:25]]

    async def on_job_event(self, job: store.Job, event: Any) -> None:
        if job.kind != "gen" or isinstance(event, StageEvent):
            return
        post = state.get_post(self.bot.db, job.id)
        if post is None:
            return  # submitted outside Discord
        channel = self.bot.get_partial_messageable(post["channel_id"])
        mention = discord.AllowedMentions(users=[discord.Object(int(job.owner))])
        if isinstance(event, FailedEvent):
            text = "was cancelled" if event.kind == "cancelled" else f"failed: {event.reason}"
            await channel.send(
                clip(f"<@{job.owner}> your images (job #{job.id}) {text}"),
                allowed_mentions=mention,
                nonce=outbox_nonce(),
            )
            return
        if not isinstance(event, ImagesEvent):
            return
        files, links = files_or_links(self.bot, event.images[:10], bool(post["spoiler"]))
        prompt = clip(parse_parameters(event.parameters[0]).prompt, 300)
        text = clip(f"<@{job.owner}> {prompt}" + "".join(f"\n{u}" for u in links))
        message = await channel.send(
            text, files=files, view=result_view(job.id), allowed_mentions=mention, nonce=outbox_nonce()
        )
        state.set_post(self.bot.db, job.id, post["channel_id"], message.id, bool(post["spoiler"]))
