"""Intake: posted files streamed to disk, made into the dataset in a child process; old drafts swept."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

import aiohttp
import discord
from discord.ext import commands, tasks

from runner.data.intake import build_dataset
from runner.spec import IntakeSpec

from .. import jobs, store
from ..files import DiskFull, PathError, check_free_disk, member_path
from . import state
from .card import refresh_card
from .common import clip, member_id, size_text
from .draft import FROZEN, SUBSET, dataset_dir, effective, repeats, subset_dir

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
_CHILDREN = multiprocessing.get_context("forkserver")
_CHILDREN.set_forkserver_preload(["runner.data.intake"])
_CHUNK = 1 << 20  # bytes an attachment is written to disk by, never held whole in memory
# Downloads of one message at once: under a crowd each await waits behind every interaction ready
# to run, so ten files one after another took ten times as many turns of the event loop.
_PARALLEL_DOWNLOADS = 4
_SWEEP_MINUTES = 60


async def download(
    session: aiohttp.ClientSession, attachment: discord.Attachment, path: Path, limit: int
) -> str | None:
    """Stream one attachment to ``path`` in chunks (a 500 MB zip never sits in memory); returns
    why it was not saved, or None. discord.py's ``Attachment.save`` reads the whole file first."""
    if attachment.size > limit:
        return f"{size_text(attachment.size)} is too large to take in (the limit is {size_text(limit)})"
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        async with session.get(attachment.url) as response:
            response.raise_for_status()
            with open(path, "wb") as f:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    written += len(chunk)
                    if written > limit:  # the size Discord announced can be wrong; the limit holds
                        raise ValueError
                    f.write(chunk)
    except ValueError:
        path.unlink(missing_ok=True)
        return f"more than {size_text(limit)}; not taken in"
    except (aiohttp.ClientError, TimeoutError) as e:
        path.unlink(missing_ok=True)
        return f"could not be downloaded from Discord ({e or type(e).__name__}); send it again"
    return None


async def in_child_process(fn: Callable[[T], R], arg: T) -> R:
    """``fn(arg)`` in a fresh process: image decoders are native code, and one that crashes on a
    member's file must not take the bot (and every member's session) down with it.
    ``BrokenProcessPool`` says the child died. Children are forked from a forkserver (a small
    single-threaded process with the intake code already imported): quick to start, and never a
    fork of this threaded process, which could deadlock, nor a copy of its memory."""
    pool = ProcessPoolExecutor(1, mp_context=_CHILDREN)
    try:
        # The pool forks in submit(), which connects to the forkserver and, the first time, waits
        # for it to start and import the intake code: not on the event loop.
        return await asyncio.wrap_future(await asyncio.to_thread(pool.submit, fn, arg))
    finally:
        await asyncio.to_thread(pool.shutdown)


