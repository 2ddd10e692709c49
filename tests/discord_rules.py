"""Discord's limits on what a bot sends, checked the way Discord answers: Invalid Form Body (50035)
errors keyed by JSON path. Used by the Discord stub (tests/discord_stub.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import discord

MiB = 1024 * 1024
_CT = discord.ComponentType
_OT = discord.AppCommandOptionType
COMPONENTS_V2 = discord.MessageFlags.components_v2.flag
SELECT_TYPES = {
    _CT.string_select.value,
    _CT.user_select.value,
    _CT.role_select.value,
    _CT.mentionable_select.value,
    _CT.channel_select.value,
}
LABEL, FILE_UPLOAD = 18, 19  # component types newer than some discord.py enums
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")


@dataclass(frozen=True)
class Limits:
    """Discord's documented limits (developers docs: messages, components, interactions)."""

    ack_seconds: float = 3.0
    token_seconds: float = 15 * 60.0
    upload_bytes: int = 10 * MiB  # per file; sent to the bot as attachment_size_limit
    request_bytes: int = 25 * MiB
    files: int = 10
    content: int = 2000
    embeds: int = 10
    embed_total: int = 6000
    options: int = 25  # command options, choices, select options, autocomplete choices
    rows: int = 5
    row_items: int = 5
    custom_id: int = 100
    v2_components: int = 40
    modal_items: int = 5


def walk_components(components: Sequence[dict]) -> Iterator[dict]:
    for component in components:
        yield component
        yield from walk_components(component.get("components") or [])
        for key in ("component", "accessory"):
            if component.get(key):
                yield from walk_components([component[key]])


