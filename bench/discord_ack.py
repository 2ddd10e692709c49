"""Interaction ack latency p50/p99 of the real bot (bot/discord) on the Discord stub (tests/discord_stub.py).

N members send ``/gen`` (which checks the library and quotas and queues a job) and ``/queue`` at
the same moment, R rounds; the figure is the time from the interaction's creation to the bot's
acknowledgement as the stub records it (the same clock for both). Prints one JSON line per
member count.

The stub and the members it plays run in a child process of their own, as Discord runs on its
own machines: in one process their CPU (JSON, Discord's rules, the members' waiting) would be
counted as the bot's; ``--in-process`` puts them back in the bot's event loop (the set-up of the
figures before 2026-11-29). Without ``--with-training`` no worker runs (the scheduler is off and
the jobs only queue), so this measures the bot process alone.

``--with-training``: the scheduler runs with a CPU worker that trains a tiny LoRA for the whole
measurement (``--training-threads`` torch threads; a GPU worker keeps about one core busy), and
serves the crowd's /gen jobs between its steps, as a server does.
``--upload K``: a member posts K images (up to 10 per message, as the app allows) in their
/train thread as the first round starts; the rounds go on until the bot has taken them all in,
and the ack figures of the interactions made meanwhile are reported apart (``upload_*``).

    python -m bench.discord_ack --members 50 200 --rounds 3
    python -m bench.discord_ack --members 200 --with-training --upload 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
STUB_TOKEN = "stub-bot-token"  # DiscordStub's default
MAX_ROUNDS = 200  # an upload the bot never takes in ends the run here


def _images(count: int, side: int = 640) -> list[Any]:
    """Photo-sized JPEGs (noise, so no two are alike and each is a few hundred KB)."""
    import numpy as np
    from discord_stub import Upload
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        out.append(Upload(f"photo{i:03d}.jpg", buf.getvalue(), "image/jpeg"))
    return out


async def drive(stub: Any, members: int, rounds: int, upload: int) -> dict[str, Any]:
    """The members' side: the rounds (and the upload), then the ack times from the stub's records."""
    users = [stub.add_member(f"m{i}") for i in range(members)]
    taken_in = None
    if upload:
        uploader = stub.add_member("uploader")
        ix = await stub.command(
            uploader, "train", {"name": "crowd", "trigger": "sks", "preset": "character", "base": "tiny"}
        )
        await ix.original_message(timeout=60)
        thread = int(stub.threads()[-1]["id"])
        (card,) = await stub.wait_until(lambda: stub.channel_messages(thread), 60, "the dataset card")
        files = _images(upload)

        def taken_in() -> bool:
            return bool(card.embeds) and f"**{upload}** images" in card.embeds[0]["description"]

    await asyncio.sleep(0.2)
    ixs: list[Any] = []
    intake: dict[str, float] = {}

    async def post_upload() -> None:
        intake["start"] = stub.clock.now()
        for i in range(0, upload, stub.limits.files):
            await stub.post_message(uploader, thread, "my pics", files=files[i : i + stub.limits.files])
        await stub.wait_until(taken_in, 600, "the upload taken in")
        intake["end"] = stub.clock.now()

    started = time.perf_counter()
    poster = asyncio.create_task(post_upload()) if upload else None
    done = 0
    while done < rounds or (poster is not None and not poster.done() and done < MAX_ROUNDS):
        sent = await asyncio.gather(
            *(stub.command(u, "gen", {"prompt": f"a cat {u.name}", "steps": 2}) for u in users),
            *(stub.command(u, "queue") for u in users),
        )
        ixs += sent
        # One waiter for the round, not one per interaction: the stub wakes every waiter on each
        # change it records, and hundreds of them would take CPU the stub needs to record acks.
        await stub.wait_until(lambda sent=sent: all(ix.callbacks for ix in sent), 60, "the round's acks")
        await stub.wait_until(
            lambda sent=sent: all(ix.original is not None and not ix.original.loading for ix in sent),
            60,
            "the round's answers",
        )
        done += 1
    wall = time.perf_counter() - started
    if poster is not None:
        await poster
    result: dict[str, Any] = {
        "rounds": done,
        "ack_ms": [1000 * (ix.callbacks[0].at - ix.created_at) for ix in ixs],
        "wall_s": round(wall, 2),
    }
    if upload:
        during = [ix for ix in ixs if intake["start"] <= ix.created_at <= intake["end"]]
        result["upload_ack_ms"] = [1000 * (ix.callbacks[0].at - ix.created_at) for ix in during]
        result["upload_intake_s"] = round(intake["end"] - intake["start"], 2)
    return result


def _stats(ms: list[float], prefix: str = "") -> dict[str, Any]:
    if len(ms) < 2:
        return {f"{prefix}interactions": len(ms)}
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        f"{prefix}interactions": len(ms),
        f"{prefix}ack_ms_p50": round(q[49], 1),
        f"{prefix}ack_ms_p99": round(q[98], 1),
        f"{prefix}ack_ms_max": round(ms[-1], 1),
        f"{prefix}over_3s": sum(m > 3000 for m in ms),
    }


async def serve_stub(members: int, rounds: int, upload: int) -> None:
    """The child process: the stub and its members, told by the parent (one line on stdin) when
    the bot is ready and when it has closed; answers in JSON lines on stdout."""
    from discord_stub import DiscordStub

    async def told() -> str:
        return (await asyncio.to_thread(sys.stdin.readline)).strip()

    stub = DiscordStub()
    async with stub:
        print(json.dumps({"api_base": stub.api_base, "gateway": stub.gateway_url, "guild": stub.guild_id}))
        sys.stdout.flush()
        if await told() != "go":
            return
        result = await drive(stub, members, rounds, upload)
        print(json.dumps({"finished": True}), flush=True)
        await told()  # the bot has closed: what it left unanswered is counted below
    result["violations"] = [str(v) for v in stub.violations]
    print(json.dumps(result), flush=True)


def _config(tmp: Path, stub: dict[str, Any], with_training: bool) -> Path:
    path = tmp / "server.toml"
    path.write_text(
        f'[store]\npath = "{tmp}/loracord.db"\n[data]\ndir = "{tmp}/data"\n'
        f'[workers]\ndevices = ["cpu"]\n[bases]\ntiny = "tiny:sd15"\n'
        f'[quota]\nqueued_jobs = 1000\ndaily_gpu_seconds = "unlimited"\ntotal_steps = 10000000\n'
        f"[web]\nport = 0\n"
        f'[discord]\napi_base = "{stub["api_base"]}"\ngateway = "{stub["gateway"]}"\n'
        f"guilds = [{stub['guild']}]\n",
        encoding="utf-8",
    )
    return path


async def _start_training(cfg: Any, db: Any, scheduler: Any, stack: contextlib.AsyncExitStack) -> None:
    """A tiny LoRA that trains for longer than the run (its worker is stopped with the scheduler),
    submitted before the crowd and running, past its first step, when the crowd starts."""
    from bot import jobs, store
    from bot.files import member_path
    from runner.selftest import make_demo_dataset

    make_demo_dataset(member_path(cfg.data_dir, "trainer", "datasets", "ds"), count=4, repeats=2)
    settings = {
        "max_train_epochs": 10000,
        "save_every_n_epochs": 10000,
        "sample_every_n_epochs": 0,
        "network_dim": 4,
        "network_alpha": 2,
        "resolution": 64,
        "mixed_precision": "no",
    }
    job = jobs.submit_train(db, cfg, "trainer", "ds", "tiny", "background", settings)
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop))

    async def end() -> None:
        stop.set()
        await task

    stack.push_async_callback(end)
    deadline = time.monotonic() + 300
    while (store.get_job(db, job.id).progress or "").find('"step"') < 0:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise TimeoutError("the background training did not start within 300 s")
        await asyncio.sleep(0.2)


async def measure(
    members: int, rounds: int, *, upload: int = 0, with_training: bool = False, in_process: bool = False
) -> dict[str, Any]:
    from bot import store
    from bot.config import load_config
    from bot.discord.app import LoracordBot, point_discord_py
    from bot.dispatch import make_dispatcher
    from bot.scheduler import Scheduler
    from bot.web import WebServer

    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        child = stub = None
        if in_process:
            from discord_stub import DiscordStub

            stub = await stack.enter_async_context(DiscordStub())
            where = {"api_base": stub.api_base, "gateway": stub.gateway_url, "guild": stub.guild_id}
        else:
            args = [
                "--serve-stub",
                "--members",
                str(members),
                "--rounds",
                str(rounds),
                "--upload",
                str(upload),
            ]
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.discord_ack",
                *args,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,  # the result line lists every interaction's ack time
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                },
            )

            async def end_child() -> None:
                child.stdin.close()  # an EOF ends the child wherever it waits for the parent
                await child.wait()

            stack.push_async_callback(end_child)
            where = json.loads(await child.stdout.readline())
        cfg = load_config(_config(tmp, where, with_training))
        db = store.open_store(cfg.store)
        scheduler = Scheduler(db, cfg, make_dispatcher(cfg))
        web = await stack.enter_async_context(WebServer(cfg, db, scheduler))
        if with_training:
            await _start_training(cfg, db, scheduler, stack)
        bot = LoracordBot(cfg, db, scheduler, web, guild_ready_timeout=0.05)
        point_discord_py(cfg)
        running = asyncio.create_task(bot.start(STUB_TOKEN))
        ready = asyncio.create_task(bot.wait_until_ready())
        await asyncio.wait({running, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()
        try:
            if stub is not None:
                result = await drive(stub, members, rounds, upload)
            else:
                child.stdin.write(b"go\n")
                await child.stdin.drain()
                line = await child.stdout.readline()
                if not line:
                    raise RuntimeError("the stub's process ended before the rounds did")
        finally:
            ready.cancel()
            await bot.close()
            await asyncio.wait_for(running, 30)
        if stub is not None:
            await stub.close()
            result["violations"] = [str(v) for v in stub.violations]
        else:
            child.stdin.write(b"closed\n")
            await child.stdin.drain()
            result = json.loads(await child.stdout.readline())
    out = {**_stats(result["ack_ms"]), "rounds_run": result["rounds"], "wall_s": result["wall_s"]}
    if upload:
        out.update(_stats(result["upload_ack_ms"], "upload_"), upload_intake_s=result["upload_intake_s"])
    out["violations"] = result["violations"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[50])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--upload", type=int, default=0, metavar="K", help="a member posts K images meanwhile")
    p.add_argument("--with-training", action="store_true", help="a CPU worker trains meanwhile")
    p.add_argument("--training-threads", type=int, default=1, help="torch threads of that worker")
    p.add_argument("--in-process", action="store_true", help="the stub in the bot's process (old set-up)")
    p.add_argument("--serve-stub", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.serve_stub:
        asyncio.run(serve_stub(args.members[0], args.rounds, args.upload))
        return 0
    if args.with_training:  # inherited by the worker the scheduler starts
        os.environ["OMP_NUM_THREADS"] = str(args.training_threads)
    for n in args.members:
        result = asyncio.run(
            measure(
                n,
                args.rounds,
                upload=args.upload,
                with_training=args.with_training,
                in_process=args.in_process,
            )
        )
        settings = {
            "members": n,
            "rounds": args.rounds,
            "stub": "in-process" if args.in_process else "own process",
        }
        if args.with_training:
            settings["training_threads"] = args.training_threads
        if args.upload:
            settings["upload"] = args.upload
        emit("loracord", "discord_ack", settings=settings, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
