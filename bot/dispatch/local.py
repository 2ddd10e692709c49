"""One ``python -m runner.worker DEVICE`` child process per device, spoken to in JSON lines.

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
import os
import re
import signal
import sys
import time
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


class _Child:
    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        inbox: asyncio.Queue[Message],
        env: dict[str, str],
    ):
        self.name, self.command, self.log_path, self.inbox, self.env = name, command, log_path, inbox, env
        self.proc: asyncio.subprocess.Process | None = None
        self.closing = False
        self.quick_deaths = 0
        self.reader: asyncio.Task | None = None
        self.ready = False  # a live process that has not died since it was started

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
            child = _Child(name, [*self.program, device], log_path, inbox, env)
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
