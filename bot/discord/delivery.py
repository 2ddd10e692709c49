"""The outbox courier: job events reach Discord off the scheduler's path, once each.

The scheduler writes a row (``store.add_post``) for every event but progress, whether or not a
bot is connected, and its listener only wakes the courier, so an outage, a 429 burst, a dropped
gateway or a bot restart never holds up starting jobs or taking cancels, and loses no post. The
courier posts rows oldest first, one job's rows in order, and marks a row sent only after Discord
took it. A crash between Discord taking a message and the row being marked would post it again on
the next try: every message a row sends carries the row's nonce with ``enforce_nonce`` (discord.py
sets it whenever a nonce is given), so Discord answers with the message it already has.

Progress events skip the outbox: only the latest matters, and the coalesced edit
(:mod:`.progress`) already runs on its own task and retries.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import discord

from runner.spec import ProgressEvent, parse_event

from .. import store

if TYPE_CHECKING:
    from .app import LoracordBot

log = logging.getLogger(__name__)
_nonce: contextvars.ContextVar[str | None] = contextvars.ContextVar("outbox_nonce", default=None)


def outbox_nonce() -> str | None:
    """The nonce for the message a cog sends while delivering an outbox row (None elsewhere)."""
    return _nonce.get()


def transient(error: BaseException) -> bool:
    """Whether trying again later can help: Discord down or rate limiting, or the network."""
    if isinstance(error, discord.HTTPException):
        return error.status == 429 or error.status >= 500
    return isinstance(error, discord.RateLimited | aiohttp.ClientError | OSError | TimeoutError)


class Courier:
    def __init__(self, bot: LoracordBot):
        self.bot = bot
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="discord-outbox")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def on_job_event(self, job: store.Job, event: Any) -> None:
        """The scheduler's listener (it already wrote the outbox row): never waits on Discord."""
        if isinstance(event, ProgressEvent):
            await self._handle(job, event)  # handlers only ask the coalescer for an edit
        else:
            self._wake.set()

    def retry_now(self) -> None:
        """Discord is back (the gateway reconnected): try what waits without the rest of its back-off."""
        store.retry_posts_now(self.bot.db)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before reading: a row added while delivering wakes the next round
            try:
                for post in store.due_posts(self.bot.db):
                    await self._deliver(post)
                upcoming = store.next_post_at(self.bot.db)
            except Exception:  # the store failing (disk full): keep the bot up, try again soon
                log.exception("the Discord outbox could not be read")
                upcoming = time.time() + 1
            if upcoming is not None and upcoming <= time.time():
                continue
            try:
                async with asyncio.timeout(None if upcoming is None else upcoming - time.time()):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _deliver(self, post: store.Post) -> None:
        job = store.get_job(self.bot.db, post.job_id)
        if job is None:
            store.post_failed(self.bot.db, post.id, "the job no longer exists", None)
            return
        token = _nonce.set(f"lc{post.id}")
        try:
            await self._handle(job, parse_event(post.event), raise_errors=True)
        except Exception as e:
            if transient(e):
                backoff = min(2.0**post.attempts, self.bot.cfg.discord.retry_max_seconds)
                log.warning("job %s: Discord did not take a post (%s); again in %.0f s", job.id, e, backoff)
                store.post_failed(self.bot.db, post.id, str(e), time.time() + backoff)
            else:
                # Refused for good (a deleted thread, missing permissions) or a bug: posting it
                # again would fail the same way and hold back this job's later posts.
                log.exception("job %s: post %s dropped", job.id, post.id)
                store.post_failed(self.bot.db, post.id, f"{type(e).__name__}: {e}", None)
        else:
            store.post_sent(self.bot.db, post.id)
        finally:
            _nonce.reset(token)

    async def _handle(self, job: store.Job, event: Any, raise_errors: bool = False) -> None:
        for cog in list(self.bot.cogs.values()):
            handler = getattr(cog, "on_job_event", None)
            if handler is None:
                continue
            try:
                await handler(job, event)
            except Exception:
                if raise_errors:
                    raise
                log.exception("job %s: updating Discord failed", job.id)
