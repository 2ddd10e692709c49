"""AckFirst: an answer waits for the acknowledgements of the interactions that came in before it."""

from __future__ import annotations

import asyncio

from bot.discord.acks import AckFirst


def test_an_answer_waits_until_everyone_who_came_in_is_acknowledged():
    async def go() -> None:
        acks = AckFirst(hold_s=60)
        await asyncio.wait_for(acks.settled(), 1)  # nobody waiting: no wait
        acks.arrived(1)
        acks.arrived(2)
        acks.acked(1)
        answer = asyncio.create_task(acks.settled())
        await asyncio.sleep(0.05)
        assert not answer.done()  # 2 is not acknowledged yet
        acks.acked(2)
        await asyncio.wait_for(answer, 1)

    asyncio.run(go())


def test_an_answer_waits_no_longer_than_the_hold_and_a_lost_interaction_is_forgotten():
    async def go() -> None:
        acks = AckFirst(hold_s=0.05, forget_s=60)
        acks.arrived(1)  # its handler failed before acknowledging
        await asyncio.wait_for(acks.settled(), 5)  # the hold ends the wait
        assert not acks._settled.is_set()
        forgetful = AckFirst(hold_s=60, forget_s=0)
        forgetful.arrived(1)
        await asyncio.wait_for(forgetful.settled(), 1)  # older than forget_s: holds nothing up

    asyncio.run(go())
