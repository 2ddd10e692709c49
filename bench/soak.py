"""Soak: the whole bot (scheduler, CPU workers, outbox, discord.py on the stub) under faults.

Several members send a stream of mixed jobs (``/gen`` from Discord, training and auto-tagging
from the CLI path) on tiny bases while the run kills a busy worker with SIGKILL now and then,
restarts the bot twice, takes Discord down for a window (REST 503s, the gateway dropped) and
serves 429 bursts on message posts. Then it stops submitting, lets the queue drain and counts:

- submitted / finished / failed with a reason / lost (must be 0: a job that vanished, or ended
  failed without saying why) / stuck (must be 0: still queued or running after the drain);
- duplicate and missing posts (must be 0): each ``/gen`` job that ended gets exactly one post;
- the longest time from a fault to recovery (worker back, bot ready, outbox empty after the
  outage). Prints one JSON line; bounded in time by ``--minutes`` plus ``--drain-minutes``.

    python -m bench.soak --minutes 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import emit, log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

POST_ROUTE = "POST /channels/{channel_id}/messages"


@dataclass
class Submitted:
    job_id: int
    kind: str
    token: str | None = None  # a /gen job's prompt marker, to find its post


@dataclass
class Tally:
    submitted: list[Submitted] = field(default_factory=list)
    recoveries: dict[str, float] = field(default_factory=dict)  # fault → seconds to recover
    kills: int = 0
    restarts: int = 0


class Bot:
    """One life of ``loracord run``: scheduler, workers, web server and the Discord client."""

    def __init__(self, stub: Any, cfg: Any, db: Any):
        self.stub, self.cfg, self.db = stub, cfg, db
        self.stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        from bot.discord.app import LoracordBot
        from bot.dispatch import make_dispatcher
        from bot.scheduler import Scheduler
        from bot.web import WebServer

        self.scheduler = Scheduler(self.db, self.cfg, make_dispatcher(self.cfg))
        self.stop = asyncio.Event()
        self.web = web = await self.stack.enter_async_context(WebServer(self.cfg, self.db, self.scheduler))
        self.task = asyncio.create_task(self.scheduler.run(self.stop))
        self.stack.push_async_callback(self._stop_scheduler)
        client = LoracordBot(self.cfg, self.db, self.scheduler, web, guild_ready_timeout=0.05)
        await self.stack.enter_async_context(self.stub.running(client, timeout=60))

    async def _stop_scheduler(self) -> None:
        self.stop.set()
        await self.task

    async def close(self) -> None:
        await self.stack.aclose()


async def soak(minutes: float, drain_minutes: float, members: int, seed: int) -> dict[str, Any]:
    from discord_stub import DiscordStub
    from test_tagger import build_tagger

    from bot import jobs, store
    from bot.config import load_config
    from bot.files import member_path
    from runner.selftest import make_demo_dataset

    rng = random.Random(seed)
    tally = Tally()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two workers and the bot share the cores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tagger = build_tagger(root / "tagger")
        stub = DiscordStub()
        async with stub:
            path = root / "server.toml"
            path.write_text(
                '[store]\npath = "db/loracord.db"\n[data]\ndir = "data"\n'
                '[workers]\ndevices = ["cpu", "cpu"]\n[bases]\ntiny = "tiny:sd15"\n'
                '[quota]\nqueued_jobs = 1000\ndaily_gpu_seconds = "unlimited"\nconcurrent_jobs = 2\n'
                "[scheduling]\npoll_seconds = 0.05\nmax_attempts = 6\n[web]\nport = 0\n"
                f'[discord]\napi_base = "{stub.api_base}"\ngateway = "{stub.gateway_url}"\n'
                f"guilds = [{stub.guild_id}]\nprogress_seconds = 0.5\nretry_max_seconds = 2\n",
                encoding="utf-8",
            )
            cfg = load_config(path)
            db = store.open_store(cfg.store)
            users = [stub.add_member(f"m{i}") for i in range(members)]
            for u in users:
                make_demo_dataset(member_path(cfg.data_dir, str(u.id), "datasets", "ds"), count=2, repeats=1)

            bot = Bot(stub, cfg, db)
            await bot.start()
            started = time.monotonic()
            end = started + 60 * minutes
            discord_up = True

            async def submit(n: int) -> None:
                u = rng.choice(users)
                member = str(u.id)
                kind = rng.choices(["gen", "train", "tag"], [6, 2, 2])[0]
                if kind == "gen" and discord_up:
                    token = f"soak{n}x"
                    ix = await stub.command(u, "gen", {"prompt": f"{token} a cat", "steps": 2, "seed": n})
                    text = (await ix.original_message(timeout=30)).content
                    if "Queued" not in text:
                        log(f"/gen {n} refused: {text}")
                        return
                    job = next(
                        j for j in store.list_jobs(db, owner=member) if token in j.spec_dict.get("prompt", "")
                    )
                    tally.submitted.append(Submitted(job.id, "gen", token))
                elif kind == "train":
                    settings = {
                        "max_train_epochs": 2,
                        "sample_every_n_epochs": 0,
                        "network_dim": 4,
                        "network_alpha": 2,
                        "resolution": 64,
                    }
                    job = jobs.submit_train(db, cfg, member, "ds", "tiny", f"soak-{n}", settings)
                    tally.submitted.append(Submitted(job.id, "train"))
                elif kind == "tag":
                    job = jobs.submit_tag(db, cfg, member, "ds", {"tagger": str(tagger)})
                    tally.submitted.append(Submitted(job.id, "tag"))
                else:
                    job = jobs.submit_gen(db, cfg, member, "a dog", "tiny", {"steps": 2, "seed": n})
                    tally.submitted.append(Submitted(job.id, "gen"))

            async def kill_a_busy_worker() -> None:
                busy = [w for w, s in bot.scheduler.slots.items() if s.main is not None]
                pid = bot.scheduler.dispatcher.pid(busy[0]) if busy else None
                if pid is None:
                    return
                os.kill(pid, signal.SIGKILL)
                tally.kills += 1
                t0 = time.monotonic()
                while bot.scheduler.dispatcher.pid(busy[0]) in (
                    None,
                    pid,
                ) or not bot.scheduler.dispatcher.ready(busy[0]):
                    if time.monotonic() - t0 > 120:
                        break
                    await asyncio.sleep(0.05)
                keep_worst(f"worker kill {tally.kills}", time.monotonic() - t0)

            def keep_worst(fault: str, seconds: float) -> None:
                tally.recoveries[fault] = round(seconds, 2)
                log(f"{fault}: recovered in {seconds:.1f} s")

            async def restart() -> None:
                t0 = time.monotonic()
                await bot.close()
                await bot.start()
                tally.restarts += 1
                keep_worst(f"bot restart {tally.restarts}", time.monotonic() - t0)

            async def outage(seconds: float) -> None:
                nonlocal discord_up
                discord_up = False
                stub.begin_outage(503)
                await asyncio.sleep(seconds)
                stub.end_outage()
                t0 = time.monotonic()
                while pending_posts(db) and time.monotonic() - t0 < 120:
                    await asyncio.sleep(0.1)
                await stub.wait_until(lambda: bot_ready(bot), 60, "the gateway back")
                discord_up = True
                keep_worst("Discord outage", time.monotonic() - t0)

            async def burst(seconds: float) -> None:
                stub.rate_limit(POST_ROUTE, limit=1, per=2.0, announce=False)
                await asyncio.sleep(seconds)
                stub._budgets.pop(POST_ROUTE, None)  # the stub has no public "lift" for a budget

            plan = sorted(
                [(0.15, "burst"), (0.3, "restart"), (0.45, "outage"), (0.65, "restart"), (0.8, "burst")]
                + [(rng.uniform(0.05, 0.85), "kill") for _ in range(max(2, int(minutes * 1.5)))]
            )
            n = 0
            while time.monotonic() < end:
                elapsed = (time.monotonic() - started) / (60 * minutes)
                while plan and plan[0][0] <= elapsed:
                    _, fault = plan.pop(0)
                    log(f"{time.monotonic() - started:.0f} s: {fault}")
                    if fault == "kill":
                        await kill_a_busy_worker()
                    elif fault == "restart":
                        await restart()
                    elif fault == "outage":
                        await outage(min(20.0, 6 * minutes))
                    else:
                        await burst(min(15.0, 4 * minutes))
                if elapsed < 0.85 and queue_depth(db) < 10:
                    n += 1
                    try:
                        await submit(n)
                    except jobs.JobError as e:
                        log(f"job {n} refused: {e}")
                await asyncio.sleep(rng.uniform(0.5, 2.0))

            drain_end = time.monotonic() + 60 * drain_minutes
            ids = [s.job_id for s in tally.submitted]
            while time.monotonic() < drain_end and (unfinished(db, ids) or pending_posts(db)):
                await asyncio.sleep(0.2)
            await bot.close()
            result = count(db, stub, tally)
            result["wall_s"] = round(time.monotonic() - started, 1)
            result["violations"] = [str(v) for v in stub.violations]
    return result


def pending_posts(db: Any) -> int:
    return db.execute("SELECT COUNT(*) FROM discord_outbox WHERE sent_at IS NULL AND dropped = 0").fetchone()[
        0
    ]


def queue_depth(db: Any) -> int:
    return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]


def unfinished(db: Any, ids: list[int]) -> list[int]:
    from bot import store

    return [i for i in ids if (j := store.get_job(db, i)) is not None and j.state in store.ACTIVE]


def bot_ready(bot: Bot) -> bool:
    return bot.web.discord_connected


def count(db: Any, stub: Any, tally: Tally) -> dict[str, Any]:
    from bot import store

    states: dict[str, int] = {}
    lost, stuck, duplicate, missing = [], [], [], []
    general = [
        m for m in stub.channel_messages(stub.general) if m.author is stub.bot and m.interaction is None
    ]
    for s in tally.submitted:
        job = store.get_job(db, s.job_id)
        if job is None:
            lost.append(s.job_id)
            continue
        states[job.state] = states.get(job.state, 0) + 1
        if job.state in store.ACTIVE:
            stuck.append(s.job_id)
        elif job.state in ("failed", "cancelled") and not job.failure:
            lost.append(s.job_id)
        if s.token is None or job.state in store.ACTIVE:
            continue
        posts = [m for m in general if s.token in m.content or f"(job #{job.id})" in m.content]
        if len(posts) > 1:
            duplicate.append(s.job_id)
        elif not posts:
            missing.append(s.job_id)
    failed = [s.job_id for s in tally.submitted if (j := store.get_job(db, s.job_id)) and j.state == "failed"]
    return {
        "submitted": len(tally.submitted),
        "by_kind": {k: sum(s.kind == k for s in tally.submitted) for k in ("gen", "train", "tag")},
        "finished": states.get("done", 0),
        "failed_with_reason": len(failed) - len(set(failed) & set(lost)),
        "failure_reasons": sorted({store.get_job(db, i).failure or "" for i in failed})[:10],
        "lost": len(lost),
        "stuck": len(stuck),
        "duplicate_posts": len(duplicate),
        "missing_posts": len(missing),
        "worker_kills": tally.kills,
        "bot_restarts": tally.restarts,
        "longest_recovery_s": max(tally.recoveries.values(), default=0.0),
        "recoveries_s": tally.recoveries,
        "dropped_posts": db.execute("SELECT COUNT(*) FROM discord_outbox WHERE dropped = 1").fetchone()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--minutes", type=float, default=5.0, help="how long jobs are submitted and faults injected"
    )
    p.add_argument("--drain-minutes", type=float, default=4.0, help="the most to wait for the queue to empty")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    result = asyncio.run(soak(args.minutes, args.drain_minutes, args.members, args.seed))
    emit("loracord", "soak", settings=vars(args), **result)
    ok = not (result["lost"] or result["stuck"] or result["duplicate_posts"] or result["missing_posts"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