class FormErrors:
    """Invalid Form Body errors (50035) keyed by their JSON path, nested the way Discord nests them."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple, str, str]] = []

    def add(self, path: tuple, code: str, message: str) -> None:
        self.items.append((path, code, message))

    def max_len(self, path: tuple, value: Sequence | None, maximum: int) -> None:
        if value is not None and len(value) > maximum:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {maximum} or fewer in length.")

    def bad_len(self, path: tuple, value: Sequence | None, low: int, high: int) -> None:
        if not isinstance(value, str | list) or not low <= len(value) <= high:
            self.add(path, "BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length.")

    def nested(self) -> dict:
        root: dict = {}
        for path, code, message in self.items:
            node = root
            for key in path:
                node = node.setdefault(str(key), {})
            node.setdefault("_errors", []).append({"code": code, "message": message})
        return root

    def describe(self) -> str:
        return "; ".join(
            f"{'.'.join(map(str, path)) or 'body'}: {message}" for path, _, message in self.items
        )


def check_message(form: FormErrors, payload: dict, limits: Limits, path: tuple = ()) -> None:
    """Content, embed and component limits of a message payload (create, edit or callback)."""
    form.max_len((*path, "content"), payload.get("content"), limits.content)
    embeds = payload.get("embeds") or []
    form.max_len((*path, "embeds"), embeds, limits.embeds)
    total = 0
    for i, embed in enumerate(embeds):
        at = (*path, "embeds", i)
        texts = [
            (("title",), embed.get("title"), 256),
            (("description",), embed.get("description"), 4096),
            (("footer", "text"), (embed.get("footer") or {}).get("text"), 2048),
            (("author", "name"), (embed.get("author") or {}).get("name"), 256),
        ]
        fields = embed.get("fields") or []
        form.max_len((*at, "fields"), fields, 25)
        for j, item in enumerate(fields):
            texts += [
                (("fields", j, "name"), item.get("name"), 256),
                (("fields", j, "value"), item.get("value"), 1024),
            ]
        for key, text, maximum in texts:
            form.max_len((*at, *key), text, maximum)
            total += len(text or "")
    if total > limits.embed_total:
        form.add(
            (*path, "embeds"),
            "MAX_EMBED_SIZE_EXCEEDED",
            f"Embed size exceeds maximum size of {limits.embed_total}",
        )
    v2 = bool((payload.get("flags") or 0) & COMPONENTS_V2)
    if v2:
        for key in ("content", "embeds"):
            if payload.get(key):
                form.add(
                    (*path, key),
                    "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                    f"The '{key}' field cannot be used when using MessageFlags.IS_COMPONENTS_V2",
                )
    check_components(form, (*path, "components"), payload.get("components") or [], limits, v2=v2)


def check_components(
    form: FormErrors,
    path: tuple,
    components: list[dict],
    limits: Limits,
    *,
    v2: bool = False,
    modal: bool = False,
) -> None:
    seen: set[str] = set()
    count = 0

    def walk(items: list[dict], at: tuple) -> None:
        nonlocal count
        for i, c in enumerate(items):
            here = (*at, i)
            count += 1
            kind = c.get("type")
            link = kind == _CT.button.value and c.get("style") in (5, 6)  # link and premium buttons
            if kind in SELECT_TYPES | {_CT.button.value, _CT.text_input.value, FILE_UPLOAD} and not link:
                custom_id = c.get("custom_id")
                form.bad_len((*here, "custom_id"), custom_id, 1, limits.custom_id)
                if custom_id in seen:
                    form.add(
                        (*here, "custom_id"),
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        "Component custom id cannot be duplicated",
                    )
                seen.add(custom_id)
            if kind == _CT.action_row.value:
                row = c.get("components") or []
                if not row:
                    form.add((*here, "components"), "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length.")
                form.max_len((*here, "components"), row, 1 if modal else limits.row_items)
                if any(k.get("type") != _CT.button.value for k in row) and len(row) > 1:
                    form.add(
                        (*here, "components"),
                        "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                        "The specified component exceeds the maximum width",
                    )
            elif kind == _CT.button.value:
                form.max_len((*here, "label"), c.get("label"), 80)
            elif kind in SELECT_TYPES:
                options = c.get("options")
                if kind == _CT.string_select.value:
                    form.bad_len((*here, "options"), options, 1, limits.options)
                for j, option in enumerate(options or []):
                    for key in ("label", "value", "description"):
                        form.max_len((*here, "options", j, key), option.get(key), 100)
                form.max_len((*here, "placeholder"), c.get("placeholder"), 150)
                for key, low in (("min_values", 0), ("max_values", 1)):
                    value = c.get(key)
                    if value is not None and not low <= value <= limits.options:
                        form.add(
                            (*here, key), "NUMBER_TYPE_MAX", f"Must be between {low} and {limits.options}."
                        )
            elif kind == _CT.text_input.value:
                form.max_len((*here, "label"), c.get("label"), 45)
                form.max_len((*here, "placeholder"), c.get("placeholder"), 100)
                form.max_len((*here, "value"), c.get("value"), 4000)
            walk(c.get("components") or [], (*here, "components"))
            for key in ("component", "accessory"):
                if c.get(key):
                    walk([c[key]], (*here, key))

    walk(components, path)
    if v2:
        if count > limits.v2_components:
            form.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limits.v2_components} or fewer in length.")
        return
    form.max_len(path, components, limits.modal_items if modal else limits.rows)
    allowed_top = {_CT.action_row.value, LABEL, _CT.text_display.value} if modal else {_CT.action_row.value}
    for i, c in enumerate(components):
        if c.get("type") not in allowed_top:
            form.add(
                (*path, i, "type"),
                "UNION_TYPE_CHOICES",
                f'Value of field "type" must be one of {sorted(allowed_top)}.',
            )


def check_modal(form: FormErrors, data: dict, limits: Limits) -> None:
    form.bad_len(("data", "title"), data.get("title"), 1, 45)
    form.bad_len(("data", "custom_id"), data.get("custom_id"), 1, limits.custom_id)
    components = data.get("components") or []
    if not components:
        form.add(("data", "components"), "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length.")
    check_components(form, ("data", "components"), components, limits, modal=True)


def check_choices(form: FormErrors, path: tuple, choices: list[dict], limits: Limits) -> None:
    form.max_len(path, choices, limits.options)
    for i, choice in enumerate(choices):
        form.bad_len((*path, i, "name"), choice.get("name"), 1, 100)
        if isinstance(choice.get("value"), str):
            form.max_len((*path, i, "value"), choice["value"], 100)


def check_command(form: FormErrors, path: tuple, command: dict, limits: Limits) -> None:
    name = command.get("name")
    if command.get("type", 1) == discord.AppCommandType.chat_input.value:
        if not isinstance(name, str) or not COMMAND_NAME.match(name) or name != name.lower():
            form.add((*path, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        form.bad_len((*path, "description"), command.get("description"), 1, 100)
        check_options(form, (*path, "options"), command.get("options") or [], limits)
    else:
        form.bad_len((*path, "name"), name, 1, 32)
    if _command_size(command) > 4000:
        form.add(path, "APPLICATION_COMMAND_TOO_LARGE", "Command exceeds maximum size (4000)")


def check_options(form: FormErrors, path: tuple, options: list[dict], limits: Limits) -> None:
    form.max_len(path, options, limits.options)
    names: set[str] = set()
    optional_seen = False
    for i, option in enumerate(options):
        at = (*path, i)
        name = option.get("name")
        if not isinstance(name, str) or not COMMAND_NAME.match(name) or name != name.lower():
            form.add((*at, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if name in names:
            form.add(
                (*at, "name"), "APPLICATION_COMMAND_OPTION_NAME_ALREADY_EXISTS", "Option names must be unique"
            )
        names.add(name)
        form.bad_len((*at, "description"), option.get("description"), 1, 100)
        if option.get("type") in (_OT.subcommand.value, _OT.subcommand_group.value):
            check_options(form, (*at, "options"), option.get("options") or [], limits)
            continue
        if option.get("required") and optional_seen:
            form.add(
                (*at, "required"),
                "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                "Required options must be placed before non-required options",
            )
        optional_seen = optional_seen or not option.get("required")
        if option.get("choices"):
            check_choices(form, (*at, "choices"), option["choices"], limits)
            if option.get("autocomplete"):
                form.add(
                    (*at, "autocomplete"),
                    "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID",
                    "Autocomplete cannot be set with choices",
                )


def _command_size(node: dict) -> int:
    size = sum(len(str(node.get(key) or "")) for key in ("name", "description"))
    size += sum(len(c.get("name", "")) + len(str(c.get("value", ""))) for c in node.get("choices") or [])
    return size + sum(_command_size(option) for option in node.get("options") or [])
