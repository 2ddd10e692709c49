"""Training settings: the Settings modal, applying a change (modal or /train-set), a setting's values."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from runner.cli import parse_value
from runner.spec import SpecError, layer_settings, names_prompt_file

from .. import jobs
from ..config import ConfigError
from . import state
from .card import refresh_card
from .common import Served, defer, say, send_modal
from .draft import RESERVED, effective, parse_train, repeats

if TYPE_CHECKING:
    from .train import Cog


class SettingsModal(Served, discord.ui.Modal):
    def __init__(self, cog: Cog, draft: state.Draft):
        super().__init__(title="Training settings", custom_id=f"lc:m:{draft.id}", timeout=600)
        self.cog, self.draft = cog, draft
        eff, family = effective(cog.bot, draft)
        res = eff.get("resolution") or (jobs.native_resolution(family),) * 2
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


class SettingsMixin:
    """The cog's settings actions (mixed into :class:`.train.Cog`, which holds ``bot``)."""

    bot: commands.Bot

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


def literal_values(annotation: Any) -> list[Any]:
    if annotation is bool:
        return [True, False]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    out = []
    for arg in typing.get_args(annotation):
        out += literal_values(arg)
    return out
