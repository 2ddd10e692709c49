"""The bot's scheduler overhead per job: queue → worker → result recorded, with workers that answer at once.

The workers are an in-process dispatcher that finishes every job the moment it is sent, so what is
timed is the scheduler alone: fair ordering, the SQLite store (WAL), event handling. Figures come
from the scheduler's own ``Timing`` plus the wall time per job.

    python -m bench.scheduler --jobs 300 --members 50 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bot import jobs, store
from bot.config import load_config
from bot.dispatch import Message, WorkerEvent
from bot.scheduler import Scheduler
from runner.spec import ImagesEvent

from .common import emit


class InstantDispatcher:
    """Workers that end each job as soon as it arrives (no process, no GPU)."""

    def __init__(self, workers: int) -> None:
        self.workers = [f"w{i}" for i in range(workers)]
        self.inbox: asyncio.Queue[Message] | None = None

    async def start(self, inbox: asyncio.Queue[Message]) -> None:
        self.inbox = inbox

    async def send(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None:
        assert self.inbox is not None
        done = ImagesEvent(images=[], parameters=[], seeds=[], seconds=0.0)
        self.inbox.put_nowait(WorkerEvent(worker, job_id, done))

    def ready(self, worker: str) -> bool:
        return True

    async def cancel(self, worker: str, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


def config(root: Path, members: int, workers: int):
    path = root / "server.toml"
    path.write_text(
        f'[store]\npath = "loracord.db"\n[data]\ndir = "data"\n'
        f'[workers]\ndevices = {["cpu"] * workers}\n[bases]\ntiny = "tiny:sd15"\n'
        f'[quota]\nqueued_jobs = "unlimited"\nconcurrent_jobs = 1\ndaily_gpu_seconds = "unlimited"\n'
        f"[scheduling]\npoll_seconds = 0.05\n".replace("'", '"'),
        encoding="utf-8",
    )
    return load_config(path)


async def drive(sched: Scheduler, total: int, timeout: float) -> float:
    """Run the scheduler until ``total`` jobs have ended; the wall time it took."""
    stop = asyncio.Event()
    ended = 0

    def count(job: store.Job, event: Any) -> None:
        nonlocal ended
        ended += event.type == "images"
        if ended >= total:
            stop.set()

    sched.subscribe(count)
    started = time.perf_counter()
    task = asyncio.create_task(sched.run(stop))
    waiting = asyncio.create_task(stop.wait())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([waiting, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a scheduler that crashed says why
    finally:
        stop.set()
        await task
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loracord-schedbench-") as tmp:
        cfg = config(Path(tmp), args.members, args.workers)
        db = store.open_store(cfg.store)
        submit_started = time.perf_counter()
        for i in range(args.jobs):
            jobs.submit_gen(db, cfg, f"member{i % args.members}", "a cat", "tiny", {"steps": 4})
        submit_s = (time.perf_counter() - submit_started) / args.jobs
        sched = Scheduler(db, cfg, InstantDispatcher(args.workers))
        wall = asyncio.run(drive(sched, args.jobs, args.timeout))
    t = sched.timing
    ms = 1000
    return emit(
        "loracord",
        "scheduler",
        settings={"jobs": args.jobs, "members": args.members, "workers": args.workers, "kind": "gen"},
        per_job_ms=round(wall / args.jobs * ms, 3),
        jobs_per_s=round(args.jobs / wall, 1),
        submit_ms=round(submit_s * ms, 3),
        dispatch_ms_p50=round(statistics.median(t.dispatch_s) * ms, 3),
        dispatch_ms_p99=round(pct(t.dispatch_s, 0.99) * ms, 3),
        handle_ms_p50=round(statistics.median(t.handle_s) * ms, 3),
        handle_ms_p99=round(pct(t.handle_s, 0.99) * ms, 3),
        end_to_start_ms_p50=round(statistics.median(t.end_to_start_s) * ms, 3) if t.end_to_start_s else None,
        seconds=round(wall, 3),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--members", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
