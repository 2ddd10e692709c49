"""The scheduler: reads the queue from the store, hands jobs to free workers, records what comes back.

One asyncio task. The store is the truth and is polled (``[scheduling] poll_seconds``), so jobs
submitted or cancelled by another process (``loracord jobs …``) are seen without any other
channel. A worker that dies sends its jobs back to the queue to resume from their last saved
epoch (failed with the reason after ``max_attempts`` runs); jobs found running at start-up are
recovered the same way.

A watchdog keeps "running" honest: a worker whose jobs send no event for ``[workers]
stall_seconds``, or whose cancelled job has not stopped ``cancel_grace_seconds`` after the cancel,
is killed; its death then sends its jobs back to the queue (or ends a cancelled one) as above.

Charging: a job pays for its own compute time, never for its wait. A final event carries that
time, measured by the worker (a training job's excludes the short jobs it served between its
steps); an attempt that ends without one (its worker died or hung, the bot restarted) pays from
its start to the last event heard from it, less what short jobs served in that time paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from runner.spec import DoneEvent, EpochEvent, FailedEvent, ImagesEvent, ProgressEvent, SamplesEvent

from . import jobs, store
from .config import Config
from .dispatch import FINAL, Dispatcher, Message, WorkerDied
from .files import DiskFull, check_free_disk, sha256_file

log = logging.getLogger(__name__)
Listener = Callable[[store.Job, Any], Awaitable[None] | None]


@dataclass
class _Slot:
    main: int | None = None  # the job the worker runs
    training: bool = False  # whether that job trains (short jobs can then go between its steps)
    between: set[int] = field(default_factory=set)  # short jobs it serves between training steps


@dataclass
class Timing:
    """Where the scheduler's own time goes, for the operator's note."""

    dispatch_s: list[float] = field(default_factory=list)  # deciding and sending one job
    handle_s: list[float] = field(default_factory=list)  # recording one event
    end_to_start_s: list[float] = field(default_factory=list)  # a worker's job end → its next job sent


class Scheduler:
    def __init__(self, db: Database, cfg: Config, dispatcher: Dispatcher):
        self.db, self.cfg, self.dispatcher = db, cfg, dispatcher
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.slots = {w: _Slot() for w in dispatcher.workers}
        self.listeners: list[Listener] = []
        self.timing = Timing()
        self._freed_at: dict[str, float] = {}
        self._heard: dict[int, float] = {}  # running job → when it started or last sent an event
        self._cancel_sent: dict[int, float] = {}  # running job → when its cancel went to the worker
        self._killing: dict[str, str] = {}  # worker → why the watchdog killed it
        self.restarts = 0
        self.deaths: dict[str, tuple[int, str]] = {}  # worker → (restarts, why it died last)
        self.problems: dict[str, str] = {}  # "disk" | "store" → why jobs cannot start or be recorded now

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(job, event)`` after each event is recorded (the Discord side's hook).
        Listeners must not wait on anything slow: every event but progress is also written to the
        Discord outbox, which the bot delivers on its own task."""
        self.listeners.append(listener)

    # ---- the loop ----

    async def run(self, stop: asyncio.Event) -> None:
        self.recover("the bot restarted while it ran")
        await self.dispatcher.start(self.inbox)
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                    self._resolved("store")
                except sqlite3.OperationalError as e:
                    self._report("store", f"the database cannot be written ({e}); no job starts until it can")
                try:
                    async with asyncio.timeout(self.cfg.scheduling.poll_seconds):
                        msg = await self.inbox.get()
                except TimeoutError:
                    continue
                await self._record(msg, stop)  # never under the timeout: a half-recorded event is lost
                while not self.inbox.empty():
                    await self._record(self.inbox.get_nowait(), stop)
        finally:
            await self.dispatcher.close()
            self.recover("the bot was stopped while it ran")

    async def _record(self, msg: Message, stop: asyncio.Event) -> None:
        """``handle`` until the store takes it: a full disk holds events back (the worker goes on)
        instead of losing them or ending the scheduler."""
        while True:
            try:
                await self.handle(msg)
                self._resolved("store")
                return
            except sqlite3.OperationalError as e:
                self._report("store", f"the database cannot be written ({e}); events wait until it can")
                if stop.is_set():
                    return
                await asyncio.sleep(self.cfg.scheduling.poll_seconds)

    def _report(self, kind: str, problem: str) -> None:
        if self.problems.get(kind) != problem:  # once per episode, not once per poll
            log.error("%s", problem)
        self.problems[kind] = problem

    def _resolved(self, kind: str) -> None:
        if self.problems.pop(kind, None) is not None:
            log.warning("resolved: %s", kind)

    def recover(self, reason: str) -> None:
        """Send every running job back to the queue (or fail it after too many tries)."""
        for job in store.list_jobs(self.db, ("running",)):
            self._requeue(job, reason)
        self.slots = {w: _Slot() for w in self.slots}

    async def tick(self) -> None:
        now = time.time()
        for job in store.list_jobs(self.db, ("running",)):
            if job.cancel_requested and job.id not in self._cancel_sent and job.worker in self.slots:
                self._cancel_sent[job.id] = now
                await self.dispatcher.cancel(job.worker, job.id)
        self._watch(now)
        queued = []
        for job in store.list_jobs(self.db, ("queued",)):
            if not job.cancel_requested:
                queued.append(job)
                continue
            # Cancelled while it ran, then sent back to the queue before the cancel took effect.
            with contextlib.suppress(jobs.JobError):  # or cancelled meanwhile by another process
                jobs.move(self.db, job.id, "cancelled", finished_at=now, failure="cancelled")
        if store.get_setting(self.db, "paused", False):
            return
        try:
            check_free_disk(self.cfg.data_dir, self.cfg.data.min_free_gb)
        except DiskFull as e:
            self._report("disk", f"no job starts: {e}")
            return
        self._resolved("disk")
        if all(s.main is not None and (not s.training or s.between) for s in self.slots.values()):
            return  # no worker could take any job now
        if not queued:
            return
        started = time.perf_counter()
        running = store.list_jobs(self.db, ("running",))
        training = {}
        for job in running:
            if job.kind == "train":
                training[job.owner] = training.get(job.owner, 0) + 1
        now = time.time()
        for job in jobs.fair_order(queued, jobs.window_usage(self.db, self.cfg, running, now)):
            try:
                spec = job.spec_dict  # a row any process may have written: read before the job moves
                worker = self._worker_for(job, training)
            except Exception as e:  # one bad row fails its own job; the queue goes on
                await self._unstartable(job, e)
                continue
            if worker is None:
                continue
            if await self._start(job, worker, spec):
                if job.kind == "train":
                    training[job.owner] = training.get(job.owner, 0) + 1
                self.timing.dispatch_s.append(time.perf_counter() - started)
                started = time.perf_counter()

    def _watch(self, now: float) -> None:
        """Kill a worker that is silent too long, or that has not stopped a cancelled job in time."""
        grace, stall = self.cfg.workers.cancel_grace_seconds, self.cfg.workers.stall_seconds
        for worker, slot in self.slots.items():
            held = [j for j in (slot.main, *slot.between) if j is not None]
            if not held or worker in self._killing:
                continue
            if any(now - self._cancel_sent.get(j, now) > grace for j in held):
                self._kill(worker, f"it did not stop within {grace:g} s of a cancel")
            elif now - max(self._heard.get(j, now) for j in held) > stall:
                # A short job served between steps speaks for the training job too: it holds it.
                self._kill(worker, f"it stalled: no event for {stall:g} s")

    def _kill(self, worker: str, why: str) -> None:
        log.error("killing worker %s: %s", worker, why)
        self._killing[worker] = why
        self.dispatcher.kill(worker)

    def _worker_for(self, job: store.Job, training: dict[str, int]) -> str | None:
        up = {w: s for w, s in self.slots.items() if self.dispatcher.ready(w)}
        free = [w for w, s in up.items() if s.main is None and not s.between]
        if job.kind != "train":
            # An idle worker, else one that trains and is not already serving a short job.
            busy = [w for w, s in up.items() if s.training and not s.between]
            return (free or busy or [None])[0]
        if (
            not free
            or training.get(job.owner, 0)
            >= jobs.effective_quota(self.db, self.cfg, job.owner).concurrent_jobs
        ):
            return None
        return free[0]

    async def _unstartable(self, job: store.Job, error: Exception) -> None:
        log.exception("job %s cannot start", job.id, exc_info=error)
        event = FailedEvent(kind="error", reason=f"it cannot start ({type(error).__name__}: {error})"[:500])
        try:
            jobs.move(self.db, job.id, "failed", finished_at=time.time(), failure=event.reason)
        except jobs.JobError:
            return  # cancelled meanwhile
        store.add_event(self.db, job.id, event.type, event.model_dump(mode="json"))
        await self._publish(job.id, event)  # the member hears of it

    async def _start(self, job: store.Job, worker: str, spec: dict[str, Any]) -> bool:
        try:
            # One transaction: a write that fails (a full disk) leaves the job queued, never
            # "running" without a worker that has it.
            with store.immediate(self.db):
                jobs.move(
                    self.db,
                    job.id,
                    "running",
                    worker=worker,
                    started_at=time.time(),
                    attempts=job.attempts + 1,
                    progress=None,
                )
                store.add_event(self.db, job.id, "started", {"worker": worker, "attempt": job.attempts + 1})
        except jobs.JobError:
            return False  # cancelled by another process in the meantime
        slot = self.slots[worker]
        self._heard[job.id] = time.time()
        if slot.main is None:
            slot.main, slot.training = job.id, job.kind == "train"
        else:
            slot.between.add(job.id)
        if worker in self._freed_at:
            self.timing.end_to_start_s.append(time.monotonic() - self._freed_at.pop(worker))
        await self.dispatcher.send(worker, job.id, job.kind, spec)
        return True

    # ---- what comes back ----

    async def handle(self, msg: Message) -> None:
        started = time.perf_counter()
        if isinstance(msg, WorkerDied):
            self.restarts += 1
            deaths, _ = self.deaths.get(msg.worker, (0, ""))
            self.deaths[msg.worker] = (deaths + 1, msg.reason)
            slot = self.slots[msg.worker]
            killed = self._killing.pop(msg.worker, None)
            reason = f"its worker was restarted: {killed}" if killed else f"its worker {msg.reason}"
            for job_id in [slot.main, *slot.between]:
                job = store.get_job(self.db, job_id) if job_id is not None else None
                if job and job.state == "running":
                    self._requeue(job, reason)
            self._release(msg.worker, [slot.main, *slot.between])
            return
        job = store.get_job(self.db, msg.job_id)
        if job is None or job.state != "running":
            return  # a late event of a job already finished or recovered
        self._heard[job.id] = time.time()
        event = msg.event
        if isinstance(event, FailedEvent) and event.kind == "cancelled" and job.failure:
            # Stopped by the scheduler (over the daily GPU time), not by its owner: say so.
            event = FailedEvent(kind="error", reason=job.failure, seconds=event.seconds)
        if isinstance(event, ProgressEvent):
            store.update_job(self.db, job.id, progress=event.model_dump_json())
            store.add_loss(self.db, job.id, event.step, event.epoch, event.loss)
        else:
            store.add_event(self.db, job.id, event.type, event.model_dump(mode="json"))
        if isinstance(event, EpochEvent):
            store.update_job(self.db, job.id, last_epoch=event.epoch)
            await self._artifacts(job, "lora", [event.lora_file], event.epoch)
            await self._artifacts(job, "image", event.sample_images, event.epoch)
            await self._stop_if_over(store.get_job(self.db, job.id))
        elif isinstance(event, SamplesEvent):
            await self._artifacts(job, "image", event.sample_images, event.epoch)
        elif isinstance(event, DoneEvent):
            await self._artifacts(job, "lora", [event.lora_file], None)
        elif isinstance(event, ImagesEvent):
            await self._artifacts(job, "image", event.images, None)
        if event.type in FINAL:
            self._finish(job, event)
            self._release(msg.worker, [job.id])
        self.timing.handle_s.append(time.perf_counter() - started)
        await self._publish(job.id, event)

    async def _publish(self, job_id: int, event: Any) -> None:
        """Hand a recorded event on: to the Discord outbox (all but progress), then to listeners."""
        if not isinstance(event, ProgressEvent):
            store.add_post(self.db, job_id, event.model_dump(mode="json"))
        job = store.get_job(self.db, job_id)
        for listener in self.listeners:
            result = listener(job, event)
            if asyncio.iscoroutine(result):
                await result

    async def _artifacts(self, job: store.Job, kind: str, paths: list[str], epoch: int | None) -> None:
        for path in paths:
            p = Path(path)
            digest = await asyncio.to_thread(sha256_file, p)  # LoRAs are large; the loop stays free
            store.add_artifact(self.db, job.id, job.owner, kind, str(p), digest, p.stat().st_size, epoch)

    async def _stop_if_over(self, job: store.Job) -> None:
        """A training job past its owner's daily GPU time (and the grace) stops right after the
        epoch it just saved; ``failure`` holds the reason until its worker confirms the stop."""
        if job.kind != "train" or job.cancel_requested:
            return
        reason = jobs.overrun(self.db, self.cfg, job)
        if reason is None:
            return
        store.update_job(self.db, job.id, cancel_requested=1, failure=reason)
        self._cancel_sent[job.id] = time.time()
        await self.dispatcher.cancel(job.worker, job.id)

    def _ran(self, job: store.Job) -> float:
        """GPU time of an attempt that ended without a final event (see the module's note)."""
        start = job.started_at or time.time()
        end = self._heard.get(job.id)
        if end is None:  # recovered after a restart: its last event recorded in the store
            row = self.db.execute(
                "SELECT max(at) FROM job_events WHERE job_id = ? AND at >= ?", [job.id, start]
            ).fetchone()
            end = row[0] or start
        (lent,) = self.db.execute(
            "SELECT coalesce(sum(l.gpu_seconds), 0) FROM ledger l WHERE l.job_id != ? "
            "AND l.at BETWEEN ? AND ? AND l.job_id IN (SELECT e.job_id FROM job_events e "
            "WHERE e.type = 'started' AND json_extract(e.data, '$.worker') = ? AND e.at BETWEEN ? AND ?)",
            [job.id, start, end, job.worker, start, end],
        ).fetchone()
        return max(end - start - lent, 0.0)

    def _finish(self, job: store.Job, event: Any) -> None:
        now = time.time()
        measured = getattr(event, "seconds", None)
        seconds = measured if measured is not None else self._ran(job)
        store.charge(self.db, job.owner, job.id, seconds)
        values: dict[str, Any] = {"finished_at": now, "run_seconds": job.run_seconds + seconds}
        if isinstance(event, FailedEvent):
            state = "cancelled" if event.kind == "cancelled" else "failed"
            values["failure"] = event.reason
        else:
            state = "done"
            values["result"] = event.model_dump_json()
            if isinstance(event, DoneEvent):
                values["steps"] = event.steps
        jobs.move(self.db, job.id, state, **values)

    def _requeue(self, job: store.Job, reason: str) -> None:
        now = time.time()
        seconds = self._ran(job) if job.started_at else 0.0
        if seconds:
            store.charge(self.db, job.owner, job.id, seconds)
        values: dict[str, Any] = {"run_seconds": job.run_seconds + seconds}
        if job.cancel_requested and job.failure:  # stopped over quota; it will not resume
            jobs.move(self.db, job.id, "failed", finished_at=now, failure=job.failure, **values)
        elif job.cancel_requested:
            jobs.move(
                self.db, job.id, "cancelled", finished_at=now, failure=f"cancelled ({reason})", **values
            )
        elif job.attempts >= self.cfg.scheduling.max_attempts:
            failure = f"{reason}; gave up after {job.attempts} tries"
            jobs.move(self.db, job.id, "failed", finished_at=now, failure=failure, **values)
        else:
            if job.kind == "train":
                store.set_job_spec(self.db, job.id, {**job.spec_dict, "resume": True})
            jobs.move(self.db, job.id, "queued", worker=None, started_at=None, progress=None, **values)
            where = f"epoch {job.last_epoch}" if job.last_epoch else "the start"
            store.add_event(self.db, job.id, "requeued", {"reason": reason, "resume_from": where})
        log.warning("job %s: %s", job.id, reason)

    def _release(self, worker: str, job_ids: list[int | None]) -> None:
        slot = self.slots[worker]
        for job_id in job_ids:
            if job_id is None:
                continue
            self._cancel_sent.pop(job_id, None)
            self._heard.pop(job_id, None)
            slot.between.discard(job_id)
            if slot.main == job_id:
                slot.main, slot.training = None, False
                self._freed_at[worker] = time.monotonic()
