"""Acknowledgements before answers.

Discord wants every interaction acknowledged within 3 s; the answer may follow for 15 minutes.
When a crowd taps at once, the bot acknowledges them one after another on one event loop, and
each answer done in between (a few queries, an edit of the message) pushes back the
acknowledgements still to come. So an answer waits while interactions that came in before it
are still unacknowledged, for ``hold_s`` at most: the last of a crowd is acknowledged about twice
as soon, and nobody's answer is late by more than ``hold_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class AckFirst:
    def __init__(self, hold_s: float = 1.0, forget_s: float = 3.0):
        """``forget_s``: an interaction unacknowledged for that long never will be (Discord has
        given up on it, or its handler failed first): it holds nothing up any more."""
        self.hold_s, self.forget_s = hold_s, forget_s
        self._waiting: dict[int, float] = {}  # interaction id -> when it came in (monotonic)
        self._settled = asyncio.Event()
        self._settled.set()

    def arrived(self, interaction_id: int) -> None:
        self._waiting[interaction_id] = time.monotonic()
        self._settled.clear()

    def acked(self, interaction_id: int) -> None:
        self._waiting.pop(interaction_id, None)
        if not self._waiting:
            self._settled.set()

    def _forget_old(self) -> None:
        old = time.monotonic() - self.forget_s
        for interaction_id in [i for i, t in self._waiting.items() if t < old]:
            self.acked(interaction_id)

    async def settled(self) -> None:
        """Return once no interaction waits for its acknowledgement, or after ``hold_s``."""
        self._forget_old()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.hold_s):
                await self._settled.wait()