class IntakeMixin:
    """The cog's intake (mixed into :class:`.train.Cog`, which holds ``bot`` and the state below,
    shared with /train and Start)."""

    bot: commands.Bot
    _intake_locks: dict[int, asyncio.Lock]
    _early: dict[int, set[int]]

    async def _posted_earlier(self, draft: state.Draft, thread: discord.Thread) -> list[discord.Message]:
        """The owner's messages with files that on_message could not take in: the thread shows up
        in their app before the bot hears back that it made it, so they are read from its history."""
        taken = self._early[draft.id]
        found = [m async for m in thread.history(limit=100, oldest_first=True)]
        # Checked and marked with no await in between: on_message skips what is marked, and this
        # skips what on_message took in while the history was read.
        early = [m for m in found if m.author.id == int(draft.owner) and m.attachments and m.id not in taken]
        taken.update(m.id for m in early)
        # A late gateway event for one of these may still come; the marks stay for a while.
        asyncio.get_running_loop().call_later(600, self._early.pop, draft.id, None)
        return early

    # ---- images posted in the thread ----

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or not message.attachments or not isinstance(message.channel, discord.Thread):
            return
        draft = state.draft_in_thread(self.bot.db, message.channel.id)
        if draft is None:
            return
        if draft.owner != member_id(message.author):
            await message.reply("Only this LoRA's owner can add images here.", mention_author=False)
            return
        if draft.job_id is not None:
            await message.reply(
                "Training has started; start a new /train to use more images.", mention_author=False
            )
            return
        taken = self._early.get(draft.id)
        if taken is not None:
            if message.id in taken:
                return
            taken.add(message.id)
        await self.take_in(draft, message.attachments, message.channel)

    async def take_in(
        self, draft: state.Draft, attachments: list[discord.Attachment], thread: discord.abc.Messageable
    ) -> None:
        lock = self._intake_locks.setdefault(draft.id, asyncio.Lock())
        async with lock:
            if state.get_draft(self.bot.db, draft.id).job_id is not None:  # Start won the lock first
                await thread.send(FROZEN)
                return
            data = self.bot.cfg.data
            try:
                check_free_disk(self.bot.cfg.data_dir, data.min_free_gb, sum(a.size for a in attachments))
            except DiskFull as e:
                await thread.send(f"Not taken in: {e}.")
                return
            uploads = member_path(self.bot.cfg.data_dir, draft.owner, "uploads", draft.dataset)
            sources, problems = [], []
            report = None
            try:
                paths = []
                for i, a in enumerate(attachments):
                    try:
                        path = member_path(
                            self.bot.cfg.data_dir,
                            draft.owner,
                            "uploads",
                            draft.dataset,
                            f"{a.id}-{i}",
                            a.filename,
                        )
                    except PathError:
                        path = uploads / f"{a.id}-{i}" / f"file{Path(a.filename).suffix[:8]}"
                    paths.append(path)
                # No limit on the whole download (500 MB on a slow link), only on a stalled one.
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
                gate = asyncio.Semaphore(_PARALLEL_DOWNLOADS)
                limit = int(data.max_upload_mb * 2**20)

                async def fetch(a: discord.Attachment, path: Path) -> str | None:
                    async with gate:
                        return await download(session, a, path, limit)

                async with aiohttp.ClientSession(timeout=timeout) as session:
                    outcomes = await asyncio.gather(
                        *(fetch(a, p) for a, p in zip(attachments, paths, strict=True))
                    )
                for a, path, problem in zip(attachments, paths, outcomes, strict=True):
                    if problem:
                        problems.append(f"✗ {a.filename}: {problem}")
                    else:
                        sources.append(str(path))
                if sources:
                    _, family = effective(self.bot, draft)
                    spec = IntakeSpec(
                        sources=sources,
                        output_dir=str(dataset_dir(self.bot, draft)),
                        name=SUBSET,
                        num_repeats=repeats(draft),
                        resolution=jobs.native_resolution(family),
                        max_images=jobs.effective_quota(
                            self.bot.db, self.bot.cfg, draft.owner
                        ).images_per_dataset,
                        max_zip_members=data.max_zip_members,
                    )
                    existing = subset_dir(dataset_dir(self.bot, draft))
                    if existing is not None and existing.name != f"{spec.num_repeats}_{SUBSET}":
                        existing.rename(existing.with_name(f"{spec.num_repeats}_{SUBSET}"))
                    try:
                        report = await in_child_process(build_dataset, spec)
                    except BrokenProcessPool:
                        log.error("draft %s: the image decoder crashed", draft.id)
                        problems.append(
                            "✗ the image reader crashed on these files, so none of them was added; "
                            "send them again as PNG or JPEG (a few at a time shows which one it is)"
                        )
            finally:
                shutil.rmtree(uploads, ignore_errors=True)
            if report is not None:
                problems += [
                    f"✗ {e.source.split('/')[-1]}: {e.reason}"
                    for e in report.entries
                    if e.status == "rejected"
                ]
                problems += [f"⚠ #{e.number}: {'; '.join(e.warnings)}" for e in report.entries if e.warnings]
            if problems:
                await thread.send(clip("Some files need a look:\n" + "\n".join(problems)))
            await refresh_card(self.bot, state.get_draft(self.bot.db, draft.id))

    # ---- drafts nobody started ----

    async def cog_load(self) -> None:
        self._sweeper.start()

    async def cog_unload(self) -> None:
        self._sweeper.cancel()

    @tasks.loop(minutes=_SWEEP_MINUTES)
    async def _sweeper(self) -> None:
        try:
            await self.sweep()
        except Exception:  # the next round tries again; the bot goes on
            log.exception("sweeping old drafts failed")

    async def sweep(self, now: float | None = None) -> int:
        """Delete drafts (files and rows) and leftover uploads older than ``[data] draft_days`` that
        were never started; returns how many drafts went."""
        cfg = self.bot.cfg
        before = (time.time() if now is None else now) - cfg.data.draft_days * 86400
        stale = state.stale_drafts(self.bot.db, before)
        for draft in stale:
            tagging = store.get_job(self.bot.db, draft.tag_job_id) if draft.tag_job_id else None
            if tagging is not None and tagging.state in store.ACTIVE:
                jobs.request_cancel(self.bot.db, tagging.id)
            await asyncio.to_thread(shutil.rmtree, dataset_dir(self.bot, draft), True)
            state.delete_draft(self.bot.db, draft.id)
            if draft.card_id is not None:
                self.bot.edits.edit(
                    draft.thread_id,
                    draft.card_id,
                    content=f"Discarded: not started within {cfg.data.draft_days:g} days. Start a new /train.",
                    embed=None,
                    attachments=[],
                    view=None,
                )
        for upload in (cfg.data_dir / "members").glob("*/uploads/*"):
            with contextlib.suppress(FileNotFoundError):  # an intake that just finished removes its own
                if upload.stat().st_mtime < before:
                    await asyncio.to_thread(shutil.rmtree, upload, True)
        if stale:
            log.info("discarded %d draft(s) not started within %g days", len(stale), cfg.data.draft_days)
        return len(stale)
