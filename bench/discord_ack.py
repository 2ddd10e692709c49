"""Interaction ack latency p50/p99 of the real bot (bot/discord) on the Discord stub (tests/discord_stub.py).

N members send ``/gen`` (which checks the library and quotas and queues a job) and ``/queue`` at
the same moment, R rounds; the figure is the time from the interaction's creation to the bot's
acknowledgement as the stub records it (the same clock for both). No worker runs: the jobs only
queue, so this measures the bot process, not the GPU. Prints one JSON line per member count.

    python -m bench.discord_ack --members 50 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


async def measure(members: int, rounds: int) -> dict[str, Any]:
    from discord_stub import DiscordStub

    from bot import store
    from bot.config import load_config
    from bot.discord.app import LoracordBot
    from bot.dispatch import make_dispatcher
    from bot.scheduler import Scheduler
    from bot.web import WebServer

    with tempfile.TemporaryDirectory() as tmp:
        stub = DiscordStub()
        async with stub:
            path = Path(tmp) / "server.toml"
            path.write_text(
                f'[workers]\ndevices = ["cpu"]\n[bases]\ntiny = "tiny:sd15"\n'
                f'[quota]\nqueued_jobs = 1000\ndaily_gpu_seconds = "unlimited"\n[web]\nport = 0\n'
                f'[discord]\napi_base = "{stub.api_base}"\ngateway = "{stub.gateway_url}"\n'
                f"guilds = [{stub.guild_id}]\n",
                encoding="utf-8",
            )
            cfg = load_config(path)
            db = store.open_store(cfg.store)
            scheduler = Scheduler(db, cfg, make_dispatcher(cfg))  # never run: jobs only queue
            async with WebServer(cfg, db, scheduler) as web:
                bot = LoracordBot(cfg, db, scheduler, web, guild_ready_timeout=0.05)
                async with stub.running(bot):
                    users = [stub.add_member(f"m{i}") for i in range(members)]
                    await asyncio.sleep(0.2)
                    ixs = []
                    started = time.perf_counter()
                    for _ in range(rounds):
                        sent = await asyncio.gather(
                            *(
                                stub.command(u, "gen", {"prompt": f"a cat {u.name}", "steps": 2})
                                for u in users
                            ),
                            *(stub.command(u, "queue") for u in users),
                        )
                        ixs += sent
                        await asyncio.gather(*(ix.ack(timeout=30) for ix in sent))
                        await asyncio.gather(*(ix.original_message(timeout=30) for ix in sent))
                    wall = time.perf_counter() - started
                ms = sorted(1000 * (ix.callbacks[0].at - ix.created_at) for ix in ixs)
                violations = [str(v) for v in stub.violations]
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "interactions": len(ms),
        "ack_ms_p50": round(q[49], 1),
        "ack_ms_p99": round(q[98], 1),
        "ack_ms_max": round(ms[-1], 1),
        "wall_s": round(wall, 2),
        "violations": violations,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[50])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    for n in args.members:
        result = asyncio.run(measure(n, args.rounds))
        emit("loracord", "discord_ack", settings={"members": n, "rounds": args.rounds}, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
