"""Workers as Ray actors (``dispatch = "ray"``): one `runner.worker.Worker` per configured device,
with ``num_gpus=1`` for a CUDA device, so the bot stays one process while GPUs sit on other machines.

A job's folders travel with it: the folders its spec names (dataset, LoRA folder, and the output
folder of a job that resumes) are sent as bytes, the actor works in a temporary folder of its own
node, and every file it writes comes back with the event that announces it (a streaming
generator), into the bot's data folder; event paths are rewritten to the bot's. Nodes need
loracord installed and the base checkpoints at the same paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from . import Message, WorkerDied, WorkerEvent, event_of

log = logging.getLogger(__name__)
FOLDER_KEYS = ("train_data_dir", "lora_dir", "output_dir")  # spec keys that name folders
Files = dict[str, bytes]  # path relative to its folder → content


def pack(folder: Path) -> Files:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def unpack(files: Files, folder: Path) -> None:
    for rel, data in files.items():
        path = (folder / rel).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ValueError(f"refusing to write {rel} outside {folder}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _rewrite(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new + value[len(old) :] if value.startswith(old) else value
    if isinstance(value, list):
        return [_rewrite(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v, old, new) for k, v in value.items()}
    return value


class RayWorker:
    """The actor: the worker's events as a stream, each preceded by the files written since the last."""

    def __init__(self, device: str):
        from runner.worker import Worker

        self.worker = Worker(device)

    def run(self, job: dict[str, Any], folders: dict[str, Files]) -> Iterator[dict[str, Any]]:
        # The same folder on every attempt: a resumed run must see the same paths as the first.
        key = hashlib.sha256(job["spec"]["output_dir"].encode()).hexdigest()[:16]
        root = Path(tempfile.gettempdir()) / f"loracord-job-{key}"
        shutil.rmtree(root, ignore_errors=True)
        spec = dict(job["spec"])
        for key in FOLDER_KEYS:
            if spec.get(key):
                local = root / key
                local.mkdir(parents=True)
                unpack(folders.get(key, {}), local)
                spec[key] = str(local)
        out = Path(spec["output_dir"])
        seen = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        events: queue.Queue[Any] = queue.Queue()

        def work() -> None:
            try:
                self.worker.run({**job, "spec": spec}, events.put)
            finally:
                events.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (event := events.get()) is not None:
                if event.type != "progress":  # files are written before the event that names them
                    yield self._files(out, seen)
                yield {"event": event.model_dump(mode="json"), "local_out": str(out)}
        finally:
            thread.join()
            shutil.rmtree(root, ignore_errors=True)

    @staticmethod
    def _files(out: Path, seen: dict[Path, int]) -> dict[str, Any]:
        changed: Files = {}
        for p in out.rglob("*"):
            if p.is_file() and seen.get(p) != p.stat().st_mtime_ns:
                seen[p] = p.stat().st_mtime_ns
                changed[str(p.relative_to(out))] = p.read_bytes()
        return {"files": changed}

    def cancel(self, job_id: Any) -> None:
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

    def _actor(self, device: str) -> Any:
        gpu = device.startswith("cuda")
        # Ray gives the actor its GPU as the only visible one, so inside it is plain "cuda".
        cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_concurrency=4)(RayWorker)
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

    async def _stream(self, worker: str, job_id: int, kind: str, spec: dict[str, Any]) -> None:
        assert self.inbox is not None
        actor = self.actors[worker]
        folders = await asyncio.to_thread(
            lambda: {k: pack(Path(spec[k])) for k in FOLDER_KEYS if spec.get(k)}
        )
        out = Path(spec["output_dir"])
        job = {"type": kind, "id": job_id, "spec": spec}
        try:
            async for ref in actor.run.remote(job, folders):
                item = await ref
                if "files" in item:
                    await asyncio.to_thread(unpack, item["files"], out)
                    continue
                data = _rewrite(item["event"], item["local_out"], str(out))
                _, event = event_of({"job": job_id, **data})
                self.inbox.put_nowait(WorkerEvent(worker, job_id, event))
        except ray.exceptions.RayActorError as e:
            if self.actors.get(worker) is actor:  # the first of its jobs to notice replaces it
                self.actors[worker] = self._actor(self.devices[worker])
                reason = f"Ray actor died: {str(e).splitlines()[0][:300]}"
                log.error("worker %s: %s", worker, reason)
                self.inbox.put_nowait(WorkerDied(worker, reason))

    async def cancel(self, worker: str, job_id: int) -> None:
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
