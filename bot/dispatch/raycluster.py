"""Workers as Ray actors (``dispatch = "ray"``): one `runner.worker.Worker` per configured device,
with ``num_gpus=1`` for a CUDA device, so the bot stays one process while GPUs sit on other machines.

What a job names travels with it, so a node needs no disk shared with the bot: the folders its
spec names (dataset, LoRA folder, the output folder of a job that resumes) and each LoRA file a
gen job names by path are copied into a folder of the job's own on the actor's node, and the
worker gets a spec that names those copies. Files the job writes in those folders (a run's LoRAs
and samples, a gen job's images, a tag job's captions) come back into the bot's folders before
the event that names them, and event paths are rewritten to the bot's.

Bytes move in chunks of `CHUNK_BYTES` both ways, so the bot never holds a whole dataset or LoRA
in memory. Up: one awaited actor call per chunk; Ray passes an argument over 100 KB through its
object store and releases it when the call returns, so one chunk is in flight. Down: the run is a
Ray generator, which Ray documents for streaming a task's output without holding it whole; it
yields each changed file chunk by chunk, then the event. Copying even when the node could see the
bot's disk is deliberate: nothing tells the bot which nodes see its paths, and a wrong guess would
train on missing files.

The base model is not sent (checkpoints are gigabytes): its name resolves on the node, so nodes
need loracord installed and the base checkpoints (and a tagger folder, if one is configured) at
the same paths as the bot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from runner.spec import FailedEvent

from . import FINAL, Message, WorkerDied, WorkerEvent, event_of

log = logging.getLogger(__name__)
FOLDER_KEYS = ("train_data_dir", "lora_dir", "output_dir")  # spec keys that name folders
# Large enough that the cost of one call per chunk is small next to moving it, small enough that
# a chunk in flight is nothing next to the bot's own memory.
CHUNK_BYTES = 4 * 2**20
# A job that never ran is charged nothing.
NOT_STARTED = FailedEvent(kind="cancelled", reason="cancelled before it started", seconds=0.0)


@dataclass(frozen=True)
class Place:
    """A file or folder a job's spec names: ``path`` on the bot, ``rel`` in the job's folder on
    its node. A folder's new and changed files come back when the job ends or emits an event."""

    rel: str
    path: str
    folder: bool


def places(spec: dict[str, Any]) -> list[Place]:
    found = [Place(key, spec[key], True) for key in FOLDER_KEYS if spec.get(key)]
    for i, lora in enumerate(spec.get("loras") or []):
        name = Path(lora["name"])
        if name.suffix.lower() == ".safetensors":  # a bare name is looked up in lora_dir, which travels
            found.append(Place(f"loras/{i}/{name.name}", lora["name"], False))
    return found


def rewrite(value: Any, moves: dict[str, str]) -> Any:
    """``value`` (a spec or an event) with every path at or under a key of ``moves`` moved to its value."""
    if isinstance(value, str):
        for old, new in moves.items():
            if value == old or value.startswith(old + os.sep):
                return new + value[len(old) :]
        return value
    if isinstance(value, list):
        return [rewrite(v, moves) for v in value]
    if isinstance(value, dict):
        return {k: rewrite(v, moves) for k, v in value.items()}
    return value


def chunks(path: Path, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, bytes, last) through a file; the last chunk is short, so it may be empty."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(size)
            last = len(data) < size
            yield offset, data, last
            if last:
                return
            offset += len(data)


