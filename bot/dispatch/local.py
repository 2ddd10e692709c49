"""One ``runner.worker`` child process per device, spoken to in JSON lines.

A GPU worker is a fresh ``python -m runner.worker DEVICE``. A CPU worker is forked from a template
process that has imported what a worker needs once (``runner/template.py`` says why and how), so
it is ready at once, and so is one started again after it died.

Reading happens in an asyncio task per child, so the bot's event loop never waits on a worker.
A child that exits on its own (kill -9, CUDA error, out of memory) is reported at once with the
reason (its signal or exit code and the end of its log) and started again; a child that keeps
dying right after start is restarted with a growing pause.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from runner import template

from . import Message, WorkerDied, WorkerEvent, event_of

log = logging.getLogger(__name__)
_LINE_LIMIT = 2**24  # bytes; the longest event (a tag job's frequencies) is far below
_ERROR_LINE = re.compile(r"error|exception|out of memory|killed", re.IGNORECASE)


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


class _Template:
    """The bot's side of the template process CPU workers fork from (``runner/template.py``): one
    per bot process, started at the first CPU worker and shared by every dispatcher and event
    loop after it. A thread reads its answers and hands each to the loop of the worker it is about."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one request (send, then its place in line) at a time
        self._conn: Connection | None = None
        self._starting: collections.deque[_Forked] = collections.deque()
        self._forked: dict[int, _Forked] = {}

    async def fork(self, device: str, log_path: Path, env: dict[str, str]) -> _Forked:
        forked = _Forked(asyncio.get_running_loop())
        child_in, bot_in = os.pipe()
        bot_out, child_out = os.pipe()
        # Sent as connections, so multiprocessing hands the template the descriptors themselves.
        ends = (Connection(child_in, writable=False), Connection(child_out, readable=False))
        try:
            # Off the event loop: the first call starts the template (a fresh interpreter).
            await asyncio.to_thread(self._send, forked, (*ends, str(log_path), env, device))
        finally:
            for end in ends:
                end.close()
        await forked.started  # the first answer waits for the template's imports, in the template
        await forked.connect(bot_in, bot_out)
        return forked

    def _send(self, forked: _Forked, request: tuple[Any, ...]) -> None:
        with self._lock:
            if self._conn is None:
                # spawn: a fresh interpreter, never a fork of this threaded process
                context = multiprocessing.get_context("spawn")
                conn, theirs = context.Pipe()
                process = context.Process(target=template.serve, args=(theirs,), name="worker template")
                process.start()
                theirs.close()
                threading.Thread(target=self._hear, args=(conn,), name="worker template", daemon=True).start()
                self._conn = conn
                # Runs before multiprocessing's exit handler, which waits for the template to end:
                # the dispatchers have stopped their workers by then, and the template may still
                # be importing, when it would not read that the connection ended.
                atexit.register(process.terminate)
            self._starting.append(forked)
            self._conn.send(request)

    def _hear(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                if message[0] == "started":
                    forked = self._starting.popleft()
                    self._forked[message[1]] = forked
                    forked.call(forked.start, message[1])
                else:
                    _, pid, code = message
                    forked = self._forked.pop(pid)
                    forked.call(forked.end, code)
        # The template is gone. Its workers got SIGTERM, which cancels a job but leaves a worker
        # waiting for the next: they are stopped here, and a next fork starts a new template.
        with self._lock:
            for forked in self._starting:
                forked.call(forked.fail, RuntimeError("the worker template process died"))
            for forked in self._forked.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(forked.pid, signal.SIGKILL)
                forked.call(forked.end, -signal.SIGKILL)
            self._starting.clear()
            self._forked.clear()
            if self._conn is conn:
                self._conn = None


_TEMPLATE = _Template()


class _Forked:
    """A worker forked from the template, with the part of ``asyncio.subprocess.Process`` that
    ``_Child`` uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pid = 0
        self.started: asyncio.Future[int] = loop.create_future()
        self._ended: asyncio.Future[int] = loop.create_future()

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on this worker's event loop, from the template's reading thread."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(fn, *args)

    def start(self, pid: int) -> None:
        self.pid = pid
        self.started.set_result(pid)

    def fail(self, error: Exception) -> None:
        self.started.set_exception(error)

    def end(self, code: int) -> None:
        if not self._ended.done():
            self._ended.set_result(code)

    async def connect(self, stdin_fd: int, stdout_fd: int) -> None:
        self.stdout = asyncio.StreamReader(limit=_LINE_LIMIT)
        await self.loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.stdout),
            open(stdout_fd, "rb", 0),  # noqa: SIM115
        )
        transport, protocol = await self.loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin,
            open(stdin_fd, "wb", 0),  # noqa: SIM115
        )
        self.stdin = asyncio.StreamWriter(transport, protocol, None, self.loop)

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
        template: _Template | None = None,
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
            self.proc = await self.template.fork(self.command[-1], self.log_path, self.env)
        else:
            with open(self.log_path, "ab") as log_file:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log_file,
                    limit=_LINE_LIMIT,
                    env=self.env,
                    preexec_fn=template.die_with_parent,
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
        warm = not program and "cpu" in devices and sys.platform == "linux"  # Linux: fork, prctl
        self.template = _TEMPLATE if warm else None
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
            warm = self.template if device == "cpu" else None
            child = _Child(name, [*self.program, device], log_path, inbox, env, warm)
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
