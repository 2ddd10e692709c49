"""One ``runner.worker`` child process per device, spoken to in JSON lines.

A GPU worker is a fresh ``python -m runner.worker DEVICE``. A CPU worker is forked from a template
process that has already imported what a worker needs (``runner.warm``: torch, diffusers, ...,
about ten seconds on a small CPU), so it is ready at once, and so is one started again after it
died. GPU workers cannot be forked that way: CUDA does not survive a fork once the parent has
touched it, and importing bitsandbytes (through diffusers) does.

Reading happens in an asyncio task per child, so the bot's event loop never waits on a worker.
A child that exits on its own (kill -9, CUDA error, out of memory) is reported at once with the
reason (its signal or exit code and the end of its log) and started again; a child that keeps
dying right after start is restarted with a growing pause.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import multiprocessing
import os
import re
import runpy
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import Message, WorkerDied, WorkerEvent, event_of

log = logging.getLogger(__name__)
_LINE_LIMIT = 2**24  # bytes; the longest event (a tag job's frequencies) is far below
_ERROR_LINE = re.compile(r"error|exception|out of memory|killed", re.IGNORECASE)


def _die_with_parent() -> None:
    # A bot killed with -9 cannot stop its workers; Linux can: SIGTERM (cancel, then exit) when
    # the parent goes, so an orphan never trains on beside the job the next bot resumes.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_reason(returncode: int, log_path: Path) -> str:
    if returncode < 0:
        try:
            why = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            why = f"killed by signal {-returncode}"
    else:
        why = f"exited with code {returncode}"
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        lines = []
    # The log's last error says why (CUDA error, out of memory); library warnings do not.
    tail = [line for line in lines if _ERROR_LINE.search(line)][-1:]
    return why + (f" ({tail[0][-300:]})" if tail else "")


WARM_MODULE = "runner.warm"


def _warm_template() -> multiprocessing.context.ForkServerContext | None:
    """The forkserver that CPU workers fork from, with ``runner.warm`` imported; None where there
    is no forkserver (not Linux), and CPU workers start fresh like GPU ones."""
    if sys.platform != "linux":
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([WARM_MODULE])
    return context


def _forked_worker(
    stdin: Connection, stdout: Connection, log_path: str, env: dict[str, str], device: str
) -> None:
    """A CPU worker's body in the process forked from the template: ``runner.worker``'s main on
    the pipes, log and environment the bot gave it, as an exec'd worker has them."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd, std in ((stdin.fileno(), 0), (stdout.fileno(), 1), (log_fd, 2)):
        os.dup2(fd, std)
    stdin.close(), stdout.close(), os.close(log_fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (they live as long as the process)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent()  # the template's child: the template exits when the bot does
    sys.argv = [WARM_MODULE, device]
    runpy.run_module("runner.worker", run_name="__main__", alter_sys=True)


class _Forked:
    """A worker forked from the template, with the part of ``asyncio.subprocess.Process`` that
    ``_Child`` uses (the template, not the bot, is its parent: the return code comes through
    multiprocessing's sentinel)."""

    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
    ):
        self.process, self.stdin, self.stdout = process, stdin, stdout
        self.pid = process.pid
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[int] = loop.create_future()
        loop.add_reader(process.sentinel, self._on_end)

    @classmethod
    async def start(
        cls,
        context: multiprocessing.context.ForkServerContext,
        device: str,
        log_path: Path,
        env: dict[str, str],
    ) -> _Forked:
        loop = asyncio.get_running_loop()
        child_in, bot_in = os.pipe()
        bot_out, child_out = os.pipe()
        ends = (Connection(child_in, writable=False), Connection(child_out, readable=False))
        # daemon: multiprocessing stops it when the bot exits without closing its workers
        process = context.Process(
            target=_forked_worker,
            args=(*ends, str(log_path), env, device),
            name=f"worker {device}",
            daemon=True,
        )
        try:
            # The first start waits for the template's imports: off the event loop.
            await asyncio.to_thread(process.start)
        finally:
            for end in ends:
                end.close()  # the template has sent them on; the child holds its copies
        stdout = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), open(bot_out, "rb", 0))  # noqa: SIM115
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin,
            open(bot_in, "wb", 0),  # noqa: SIM115
        )
        stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        return cls(process, stdin, stdout)

    def _on_end(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        self.process.join()  # reads the return code the template wrote; the process has ended
        self._ended.set_result(self.process.exitcode)

    @property
    def returncode(self) -> int | None:
        return self._ended.result() if self._ended.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Child:
    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        inbox: asyncio.Queue[Message],
        env: dict[str, str],
        template: multiprocessing.context.ForkServerContext | None = None,
    ):
        """``template``: fork the worker from it (``command``'s last item is the device) instead
        of running ``command``."""
        self.name, self.command, self.log_path, self.inbox, self.env = name, command, log_path, inbox, env
        self.template = template
        self.proc: asyncio.subprocess.Process | _Forked | None = None
        self.closing = False
        self.quick_deaths = 0
        self.reader: asyncio.Task | None = None
        self.ready = False  # a live process that has not died since it was started

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.template is not None:
            self.proc = await _Forked.start(self.template, self.command[-1], self.log_path, self.env)
        else:
            with open(self.log_path, "ab") as log_file:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log_file,
                    limit=_LINE_LIMIT,
                    env=self.env,
                    preexec_fn=_die_with_parent,
                )
        self.started = time.monotonic()
        self.ready = True
        self.reader = asyncio.create_task(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the reader's limit: StreamReader has dropped it
                log.warning("%s: skipped a line over %d bytes", self.name, _LINE_LIMIT)
                continue
            if not raw:
                break
            self._take(raw)
        code = await proc.wait()
        self.ready = False
        if self.closing:
            return
        reason = _exit_reason(code, self.log_path)
        log.error("worker %s died: %s", self.name, reason)
        self.inbox.put_nowait(WorkerDied(self.name, reason))
        self.quick_deaths = self.quick_deaths + 1 if time.monotonic() - self.started < 10 else 0
        if self.quick_deaths:
            await asyncio.sleep(min(2**self.quick_deaths, 60))
        if not self.closing:
            await self.spawn()

    def _take(self, raw: bytes) -> None:
        """Pass on one line that is an event of a job; anything else (a library's print, ``5``,
        ``null``, a cut-off line) is logged and skipped, so no line can stop the reader."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("job"), int):
                raise ValueError("not an event of a job")
            job, event = event_of(data)
        except ValueError:  # pydantic's ValidationError and JSONDecodeError are ValueErrors
            log.warning("%s: not an event: %s", self.name, raw[:200])
            return
        self.inbox.put_nowait(WorkerEvent(self.name, job, event))

    async def write(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader reports the death and the scheduler requeues the job

    async def close(self, grace: float = 10) -> None:
        self.closing = True
        if self.proc and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.send_signal(signal.SIGTERM)  # the worker cancels its job; epochs saved stay
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader:
            await self.reader


class LocalDispatcher:
    def __init__(self, devices: list[str], log_dir: Path, program: list[str] | None = None):
        """``program``: what runs as a worker, given its device as the last argument (tests run a
        worker whose output they control)."""
        self.log_dir = log_dir
        self.template = None if program else _warm_template()
        self.program = program or [sys.executable, "-m", "runner.worker"]
        self.workers = [f"{i}:{d}" for i, d in enumerate(devices)]
        self.devices = dict(zip(self.workers, devices, strict=True))
        self.children: dict[str, _Child] = {}

    async def start(self, inbox: asyncio.Queue[Message]) -> None:
        # CPU workers share the cores instead of each starting a thread per core.
        cpu_workers = sum(d == "cpu" for d in self.devices.values())
        threads = str(max(1, (os.cpu_count() or 1) // max(cpu_workers, 1)))
        for name, device in self.devices.items():
            env = dict(os.environ)
            if device == "cpu":
                env.setdefault("OMP_NUM_THREADS", threads)
            log_path = self.log_dir / f"worker-{name.replace(':', '-')}.log"
            template = self.template if device == "cpu" else None
            child = _Child(name, [*self.program, device], log_path, inbox, env, template)
            self.children[name] = child
        await asyncio.gather(*(c.spawn() for c in self.children.values()))

    async def send(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None:
        await self.children[worker].write({"type": kind, "id": job_id, "spec": spec})

    async def cancel(self, worker: str, job_id: int) -> None:
        await self.children[worker].write({"type": "cancel", "id": job_id})

    def ready(self, worker: str) -> bool:
        return self.children[worker].ready

    def kill(self, worker: str) -> None:
        """SIGKILL the worker (a hung one ignores SIGTERM); it is reported dead and started again."""
        proc = self.children[worker].proc
        if proc and proc.returncode is None:
            proc.kill()

    def pid(self, worker: str) -> int | None:
        proc = self.children[worker].proc
        return proc.pid if proc else None

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.children.values()))
