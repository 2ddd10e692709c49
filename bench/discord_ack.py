"""SLOT: interaction ack latency p50/p99 with 50 and 200 simulated members on the Discord stub.

Not measured yet: the bot's Discord side (``bot/discord/``: cogs, views) has not landed, and the
figure is the time from an interaction sent by ``tests/discord_stub.py`` to the bot's ack (defer or
reply) as the stub records it. Until then this prints one record that says so, so ``run_all`` and
``docs/benchmarks.md`` keep the row. When the cogs land, replace ``run`` with: start the stub
server on 127.0.0.1, start the bot against it, send ``/gen`` and ``/train`` interactions from
``--members`` members in a bounded loop, and emit ``ack_ms_p50`` / ``ack_ms_p99``.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from .common import emit


def run(args: argparse.Namespace) -> dict[str, Any]:
    landed = importlib.util.find_spec("bot.discord") is not None
    why = (
        "bot/discord exists now: this benchmark is still to be written (see its docstring)"
        if landed
        else "not measured: the bot's Discord side (bot/discord/) has not landed"
    )
    return emit("loracord", "discord_ack", settings={"members": args.members}, skipped=why)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[50, 200])
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
