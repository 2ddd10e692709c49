"""A Discord-compatible server for tests, driven by a real discord.py 2.x client.

It serves the REST routes (API v10) and the gateway (JSON, uncompressed text frames, which
discord.py accepts even when it asks for ``compress=zlib-stream``) a bot uses, on 127.0.0.1 at a
free port. A test acts as the server's members (slash commands, autocomplete, button clicks,
selects, modal submits, messages with attachments), awaits what the bot answers, and reads
everything the bot sent. Discord's rules are enforced the way Discord does (same status codes and
error JSON) and every broken rule is recorded in ``stub.violations``::

    async with DiscordStub() as stub, stub.running(bot):
        alice = stub.add_member("alice")
        ix = await stub.command(alice, "gen", {"prompt": "a cat"})
        message = await ix.original_message()
    assert stub.violations == []

Time: ``stub.clock`` runs with the real monotonic clock plus an offset that ``stub.advance(s)``
moves forward, so the 3 s acknowledgement and 15 min token rules are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import json
import math
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import discord
import yarl
from aiohttp import WSMsgType, web
from discord_rules import (
    FILE_UPLOAD,
    LABEL,
    SELECT_TYPES,
    FormErrors,
    Limits,
    check_choices,
    check_command,
    check_message,
    check_modal,
    walk_components,
)

API = "/api/v10"
GATEWAY_PATH = "/gateway-ws"
DISCORD_EPOCH_MS = 1_420_070_400_000

_IT = discord.InteractionType
_RT = discord.InteractionResponseType
_CT = discord.ComponentType
_OT = discord.AppCommandOptionType
_CH = discord.ChannelType
EPHEMERAL = discord.MessageFlags.ephemeral.flag
LOADING = discord.MessageFlags.loading.flag
ADMINISTRATOR = discord.Permissions.administrator.flag
EVERYONE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
    use_application_commands=True,
).value
ALL_PERMISSIONS = discord.Permissions.all().value
GUILDS_INTENT = discord.Intents.guilds.flag
MEMBERS_INTENT = discord.Intents.members.flag
MESSAGES_INTENT = discord.Intents.guild_messages.flag
CONTENT_INTENT = discord.Intents.message_content.flag
PRIVILEGED_INTENTS = {
    "members": MEMBERS_INTENT,
    "presences": discord.Intents.presences.flag,
    "message_content": CONTENT_INTENT,
}
THREAD_TYPES = {_CH.public_thread.value, _CH.private_thread.value, _CH.news_thread.value}
ARCHIVE_DURATIONS = {60, 1440, 4320, 10080}
# Callback types Discord accepts for each interaction type.
ALLOWED_CALLBACKS = {
    _IT.application_command.value: {4, 5, 9},
    _IT.component.value: {4, 5, 6, 7, 9},
    _IT.autocomplete.value: {8},
    _IT.modal_submit.value: {4, 5, 6, 7},
}
T = TypeVar("T")


@dataclass(frozen=True)
class Violation:
    rule: str  # short key: late_ack, double_ack, expired_token, invalid_form, too_large, …
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


@dataclass(frozen=True)
class Upload:
    """A file a member attaches (to a message, a command option or a modal)."""

    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(eq=False)
class StubUser:
    id: int
    name: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.name,
            "avatar": None,
            "bot": self.bot,
        }


@dataclass(eq=False)
class StubFile:
    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str
    description: str | None = None

    def json(self) -> dict[str, Any]:
        payload = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            payload["description"] = self.description
        return payload


@dataclass(eq=False)
class StubMessage:
    id: int
    channel_id: int
    author: StubUser
    content: str = ""
    embeds: list[dict] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    flags: int = 0
    files: list[StubFile] = field(default_factory=list)
    type: int = 0
    interaction: StubInteraction | None = None
    reference: dict | None = None
    edits: list[dict] = field(default_factory=list)  # every edit's payload, in order
    deleted: bool = False
    nonce: str | None = None
    created: float = 0.0  # stub clock
    # allowed_mentions of each payload that set content (made, or edited), in order; None where
    # none was sent, which Discord reads as "ping everyone mentioned"
    mention_rules: list[dict | None] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    def walk_components(self) -> Iterator[dict]:
        yield from walk_components(self.components)

    def component(self, custom_id: str) -> dict | None:
        return next((c for c in self.walk_components() if c.get("custom_id") == custom_id), None)

    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in self.walk_components() if "custom_id" in c]


@dataclass(eq=False)
class StubCallback:
    type: int
    data: dict | None
    files: list[StubFile]
    at: float


@dataclass(eq=False)
class StubInteraction:
    """One interaction a member started; awaitables return what the bot answered."""

    stub: DiscordStub = field(repr=False)
    id: int
    token: str
    type: int
    user: StubUser
    channel_id: int
    data: dict
    created_at: float
    message: StubMessage | None = None  # the message whose component was used
    callbacks: list[StubCallback] = field(default_factory=list)
    original: StubMessage | None = None
    followups: list[StubMessage] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)  # deadline rules already recorded

    @property
    def name(self) -> str:
        return self.data.get("name") or self.data.get("custom_id", "")

    async def ack(self, timeout: float = 5.0) -> StubCallback:
        return await self.stub.wait_until(
            lambda: self.callbacks[0] if self.callbacks else None, timeout, f"ack of {self}"
        )

    async def original_message(self, timeout: float = 5.0) -> StubMessage:
        """The response message once it shows something (a deferred one after its edit)."""
        return await self.stub.wait_until(
            lambda: self.original if self.original and not self.original.loading else None,
            timeout,
            f"response to {self}",
        )

    async def followup(self, index: int = 0, timeout: float = 5.0) -> StubMessage:
        return await self.stub.wait_until(
            lambda: self.followups[index] if len(self.followups) > index else None,
            timeout,
            f"followup {index} to {self}",
        )

    async def modal(self, timeout: float = 5.0) -> dict:
        callback = await self.ack(timeout)
        assert callback.type == _RT.modal.value, (
            f"{self} answered with callback type {callback.type}, not a modal"
        )
        return callback.data or {}

    async def choices(self, timeout: float = 5.0) -> list[dict]:
        callback = await self.ack(timeout)
        assert callback.type == _RT.autocomplete_result.value, f"{self} answered with type {callback.type}"
        return (callback.data or {}).get("choices", [])

    def __str__(self) -> str:
        return f"interaction {self.id} ({_IT(self.type).name} {self.name!r} by {self.user.name})"


class StubClock:
    """Monotonic seconds plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset


