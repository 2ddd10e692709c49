"""Where jobs run. A dispatcher owns the workers and reports back through one asyncio queue.

``local`` runs ``python -m runner.worker DEVICE`` as a child process per configured device;
``ray`` runs the same `runner.worker.Worker` as a Ray actor per device. Either way the bot only
sends job dicts and reads `runner.spec` events: it never imports torch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from runner.spec import FINAL as FINAL  # the dispatchers and the scheduler import it from here
from runner.spec import parse_event

from ..config import Config


@dataclass
class WorkerEvent:
    worker: str
    job_id: int
    event: Any  # a runner.spec event


@dataclass
class WorkerDied:
    """A worker stopped on its own; the dispatcher starts a fresh one and says `ready` again then."""

    worker: str
    reason: str


Message = WorkerEvent | WorkerDied


class Dispatcher(Protocol):
    workers: list[str]

    async def start(self, inbox: asyncio.Queue[Message]) -> None: ...

    def ready(self, worker: str) -> bool:
        """Whether the worker can take a job now (False while a dead one is being replaced)."""

    async def send(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None: ...

    async def cancel(self, worker: str, job_id: int) -> None: ...

    def kill(self, worker: str) -> None:
        """Stop the worker at once (it is hung, or ignores a cancel); it is reported as `WorkerDied`
        and replaced like one that died on its own."""

    async def close(self) -> None: ...


def event_of(data: dict[str, Any]) -> tuple[int | None, Any]:
    """(job id, event) from one worker line already read as JSON."""
    data = dict(data)
    job = data.pop("job", None)
    return job, parse_event(data)


def make_dispatcher(cfg: Config) -> Dispatcher:
    if cfg.workers.dispatch == "ray":
        from .raycluster import RayDispatcher  # Ray is an optional extra

        return RayDispatcher(cfg.workers.devices, cfg.ray.address, cfg.ray.num_cpus, cfg.data_dir)
    from .local import LocalDispatcher

    return LocalDispatcher(cfg.workers.devices, cfg.data_dir / "logs")