def write_chunk(root: Path, rel: str, offset: int, data: bytes, last: bool) -> None:
    """Write one chunk of file ``rel`` under ``root``. The file takes its name only with its last
    chunk, so a half-sent file (a transfer cut by a dead actor) is never taken for a whole one."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write {rel} outside {root}")
    # A fixed-length name: the file's own name plus a suffix could pass the 255-byte limit.
    part = path.with_name(f".{hashlib.sha256(path.name.encode()).hexdigest()[:16]}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)
    if last:
        os.replace(part, path)


class RayWorker:
    """The actor: receives a job's files, then runs it as a stream of its events, each preceded by
    the chunks of the files written since the last."""

    def __init__(self, device: str):
        from runner.worker import Worker

        self.worker = Worker(device)
        self.cancelled: set[Any] = set()
        # Held while a job that is not served between training steps runs: the next one waits for
        # it (its final event may be out while its thread is still returning), as `serve` does.
        self.main = threading.Lock()

    @staticmethod
    def _root(key: str) -> Path:
        return Path(tempfile.gettempdir()) / f"loracord-job-{key}"

    def discard(self, key: str) -> None:
        shutil.rmtree(self._root(key), ignore_errors=True)

    def receive(self, key: str, rel: str, offset: int, data: bytes, last: bool) -> None:
        write_chunk(self._root(key), rel, offset, data, last)

    def run(self, job: dict[str, Any], key: str, moved: list[Place], chunk_bytes: int) -> Iterator[dict]:
        root = self._root(key)
        job_id = job["id"]
        thread: threading.Thread | None = None
        try:
            for place in moved:
                if place.folder:
                    (root / place.rel).mkdir(parents=True, exist_ok=True)
            spec = rewrite(job["spec"], {p.path: str(root / p.rel) for p in moved})
            back = {str(root / p.rel): p.path for p in moved}
            folders = [(i, root / p.rel) for i, p in enumerate(moved) if p.folder]
            seen = {f: f.stat().st_mtime_ns for _, d in folders for f in d.rglob("*") if f.is_file()}
            if job_id in self.cancelled:  # the cancel came before this call
                yield {"event": NOT_STARTED.model_dump(mode="json")}
                return
            events: queue.Queue[Any] = queue.Queue()
            between = job["type"] != "train" and self.worker.training

            def work() -> None:
                try:
                    if between:
                        self.worker.run({**job, "spec": spec}, events.put)
                    else:
                        with self.main:
                            self.worker.run({**job, "spec": spec}, events.put)
                finally:
                    events.put(None)

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while (event := events.get()) is not None:
                if job_id in self.cancelled:
                    # A cancel that reached the worker before the job did was dropped there (the
                    # job starts by clearing its cancel flag); it is given again once the job runs.
                    self.worker.cancel(job_id)
                if event.type != "progress":  # files are written before the event that names them
                    yield from self._changed(folders, seen, chunk_bytes)
                yield {"event": rewrite(event.model_dump(mode="json"), back)}
        finally:
            if thread is not None:
                thread.join()
            self.cancelled.discard(job_id)
            shutil.rmtree(root, ignore_errors=True)

    @staticmethod
    def _changed(folders: list[tuple[int, Path]], seen: dict[Path, int], size: int) -> Iterator[dict]:
        for place, folder in folders:
            for f in sorted(folder.rglob("*")):
                if not f.is_file() or seen.get(f) == (mtime := f.stat().st_mtime_ns):
                    continue
                seen[f] = mtime
                rel = f.relative_to(folder).as_posix()
                for offset, data, last in chunks(f, size):
                    yield {"place": place, "rel": rel, "offset": offset, "data": data, "last": last}

    def cancel(self, job_id: Any) -> None:
        self.cancelled.add(job_id)
        self.worker.cancel(job_id)


class RayDispatcher:
    def __init__(self, devices: list[str], address: str | None, num_cpus: int | None, data_dir: Path):
        self.address, self.num_cpus, self.data_dir = address, num_cpus, data_dir
        self.workers = [f"{i}:{d}" for i, d in enumerate(devices)]
        self.devices = dict(zip(self.workers, devices, strict=True))
        self.actors: dict[str, Any] = {}
        self.tasks: set[asyncio.Task] = set()
        self.inbox: asyncio.Queue[Message] | None = None
        self.own_ray = False
        self.chunk_bytes = CHUNK_BYTES
        self.cancelled: set[int] = set()  # jobs cancelled while they may still be uploading

    def _actor(self, device: str) -> Any:
        gpu = device.startswith("cuda")
        # Ray gives the actor its GPU as the only visible one, so inside it is plain "cuda". Calls
        # run side by side: a training run, a short job between its steps, cancels, uploads.
        cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_concurrency=8)(RayWorker)
        return cls.remote("cuda" if gpu else "cpu")

    async def start(self, inbox: asyncio.Queue[Message]) -> None:
        self.inbox = inbox
        if not ray.is_initialized():
            self.own_ray = True
            kwargs = {"num_cpus": self.num_cpus} if self.address is None and self.num_cpus else {}
            await asyncio.to_thread(
                ray.init, address=self.address, include_dashboard=False, log_to_driver=False, **kwargs
            )
        self.actors = {w: self._actor(d) for w, d in self.devices.items()}

    def ready(self, worker: str) -> bool:
        return worker in self.actors

    async def send(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None:
        task = asyncio.create_task(self._stream(worker, job_id, kind, spec))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _emit(self, worker: str, job_id: int, event: Any) -> None:
        assert self.inbox is not None
        self.inbox.put_nowait(WorkerEvent(worker, job_id, event))

    async def _stream(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None:
        actor = self.actors[worker]
        # The same folder on every attempt (a resumed run must see the paths of the first), and
        # another bot's job of the same id on a shared cluster gets its own.
        key = hashlib.sha256(f"{self.data_dir.resolve()}\0{job_id}".encode()).hexdigest()[:16]
        # A LoRA gone from the bot stays unmoved: the worker then reports it missing, as locally.
        moved = [p for p in places(spec) if p.folder or Path(p.path).is_file()]
        ended = started = False
        try:
            await actor.discard.remote(key)  # what a killed attempt left on that node
            for place in moved:
                await self._upload(actor, key, place, job_id)
            if job_id in self.cancelled:
                actor.discard.remote(key)
                self._emit(worker, job_id, NOT_STARTED)
                return
            job = {"type": kind, "id": job_id, "spec": spec}
            started = True
            async for ref in actor.run.remote(job, key, moved, self.chunk_bytes):
                item = await ref
                if "event" not in item:
                    folder = Path(moved[item["place"]].path)
                    await asyncio.to_thread(
                        write_chunk, folder, item["rel"], item["offset"], item["data"], item["last"]
                    )
                    continue
                _, event = event_of({"job": job_id, **item["event"]})
                ended = ended or event.type in FINAL
                self._emit(worker, job_id, event)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            # The actor or its node is gone (a lost stream object means its node went down). The
            # scheduler requeues every job of a dead worker, so this job needs no event of its own.
            ended = True
            if self.actors.get(worker) is actor:  # the first of its jobs to notice replaces it
                ray.kill(actor)  # an actor only unreachable for now must not train on beside its successor
                self.actors[worker] = self._actor(self.devices[worker])
                reason = f"Ray actor died: {str(e).splitlines()[0][:300]}"
                log.error("worker %s: %s", worker, reason)
                assert self.inbox is not None
                self.inbox.put_nowait(WorkerDied(worker, reason))
        except Exception as e:  # a file that cannot be read or written, here or on the node
            log.exception("job %s on %s", job_id, worker)
            ended = True
            # Failed here, the job must not run on there beside the next one, nor leave its files.
            if started:
                actor.cancel.remote(job_id)
            else:
                actor.discard.remote(key)
            cause = getattr(e, "cause", None) or e  # a RayTaskError carries the node's exception
            reason = f"the job's files could not be moved: {type(cause).__name__}: {cause}"[:400]
            self._emit(worker, job_id, FailedEvent(kind="error", reason=reason))
        finally:
            self.cancelled.discard(job_id)
        if not ended:
            reason = "the Ray worker ended the job without a result"
            self._emit(worker, job_id, FailedEvent(kind="error", reason=reason))

    async def _upload(self, actor: Any, key: str, place: Place, job_id: int) -> None:
        source = Path(place.path)
        if not place.folder:
            files = [(source, place.rel)]
        else:
            found = await asyncio.to_thread(lambda: sorted(source.rglob("*")) if source.is_dir() else [])
            files = [(f, f"{place.rel}/{f.relative_to(source).as_posix()}") for f in found if f.is_file()]
        for path, rel in files:
            reader = chunks(path, self.chunk_bytes)
            # Each chunk is read off the event loop and sent before the next is read.
            while (chunk := await asyncio.to_thread(next, reader, None)) is not None:
                if job_id in self.cancelled:
                    reader.close()
                    return
                await actor.receive.remote(key, rel, *chunk)

    async def cancel(self, worker: str, job_id: int) -> None:
        self.cancelled.add(job_id)
        self.actors[worker].cancel.remote(job_id)

    def kill(self, worker: str) -> None:
        ray.kill(self.actors[worker])

    async def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.actors = {}
        if self.own_ray:
            ray.shutdown()