class _Refused(Exception):
    """Discord's answer to a request it refuses: status, JSON error code and message."""

    def __init__(self, status: int, code: int, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return _json(body, self.status)


def _unknown(what: str, code: int) -> _Refused:
    return _Refused(404, code, f"Unknown {what}")


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # Exactly "application/json": discord.py parses nothing else (web.json_response adds a charset).
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


@dataclass
class _Budget:
    limit: int
    per: float
    announce: bool  # send X-RateLimit-* headers so the client can pace itself
    windows: dict[str, tuple[float, int]] = field(default_factory=dict)
    blocked_until: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    ws: web.WebSocketResponse | None
    seq: int = 0
    sent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    invalid: bool = False
    dropped: bool = False  # closed by the stub, so resumable whatever code the client answers

    async def send(self, payload: dict) -> None:
        if self.ws is not None and not self.ws.closed:
            async with self.lock:
                await self.ws.send_str(json.dumps(payload))

    async def dispatch(self, event: str, data: dict) -> None:
        self.seq += 1
        payload = {"op": 0, "t": event, "s": self.seq, "d": data}
        self.sent.append(payload)
        await self.send(payload)


class DiscordStub:
    """One guild, one bot application, members and channels; see the module docstring."""

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        token: str = "stub-bot-token",
        enabled_intents: Sequence[str] = ("members", "presences", "message_content"),
        heartbeat_interval: float = 41.25,
    ) -> None:
        self.limits = limits or Limits()
        self.token = token
        self.enabled_intents = set(enabled_intents)  # privileged intents switched on in the portal
        self.heartbeat_interval = heartbeat_interval
        self.clock = StubClock()
        self.violations: list[Violation] = []
        self.rate_limited: list[str] = []  # route of every 429 served
        self.log: list[tuple[float, str, int]] = []  # (clock, "METHOD /route", status) of every REST call
        self.identifies = 0
        self.resumes = 0
        self.outage_status: int | None = None  # every REST call and gateway connect answers this
        self._outage_over = asyncio.Event()
        self._outage_over.set()
        self._gateway_down = False
        self.nonce_replays = 0  # messages not created again because their nonce was already used
        self._last_snowflake = 0
        self._changed = asyncio.Event()
        self._budgets: dict[str, _Budget] = {}
        self._sessions: list[_Session] = []
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

        self.bot = StubUser(self._snowflake(), "loracord", bot=True)
        self.application_id = self.bot.id
        self.owner = StubUser(self._snowflake(), "owner")
        self.guild_id = self._snowflake()
        self.roles: dict[int, dict] = {
            self.guild_id: {
                "id": str(self.guild_id),
                "name": "@everyone",
                "permissions": str(EVERYONE_PERMISSIONS),
                "position": 0,
            }
        }
        self.users: dict[int, StubUser] = {u.id: u for u in (self.bot, self.owner)}
        self.members: dict[int, StubUser] = dict(self.users)
        self.channels: dict[int, dict] = {}
        self.messages: dict[int, StubMessage] = {}
        self.files: dict[int, StubFile] = {}
        self.interactions: dict[int, StubInteraction] = {}
        self.commands: dict[int | None, dict[str, dict]] = {}  # guild id (None: global) → name → command
        self.thread_members: dict[int, set[int]] = collections.defaultdict(set)
        self.presences: list[dict] = []
        self.other_guilds: dict[int, int] = {}  # servers the bot was added to besides this one → a channel
        self.left_guilds: list[int] = []  # servers the bot left, in order
        self.general = self.add_channel("general")

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> DiscordStub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application(client_max_size=4 * self.limits.request_bytes, middlewares=[self._middleware])
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # aiohttp has no public accessor for port 0

    async def close(self) -> None:
        """Stops serving; interactions never acknowledged or left "thinking" count as violations."""
        self._check_deadlines(final=True)
        for session in self._sessions:
            if session.ws is not None:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE`` (the bot's ``[discord] api_base``)."""
        return self.http_url + API

    @property
    def gateway_url(self) -> str:
        """The value for ``DiscordWebSocket.DEFAULT_GATEWAY`` (the bot's ``[discord] gateway``)."""
        return f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"

    @contextlib.contextmanager
    def pointing_discord_py(self) -> Iterator[None]:
        """Points discord.py's REST base and gateway at the stub, restoring them afterwards."""
        route, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = route, gateway

    @contextlib.asynccontextmanager
    async def running(self, client: discord.Client, timeout: float = 10.0) -> AsyncIterator[discord.Client]:
        """Runs ``client`` against the stub until the block ends; yields once it is ready."""
        with self.pointing_discord_py():
            task = asyncio.create_task(client.start(self.token))
            ready = asyncio.create_task(client.wait_until_ready())
            try:
                done, _ = await asyncio.wait(
                    {task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    task.result()  # the client stopped before it was ready: raise its error
                if ready not in done:
                    raise TimeoutError(f"the client was not ready within {timeout} s")
                yield client
            finally:
                ready.cancel()
                await client.close()
                await asyncio.wait_for(task, timeout)

    # -- time and waiting --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Moves the stub's clock forward (deadlines: 3 s acknowledgements, 15 min tokens)."""
        self.clock.offset += seconds
        self._check_deadlines(final=False)
        self._touch()

    async def wait_until(
        self, predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Returns the predicate's first truthy value, re-checked whenever the stub records something."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    result = predicate()
                    if result:
                        return result
                    # Re-checked on a short beat too: predicates may read the bot's state as well.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 0.05)
        except TimeoutError:
            raise TimeoutError(f"stub: no {what} within {timeout:g} s") from None

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _violate(self, rule: str, detail: str) -> None:
        self.violations.append(Violation(rule, detail))

    def _check_deadlines(self, *, final: bool) -> None:
        now = self.clock.now()
        for ix in self.interactions.values():
            age = now - ix.created_at
            if not ix.callbacks and (final or age > self.limits.ack_seconds) and "late_ack" not in ix.flagged:
                ix.flagged.add("late_ack")
                self._violate("late_ack", f"{ix} was not acknowledged within {self.limits.ack_seconds:g} s")
            thinking = ix.original is not None and ix.original.loading
            if thinking and (final or age > self.limits.token_seconds) and "thinking" not in ix.flagged:
                ix.flagged.add("thinking")
                self._violate(
                    "left_thinking", f"{ix} was deferred and never answered (the member sees 'thinking…')"
                )

    # -- the world: members, roles, channels --------------------------------------------------

    def _snowflake(self) -> int:
        value = (int(self.clock.wall() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_snowflake = max(value, self._last_snowflake + 1)
        return self._last_snowflake

    def add_role(self, name: str, permissions: discord.Permissions | int = 0) -> int:
        role_id = self._snowflake()
        value = permissions.value if isinstance(permissions, discord.Permissions) else permissions
        self.roles[role_id] = {
            "id": str(role_id),
            "name": name,
            "permissions": str(value),
            "position": len(self.roles),
        }
        self._spawn(
            self._dispatch(
                "GUILD_ROLE_CREATE",
                {"guild_id": str(self.guild_id), "role": self.roles[role_id]},
                GUILDS_INTENT,
            )
        )
        return role_id

    def add_member(self, name: str, *, roles: Sequence[int] = ()) -> StubUser:
        user = StubUser(self._snowflake(), name, role_ids=list(roles))
        self.users[user.id] = self.members[user.id] = user
        self._spawn(
            self._dispatch(
                "GUILD_MEMBER_ADD",
                {**self._member_json(user), "guild_id": str(self.guild_id)},
                MEMBERS_INTENT,
            )
        )
        return user

    def add_channel(self, name: str, *, nsfw: bool = False) -> int:
        channel_id = self._snowflake()
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": _CH.text.value,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": len(self.channels),
            "nsfw": nsfw,
            "topic": None,
            "parent_id": None,
            "permission_overwrites": [],
            "rate_limit_per_user": 0,
            "last_message_id": None,
        }
        self._spawn(self._dispatch("CHANNEL_CREATE", self.channels[channel_id], GUILDS_INTENT))
        return channel_id

    def add_guild(self, name: str) -> int:
        """Someone adds the bot to another server (with one text channel, ``other_guilds[id]``; it
        stays there after the bot leaves, for interactions an app gets without its bot user)."""
        guild_id, channel_id = self._snowflake(), self._snowflake()
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": _CH.text.value,
            "guild_id": str(guild_id),
            "name": "general",
            "position": 0,
            "nsfw": False,
            "parent_id": None,
            "permission_overwrites": [],
            "last_message_id": None,
        }
        self.other_guilds[guild_id] = channel_id
        # Without "unavailable": a server just joined, not one coming back after an outage.
        joined = {k: v for k, v in self._other_guild_json(guild_id).items() if k != "unavailable"}
        self._spawn(self._dispatch("GUILD_CREATE", joined, GUILDS_INTENT))
        return guild_id

    def channel_id(self, name: str) -> int:
        return next(int(c["id"]) for c in self.channels.values() if c.get("name") == name)

    def permissions(self, user: StubUser) -> int:
        if user.id == self.owner.id:
            return ALL_PERMISSIONS
        value = 0
        for role_id in (self.guild_id, *user.role_ids):
            value |= int(self.roles[role_id]["permissions"])
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def channel_messages(self, channel_id: int, *, include_deleted: bool = False) -> list[StubMessage]:
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and (include_deleted or not m.deleted)
        ]

    def threads(self) -> list[dict]:
        return [c for c in self.channels.values() if c["type"] in THREAD_TYPES]

    def rate_limit(self, route: str, *, limit: int = 1, per: float = 1.0, announce: bool = True) -> None:
        """Allows ``limit`` requests per ``per`` seconds on ``route`` (e.g. ``"POST /channels/{channel_id}/messages"``,
        the way discord.py writes routes) for each channel/guild/webhook; the rest get 429. With
        ``announce=False`` no X-RateLimit headers come first, so the client meets the 429 itself."""
        self._budgets[route] = _Budget(limit, per, announce)

    # -- acting as members --------------------------------------------------------------------

    async def command(
        self,
        user: StubUser,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        channel_id: int | None = None,
        guild_id: int | None = None,
    ) -> StubInteraction:
        """A member runs a synced slash command (``"admin pause"`` for a subcommand); option values are
        str/int/float/bool, :class:`Upload` (attachment), :class:`StubUser` (user) or ids (channel, role).
        Raises what the member's Discord app would refuse: unknown command, missing permission,
        missing required option, a value outside the choices or bounds. ``guild_id``: one of
        ``other_guilds``, where the command is used in that server's channel (global commands only)."""
        if guild_id is not None:
            channel_id = self.other_guilds[guild_id]
        channel_id = channel_id or self.general
        data = self._command_data(
            user, name, options or {}, focused=None, channel_id=channel_id, guild_id=guild_id
        )
        return await self._interact(_IT.application_command, user, channel_id, data, guild_id=guild_id)

    async def autocomplete(
        self,
        user: StubUser,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        channel_id: int | None = None,
    ) -> StubInteraction:
        """A member types into option ``focused`` (its partial text is ``options[focused]``)."""
        data = self._command_data(user, name, options, focused=focused, channel_id=channel_id or self.general)
        return await self._interact(_IT.autocomplete, user, channel_id or self.general, data)

    async def click(self, user: StubUser, message: StubMessage, custom_id: str) -> StubInteraction:
        component = self._usable_component(user, message, custom_id, {_CT.button.value})
        data = {"custom_id": custom_id, "component_type": component["type"]}
        return await self._interact(_IT.component, user, message.channel_id, data, message=message)

    async def select(
        self, user: StubUser, message: StubMessage, custom_id: str, values: Sequence[str]
    ) -> StubInteraction:
        component = self._usable_component(user, message, custom_id, SELECT_TYPES)
        low, high = component.get("min_values", 1), component.get("max_values", 1)
        if not low <= len(values) <= high:
            raise ValueError(f"select {custom_id!r} takes {low}–{high} values, not {len(values)}")
        allowed = {o["value"] for o in component.get("options") or []}
        if component["type"] == _CT.string_select.value and not set(values) <= allowed:
            raise ValueError(f"select {custom_id!r} has no option(s) {sorted(set(values) - allowed)}")
        data = {"custom_id": custom_id, "component_type": component["type"], "values": list(values)}
        return await self._interact(_IT.component, user, message.channel_id, data, message=message)

    async def submit_modal(
        self, user: StubUser, opened_by: StubInteraction, values: Mapping[str, Any]
    ) -> StubInteraction:
        """A member fills in the modal the bot answered ``opened_by`` with, ``values`` keyed by
        custom_id or label: text inputs take str, selects a list of values, file uploads a list of
        :class:`Upload`. Raises what the Discord app would refuse (length, required)."""
        modal = await opened_by.modal()
        if user is not opened_by.user:
            raise PermissionError(f"only {opened_by.user.name} sees the modal of {opened_by}")
        resolved: dict[str, dict] = {}
        unused = dict(values)

        def submitted(c: dict, label: str | None) -> dict:
            custom_id, kind = c.get("custom_id"), c["type"]
            key = custom_id if custom_id in values else label
            given = unused.pop(key, None)
            if kind == _CT.text_input.value:
                value = str(given if given is not None else c.get("value") or "")
                required = c.get("required", True)
                low, high = max(c.get("min_length", 0), 1 if required else 0), c.get("max_length", 4000)
                if (value or required) and not low <= len(value) <= high:
                    raise ValueError(
                        f"text input {custom_id!r} takes {low}–{high} characters, got {len(value)}"
                    )
                return {"type": kind, "custom_id": custom_id, "value": value}
            chosen = list(given or [])
            if kind == FILE_UPLOAD:
                files = [self._store_file(opened_by.channel_id, upload) for upload in chosen]
                resolved.setdefault("attachments", {}).update({str(f.id): f.json() for f in files})
                chosen = [str(f.id) for f in files]
            if kind not in SELECT_TYPES | {FILE_UPLOAD}:
                raise ValueError(f"the stub cannot fill modal component type {kind}")
            return {"type": kind, "custom_id": custom_id, "values": chosen}

        components = []
        for top in modal.get("components", []):
            if top["type"] == _CT.action_row.value:
                inner = [submitted(c, c.get("label")) for c in top["components"]]
                components.append({"type": top["type"], "components": inner})
            elif top["type"] == LABEL:
                components.append({"type": LABEL, "component": submitted(top["component"], top.get("label"))})
        if unused:
            raise ValueError(f"the modal has no input(s) {sorted(unused)}")
        data = {"custom_id": modal["custom_id"], "components": components, "resolved": resolved}
        return await self._interact(
            _IT.modal_submit, user, opened_by.channel_id, data, message=opened_by.message
        )

    async def post_message(
        self, user: StubUser, channel_id: int, content: str = "", *, files: Sequence[Upload] = ()
    ) -> StubMessage:
        """A member posts a message (up to 10 files, as the Discord app allows)."""
        if len(files) > self.limits.files:
            raise ValueError(f"a member cannot attach more than {self.limits.files} files")
        channel = self._channel(channel_id)
        self._unarchive(channel)
        stored = [self._store_file(channel_id, f) for f in files]
        message = StubMessage(self._snowflake(), channel_id, user, content=content, files=stored)
        await self._publish(message)
        return message

    def drop_connection(self) -> None:
        """Closes the bot's gateway connection as Discord does on a hiccup; the session stays resumable."""
        for session in self._sessions:
            if session.ws is not None and not session.invalid:
                session.dropped = True
                self._spawn(session.ws.close(code=4000, message=b"stub: connection dropped"))

    def begin_outage(self, status: int | None = 503, *, gateway: bool = True) -> None:
        """Discord goes down until :meth:`end_outage`: every REST call (and, with ``gateway``, the
        gateway connection, which drops, and every reconnect) answers ``status`` (503 as from
        Cloudflare, 502, 500), or with ``None`` hangs unanswered until the outage ends."""
        self.outage_status = status
        self._outage_over.clear()
        self._gateway_down = gateway
        if gateway:
            self.drop_connection()

    def end_outage(self) -> None:
        self.outage_status = None
        self._gateway_down = False
        self._outage_over.set()

    def _usable_component(
        self, user: StubUser, message: StubMessage, custom_id: str, kinds: set[int]
    ) -> dict:
        if message.deleted:
            raise LookupError(f"message {message.id} was deleted")
        if message.ephemeral and message.interaction is not None and message.interaction.user is not user:
            raise PermissionError(
                f"message {message.id} is ephemeral: only {message.interaction.user.name} sees it"
            )
        component = message.component(custom_id)
        if component is None or component["type"] not in kinds:
            raise LookupError(
                f"message {message.id} has no such component {custom_id!r}: {message.custom_ids()}"
            )
        if component.get("disabled"):
            raise PermissionError(f"component {custom_id!r} is disabled")
        return component

    def _command_data(
        self,
        user: StubUser,
        name: str,
        options: Mapping[str, Any],
        *,
        focused: str | None,
        channel_id: int,
        guild_id: int | None = None,
    ) -> dict:
        top, *path = name.split()
        guild_commands = self.commands.get(guild_id or self.guild_id, {})
        command = guild_commands.get(top) or self.commands.get(None, {}).get(top)
        if command is None:
            raise LookupError(f"/{top} is not synced: the member's Discord app does not offer it")
        required = command.get("default_member_permissions")
        if required is not None and self.permissions(user) & int(required) != int(required):
            raise PermissionError(f"{user.name} lacks the permissions /{top} needs: the app does not show it")
        channel = self._channel(channel_id)
        if channel["type"] in THREAD_TYPES and channel["thread_metadata"]["archived"]:
            raise PermissionError("application commands do not work in archived threads")
        data = {"id": command["id"], "name": top, "type": command.get("type", 1), "resolved": {}}
        if top in guild_commands:
            data["guild_id"] = str(guild_id or self.guild_id)
        holder, node = data, command
        for part in path:
            node = next((o for o in node.get("options") or [] if o["name"] == part), None)
            if node is None or node["type"] not in (_OT.subcommand.value, _OT.subcommand_group.value):
                raise LookupError(f"/{name}: {part!r} is not a subcommand")
            holder["options"] = [{"name": part, "type": node["type"]}]
            holder = holder["options"][0]
        defined = {o["name"]: o for o in node.get("options") or []}
        unknown = set(options) - set(defined)
        if unknown:
            raise ValueError(f"/{name} has no option(s) {sorted(unknown)}; it has {sorted(defined)}")
        missing = [n for n, o in defined.items() if o.get("required") and n not in options]
        if missing and focused is None:
            raise ValueError(f"/{name} needs option(s) {missing}")
        if focused is not None and not defined.get(focused, {}).get("autocomplete"):
            raise ValueError(f"option {focused!r} of /{name} has no autocomplete")
        holder["options"] = []
        for option_name, value in options.items():
            option = {"name": option_name, "type": defined[option_name]["type"]}
            if option_name == focused:
                option.update(value=str(value), focused=True)
            else:
                option["value"] = self._option_value(
                    defined[option_name], value, data["resolved"], channel_id
                )
            holder["options"].append(option)
        return data

    def _option_value(self, definition: dict, value: Any, resolved: dict, channel_id: int) -> Any:
        kind, name = definition["type"], definition["name"]
        expected: dict[int, type | tuple[type, ...]] = {
            _OT.string.value: str,
            _OT.integer.value: int,
            _OT.number.value: (int, float),
            _OT.boolean.value: bool,
            _OT.attachment.value: Upload,
            _OT.user.value: StubUser,
            _OT.channel.value: int,
            _OT.role.value: int,
        }
        if kind in expected and not isinstance(value, expected[kind]):
            raise TypeError(f"option {name!r} takes {expected[kind]}, not {type(value).__name__}")
        if kind == _OT.attachment.value:
            stored = self._store_file(channel_id, value)
            resolved.setdefault("attachments", {})[str(stored.id)] = stored.json()
            return str(stored.id)
        if kind == _OT.user.value:
            resolved.setdefault("users", {})[str(value.id)] = value.json()
            member = {k: v for k, v in self._member_json(value).items() if k != "user"}
            resolved.setdefault("members", {})[str(value.id)] = {
                **member,
                "permissions": str(self.permissions(value)),
            }
            return str(value.id)
        if kind == _OT.channel.value:
            resolved.setdefault("channels", {})[str(value)] = self._channel(value)
            return str(value)
        if kind == _OT.role.value:
            resolved.setdefault("roles", {})[str(value)] = self.roles[value]
            return str(value)
        choices = definition.get("choices")
        if choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {name!r} takes one of {[c['value'] for c in choices]}, not {value!r}")
        low, high = definition.get("min_value"), definition.get("max_value")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"option {name!r} takes {low}–{high}, not {value}")
        if isinstance(value, str):
            low, high = definition.get("min_length", 0), definition.get("max_length", 6000)
            if not low <= len(value) <= high:
                raise ValueError(f"option {name!r} takes {low}–{high} characters")
        return value

    async def _interact(
        self,
        kind: _IT,
        user: StubUser,
        channel_id: int,
        data: dict,
        *,
        message: StubMessage | None = None,
        guild_id: int | None = None,
    ) -> StubInteraction:
        if not any(s.ws is not None and not s.invalid for s in self._sessions):
            raise RuntimeError("no bot is connected to the stub's gateway")
        ix = StubInteraction(
            self,
            self._snowflake(),
            "ix-" + secrets.token_urlsafe(24),
            kind.value,
            user,
            channel_id,
            data,
            self.clock.now(),
            message=message,
        )
        self.interactions[ix.id] = ix
        payload = {
            "id": str(ix.id),
            "application_id": str(self.application_id),
            "type": ix.type,
            "data": data,
            "guild_id": str(guild_id or self.guild_id),
            "guild": {"id": str(guild_id or self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(channel_id),
            "channel": self._channel(channel_id),
            "member": {**self._member_json(user), "permissions": str(self.permissions(user))},
            "token": ix.token,
            "version": 1,
            "app_permissions": str(ALL_PERMISSIONS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or self.guild_id)},
            "context": 0,
            "attachment_size_limit": self.limits.upload_bytes,
        }
        if message is not None:
            payload["message"] = self._message_json(message)
        await self._dispatch("INTERACTION_CREATE", payload, None)
        return ix

    # -- JSON views ---------------------------------------------------------------------------

    def _member_json(self, user: StubUser) -> dict:
        return {
            "user": user.json(),
            "roles": [str(r) for r in user.role_ids],
            "nick": None,
            "avatar": None,
            "joined_at": dt.datetime.fromtimestamp(DISCORD_EPOCH_MS / 1000, dt.UTC).isoformat(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
        }

    def _message_json(self, message: StubMessage) -> dict:
        snowflake_ms = (message.id >> 22) + DISCORD_EPOCH_MS
        payload = {
            "id": str(message.id),
            "channel_id": str(message.channel_id),
            "guild_id": str(self.guild_id),
            "author": message.author.json(),
            "content": message.content,
            "timestamp": dt.datetime.fromtimestamp(snowflake_ms / 1000, dt.UTC).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [f.json() for f in message.files],
            "embeds": message.embeds,
            "components": message.components,
            "pinned": False,
            "type": message.type,
            "flags": message.flags,
        }
        if self.channels.get(message.channel_id, {}).get("type") == _CH.private.value:
            del payload["guild_id"]  # a DM
        elif message.author is not self.bot:
            payload["member"] = {k: v for k, v in self._member_json(message.author).items() if k != "user"}
        if message.interaction is not None:
            ix = message.interaction
            payload.update(webhook_id=str(self.application_id), application_id=str(self.application_id))
            payload["interaction_metadata"] = {
                "id": str(ix.id),
                "type": ix.type,
                "user": ix.user.json(),
                "authorizing_integration_owners": {"0": str(self.guild_id)},
            }
        if message.reference is not None:
            payload["message_reference"] = message.reference
        return payload

    def _visible_json(self, message: StubMessage, session: _Session) -> dict:
        """What a session receives: without the message-content intent, content and attachments
        of others' messages that do not mention the bot arrive empty."""
        payload = self._message_json(message)
        mentioned = f"<@{self.bot.id}>" in message.content
        if not session.intents & CONTENT_INTENT and message.author is not self.bot and not mentioned:
            payload.update(content="", embeds=[], attachments=[], components=[])
        return payload

    # -- gateway ------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        if self._runner is None:
            coro.close()  # not serving yet: GUILD_CREATE will carry the change
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, event: str, data: dict, intent: int | None) -> None:
        for session in self._sessions:
            if not session.invalid and (intent is None or session.intents & intent):
                await session.dispatch(event, data)

    async def _publish(self, message: StubMessage) -> None:
        """Stores a new message and tells the gateway, as Discord does for every non-ephemeral message."""
        self.messages[message.id] = message
        channel = self.channels.get(message.channel_id)
        if channel is not None:
            channel["last_message_id"] = str(message.id)
            if channel["type"] in THREAD_TYPES:
                channel["message_count"] += 1
        self._touch()
        if not message.ephemeral:
            for session in self._sessions:
                if not session.invalid and session.intents & MESSAGES_INTENT:
                    await session.dispatch("MESSAGE_CREATE", self._visible_json(message, session))

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self._gateway_down and self.outage_status is not None:
            return web.Response(status=self.outage_status, text="upstream connect error")
        if self._gateway_down:
            await self._outage_over.wait()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"the stub speaks JSON only")
            return ws
        await ws.send_str(
            json.dumps({"op": 10, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000)}})
        )
        session: _Session | None = None
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            op, data = frame.get("op"), frame.get("d")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                session = await self._identify(ws, data)
            elif op == 6:
                session = await self._resume(ws, data)
            elif op == 3:
                self.presences.append(data)
            elif op == 8 and session is not None:
                members = [self._member_json(u) for u in self.members.values()]
                chunk = {
                    "guild_id": str(self.guild_id),
                    "members": members,
                    "chunk_index": 0,
                    "chunk_count": 1,
                }
                if data.get("nonce"):
                    chunk["nonce"] = data["nonce"]
                await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)
        if session is not None and session.ws is ws:
            session.ws = None
            # A client's clean close ends the session.
            session.invalid = not session.dropped and ws.close_code in (1000, 1001)
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict) -> _Session | None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        intents = data.get("intents")
        if intents is None:
            await ws.close(code=4013, message=b"Invalid intent(s).")
            return None
        disallowed = [
            n for n, flag in PRIVILEGED_INTENTS.items() if intents & flag and n not in self.enabled_intents
        ]
        if disallowed:
            await ws.close(code=4014, message=f"Disallowed intent(s): {disallowed}".encode())
            return None
        self.identifies += 1
        session = _Session(secrets.token_hex(16), intents, ws)
        self._sessions.append(session)
        ready = {
            "v": 10,
            "user": self.bot.json(),
            "guilds": [
                {"id": str(g), "unavailable": True}
                for g in (self.guild_id, *self.other_guilds)
                if g not in self.left_guilds
            ],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
        }
        if data.get("shard"):
            ready["shard"] = data["shard"]
        await session.dispatch("READY", ready)
        await session.dispatch("GUILD_CREATE", self._guild_json(intents))
        for guild_id in self.other_guilds.keys() - set(self.left_guilds):
            await session.dispatch("GUILD_CREATE", self._other_guild_json(guild_id))
        self._touch()
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict) -> _Session | None:
        session = next((s for s in self._sessions if s.id == data.get("session_id") and not s.invalid), None)
        if session is None or data.get("token") != self.token:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return None
        self.resumes += 1
        session.ws, session.dropped = ws, False
        for payload in list(session.sent):
            if payload["s"] > (data.get("seq") or 0):
                await session.send(payload)
        await session.dispatch("RESUMED", {})
        self._touch()
        return session

    def _guild_json(self, intents: int) -> dict:
        members = self.members.values() if intents & MEMBERS_INTENT else [self.bot]
        return {
            "id": str(self.guild_id),
            "name": "Stub Server",
            "owner_id": str(self.owner.id),
            "unavailable": False,
            "large": False,
            "member_count": len(self.members),
            "joined_at": dt.datetime.fromtimestamp(self.clock.wall(), dt.UTC).isoformat(),
            "roles": list(self.roles.values()),
            "channels": [
                c
                for c in self.channels.values()
                if c["type"] not in THREAD_TYPES | {_CH.private.value} and c["guild_id"] == str(self.guild_id)
            ],
            "threads": [t for t in self.threads() if not t["thread_metadata"]["archived"]],
            "members": [self._member_json(u) for u in members],
            "emojis": [],
            "stickers": [],
            "features": [],
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "voice_states": [],
            "presences": [],
        }

    def _other_guild_json(self, guild_id: int) -> dict:
        """Another server: only its @everyone role, one channel and the bot as a member."""
        everyone = {
            "id": str(guild_id),
            "name": "@everyone",
            "permissions": str(EVERYONE_PERMISSIONS),
            "position": 0,
        }
        return {
            **self._guild_json(0),
            "id": str(guild_id),
            "name": f"Server {guild_id}",
            "member_count": 1,
            "roles": [everyone],
            "channels": [self.channels[self.other_guilds[guild_id]]],
            "threads": [],
            "members": [self._member_json(self.bot)],
        }

    # -- REST plumbing ------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        routes = [
            ("GET", "/users/@me", self._get_me),
            ("GET", "/users/{user_id}", self._get_user),
            ("POST", "/users/@me/channels", self._open_dm),
            ("DELETE", "/users/@me/guilds/{guild_id}", self._leave_guild),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway),
            ("GET", "/applications/{application_id}/commands", self._get_commands),
            ("PUT", "/applications/{application_id}/commands", self._put_commands),
            ("POST", "/applications/{application_id}/commands", self._post_command),
            ("GET", "/applications/{application_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", "/applications/{application_id}/guilds/{guild_id}/commands", self._post_command),
            ("GET", "/guilds/{guild_id}", self._get_guild),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/roles", self._get_roles),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("PATCH", "/channels/{channel_id}", self._patch_channel),
            ("GET", "/channels/{channel_id}/messages", self._get_messages),
            ("POST", "/channels/{channel_id}/messages", self._post_message),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._patch_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message),
            ("POST", "/channels/{channel_id}/messages/{message_id}/threads", self._thread_from_message),
            ("POST", "/channels/{channel_id}/threads", self._thread_without_message),
            ("PUT", "/channels/{channel_id}/thread-members/{user_id}", self._join_thread),
            ("DELETE", "/channels/{channel_id}/thread-members/{user_id}", self._leave_thread),
            ("POST", "/interactions/{webhook_id}/{webhook_token}/callback", self._callback),
            ("POST", "/webhooks/{webhook_id}/{webhook_token}", self._post_followup),
            (
                "GET",
                "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}",
                self._get_webhook_message,
            ),
            (
                "PATCH",
                "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}",
                self._patch_webhook_message,
            ),
            (
                "DELETE",
                "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}",
                self._delete_webhook_message,
            ),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, API + path, handler)
        app.router.add_get(GATEWAY_PATH, self._gateway)
        app.router.add_get("/attachments/{channel_id}/{file_id}/{filename}", self._download)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            self._violate("stub_missing_route", f"{request.method} {request.path} is not served by the stub")
            return _json({"message": "404: Not Found", "code": 0}, 404)
        template = request.match_info.route.resource.canonical
        if not template.startswith(API):
            return await handler(request)
        route = f"{request.method} {template[len(API) :]}"
        if self.outage_status is not None:
            self.log.append((self.clock.now(), route, self.outage_status))
            return web.Response(status=self.outage_status, text="upstream connect error")
        await self._outage_over.wait()
        webhook = template.startswith((API + "/interactions/", API + "/webhooks/"))
        headers: dict[str, str] = {}
        try:
            if not webhook and request.headers.get("Authorization") != f"Bot {self.token}":
                raise _Refused(401, 0, "401: Unauthorized")
            headers = self._spend_budget(route, request.match_info)
            response = await handler(request)
        except _Refused as refused:
            response = refused.response()
        response.headers.update(headers)
        self.log.append((self.clock.now(), route, response.status))
        self._touch()
        return response

    def _spend_budget(self, route: str, params: Mapping[str, str]) -> dict[str, str]:
        budget = self._budgets.get(route)
        if budget is None:
            return {}
        majors = [params.get(k, "") for k in ("channel_id", "guild_id", "webhook_id", "webhook_token")]
        bucket = route + ":" + "+".join(majors)
        now = self.clock.now()
        if now < budget.blocked_until.get(bucket, 0.0) - 0.001:
            self._violate("ignored_rate_limit", f"{route} sent again before its retry_after ran out")
        start, count = budget.windows.get(bucket, (now, 0))
        if now >= start + budget.per:
            start, count = now, 0
        count += 1
        budget.windows[bucket] = (start, count)
        reset_after = math.ceil((start + budget.per - now) * 1000) / 1000
        headers = {}
        if budget.announce or count > budget.limit:
            headers = {
                "X-RateLimit-Limit": str(budget.limit),
                "X-RateLimit-Remaining": str(max(budget.limit - count, 0)),
                "X-RateLimit-Reset": f"{self.clock.wall() + reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                "X-RateLimit-Bucket": hashlib.sha1(route.encode()).hexdigest()[:16],
            }
        if count <= budget.limit:
            return headers
        budget.blocked_until[bucket] = start + budget.per
        self.rate_limited.append(route)
        body = {"message": "You are being rate limited.", "retry_after": reset_after, "global": False}
        extra = {"Retry-After": str(math.ceil(reset_after)), "X-RateLimit-Scope": "user", "Via": "1.1 google"}
        raise _RateLimited(_json(body, 429, {**headers, **extra}))

    async def _body(self, request: web.Request) -> tuple[dict, list[Upload]]:
        """JSON body, or multipart ``payload_json`` + ``files[n]``; refuses what Discord refuses by size."""
        if not request.content_type.startswith("multipart/"):
            raw = await request.read()
            return (json.loads(raw) if raw else {}), []
        payload: dict = {}
        uploads: dict[int, Upload] = {}
        total = 0
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = await part.read()
            total += len(data)
            if part.name == "payload_json":
                payload = json.loads(data)
            elif part.name and (index := re.fullmatch(r"files\[(\d+)\]", part.name)):
                uploads[int(index[1])] = Upload(
                    part.filename or "file", bytes(data), part.headers.get("Content-Type")
                )
        too_big = [u for u in uploads.values() if len(u.data) > self.limits.upload_bytes]
        if too_big or total > self.limits.request_bytes:
            what = (
                ", ".join(f"{u.filename} ({len(u.data)} bytes)" for u in too_big)
                or f"request of {total} bytes"
            )
            self._violate(
                "too_large",
                f"{what} over the limit ({self.limits.upload_bytes} bytes a file, {self.limits.request_bytes} a request)",
            )
            raise _Refused(413, 40005, "Request entity too large")
        return payload, [uploads[i] for i in sorted(uploads)]

    def _refuse_form(self, form: FormErrors, what: str) -> None:
        if form.items:
            self._violate("invalid_form", f"{what}: {form.describe()}")
            raise _Refused(400, 50035, "Invalid Form Body", form.nested())

    def _store_file(self, channel_id: int, upload: Upload, description: str | None = None) -> StubFile:
        file_id = self._snowflake()
        content_type = upload.content_type
        if content_type in (None, "application/octet-stream"):
            content_type = mimetypes.guess_type(upload.filename)[0] or content_type
        url = f"{self.http_url}/attachments/{channel_id}/{file_id}/{quote(upload.filename)}"
        stored = StubFile(file_id, upload.filename, upload.data, content_type, url, description)
        self.files[file_id] = stored
        return stored

    def _channel(self, channel_id: int | str) -> dict:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise _unknown("Channel", 10003)
        return channel

    def _message(self, channel_id: int | str, message_id: int | str) -> StubMessage:
        message = self.messages.get(int(message_id))
        if message is None or message.deleted or message.channel_id != int(channel_id):
            raise _unknown("Message", 10008)
        return message

    def _unarchive(self, channel: dict) -> None:
        """Posting in an archived thread reopens it, unless it is locked."""
        meta = channel.get("thread_metadata")
        if meta and meta["archived"]:
            if meta["locked"]:
                raise _Refused(400, 50083, "Thread is archived")
            meta["archived"] = False
            self._spawn(self._dispatch("THREAD_UPDATE", channel, GUILDS_INTENT))

    def _message_form(self, payload: dict, files: int, what: str, *, creating: bool) -> None:
        form = FormErrors()
        check_message(form, payload, self.limits)
        form.max_len(("attachments",), [None] * files, self.limits.files)
        self._refuse_form(form, what)
        has_body = payload.get("content") or payload.get("embeds") or payload.get("components")
        if creating and not (has_body or files or payload.get("sticker_ids") or payload.get("poll")):
            self._violate("empty_message", f"{what}: nothing to show")
            raise _Refused(400, 50006, "Cannot send an empty message")

    def _new_message(
        self,
        channel_id: int,
        payload: dict,
        uploads: list[Upload],
        *,
        interaction: StubInteraction | None = None,
    ) -> StubMessage:
        self._message_form(payload, len(uploads), f"message in {channel_id}", creating=True)
        descriptions = {
            int(a["id"]): a.get("description")
            for a in payload.get("attachments") or []
            if str(a.get("id")).isdigit()
        }
        files = [self._store_file(channel_id, u, descriptions.get(i)) for i, u in enumerate(uploads)]
        kind = 0
        if payload.get("message_reference"):
            kind = 19
        elif interaction is not None and interaction.type == _IT.application_command.value:
            kind = 20
        return StubMessage(
            self._snowflake(),
            channel_id,
            self.bot,
            content=payload.get("content") or "",
            embeds=payload.get("embeds") or [],
            components=payload.get("components") or [],
            flags=payload.get("flags") or 0,
            files=files,
            type=kind,
            interaction=interaction,
            reference=payload.get("message_reference"),
            mention_rules=[payload.get("allowed_mentions")] if payload.get("content") else [],
        )

    async def _edit(self, message: StubMessage, payload: dict, uploads: list[Upload]) -> None:
        keep = message.files
        if "attachments" in payload:
            kept_ids = {str(a["id"]) for a in payload["attachments"] or []}
            keep = [f for f in message.files if str(f.id) in kept_ids]
        self._message_form(payload, len(keep) + len(uploads), f"edit of message {message.id}", creating=False)
        message.files = keep + [self._store_file(message.channel_id, u) for u in uploads]
        for key in ("content", "embeds", "components"):
            if key in payload:
                setattr(
                    message, key, payload[key] if payload[key] is not None else type(getattr(message, key))()
                )
        if "flags" in payload and payload["flags"] is not None:
            message.flags = (message.flags & EPHEMERAL) | (payload["flags"] & ~EPHEMERAL)
        message.flags &= ~LOADING
        message.edits.append(payload)
        if payload.get("content"):
            message.mention_rules.append(payload.get("allowed_mentions"))
        self._touch()
        if not message.ephemeral:
            for session in self._sessions:
                if not session.invalid and session.intents & MESSAGES_INTENT:
                    await session.dispatch("MESSAGE_UPDATE", self._visible_json(message, session))

    async def _delete(self, message: StubMessage) -> None:
        message.deleted = True
        self._touch()
        event = {"id": str(message.id), "channel_id": str(message.channel_id), "guild_id": str(self.guild_id)}
        if not message.ephemeral:
            await self._dispatch("MESSAGE_DELETE", event, MESSAGES_INTENT)

    # -- REST: users, application, guild, gateway ----------------------------------------------

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json(self.bot.json())

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise _unknown("User", 10013)
        return _json(user.json())

    async def _open_dm(self, request: web.Request) -> web.Response:
        payload, _ = await self._body(request)
        user = self.users.get(int(payload.get("recipient_id", 0)))
        if user is None:
            raise _unknown("User", 10013)
        existing = next((c for c in self.channels.values() if c.get("recipients") == [user.json()]), None)
        if existing is None:
            channel_id = self._snowflake()
            existing = {
                "id": str(channel_id),
                "type": _CH.private.value,
                "recipients": [user.json()],
                "last_message_id": None,
            }
            self.channels[channel_id] = existing
        return _json(existing)

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": self.bot.name,
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.owner.json(),
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "bot": self.bot.json(),
                "interactions_endpoint_url": None,
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        limit = {
            "total": 1000,
            "remaining": 1000 - self.identifies,
            "reset_after": 86_400_000,
            "max_concurrency": 1,
        }
        return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})

    async def _leave_guild(self, request: web.Request) -> web.Response:
        guild_id = int(request.match_info["guild_id"])
        if guild_id != self.guild_id and guild_id not in self.other_guilds:
            raise _unknown("Guild", 10004)
        self.left_guilds.append(guild_id)
        await self._dispatch("GUILD_DELETE", {"id": str(guild_id)}, GUILDS_INTENT)
        return web.Response(status=204)

    def _check_guild(self, request: web.Request) -> None:
        if int(request.match_info["guild_id"]) != self.guild_id:
            raise _unknown("Guild", 10004)

    async def _get_guild(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json(self._guild_json(0) | {"members": []})

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json(self._guild_json(0)["channels"])

    async def _get_roles(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json(list(self.roles.values()))

    async def _get_member(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        user = self.members.get(int(request.match_info["user_id"]))
        if user is None:
            raise _unknown("Member", 10007)
        return _json(self._member_json(user))

    # -- REST: application commands ------------------------------------------------------------

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["application_id"]) != self.application_id:
            raise _unknown("Application", 10002)
        if "guild_id" in request.match_info:
            self._check_guild(request)
            return self.guild_id
        return None

    def _stored_command(self, scope: int | None, command: dict) -> dict:
        previous = self.commands.get(scope, {}).get(command["name"])
        stored = {
            **command,
            "id": previous["id"] if previous else str(self._snowflake()),
            "application_id": str(self.application_id),
            "version": str(self._snowflake()),
            "type": command.get("type", 1),
            "options": command.get("options") or [],
        }
        if command.get("default_member_permissions") is not None:
            stored["default_member_permissions"] = str(command["default_member_permissions"])
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json(list(self.commands.get(self._command_scope(request), {}).values()))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        commands, _ = await self._body(request)
        form = FormErrors()
        for i, command in enumerate(commands):
            check_command(form, (i,), command, self.limits)
        names = [(c.get("type", 1), c.get("name")) for c in commands]
        for i, key in enumerate(names):
            if key in names[:i]:
                form.add(
                    (i, "name"),
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    f"Application command names must be unique: {key[1]}",
                )
        chat = sum(1 for kind, _ in names if kind == 1)
        if chat > 100:
            form.add((), "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        self._refuse_form(form, "command sync")
        self.commands[scope] = {c["name"]: self._stored_command(scope, c) for c in commands}
        return _json(list(self.commands[scope].values()))

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        command, _ = await self._body(request)
        form = FormErrors()
        check_command(form, (), command, self.limits)
        self._refuse_form(form, "command upsert")
        stored = self._stored_command(scope, command)
        self.commands.setdefault(scope, {})[command["name"]] = stored
        return _json(stored, 201)

    # -- REST: channels, messages, threads ------------------------------------------------------

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json(self._channel(request.match_info["channel_id"]))

    async def _patch_channel(self, request: web.Request) -> web.Response:
        channel = self._channel(request.match_info["channel_id"])
        payload, _ = await self._body(request)
        form = FormErrors()
        if "name" in payload:
            form.bad_len(("name",), payload["name"], 1, 100)
        duration = payload.get("auto_archive_duration")
        if duration is not None and duration not in ARCHIVE_DURATIONS:
            form.add(
                ("auto_archive_duration",),
                "BASE_TYPE_CHOICES",
                f"Value must be one of {sorted(ARCHIVE_DURATIONS)}.",
            )
        self._refuse_form(form, f"edit of channel {channel['id']}")
        meta = channel.get("thread_metadata")
        for key in ("name", "topic", "nsfw", "rate_limit_per_user"):
            if key in payload:
                channel[key] = payload[key]
        if meta is not None:
            for key in ("archived", "locked", "auto_archive_duration", "invitable"):
                if key in payload:
                    meta[key] = payload[key]
            if "archived" in payload:
                meta["archive_timestamp"] = dt.datetime.fromtimestamp(self.clock.wall(), dt.UTC).isoformat()
        event = "THREAD_UPDATE" if meta is not None else "CHANNEL_UPDATE"
        await self._dispatch(event, channel, GUILDS_INTENT)
        return _json(channel)

    async def _get_messages(self, request: web.Request) -> web.Response:
        channel_id = int(self._channel(request.match_info["channel_id"])["id"])
        limit = min(int(request.query.get("limit", 50)), 100)
        before, after = request.query.get("before"), request.query.get("after")
        found = [m for m in self.channel_messages(channel_id) if not m.ephemeral]
        if before:
            found = [m for m in found if m.id < int(before)]
        if after:
            found = [m for m in found if m.id > int(after)]
        found = found[:limit] if after else found[-limit:]
        return _json([self._message_json(m) for m in reversed(found)])

    async def _post_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request.match_info["channel_id"])
        payload, uploads = await self._body(request)
        nonce = payload.get("nonce")
        if nonce is not None and len(str(nonce)) > 25:
            raise _Refused(
                400,
                50035,
                "Invalid Form Body",
                {
                    "nonce": {
                        "_errors": [
                            {"code": "BASE_TYPE_BAD_LENGTH", "message": "Must be 25 or fewer in length."}
                        ]
                    }
                },
            )
        if nonce is not None and payload.get("enforce_nonce"):
            # Discord: a nonce used by the same author within the last few minutes gives back the
            # message it created instead of a new one.
            seen = next(
                (
                    m
                    for m in self.messages.values()
                    if m.author is self.bot and m.nonce == str(nonce) and self.clock.now() - m.created < 300
                ),
                None,
            )
            if seen is not None:
                self.nonce_replays += 1
                return _json(self._message_json(seen))
        message = self._new_message(int(channel["id"]), payload, uploads)
        message.nonce = None if nonce is None else str(nonce)
        message.created = self.clock.now()
        self._unarchive(channel)
        await self._publish(message)
        return _json(self._message_json(message))

    async def _get_message(self, request: web.Request) -> web.Response:
        return _json(
            self._message_json(
                self._message(request.match_info["channel_id"], request.match_info["message_id"])
            )
        )

    async def _patch_message(self, request: web.Request) -> web.Response:
        message = self._message(request.match_info["channel_id"], request.match_info["message_id"])
        if message.author is not self.bot:
            raise _Refused(403, 50005, "Cannot edit a message authored by another user")
        payload, uploads = await self._body(request)
        await self._edit(message, payload, uploads)
        return _json(self._message_json(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        await self._delete(self._message(request.match_info["channel_id"], request.match_info["message_id"]))
        return web.Response(status=204)

    def _new_thread(self, parent: dict, thread_id: int, payload: dict, kind: int) -> dict:
        form = FormErrors()
        form.bad_len(("name",), payload.get("name"), 1, 100)
        duration = payload.get("auto_archive_duration") or 4320
        if duration not in ARCHIVE_DURATIONS:
            form.add(
                ("auto_archive_duration",),
                "BASE_TYPE_CHOICES",
                f"Value must be one of {sorted(ARCHIVE_DURATIONS)}.",
            )
        self._refuse_form(form, f"thread in {parent['id']}")
        now = dt.datetime.fromtimestamp(self.clock.wall(), dt.UTC).isoformat()
        thread = {
            "id": str(thread_id),
            "type": kind,
            "guild_id": str(self.guild_id),
            "parent_id": parent["id"],
            "owner_id": str(self.bot.id),
            "name": payload["name"],
            "nsfw": parent.get("nsfw", False),
            "last_message_id": None,
            "rate_limit_per_user": payload.get("rate_limit_per_user") or 0,
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": duration,
                "archive_timestamp": now,
                "locked": False,
                "invitable": payload.get("invitable", True),
                "create_timestamp": now,
            },
        }
        self.channels[thread_id] = thread
        self.thread_members[thread_id].add(self.bot.id)
        self._spawn(self._dispatch("THREAD_CREATE", {**thread, "newly_created": True}, GUILDS_INTENT))
        return thread

    async def _thread_from_message(self, request: web.Request) -> web.Response:
        parent = self._channel(request.match_info["channel_id"])
        message = self._message(parent["id"], request.match_info["message_id"])
        if message.id in self.channels:
            raise _Refused(400, 160004, "A thread has already been created for this message")
        payload, _ = await self._body(request)
        return _json(self._new_thread(parent, message.id, payload, _CH.public_thread.value), 201)

    async def _thread_without_message(self, request: web.Request) -> web.Response:
        parent = self._channel(request.match_info["channel_id"])
        payload, _ = await self._body(request)
        kind = payload.get("type", _CH.private_thread.value)
        return _json(self._new_thread(parent, self._snowflake(), payload, kind), 201)

    def _thread_member(self, request: web.Request) -> tuple[int, int]:
        thread = self._channel(request.match_info["channel_id"])
        if thread["type"] not in THREAD_TYPES:
            raise _Refused(400, 50024, "Cannot execute action on this channel type")
        raw = request.match_info["user_id"]
        user_id = self.bot.id if raw == "@me" else int(raw)
        if user_id not in self.members:
            raise _unknown("Member", 10007)
        return int(thread["id"]), user_id

    async def _join_thread(self, request: web.Request) -> web.Response:
        thread_id, user_id = self._thread_member(request)
        self.thread_members[thread_id].add(user_id)
        self.channels[thread_id]["member_count"] = len(self.thread_members[thread_id])
        return web.Response(status=204)

    async def _leave_thread(self, request: web.Request) -> web.Response:
        thread_id, user_id = self._thread_member(request)
        self.thread_members[thread_id].discard(user_id)
        self.channels[thread_id]["member_count"] = len(self.thread_members[thread_id])
        return web.Response(status=204)

    async def _download(self, request: web.Request) -> web.Response:
        stored = self.files.get(int(request.match_info["file_id"]))
        if stored is None or request.match_info["filename"] != stored.filename:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=stored.data, content_type=stored.content_type or "application/octet-stream")

    # -- REST: interactions and their webhooks -------------------------------------------------

    async def _callback(self, request: web.Request) -> web.Response:
        ix = self.interactions.get(int(request.match_info["webhook_id"]))
        if ix is None or ix.token != request.match_info["webhook_token"]:
            raise _unknown("interaction", 10062)
        if ix.callbacks:
            self._violate("double_ack", f"{ix} was acknowledged twice")
            raise _Refused(400, 40060, "Interaction has already been acknowledged.")
        late = self.clock.now() - ix.created_at
        if late > self.limits.ack_seconds:
            if "late_ack" not in ix.flagged:
                ix.flagged.add("late_ack")
                self._violate(
                    "late_ack", f"{ix} acknowledged after {late:.1f} s (limit {self.limits.ack_seconds:g} s)"
                )
            raise _unknown("interaction", 10062)
        payload, uploads = await self._body(request)
        kind, data = payload.get("type"), payload.get("data")
        if kind not in ALLOWED_CALLBACKS[ix.type] or (
            kind in (6, 7) and ix.type == _IT.modal_submit.value and ix.message is None
        ):
            self._violate("bad_callback", f"callback type {kind} is not valid for {ix}")
            form = FormErrors()
            form.add(
                ("type",),
                "INTERACTION_CALLBACK_TYPE_INVALID",
                f"Interaction callback type {kind} is not valid here",
            )
            raise _Refused(400, 50035, "Invalid Form Body", form.nested())
        message = await self._apply_callback(ix, kind, data or {}, uploads)
        ix.callbacks.append(StubCallback(kind, data, message.files if message else [], self.clock.now()))
        self._touch()
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        answer: dict[str, Any] = {
            "interaction": {"id": str(ix.id), "type": ix.type},
            "resource": {"type": kind},
        }
        if message is not None:
            answer["interaction"].update(
                response_message_id=str(message.id),
                response_message_loading=message.loading,
                response_message_ephemeral=message.ephemeral,
            )
            answer["resource"]["message"] = self._message_json(message)
        return _json(answer)

    async def _apply_callback(
        self, ix: StubInteraction, kind: int, data: dict, uploads: list[Upload]
    ) -> StubMessage | None:
        """Validates a callback's data and makes the message it shows, if any."""
        if kind == _RT.channel_message.value:
            ix.original = self._new_message(ix.channel_id, data, uploads, interaction=ix)
            await self._publish(ix.original)
            return ix.original
        if kind == _RT.deferred_channel_message.value:
            flags = LOADING | ((data.get("flags") or 0) & EPHEMERAL)
            ix.original = StubMessage(
                self._snowflake(), ix.channel_id, self.bot, flags=flags, interaction=ix, type=20
            )
            await self._publish(ix.original)
            return ix.original
        if kind == _RT.deferred_message_update.value:
            ix.original = ix.message
            return None
        if kind == _RT.message_update.value:
            assert ix.message is not None  # only component interactions (or modals from them) get here
            ix.original = ix.message
            await self._edit(ix.message, data, uploads)
            return ix.message
        form = FormErrors()
        if kind == _RT.autocomplete_result.value:
            check_choices(form, ("data", "choices"), data.get("choices") or [], self.limits)
        else:
            check_modal(form, data, self.limits)
        self._refuse_form(form, f"callback to {ix}")
        return None

    def _webhook_interaction(self, request: web.Request) -> StubInteraction:
        """The interaction behind a webhook token, refusing an unknown or expired one."""
        token = request.match_info["webhook_token"]
        ix = next((i for i in self.interactions.values() if i.token == token), None)
        if ix is None or int(request.match_info["webhook_id"]) != self.application_id:
            raise _unknown("Webhook", 10015)
        age = self.clock.now() - ix.created_at
        if age > self.limits.token_seconds:
            self._violate("expired_token", f"{ix}'s token used after {age / 60:.1f} min (limit 15 min)")
            raise _Refused(401, 50027, "Invalid Webhook Token")
        if not ix.callbacks:
            self._violate("before_ack", f"{ix}'s webhook used before the interaction was acknowledged")
            raise _unknown("Webhook", 10015)
        return ix

    def _webhook_message(self, request: web.Request, ix: StubInteraction) -> StubMessage:
        raw = request.match_info["message_id"]
        if raw == "@original":
            message = ix.original
        else:
            message = next(
                (m for m in [ix.original, *ix.followups] if m is not None and m.id == int(raw)), None
            )
        if message is None or message.deleted:
            raise _unknown("Message", 10008)
        return message

    async def _post_followup(self, request: web.Request) -> web.Response:
        ix = self._webhook_interaction(request)
        payload, uploads = await self._body(request)
        if ix.original is not None and ix.original.loading:
            # The first followup after a defer fills the "thinking" message (and keeps its ephemerality).
            message = ix.original
            await self._edit(message, payload, uploads)
        else:
            channel_id = int(self._channel(request.query.get("thread_id", ix.channel_id))["id"])
            message = self._new_message(channel_id, payload, uploads, interaction=ix)
            await self._publish(message)
        ix.followups.append(message)
        self._touch()
        if request.query.get("wait") in ("1", "true", "True"):
            return _json(self._message_json(message))
        return web.Response(status=204)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        ix = self._webhook_interaction(request)
        return _json(self._message_json(self._webhook_message(request, ix)))

    async def _patch_webhook_message(self, request: web.Request) -> web.Response:
        ix = self._webhook_interaction(request)
        message = self._webhook_message(request, ix)
        payload, uploads = await self._body(request)
        await self._edit(message, payload, uploads)
        return _json(self._message_json(message))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        ix = self._webhook_interaction(request)
        await self._delete(self._webhook_message(request, ix))
        return web.Response(status=204)


class _RateLimited(_Refused):
    """A 429 with its headers (``Via`` included: without it discord.py assumes a Cloudflare ban)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(429, 0, "You are being rate limited.")
        self._response = response

    def response(self) -> web.Response:
        return self._response
