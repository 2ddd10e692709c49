"""Coalesced message edits: a busy GPU reports many times a second, a channel gets at most one
edit of a message per ``[discord] progress_seconds``, always with the latest text."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import discord

from .delivery import transient

log = logging.getLogger(__name__)


class Coalescer:
    def __init__(self, client: discord.Client, interval: float, retry_max: float = 30.0):
        self.client, self.interval, self.retry_max = client, interval, retry_max
        self._pending: dict[tuple[int, int], dict[str, Any]] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._tasks: dict[tuple[int, int], asyncio.Task] = {}

    def edit(self, channel_id: int, message_id: int, **fields: Any) -> None:
        """Ask for ``message.edit(**fields)``; an edit still waiting for its turn is replaced."""
        key = (channel_id, message_id)
        self._pending[key] = fields
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.get_running_loop().create_task(self._flush(key))

    async def _flush(self, key: tuple[int, int]) -> None:
        failures = 0
        while key in self._pending:
            wait = self._last.get(key, 0.0) + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            fields = self._pending.pop(key)
            self._last[key] = time.monotonic()
            message = self.client.get_partial_messageable(key[0]).get_partial_message(key[1])
            try:
                await message.edit(**fields)
                failures = 0
            except Exception as e:
                if not transient(e):  # a deleted message or thread: nothing to update
                    log.warning("progress message %s in %s not updated: %s", key[1], key[0], e)
                    continue
                # Discord is down: the text shown last must still arrive (a finished job's
                # "✅" must not stay "epoch 3/4"), unless a newer text replaced it meanwhile.
                self._pending.setdefault(key, fields)
                failures += 1
                await asyncio.sleep(min(2.0**failures, self.retry_max))

    async def drain(self) -> None:
        """Wait for every edit asked for so far (tests, and a clean shutdown)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
